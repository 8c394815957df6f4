"""The parity machinery shared by tests/test_parity*.py and tools/gpu_check.sh: the Flax CAV-MAE
models against the PyTorch reference of the original (tests/torch_reference.py).

Same weights (reference init, perturbed, -> state dict -> `torch_to_flax`) and the same mask
noise (`cav_mae_jax.models.mask_noise`) on both sides; every output must agree within 1e-5 max
abs. The test weights are the original's init with every LayerNorm scale/bias and every bias
perturbed (so a dropped or transposed bias cannot hide behind zeros) and the input embeddings
(patch kernels, position and modality embeddings) scaled by 1e-2, so that the first LayerNorm
of every stream sees low-variance tokens, where its epsilon matters.

No pytest here: the GPU check imports this module on a machine that has torch but no pytest.
Run the base-config comparison once (not part of the suite; a minute or more on CPU), on the
CPU or with the torch reference on another device (JAX then runs on its default device):
  python -m tests.parity --base [--device cuda --tolerance 1e-4]
It also runs the JAX model in bfloat16 on the same weights and masks and compares its losses
with the float32 reference (relative tolerance 1e-2). `tools/gpu_check.sh` runs it on a GPU.
With `--original DIR` (a checkout of github.com/YuanGongND/cav-mae, timm 0.4.x installed) it
compares the Flax models with the original's own model code instead (`compare_original`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any

import jax
import numpy as np
import torch

from cav_mae_jax import models
from cav_mae_jax.convert import state_dict as sd

try:  # pytest puts tests/ on sys.path; `python -m tests.parity` has the repo root instead.
  import torch_reference as tr
except ModuleNotFoundError:
  from tests import torch_reference as tr

TOLERANCE = 1e-5
BATCH = 4
GROUP = 2
EMBED_SCALE = 1e-2
AUDIO_FT_MODES = ("multimodal", "audioonly", "missingaudioonly")
VIDEO_FT_MODES = ("multimodal", "videoonly", "missingvideoonly")
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


def flax_params(reference: "torch.nn.Module", cfg: models.ModelConfig, finetune: bool = False,
                dropped: tuple[str, ...] = ()) -> dict:
  """The reference's weights as Flax params, strictly matched against the Flax model's tree.

  `dropped`: name prefixes of reference parameters the Flax model must not have (e.g. the decoder
  of CAV, which the original builds but never uses); any other unmatched parameter fails.
  """
  state = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}  # no shared memory
  params, report = sd.match_to_target(sd.torch_to_flax(state), models.param_shapes(cfg, finetune))
  expected = {"/".join(sd.torch_key_to_path(k, v.ndim)[0]) for k, v in state.items() if k.startswith(dropped)}
  assert set(report.unexpected) == expected, f"unmatched reference parameters: {report.unexpected}"
  return params


def copy_weights(source: "torch.nn.Module", target: "torch.nn.Module") -> "torch.nn.Module":
  """Loads source's weights into target (strict) and returns target in eval mode."""
  target.load_state_dict(source.state_dict(), strict=True)
  return target.eval()


def make_inputs(cfg: models.ModelConfig, batch: int, seed: int = 0,
                constant_tail: bool = True,
                near_flat: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Random fbank [B, T, F] and NHWC image.

  With constant_tail, the first clip's second half is constant, like a short clip's zero padding
  after normalization: constant patches, whose norm_pix targets divide float rounding by 1e-3.
  With near_flat, the lower half of the first image is nearly flat (variance ~1e-6 per patch, as
  a one-level JPEG step), where the norm_pix variance's +1e-6 sets the targets' scale.
  """
  rng = np.random.default_rng(seed)
  audio = rng.standard_normal((batch, cfg.audio_length, cfg.num_mel_bins)).astype(np.float32)
  image = rng.standard_normal((batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  if constant_tail:
    audio[0, cfg.audio_length // 2:] = (0.0 + 5.081) / 4.4849
  if near_flat:
    flat = np.random.default_rng(seed + 1000).standard_normal(image[0, cfg.image_size // 2:].shape)
    image[0, cfg.image_size // 2:] = 1e-3 * flat
  return audio, image


def make_noise(cfg: models.ModelConfig, batch: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """Audio (configured mode) and video (unstructured) mask noise from the project's generator."""
  key_a, key_v = jax.random.split(jax.random.key(seed))
  noise_a = models.mask_noise(key_a, batch, cfg.audio_grid, cfg.mask_ratio_a, cfg.mask_mode_a)
  noise_v = models.mask_noise(key_v, batch, cfg.image_grid, cfg.mask_ratio_v, "unstructured")
  return noise_a, noise_v


def to_torch(x: Any, device: Any = "cpu") -> "torch.Tensor":
  return torch.from_numpy(np.array(x)).to(device)


def nchw(image: np.ndarray, device: Any = "cpu") -> "torch.Tensor":
  return to_torch(image, device).permute(0, 3, 1, 2).contiguous()


def device_of(module: "torch.nn.Module") -> "torch.device":
  return next(module.parameters()).device


def max_abs_diffs(flax_out: dict[str, Any], torch_out: dict[str, Any]) -> dict[str, float]:
  """Max abs difference per output name (float64), for names present on both sides."""
  diffs = {}
  for name, value in torch_out.items():
    mine = np.asarray(flax_out[name], np.float64)
    theirs = value.detach().cpu().numpy().astype(np.float64)
    assert mine.shape == theirs.shape, f"{name}: flax {mine.shape} vs torch {theirs.shape}"
    diffs[name] = float(np.max(np.abs(mine - theirs))) if mine.size else 0.0
  return diffs


def assert_parity(diffs: dict[str, float]) -> None:
  bad = {k: v for k, v in diffs.items() if not v <= TOLERANCE}
  assert not bad, f"outputs beyond {TOLERANCE}: {bad} (all: {diffs})"


INPAINT_OUTPUTS = ("pred_a", "pred_v", "mask_a", "mask_v", "loss_mae_a", "loss_mae_v")
INPAINT_GROUP_DEPENDENT = ("inpaint/loss_mae_a", "inpaint/loss_mae_v")


def flax_pretrain_fn(cfg: models.ModelConfig, with_features: bool = True):
  """One jitted call: forward with details, encoder outputs (captured final norms), inpaint, features."""
  model = models.CAVMAE(cfg)
  final_norms = {"norm": "latent", "norm_a": "latent_a", "norm_v": "latent_v"}

  def run(p, audio, image, noise_a, noise_v):
    variables = {"params": p}
    out, state = model.apply(variables, audio, image, noise_a=noise_a, noise_v=noise_v, return_details=True,
                             capture_intermediates=lambda mdl, _: mdl.name in final_norms,
                             mutable=["intermediates"])
    captured = {name: state["intermediates"][norm]["__call__"] for norm, name in final_norms.items()}
    assert all(len(calls) == 1 for calls in captured.values()), "a final norm ran more than once"
    out.update({name: calls[0] for name, calls in captured.items()})
    inpaint = model.apply(variables, audio, image, noise_a=noise_a, noise_v=noise_v, method="inpaint")
    out.update({f"inpaint/{k}": v for k, v in inpaint.items()})
    if with_features:  # unmasked and independent of the loss options
      out["features/a"], out["features/v"] = model.apply(variables, audio, image, method="features")
    return out

  jitted = jax.jit(run)
  return lambda *args: jax.device_get(jitted(*args))


def torch_pretrain_outputs(reference, cfg: models.ModelConfig, audio, image, noise_a, noise_v,
                           with_features: bool = True) -> dict:
  """The reference's counterparts of flax_pretrain_fn's outputs (under the same names)."""
  device = device_of(reference)
  a, v = to_torch(audio, device), nchw(image, device)
  na, nv = to_torch(noise_a, device), to_torch(noise_v, device)
  with torch.no_grad():
    details = reference.forward_details(a, v, noise_a=na, noise_v=nv, **reference_forward_kwargs(cfg))
    inpaint = reference.forward_inpaint(a, v, cfg.mask_ratio_a, cfg.mask_ratio_v, noise_a=na, noise_v=nv)
    out = {k: details[k] for k in PRETRAIN_OUTPUTS}
    out.update({f"inpaint/{k}": t for k, t in zip(INPAINT_OUTPUTS, inpaint)})
    if with_features:
      out["features/a"], out["features/v"] = reference.forward_feat(a, v)
  return out


def tiny_config(**overrides: Any) -> models.ModelConfig:
  """The tiny preset with short inputs (8 x 16 audio grid, 4 x 4 image grid) to keep torch fast."""
  values = dict(audio_length=256, image_size=64)
  values.update(overrides)
  return models.ModelConfig.from_config(models.model_config("tiny", **values))


def flax_finetune_fn(cfg: models.ModelConfig):
  """One jitted call: logits of every mode (absent modality passed as None) and features."""
  model = models.CAVMAEFT(cfg)

  def run(p, audio, image):
    variables = {"params": p}
    out = {}
    for mode in models.FT_MODES:
      a = audio if mode in AUDIO_FT_MODES else None
      v = image if mode in VIDEO_FT_MODES else None
      out[mode] = model.apply(variables, a, v, mode=mode)
    out["features/a"], out["features/v"] = model.apply(variables, audio, image, method="features")
    return out

  jitted = jax.jit(run)
  return lambda *args: jax.device_get(jitted(*args))


def torch_finetune_outputs(reference, audio, image) -> dict:
  device = device_of(reference)
  a, v = to_torch(audio, device), nchw(image, device)
  with torch.no_grad():
    out = {mode: reference(a if mode in AUDIO_FT_MODES else None, v if mode in VIDEO_FT_MODES else None, mode)
           for mode in models.FT_MODES}
    out["features/a"], out["features/v"] = reference.forward_feat(a, v)
  return out


# ----------------------------------------------------------------------------- base config (manual)


BF16_PREFIX = "pretrain-bf16/"
BF16_LOSSES = ("loss", "loss_mae_a", "loss_mae_v", "loss_c")
BF16_RELATIVE_TOLERANCE = 1e-2
# Parameter gradients in bfloat16 with another attention against XLA attention's (relative L2):
# rounding in other places moves them by about a percent; a wrong backward pass by far more.
BF16_GRAD_RELATIVE_TOLERANCE = 5e-2
# The gradient comparison's model: the preset's widths and token counts (every stream length of
# the full model: base's 128 audio, 49 video, 177 joint and 708 decoder tokens) in two encoder
# blocks and one decoder block, so that its two gradient compiles take seconds, not minutes.
GRAD_CHECK_DEPTHS = {"encoder_depth": 2, "modality_specific_depth": 1, "decoder_depth": 1}


def is_bf16_entry(name: str) -> bool:
  """A bfloat16 loss entry (`pretrain-bf16/...` or `pretrain-bf16-<attention>/...`): held to the
  relative tolerance, not to the float32 max abs diff."""
  return name.startswith(BF16_PREFIX.rstrip("/"))


def relative_diff(diff: float, scale: float) -> float:
  """A bfloat16 entry's (max abs diff, reference magnitude) as the relative difference checked."""
  return diff / max(scale, 1e-12)


def exact_float32() -> None:
  """Full float32 matmuls and convolutions in JAX and torch (no TF32 on GPUs)."""
  jax.config.update("jax_default_matmul_precision", "highest")
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False


def _pretrain_case(batch: int, seed: int, constant_tail: bool, device: str, preset: str,
                   **overrides: Any):
  """(config, flax params, inputs, noise, reference outputs) of the pretraining comparison;
  `overrides`: model config fields set on the preset."""
  if preset == "tiny":
    cfg = tiny_config(**overrides)
  else:
    cfg = models.ModelConfig.from_config(models.model_config(preset, dtype="float32",
                                                             **overrides))
  torch.manual_seed(seed)
  reference = tr.CAVMAE(**reference_kwargs(cfg)).eval()
  params = flax_params(reference, cfg)
  reference.to(device)
  audio, image = make_inputs(cfg, batch, seed, constant_tail)
  noise = make_noise(cfg, batch, seed)
  torch_out = torch_pretrain_outputs(reference, cfg, audio, image, *noise)
  return cfg, params, (audio, image, *noise), torch_out


def _diffs_and_scales(flax_out, torch_out, prefix):
  diffs = max_abs_diffs(flax_out, torch_out)
  return {f"{prefix}/{k}": (d, float(torch_out[k].abs().max())) for k, d in diffs.items()}


def _bf16_losses(cfg, params, inputs, torch_out, attention_impl: str, prefix: str):
  """The JAX bfloat16 model's losses (with `attention_impl`) against the float32 reference's."""
  bf16 = dataclasses.replace(cfg, dtype="bfloat16", attention_impl=attention_impl)
  bf16_fn = jax.jit(lambda p, a, v, na, nv: models.CAVMAE(bf16).apply(
      {"params": p}, a, v, noise_a=na, noise_v=nv))
  bf16_out = jax.device_get(bf16_fn(params, *inputs))
  return _diffs_and_scales({k: bf16_out[k] for k in BF16_LOSSES},
                           {k: torch_out[k] for k in BF16_LOSSES}, prefix.rstrip("/"))


def compare_base(batch: int = 2, seed: int = 0, constant_tail: bool = True, device: str = "cpu",
                 preset: str = "base") -> dict[str, tuple[float, float]]:
  """{output: (max abs diff, max abs reference value)} for the base configs (original init).

  The torch reference runs on `device`, JAX on its default device. Entries under `BF16_PREFIX`
  compare the JAX bfloat16 model's losses with the float32 reference. `preset='tiny'` runs the
  tiny model with short inputs instead (seconds, to check the machinery).
  """
  cfg, params, inputs, torch_out = _pretrain_case(batch, seed, constant_tail, device, preset)
  flax_out = flax_pretrain_fn(cfg)(params, *inputs)
  results = _diffs_and_scales(flax_out, torch_out, "pretrain")
  results.update(_bf16_losses(cfg, params, inputs, torch_out, "xla", BF16_PREFIX))
  audio, image = inputs[:2]
  del params, flax_out, torch_out

  ft_cfg = dataclasses.replace(cfg, trainable_pos_embed=True)
  torch.manual_seed(seed + 1)
  reference = tr.CAVMAEFT(ft_cfg.num_classes, **reference_kwargs(ft_cfg, True)).eval()
  params = flax_params(reference, ft_cfg, finetune=True)
  reference.to(device)
  flax_out = flax_finetune_fn(ft_cfg)(params, audio, image)
  results.update(_diffs_and_scales(flax_out, torch_finetune_outputs(reference, audio, image),
                                   "finetune"))
  return results


def compare_bf16_attention(attention_impl: str, batch: int = 2, seed: int = 0,
                           constant_tail: bool = True, device: str = "cpu",
                           preset: str = "base") -> dict[str, tuple[float, float]]:
  """compare_base's bfloat16 loss entries with another attention (e.g. 'cudnn', on a GPU).

  Keys start with `pretrain-bf16-<impl>/`; `base_failures` holds them to
  the bfloat16 relative tolerance.
  """
  cfg, params, inputs, torch_out = _pretrain_case(batch, seed, constant_tail, device, preset)
  return _bf16_losses(cfg, params, inputs, torch_out, attention_impl,
                      f"{BF16_PREFIX.rstrip('/')}-{attention_impl}/")


def compare_bf16_attention_grads(attention_impl: str, batch: int = 2, seed: int = 0,
                                 constant_tail: bool = True, device: str = "cpu",
                                 preset: str = "base", **overrides: Any) -> float:
  """How far the bfloat16 model's parameter gradients with `attention_impl` lie from those with
  XLA attention (same weights, inputs and masks): ||g - g_xla|| / ||g_xla|| over all parameters,
  inf where a gradient is not finite. The losses alone would not show a wrong backward pass.
  `overrides`: model config fields set on the preset (e.g. `GRAD_CHECK_DEPTHS`)."""
  cfg, params, inputs, _ = _pretrain_case(batch, seed, constant_tail, device, preset, **overrides)

  def grads(impl):
    model = models.CAVMAE(dataclasses.replace(cfg, dtype="bfloat16", attention_impl=impl))
    loss = lambda p, a, v, na, nv: model.apply({"params": p}, a, v, noise_a=na,
                                               noise_v=nv)["loss"]
    return [np.asarray(g, np.float64) for g in
            jax.tree.leaves(jax.device_get(jax.jit(jax.grad(loss))(params, *inputs)))]

  reference, other = grads("xla"), grads(attention_impl)
  if not all(np.isfinite(g).all() for g in other):
    return float("inf")
  diff = math.sqrt(sum(float(np.sum((g - r)**2)) for g, r in zip(other, reference)))
  return diff / max(math.sqrt(sum(float(np.sum(r**2)) for r in reference)), 1e-30)


def base_failures(results: dict[str, tuple[float, float]], tolerance: float = TOLERANCE) -> dict[str, float]:
  """compare_base's outputs out of tolerance: float32 by max abs diff, bfloat16 losses by relative diff."""
  failures = {}
  for name, (diff, scale) in results.items():
    if is_bf16_entry(name):
      relative = relative_diff(diff, scale)
      if not relative <= BF16_RELATIVE_TOLERANCE:
        failures[name] = relative
    elif not diff <= tolerance:
      failures[name] = diff
  return failures


# ----------------------------------------------------------------------------- the original (manual)


class OriginalImportError(Exception):
  """The original's model code could not be imported from the path given."""


def load_original(path: str) -> Any:
  """The original's `src/models` package (CAVMAE, CAVMAEFT) from a checkout of
  github.com/YuanGongND/cav-mae (`path`: the checkout or its `src/`), imported under another name.

  It needs what the original needs: torch and timm 0.4.x (which imports torchvision). Its
  position-embedding code uses `np.float`, gone from NumPy >= 1.24, so this sets that alias to
  `float` (what it meant) when it is missing.
  """
  import importlib.util  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  candidates = [os.path.join(path, "src", "models"), os.path.join(path, "models")]
  package_dir = next((c for c in candidates if os.path.isfile(os.path.join(c, "cav_mae.py"))), None)
  if package_dir is None:
    raise OriginalImportError(f"{path}: no src/models/cav_mae.py or models/cav_mae.py (a checkout "
                              "of github.com/YuanGongND/cav-mae)")
  if not hasattr(np, "float"):
    np.float = float  # the original's pos_embed.py: np.arange(..., dtype=np.float)
  name = "cav_mae_original_models"
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(package_dir, "__init__.py"), submodule_search_locations=[package_dir])
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except ImportError as e:
    del sys.modules[name]
    raise OriginalImportError(f"{path}: the original's model code needs {e.name or e} "
                              "(pip install timm==0.4.5 torchvision)") from None
  return module


class _FixedRand:
  """Within the block, `torch.rand` returns the given arrays in order (the original draws its mask
  noise with `torch.rand(N, L)`, audio first, and takes no noise argument)."""

  def __init__(self, *arrays: Any):
    self.arrays = [torch.from_numpy(np.array(a, np.float32)) for a in arrays]

  def __enter__(self) -> None:
    self.real = torch.rand

    def fixed(*shape, **unused_kwargs):
      noise = self.arrays.pop(0)
      assert noise.numel() == int(np.prod(shape)), f"noise {tuple(noise.shape)} for rand{shape}"
      return noise.reshape(shape).clone()

    torch.rand = fixed

  def __exit__(self, *exc: Any) -> None:
    torch.rand = self.real
    assert exc[0] is not None or not self.arrays, "the original drew fewer noise arrays"


ORIGINAL_PRETRAIN_OUTPUTS = ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "mask_a",
                             "mask_v", "c_acc")


def compare_original(original: Any, modality_specific_depth: int = 11, batch: int = 4,
                     seed: int = 0, norm_pix_losses: tuple[bool, ...] = (False, True)
                     ) -> dict[str, tuple[float, float]]:
  """{output: (max abs diff, max abs original value)}: the original's own CAVMAE and CAVMAEFT
  (`load_original`) against the Flax models, on the parity weights (`perturb_for_parity`) mapped
  through the converter that loads released checkpoints (`cavmae_checkpoint.cavmae_to_params`).

  A small model in the original's fixed layout (12 encoder blocks, 128 mel bins): pretraining
  losses, masks, contrastive accuracy, inpainting and retrieval features with and without
  norm_pix_loss, and the logits of the five fine-tuning modes. The original chains the joint
  blocks for its contrastive streams only when there is one (`modality_specific_depth=11`, its
  only setting); with more, loss_c and c_acc differ by design (README, differences).
  """
  from cav_mae_jax.convert import cavmae_checkpoint  # pylint: disable=import-outside-toplevel
  sizes = dict(img_size=64, audio_length=64, patch_size=16, embed_dim=64, num_heads=4,
               modality_specific_depth=modality_specific_depth)
  decoder = dict(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)
  results = {}

  def converted(module, cfg, finetune):  # shapes suffice: the original has every parameter
    state = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    return cavmae_checkpoint.cavmae_to_params(state, models.param_shapes(cfg, finetune))[0]

  def config(**overrides):
    return models.ModelConfig.from_config(models.model_config(
        "tiny", encoder_depth=12, num_mel_bins=128, image_size=64, audio_length=64, embed_dim=64,
        num_heads=4, modality_specific_depth=modality_specific_depth, contrast_group_size=0,
        **decoder, **overrides))

  for norm_pix in norm_pix_losses:
    cfg = config(norm_pix_loss=norm_pix)
    torch.manual_seed(seed)
    original_model = original.CAVMAE(**sizes, **decoder, norm_pix_loss=norm_pix).eval()
    perturb_for_parity(original_model, seed)
    params = converted(original_model, cfg, False)
    audio, image = make_inputs(cfg, batch, seed)
    noise = make_noise(cfg, batch, seed)
    ours = flax_pretrain_fn(cfg)(params, audio, image, *noise)
    a, v = to_torch(audio), nchw(image)
    theirs = {}
    with torch.no_grad():
      with _FixedRand(*noise):
        out = original_model(a, v, cfg.mask_ratio_a, cfg.mask_ratio_v, mae_loss_weight=cfg.lambda_mae,
                             contrast_loss_weight=cfg.lambda_c)
      theirs.update(zip(ORIGINAL_PRETRAIN_OUTPUTS, out))
      with _FixedRand(*noise):
        out = original_model.forward_inpaint(a, v, cfg.mask_ratio_a, cfg.mask_ratio_v)
      theirs.update({f"inpaint/{k}": t for k, t in zip(INPAINT_OUTPUTS, out)})
      theirs["features/a"], theirs["features/v"] = original_model.forward_feat(a, v)
    results.update(_diffs_and_scales(ours, theirs, f"pretrain-norm_pix={norm_pix}"))

  cfg = config(num_classes=7, trainable_pos_embed=True)
  torch.manual_seed(seed + 1)
  original_model = original.CAVMAEFT(7, **sizes).eval()
  perturb_for_parity(original_model, seed + 1)
  params = converted(original_model, cfg, True)
  audio, image = make_inputs(cfg, batch, seed + 1)
  results.update(_diffs_and_scales(flax_finetune_fn(cfg)(params, audio, image),
                                   torch_finetune_outputs(original_model, audio, image), "finetune"))
  return results


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--base", action="store_true", help="compare the base configs once and print max abs diffs")
  parser.add_argument("--original", metavar="DIR",
                      help="compare with the original's own model code instead of the reference: "
                           "a checkout of github.com/YuanGongND/cav-mae (needs timm 0.4.x)")
  parser.add_argument("--modality-specific-depth", type=int, default=11,
                      help="with --original: blocks per modality before the joint ones (11)")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--no-constant-tail", action="store_true",
                      help="fully random fbank (no zero-padding-like constant patches)")
  parser.add_argument("--device", default="cpu", help="torch device of the reference (e.g. cuda)")
  parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="float32 max abs diff allowed")
  args = parser.parse_args(argv)
  if not (args.base or args.original):
    parser.error("nothing to do: pass --base or --original DIR (the tiny-config tests are "
                 "tests/test_parity.py)")
  exact_float32()
  if args.original:
    try:
      original = load_original(args.original)
    except OriginalImportError as e:
      print(f"error: --original {e}", file=sys.stderr)
      return 2
    print(f"devices: {jax.devices()}; the original's model code from {args.original} on the CPU")
    results = compare_original(original, args.modality_specific_depth)
  else:
    print(f"devices: {jax.devices()}; torch reference on {args.device}")
    results = compare_base(args.batch, constant_tail=not args.no_constant_tail, device=args.device)
  width = max(36, *map(len, results))
  print(f"{'output':{width}s} {'max_abs_diff':>12s} {'max_abs_value':>13s}")
  for name, (diff, scale) in results.items():
    print(f"{name:{width}s} {diff:12.3e} {scale:13.3e}")
  failures = base_failures(results, args.tolerance)
  bf16 = (f", bfloat16 losses within {BF16_RELATIVE_TOLERANCE} relative"
          if any(map(is_bf16_entry, results)) else "")
  print(f"float32 within {args.tolerance}{bf16}: {'yes' if not failures else f'no: {failures}'}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
