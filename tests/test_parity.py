"""Parity of the Flax CAV-MAE models with the PyTorch reference of the original (float32, CPU).

The weights, inputs, mask noise and comparisons are tests/parity.py's (shared with the GPU
check): every output must agree within 1e-5 max abs. The negative controls (LayerNorm eps 1e-6,
tanh GELU in the reference) exceed the tolerance by orders of magnitude.

Model: the tiny preset with 256 audio frames and 64 x 64 images. Two loss configurations
(norm_pix_loss on/off, single/bidirectional contrast, contrast groups off/on), each with every
audio mask mode; one jitted call per configuration also runs inpaint and features. Then the
AV-MAE, vanilla AV-MAE and CAV variants, two joint blocks, and the five fine-tuning modes with
features (one jitted call). The base-config comparison: `python -m tests.parity --base`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests compare against the PyTorch reference")

import jax  # noqa: E402

from cav_mae_jax import models  # noqa: E402
from cav_mae_jax.convert import state_dict as sd  # noqa: E402
from cav_mae_jax.models import pos_embed as flax_pos_embed  # noqa: E402

import torch_reference as tr  # noqa: E402  (pytest puts tests/ on sys.path)
from parity import (BATCH, BF16_LOSSES, GROUP, INPAINT_GROUP_DEPENDENT, TOLERANCE,  # noqa: E402
                    BF16_GRAD_RELATIVE_TOLERANCE, GRAD_CHECK_DEPTHS, assert_parity, base_failures,
                    build_reference,
                    compare_bf16_attention, compare_bf16_attention_grads,
                    compare_original, load_original,
                    copy_weights, flax_finetune_fn, flax_params, flax_pretrain_fn, make_inputs,
                    make_noise, max_abs_diffs, nchw, reference_forward_kwargs, reference_kwargs,
                    tiny_config, to_torch, torch_finetune_outputs, torch_pretrain_outputs)


# ----------------------------------------------------------------------------- pretraining

# Two configurations cover each loss option on and off; each runs every audio mask mode. With
# explicit noise the mask depends only on the noise (mask_mode_a picks the noise generator), so
# one compiled function per configuration serves all four modes.
PRETRAIN_CONFIGS = {
    "normpix-single": dict(norm_pix_loss=True),  # also runs the features method
    "pixels-bidirectional-groups": dict(norm_pix_loss=False, contrast_bidirectional=True,
                                        contrast_group_size=GROUP),
}


class PretrainCases:
  """Builds the shared reference/params once and each configuration's jitted function lazily."""

  def __init__(self):
    self.cfg = tiny_config()
    self.reference = build_reference(self.cfg)
    self.params = flax_params(self.reference, self.cfg)
    self.audio, self.image = make_inputs(self.cfg, BATCH, near_flat=True)
    self._fns: dict[str, Any] = {}
    self._results: dict[tuple[str, str], tuple[dict, dict, tuple]] = {}

  def config(self, name: str, mode: str) -> models.ModelConfig:
    return dataclasses.replace(self.cfg, mask_mode_a=mode, **PRETRAIN_CONFIGS[name])

  def run(self, name: str, mode: str) -> tuple[dict, dict, tuple]:
    """(flax outputs, torch outputs, (noise_a, noise_v)) for one configuration and mask mode."""
    if (name, mode) not in self._results:
      cfg = self.config(name, mode)
      with_features = name == "normpix-single"
      if name not in self._fns:
        self._fns[name] = flax_pretrain_fn(cfg, with_features)
      noise = make_noise(cfg, BATCH, seed=models.MASK_MODES.index(mode))
      self.reference.norm_pix_loss = cfg.norm_pix_loss  # a loss flag only; the weights are shared
      try:
        torch_out = torch_pretrain_outputs(self.reference, cfg, self.audio, self.image, *noise, with_features)
      finally:
        self.reference.norm_pix_loss = self.cfg.norm_pix_loss
      flax_out = self._fns[name](self.params, self.audio, self.image, *noise)
      self._results[(name, mode)] = (flax_out, torch_out, noise)
    return self._results[(name, mode)]


@pytest.fixture(scope="module")
def pretrain():
  return PretrainCases()


@pytest.mark.parametrize("mode", models.MASK_MODES)
@pytest.mark.parametrize("name", list(PRETRAIN_CONFIGS))
def test_pretraining_matches(pretrain, name, mode):
  """Losses, c_acc, masks, reconstructions, encoder outputs, inpaint and features agree."""
  flax_out, torch_out, _ = pretrain.run(name, mode)
  if pretrain.config(name, mode).contrast_group_size:  # see test_inpaint_losses_ignore_groups
    torch_out = {k: v for k, v in torch_out.items() if k not in INPAINT_GROUP_DEPENDENT}
  assert_parity(max_abs_diffs(flax_out, torch_out))
  assert float(torch_out["loss_c"]) > 0 and float(torch_out["loss_mae"]) > 0


@pytest.mark.parametrize("mode, axis", [("time", 1), ("freq", 2), ("tf", None)])
def test_structured_masks_remove_whole_rows_or_columns(pretrain, mode, axis):
  """The compared masks really are structured (so the mode cases test what they claim)."""
  _, torch_out, _ = pretrain.run("normpix-single", mode)
  rows, cols = pretrain.cfg.audio_grid
  mask = torch_out["mask_a"].numpy().reshape(BATCH, rows, cols).astype(bool)
  whole_cols, whole_rows = mask.all(axis=1), mask.all(axis=2)
  assert (whole_cols.any(axis=1) if mode != "freq" else whole_rows.any(axis=1)).all(), mode
  if axis is not None:  # nothing but whole columns (time) or whole rows (freq) is removed
    full = whole_cols[:, None, :] if mode == "time" else whole_rows[:, :, None]
    assert (mask == np.broadcast_to(full, mask.shape)).all(), mode


def test_inpaint_losses_ignore_groups(pretrain):
  flax_out, torch_out, _ = pretrain.run("pixels-bidirectional-groups", "unstructured")
  names = INPAINT_GROUP_DEPENDENT
  assert_parity(max_abs_diffs({k: flax_out[k] for k in names}, {k: torch_out[k] for k in names}))


# The paper's other variants (Table 1): loss terms switched off change which parts run.
VARIANTS = {
    "avmae": dict(lambda_c=0.0),
    "vanilla-avmae": dict(lambda_c=0.0, modality_specific_depth=0),
    "cav": dict(lambda_mae=0.0),
}
DECODER_PREFIXES = ("decoder_", "mask_token")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pretraining_variant_matches(variant):
  cfg = tiny_config(**VARIANTS[variant])
  reference = build_reference(cfg, seed=7)
  params = flax_params(reference, cfg, dropped=() if cfg.has_decoder else DECODER_PREFIXES)
  audio, image = make_inputs(cfg, BATCH, seed=8)
  noise = make_noise(cfg, BATCH, seed=9)
  fn = jax.jit(lambda p, a, v, na, nv: models.CAVMAE(cfg).apply(
      {"params": p}, a, v, noise_a=na, noise_v=nv, return_details=True))
  flax_out = jax.device_get(fn(params, audio, image, *noise))
  with torch.no_grad():
    torch_out = reference.forward_details(to_torch(audio), nchw(image), noise_a=to_torch(noise[0]),
                                          noise_v=to_torch(noise[1]), **reference_forward_kwargs(cfg))
  names = ["loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc", "mask_a", "mask_v"]
  names += ["pred_a", "pred_v"] if cfg.has_decoder else []
  assert set(flax_out) == set(names)
  assert_parity(max_abs_diffs(flax_out, {k: torch_out[k] for k in names}))
  assert (float(flax_out["loss_c"]) == 0) == (not cfg.has_contrast)
  assert (float(flax_out["loss_mae"]) == 0) == (not cfg.has_decoder)


def test_two_joint_blocks_chain_the_contrastive_streams():
  """With joint depth > 1 the Flax model chains the joint blocks on the audio/video streams.

  The original's pretraining forward keeps only the last joint block's output there (its
  `for blk in blocks_u: ca = blk(a, 'a')`); the paper's models have one joint block, where both agree.
  """
  cfg = tiny_config(modality_specific_depth=1)
  reference = build_reference(cfg, seed=11, unchained_joint_streams=False)
  params = flax_params(reference, cfg)
  audio, image = make_inputs(cfg, BATCH, seed=12)
  noise = make_noise(cfg, BATCH, seed=13)
  fn = jax.jit(lambda p, a, v, na, nv: models.CAVMAE(cfg).apply({"params": p}, a, v, noise_a=na, noise_v=nv))
  flax_out = jax.device_get(fn(params, audio, image, *noise))
  kwargs = dict(noise_a=to_torch(noise[0]), noise_v=to_torch(noise[1]), **reference_forward_kwargs(cfg))
  with torch.no_grad():
    chained = reference.forward_details(to_torch(audio), nchw(image), **kwargs)
    reference.unchained_joint_streams = True
    original = reference.forward_details(to_torch(audio), nchw(image), **kwargs)
  names = ("loss", "loss_c", "c_acc", "loss_mae")
  assert_parity(max_abs_diffs({k: flax_out[k] for k in names}, {k: chained[k] for k in names}))
  assert abs(float(original["loss_c"]) - float(chained["loss_c"])) > 1e-4


def test_contrast_groups_change_the_objective(pretrain):
  """Groups are a different objective: summed per-group losses, not whole-batch ones."""
  _, torch_groups, noise = pretrain.run("pixels-bidirectional-groups", "unstructured")
  cfg = dataclasses.replace(pretrain.config("pixels-bidirectional-groups", "unstructured"), contrast_group_size=0)
  pretrain.reference.norm_pix_loss = False
  try:
    torch_whole = torch_pretrain_outputs(pretrain.reference, cfg, pretrain.audio, pretrain.image, *noise, False)
  finally:
    pretrain.reference.norm_pix_loss = pretrain.cfg.norm_pix_loss
  ratio = float(torch_groups["loss_mae"]) / float(torch_whole["loss_mae"])
  assert abs(ratio - BATCH // GROUP) < 0.5  # about n_groups times the whole-batch mean
  assert abs(float(torch_groups["loss_c"]) - float(torch_whole["loss_c"])) > 1e-3


def test_reference_base_counts_match_the_original():
  """The reference's architecture: the original's element counts (docs/original.md), on the meta device."""
  with torch.device("meta"):
    pretrain_model, finetune_model = tr.CAVMAE(), tr.CAVMAEFT(527)
  assert tr.count_elements(pretrain_model) == 191_036_160
  assert tr.count_elements(pretrain_model, trainable_only=True) == 190_129_920
  assert tr.count_elements(finetune_model) == 164_907_023
  for reference, finetune in ((pretrain_model, False), (finetune_model, True)):  # same tree as the Flax model
    sizes = {sd.torch_key_to_path(k, v.ndim)[0]: v.numel() for k, v in reference.state_dict().items()}
    flax_sizes = {path: int(np.prod(leaf.shape)) for path, leaf in
                  sd.flatten_params(models.param_shapes(models.model_config("base"), finetune)).items()}
    assert sizes == flax_sizes


@pytest.mark.parametrize("finetune", [False, True], ids=["pretraining", "finetuning"])
def test_initialization_draws_every_parameter_as_the_original(finetune):
  """A random start: each parameter is the reference's constant (zeros, ones, the sin-cos
  tables) where the original sets one, else a draw of the same spread (std within 25%; the
  tiny model's draws, seeds fixed, are within 10%). The original keeps torch's default uniform
  bias of the patch convs; a zero there (as ours was) fails."""
  cfg = tiny_config()
  torch.manual_seed(0)
  reference = (tr.CAVMAEFT(cfg.num_classes, **reference_kwargs(cfg, True)) if finetune
               else tr.CAVMAE(**reference_kwargs(cfg)))
  theirs = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  ours = sd.flax_to_torch(jax.device_get(models.init_params(cfg, jax.random.key(0),
                                                            finetune=finetune)))
  assert set(ours) == set(theirs)
  for key, expected in theirs.items():
    mine = ours[key]
    assert mine.shape == expected.shape, key
    if np.all(expected == expected.flat[0]) or np.all(mine == mine.flat[0]):
      np.testing.assert_array_equal(mine, expected, err_msg=key)
    elif key.startswith(("pos_embed", "decoder_pos_embed")):
      np.testing.assert_allclose(mine, expected, atol=1e-7, err_msg=key)
    else:
      assert 0.75 < mine.std() / expected.std() < 1.33, (key, mine.std(), expected.std())


def test_position_embedding_tables_match():
  for dim, rows, cols in ((64, 8, 16), (32, 4, 4), (768, 8, 64), (512, 14, 14)):
    mine = flax_pos_embed.sincos_2d(dim, rows, cols)
    theirs = tr.sincos_pos_embed_2d(dim, rows, cols).astype(np.float32)
    np.testing.assert_array_equal(mine, theirs)


# ----------------------------------------------------------------------------- negative controls


@pytest.mark.parametrize("change", [dict(layer_norm_eps=1e-6), dict(gelu_approximate="tanh")],
                         ids=["layernorm-eps-1e-6", "tanh-gelu"])
def test_negative_control_breaks_parity(pretrain, change):
  """The same comparison with one numerical change in the reference fails the tolerance clearly."""
  flax_out, _, noise = pretrain.run("normpix-single", "unstructured")
  cfg = pretrain.config("normpix-single", "unstructured")
  changed = copy_weights(pretrain.reference, tr.CAVMAE(**reference_kwargs(cfg, **change)))
  diffs = max_abs_diffs(flax_out, torch_pretrain_outputs(changed, cfg, pretrain.audio, pretrain.image, *noise))
  for name in ("latent", "latent_a", "latent_v", "pred_a", "pred_v", "features/a", "features/v"):
    assert diffs[name] > 10 * TOLERANCE, (name, diffs)


# ----------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def finetune():
  cfg = tiny_config(num_classes=7, trainable_pos_embed=True)
  reference = build_reference(cfg, finetune=True, seed=3)
  params = flax_params(reference, cfg, finetune=True)
  audio, image = make_inputs(cfg, 2, seed=4)
  return cfg, flax_finetune_fn(cfg)(params, audio, image), torch_finetune_outputs(reference, audio, image)


@pytest.mark.parametrize("mode", models.FT_MODES)
def test_finetuning_mode_matches(finetune, mode):
  cfg, flax_out, torch_out = finetune
  assert flax_out[mode].shape == (2, cfg.num_classes)
  assert_parity(max_abs_diffs({mode: flax_out[mode]}, {mode: torch_out[mode]}))


def test_finetuning_features_match(finetune):
  _, flax_out, torch_out = finetune
  names = ("features/a", "features/v")
  assert_parity(max_abs_diffs({k: flax_out[k] for k in names}, {k: torch_out[k] for k in names}))


def test_finetuning_modes_differ(finetune):
  """The five modes are distinct computations (so each parity case checks its own path)."""
  _, _, torch_out = finetune
  logits = [torch_out[m].numpy() for m in models.FT_MODES]
  for i in range(len(logits)):
    for j in range(i + 1, len(logits)):
      assert np.max(np.abs(logits[i] - logits[j])) > 1e-3, (models.FT_MODES[i], models.FT_MODES[j])


# ----------------------------------------------------------------------------- the GPU check's machinery


def test_bf16_comparison_of_another_attention():
  """The machinery gpu_check runs with cuDNN attention on a GPU, here with XLA's on the CPU
  (compare_base's bf16 entries come from the same `_pretrain_case` and `_bf16_losses`)."""
  other = compare_bf16_attention("xla", preset="tiny")
  assert set(other) == {f"pretrain-bf16-xla/{k}" for k in BF16_LOSSES}
  assert all(diff > 0 for diff, _ in other.values())  # bfloat16 against float32: not identical
  assert not base_failures(other)
  assert base_failures({"pretrain-bf16-cudnn/loss": (0.5, 1.0)}) == {"pretrain-bf16-cudnn/loss": 0.5}


def test_bf16_gradients_of_another_attention(monkeypatch):
  """gpu_check's gradient comparison of cuDNN attention, here on the CPU with JAX's call routed
  to its XLA implementation: the padded odd-length streams' gradients lie within the tolerance
  of plain attention's, and a backward pass that drops the keys' gradient does not."""
  from cav_mae_jax.models import vit  # pylint: disable=g-import-not-at-top
  # 5 x 5 image patches, 11 kept: video, joint (32 + 11) and decoder (128 + 25) streams are odd;
  # in gpu_check's depths.
  odd = dict(image_size=80, mask_ratio_v=0.55, **GRAD_CHECK_DEPTHS)
  assert compare_bf16_attention_grads("xla", preset="tiny", **odd) == 0.0
  jax_attention = jax.nn.dot_product_attention
  seen = []

  def on_cpu(q, k, v, **kwargs):
    seen.append((q.shape[1], kwargs.get("query_seq_lengths") is not None))
    return jax_attention(q, k, v, **{**kwargs, "implementation": "xla"})
  monkeypatch.setattr(jax.nn, "dot_product_attention", on_cpu)
  padded = compare_bf16_attention_grads("cudnn", preset="tiny", **odd)
  # The padded path ran (`seen`); its rounding may differ from plain attention's or not, with
  # the JAX version and XLA flags (under this suite's flags JAX 0.10.2 differs, 0.11.2 does not).
  assert 0 <= padded < BF16_GRAD_RELATIVE_TOLERANCE
  assert set(seen) == {(12, True), (44, True), (154, True), (32, False)}  # odd ones padded

  def wrong_backward(q, k, v, implementation="cudnn"):
    return jax.nn.dot_product_attention(q, jax.lax.stop_gradient(k), v, scale=q.shape[-1]**-0.5,
                                        implementation=implementation)
  monkeypatch.setattr(vit, "fused_attention", wrong_backward)
  wrong = compare_bf16_attention_grads("cudnn", preset="tiny", **odd)
  assert wrong > BF16_GRAD_RELATIVE_TOLERANCE


# ----------------------------------------------------------------------------- --original


def test_compare_original_machinery(tmp_path):
  """`python -m tests.parity --original DIR` runs the original's own model code, which CI does not
  have; here a stand-in with the original's package layout and API (the torch reference: it draws
  its mask noise with torch.rand when given none, as the original does) checks the machinery: the
  package import, the noise handed to torch.rand, the converter and every comparison."""
  package = tmp_path / "src" / "models"
  package.mkdir(parents=True)
  (package / "__init__.py").write_text("from .cav_mae import CAVMAE, CAVMAEFT\n")
  (package / "cav_mae.py").write_text("from torch_reference import CAVMAE, CAVMAEFT\n")
  results = compare_original(load_original(str(tmp_path)), norm_pix_losses=(True,))
  assert {name.split("/")[0] for name in results} == {"pretrain-norm_pix=True", "finetune"}
  assert len(results) == 16 + 7
  assert not base_failures(results), results


def test_compare_original_errors(tmp_path, capsys):
  import parity  # pylint: disable=import-outside-toplevel
  assert parity.main(["--original", str(tmp_path)]) == 2
  (tmp_path / "models").mkdir()
  (tmp_path / "models" / "__init__.py").write_text("import timm_that_is_missing\n")
  (tmp_path / "models" / "cav_mae.py").write_text("")
  assert parity.main(["--original", str(tmp_path)]) == 2
  errors = capsys.readouterr().err.splitlines()
  assert errors == [
      f"error: --original {tmp_path}: no src/models/cav_mae.py or models/cav_mae.py (a checkout "
      "of github.com/YuanGongND/cav-mae)",
      f"error: --original {tmp_path}: the original's model code needs timm_that_is_missing (pip "
      "install timm==0.4.5 torchvision)"]
