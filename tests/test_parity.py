"""Parity of the Flax CAV-MAE models with the PyTorch reference of the original (float32, CPU).

Same weights (reference init, perturbed, -> state dict -> `torch_to_flax`) and the same mask
noise (`cav_mae_jax.models.mask_noise`) on both sides; every output must agree within 1e-5 max
abs. The test weights are the original's init with every LayerNorm scale/bias and every bias
perturbed (so a dropped or transposed bias cannot hide behind zeros) and the input embeddings
(patch kernels, position and modality embeddings) scaled by 1e-2, so that the first LayerNorm
of every stream sees low-variance tokens, where its epsilon matters. The negative controls
(LayerNorm eps 1e-6, tanh GELU in the reference) then exceed the tolerance by orders of magnitude.

Model: the tiny preset with 256 audio frames and 64 x 64 images. Configurations are covered pairwise, one compile each: every audio mask mode, norm_pix_loss on
and off, single and bidirectional contrast, contrast groups on and off.

Run the base-config comparison once (not part of the suite; a minute or more on CPU):
  python -m tests.test_parity --base
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests compare against the PyTorch reference")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cav_mae_jax import models  # noqa: E402
from cav_mae_jax.convert import state_dict as sd  # noqa: E402
from cav_mae_jax.models import pos_embed as flax_pos_embed  # noqa: E402

try:  # pytest puts tests/ on sys.path; `python -m tests.test_parity` has the repo root instead.
  import torch_reference as tr  # noqa: E402
except ModuleNotFoundError:
  from tests import torch_reference as tr  # noqa: E402

TOLERANCE = 1e-5
BATCH = 4
GROUP = 2
EMBED_SCALE = 1e-2
PRETRAIN_OUTPUTS = ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc", "mask_a",
                    "mask_v", "pred_a", "pred_v", "latent", "latent_a", "latent_v")


# ----------------------------------------------------------------------------- helpers


def reference_kwargs(cfg: models.ModelConfig, finetune: bool = False, **overrides: Any) -> dict[str, Any]:
  """Constructor kwargs of the torch reference equivalent to a Flax ModelConfig."""
  kwargs = dict(img_size=cfg.image_size, audio_length=cfg.audio_length, patch_size=cfg.patch_size,
                embed_dim=cfg.embed_dim, modality_specific_depth=cfg.modality_specific_depth,
                num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, depth=cfg.encoder_depth,
                num_mel_bins=cfg.num_mel_bins, tr_pos=cfg.trainable_pos_embed)
  if not finetune:
    kwargs.update(decoder_embed_dim=cfg.decoder_embed_dim, decoder_depth=cfg.decoder_depth,
                  decoder_num_heads=cfg.decoder_num_heads, norm_pix_loss=cfg.norm_pix_loss,
                  temperature=cfg.temperature)
  kwargs.update(overrides)
  return kwargs


def reference_forward_kwargs(cfg: models.ModelConfig) -> dict[str, Any]:
  """Forward kwargs of the torch reference equivalent to a Flax ModelConfig."""
  return dict(mask_ratio_a=cfg.mask_ratio_a, mask_ratio_v=cfg.mask_ratio_v, mae_loss_weight=cfg.lambda_mae,
              contrast_loss_weight=cfg.lambda_c, mask_mode=cfg.mask_mode_a,
              bidirect_contrast=cfg.contrast_bidirectional, contrast_group_size=cfg.contrast_group_size)


def perturb_for_parity(module: "torch.nn.Module", seed: int = 0, embed_scale: float = EMBED_SCALE) -> None:
  """Perturbs LayerNorm scales and all biases; scales the input embeddings by embed_scale."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if name.endswith("bias"):
        p.add_(0.05 * noise)
      elif p.ndim == 1:  # LayerNorm scale
        p.add_(0.3 * noise)
      if name.startswith(("patch_embed_", "pos_embed_", "modality_")):
        p.mul_(embed_scale)


def build_reference(cfg: models.ModelConfig, finetune: bool = False, seed: int = 0,
                    **overrides: Any) -> "torch.nn.Module":
  """A torch reference model with the parity test weights (deterministic in seed)."""
  torch.manual_seed(seed)
  if finetune:
    model = tr.CAVMAEFT(cfg.num_classes, **reference_kwargs(cfg, True, **overrides))
  else:
    model = tr.CAVMAE(**reference_kwargs(cfg, **overrides))
  perturb_for_parity(model, seed)
  return model.eval()


def flax_params(reference: "torch.nn.Module", cfg: models.ModelConfig, finetune: bool = False) -> dict:
  """The reference's weights as Flax params, strictly matched against the Flax model's tree."""
  state = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}  # no shared memory
  params, report = sd.match_to_target(sd.torch_to_flax(state), models.param_shapes(cfg, finetune))
  if report.unexpected:
    raise AssertionError(f"reference parameters the Flax model lacks: {report.unexpected}")
  return params


def copy_weights(source: "torch.nn.Module", target: "torch.nn.Module") -> "torch.nn.Module":
  """Loads source's weights into target (strict) and returns target in eval mode."""
  target.load_state_dict(source.state_dict(), strict=True)
  return target.eval()


def make_inputs(cfg: models.ModelConfig, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Random fbank [B, T, F] and NHWC image; the first audio sample has a silent (constant) half."""
  rng = np.random.default_rng(seed)
  audio = rng.standard_normal((batch, cfg.audio_length, cfg.num_mel_bins)).astype(np.float32)
  image = rng.standard_normal((batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  audio[0, cfg.audio_length // 2:] = -2.4  # normalized silence: constant patches
  return audio, image


def make_noise(cfg: models.ModelConfig, batch: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """Audio (configured mode) and video (unstructured) mask noise from the project's generator."""
  key_a, key_v = jax.random.split(jax.random.key(seed))
  noise_a = models.mask_noise(key_a, batch, cfg.audio_grid, cfg.mask_ratio_a, cfg.mask_mode_a)
  noise_v = models.mask_noise(key_v, batch, cfg.image_grid, cfg.mask_ratio_v, "unstructured")
  return noise_a, noise_v


def to_torch(x: Any) -> "torch.Tensor":
  return torch.from_numpy(np.array(x))


def nchw(image: np.ndarray) -> "torch.Tensor":
  return to_torch(image).permute(0, 3, 1, 2).contiguous()


def max_abs_diffs(flax_out: dict[str, Any], torch_out: dict[str, Any]) -> dict[str, float]:
  """Max abs difference per output name (float64), for names present on both sides."""
  diffs = {}
  for name, value in torch_out.items():
    mine = np.asarray(flax_out[name], np.float64)
    theirs = value.detach().numpy().astype(np.float64)
    assert mine.shape == theirs.shape, f"{name}: flax {mine.shape} vs torch {theirs.shape}"
    diffs[name] = float(np.max(np.abs(mine - theirs))) if mine.size else 0.0
  return diffs


def assert_parity(diffs: dict[str, float]) -> None:
  bad = {k: v for k, v in diffs.items() if not v <= TOLERANCE}
  assert not bad, f"outputs beyond {TOLERANCE}: {bad} (all: {diffs})"


def run_flax_pretrain(cfg: models.ModelConfig, params: dict, audio, image, noise_a, noise_v) -> dict:
  """Flax pretraining forward with details, plus the encoder outputs (captured final norms)."""
  model = models.CAVMAE(cfg)
  final_norms = {"norm": "latent", "norm_a": "latent_a", "norm_v": "latent_v"}

  def forward(p, a, v, na, nv):
    out, state = model.apply({"params": p}, a, v, noise_a=na, noise_v=nv, return_details=True,
                             capture_intermediates=lambda mdl, _: mdl.name in final_norms,
                             mutable=["intermediates"])
    captured = {name: state["intermediates"][norm]["__call__"] for norm, name in final_norms.items()}
    assert all(len(calls) == 1 for calls in captured.values()), "a final norm ran more than once"
    return dict(out, **{name: calls[0] for name, calls in captured.items()})

  return jax.device_get(jax.jit(forward)(params, audio, image, noise_a, noise_v))


def run_torch_pretrain(reference, cfg: models.ModelConfig, audio, image, noise_a, noise_v) -> dict:
  """Reference pretraining forward, restricted to the outputs compared with Flax."""
  with torch.no_grad():
    out = reference.forward_details(to_torch(audio), nchw(image), noise_a=to_torch(noise_a),
                                    noise_v=to_torch(noise_v), **reference_forward_kwargs(cfg))
  return {k: out[k] for k in PRETRAIN_OUTPUTS}


# ----------------------------------------------------------------------------- fixtures

# Pairwise cover: each mask mode once, each of norm_pix / bidirectional / groups on and off.
PRETRAIN_CASES = {
    "unstructured-normpix-single": dict(mask_mode_a="unstructured", norm_pix_loss=True),
    "time-bidirectional": dict(mask_mode_a="time", norm_pix_loss=False, contrast_bidirectional=True),
    "freq-normpix-bidirectional-groups": dict(mask_mode_a="freq", norm_pix_loss=True,
                                              contrast_bidirectional=True, contrast_group_size=GROUP),
    "tf-groups": dict(mask_mode_a="tf", norm_pix_loss=False, contrast_group_size=GROUP),
}


def tiny_config(**overrides: Any) -> models.ModelConfig:
  """The tiny preset with short inputs (8 x 16 audio grid, 4 x 4 image grid) to keep torch fast."""
  values = dict(audio_length=256, image_size=64)
  values.update(overrides)
  return models.ModelConfig.from_config(models.model_config("tiny", **values))


@pytest.fixture(scope="module")
def pretrain_setup():
  """Reference model, Flax params and inputs shared by the pretraining tests."""
  cfg = tiny_config()
  reference = build_reference(cfg)
  params = flax_params(reference, cfg)
  audio, image = make_inputs(cfg, BATCH)
  return cfg, reference, params, audio, image


@pytest.fixture(scope="module")
def base_case(pretrain_setup):
  """The default configuration's outputs on both sides (reused by the negative controls)."""
  cfg, reference, params, audio, image = pretrain_setup
  noise_a, noise_v = make_noise(cfg, BATCH, seed=1)
  flax_out = run_flax_pretrain(cfg, params, audio, image, noise_a, noise_v)
  torch_out = run_torch_pretrain(reference, cfg, audio, image, noise_a, noise_v)
  return flax_out, torch_out, (noise_a, noise_v)


@pytest.fixture(scope="module")
def finetune_setup():
  cfg = tiny_config(num_classes=7, trainable_pos_embed=True)
  reference = build_reference(cfg, finetune=True, seed=3)
  params = flax_params(reference, cfg, finetune=True)
  audio, image = make_inputs(cfg, 2, seed=4)
  return cfg, reference, params, audio, image


# ----------------------------------------------------------------------------- pretraining


def test_default_pretraining_forward_matches(base_case):
  flax_out, torch_out, _ = base_case
  assert_parity(max_abs_diffs(flax_out, torch_out))
  assert float(torch_out["loss_c"]) > 0 and float(torch_out["loss_mae"]) > 0


@pytest.mark.parametrize("case", [c for c in PRETRAIN_CASES if c != "unstructured-normpix-single"])
def test_pretraining_variant_matches(pretrain_setup, case):
  base_cfg, reference, params, audio, image = pretrain_setup
  cfg = dataclasses.replace(base_cfg, **PRETRAIN_CASES[case])
  reference.norm_pix_loss = cfg.norm_pix_loss  # a loss flag only; the weights are shared
  try:
    noise_a, noise_v = make_noise(cfg, BATCH, seed=2)
    flax_out = run_flax_pretrain(cfg, params, audio, image, noise_a, noise_v)
    torch_out = run_torch_pretrain(reference, cfg, audio, image, noise_a, noise_v)
  finally:
    reference.norm_pix_loss = base_cfg.norm_pix_loss
  assert_parity(max_abs_diffs(flax_out, torch_out))


def test_structured_noise_masks_whole_rows_or_columns(pretrain_setup):
  """The compared masks really are structured (so the mode cases test what they claim)."""
  base_cfg = pretrain_setup[0]
  rows, cols = base_cfg.audio_grid
  for mode, axis in (("time", 1), ("freq", 2)):
    cfg = dataclasses.replace(base_cfg, mask_mode_a=mode)
    noise_a, _ = make_noise(cfg, BATCH, seed=2)
    lifted = (np.asarray(noise_a) >= 1.0).reshape(BATCH, rows, cols)
    whole = lifted.all(axis=axis)
    assert whole.any(axis=1).all(), mode
    assert (lifted == np.broadcast_to(np.expand_dims(whole, axis), lifted.shape)).all(), mode


def test_contrast_groups_change_the_objective(pretrain_setup, base_case):
  """Groups are a different objective: summed losses differ from the whole-batch ones."""
  base_cfg, reference, _, audio, image = pretrain_setup
  _, torch_whole, (noise_a, noise_v) = base_case
  cfg = dataclasses.replace(base_cfg, contrast_group_size=GROUP)
  torch_groups = run_torch_pretrain(reference, cfg, audio, image, noise_a, noise_v)
  ratio = float(torch_groups["loss_mae"]) / float(torch_whole["loss_mae"])
  assert abs(ratio - BATCH // GROUP) < 0.5  # roughly n_groups times the per-batch mean
  assert abs(float(torch_groups["loss_c"]) - float(torch_whole["loss_c"])) > 1e-3


def test_inpaint_matches(pretrain_setup):
  base_cfg, reference, params, audio, image = pretrain_setup
  cfg = dataclasses.replace(base_cfg, norm_pix_loss=False)  # the inpainting model's setting
  reference.norm_pix_loss = False
  try:
    noise_a, noise_v = make_noise(cfg, BATCH, seed=5)
    fn = jax.jit(lambda p, a, v, na, nv: models.CAVMAE(cfg).apply(
        {"params": p}, a, v, noise_a=na, noise_v=nv, method="inpaint"))
    flax_out = jax.device_get(fn(params, audio, image, noise_a, noise_v))
    with torch.no_grad():
      values = reference.forward_inpaint(to_torch(audio), nchw(image), cfg.mask_ratio_a, cfg.mask_ratio_v,
                                         noise_a=to_torch(noise_a), noise_v=to_torch(noise_v))
  finally:
    reference.norm_pix_loss = base_cfg.norm_pix_loss
  names = ("pred_a", "pred_v", "mask_a", "mask_v", "loss_mae_a", "loss_mae_v")
  assert_parity(max_abs_diffs(flax_out, dict(zip(names, values))))


def test_pretraining_features_match(pretrain_setup):
  cfg, reference, params, audio, image = pretrain_setup
  fn = jax.jit(lambda p, a, v: models.CAVMAE(cfg).apply({"params": p}, a, v, method="features"))
  feat_a, feat_v = jax.device_get(fn(params, audio[:2], image[:2]))
  with torch.no_grad():
    ref_a, ref_v = reference.forward_feat(to_torch(audio[:2]), nchw(image[:2]))
  assert_parity(max_abs_diffs({"a": feat_a, "v": feat_v}, {"a": ref_a, "v": ref_v}))


def test_position_embedding_tables_match():
  for dim, rows, cols in ((64, 8, 64), (32, 14, 14), (768, 8, 64)):
    mine = flax_pos_embed.sincos_2d(dim, rows, cols)
    theirs = tr.sincos_pos_embed_2d(dim, rows, cols).astype(np.float32)
    np.testing.assert_array_equal(mine, theirs)


# ----------------------------------------------------------------------------- negative controls


@pytest.mark.parametrize("change", [dict(layer_norm_eps=1e-6), dict(gelu_approximate="tanh")],
                         ids=["layernorm-eps-1e-6", "tanh-gelu"])
def test_negative_control_breaks_parity(pretrain_setup, base_case, change):
  """The same comparison with one numerical change in the reference fails the tolerance clearly."""
  cfg, reference, _, audio, image = pretrain_setup
  flax_out, _, (noise_a, noise_v) = base_case
  changed = copy_weights(reference, tr.CAVMAE(**reference_kwargs(cfg, **change)))
  diffs = max_abs_diffs(flax_out, run_torch_pretrain(changed, cfg, audio, image, noise_a, noise_v))
  assert max(diffs.values()) > 10 * TOLERANCE, diffs
  assert diffs["latent"] > 10 * TOLERANCE and diffs["pred_a"] > TOLERANCE, diffs


# ----------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("mode", models.FT_MODES)
def test_finetuning_mode_matches(finetune_setup, mode):
  cfg, reference, params, audio, image = finetune_setup
  uses_audio = mode in ("multimodal", "audioonly", "missingaudioonly")
  uses_image = mode in ("multimodal", "videoonly", "missingvideoonly")
  a = audio if uses_audio else None
  v = image if uses_image else None
  fn = jax.jit(lambda p, a, v: models.CAVMAEFT(cfg).apply({"params": p}, a, v, mode=mode))
  logits = jax.device_get(fn(params, a, v))
  with torch.no_grad():
    expected = reference(None if a is None else to_torch(a), None if v is None else nchw(v), mode)
  assert logits.shape == (audio.shape[0], cfg.num_classes)
  assert_parity(max_abs_diffs({"logits": logits}, {"logits": expected}))


def test_finetuning_features_match(finetune_setup):
  cfg, reference, params, audio, image = finetune_setup
  fn = jax.jit(lambda p, a, v: models.CAVMAEFT(cfg).apply({"params": p}, a, v, method="features"))
  feat_a, feat_v = jax.device_get(fn(params, audio, image))
  with torch.no_grad():
    ref_a, ref_v = reference.forward_feat(to_torch(audio), nchw(image))
  assert_parity(max_abs_diffs({"a": feat_a, "v": feat_v}, {"a": ref_a, "v": ref_v}))


# ----------------------------------------------------------------------------- base config (manual)


def compare_base(batch: int = 2, seed: int = 0) -> dict[str, float]:
  """Max abs diffs of every output for the base configs (original init, no perturbation)."""
  diffs: dict[str, float] = {}
  cfg = models.ModelConfig.from_config(models.model_config("base", dtype="float32"))
  torch.manual_seed(seed)
  reference = tr.CAVMAE(**reference_kwargs(cfg)).eval()
  params = flax_params(reference, cfg)
  audio, image = make_inputs(cfg, batch, seed)
  noise_a, noise_v = make_noise(cfg, batch, seed)
  flax_out = run_flax_pretrain(cfg, params, audio, image, noise_a, noise_v)
  torch_out = run_torch_pretrain(reference, cfg, audio, image, noise_a, noise_v)
  diffs.update({f"pretrain/{k}": v for k, v in max_abs_diffs(flax_out, torch_out).items()})
  del reference, params, flax_out, torch_out

  ft_cfg = dataclasses.replace(cfg, trainable_pos_embed=True)
  torch.manual_seed(seed + 1)
  reference = tr.CAVMAEFT(ft_cfg.num_classes, **reference_kwargs(ft_cfg, True)).eval()
  params = flax_params(reference, ft_cfg, finetune=True)
  model = models.CAVMAEFT(ft_cfg)
  for mode in models.FT_MODES:
    logits = jax.jit(lambda p, a, v: model.apply({"params": p}, a, v, mode=mode))(params, audio, image)
    with torch.no_grad():
      expected = reference(to_torch(audio), nchw(image), mode)
    diffs[f"finetune/{mode}"] = max_abs_diffs({"x": logits}, {"x": expected})["x"]
  feat_a, feat_v = jax.jit(lambda p, a, v: model.apply({"params": p}, a, v, method="features"))(
      params, audio, image)
  with torch.no_grad():
    ref_a, ref_v = reference.forward_feat(to_torch(audio), nchw(image))
  diffs.update({f"finetune/features_{k}": v for k, v in
                max_abs_diffs({"a": feat_a, "v": feat_v}, {"a": ref_a, "v": ref_v}).items()})
  return diffs


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--base", action="store_true", help="compare the base configs once and print max abs diffs")
  parser.add_argument("--batch", type=int, default=2)
  args = parser.parse_args(argv)
  if not args.base:
    parser.error("nothing to do: pass --base (the tiny-config tests run under pytest)")
  jax.config.update("jax_default_matmul_precision", "highest")
  diffs = compare_base(args.batch)
  for name, value in diffs.items():
    print(f"{name:40s} {value:.3e}")
  worst = max(diffs.values())
  print(f"max_abs_diff {worst:.3e} ({'within' if worst <= TOLERANCE else 'BEYOND'} {TOLERANCE})")
  return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
