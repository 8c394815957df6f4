"""Model FLOP counts (a multiply-add counts as 2) for throughput and MFU.

Per transformer block on n tokens of width d: 24*n*d^2 (qkv, projection, 4x MLP) plus 4*n^2*d
(scores and weighted sum). A pretraining forward masks each modality, runs the modality-specific
blocks on the kept tokens, the joint blocks on three streams (audio+video for the decoder; audio
and video for the contrastive loss), then the decoder on all tokens of both modalities; a variant
runs only the streams its losses need (AV-MAE no audio and video streams, CAV no joint one and
no decoder). Base at mask ratio 0.75: about 78.1 GFLOP per sample.
A training step is 3x the forward (backward = 2x forward). Fine-tuning runs the unmasked encoder:
about 132 GFLOP forward, 397 GFLOP per training step per sample for base.

XLA's own count of a compiled step (`xla_flops`) checks these figures against what really runs:
it also counts the elementwise work (LayerNorm, GELU, softmax, the optimizer), so it sits a few
percent above the model FLOPs; much more means wasted work. The base pretraining step compiled in
bfloat16 counts about 239 GFLOP per sample against the model's 234 (`tools/benchmark.py
--cost-analysis`); with `config.model.remat` about 295 (the backward recomputes most of the
forward), 243 with `remat_policy='attention_only'` (only attention's core is recomputed).
"""

from __future__ import annotations

from typing import Any

import ml_collections

# Dense bf16 peak FLOP/s per chip, by `jax.Device.device_kind` prefix.
PEAK_BF16_FLOPS = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def block_flops(num_tokens: int, width: int, mlp_ratio: float = 4.0) -> float:
  """FLOPs of one pre-norm transformer block on `num_tokens` tokens."""
  dense = (8 + 4 * mlp_ratio) * num_tokens * width**2  # 2 * (3d + d + 2*r*d) * d per token
  attention = 4 * num_tokens**2 * width
  return dense + attention


def pretrain_forward_flops(model: ml_collections.ConfigDict) -> float:
  """FLOPs of one pretraining forward pass for one sample, from `config.model`."""
  d, p, r = model.embed_dim, model.patch_size, model.mlp_ratio
  patches_a = (model.num_mel_bins // p) * (model.audio_length // p)
  patches_v = (model.image_size // p) ** 2
  use_a = model.modalities in ("audiovisual", "audio")
  use_v = model.modalities in ("audiovisual", "visual")
  patches_a, patches_v = patches_a * use_a, patches_v * use_v
  kept_a = int(patches_a * (1 - model.mask_ratio_a))
  kept_v = int(patches_v * (1 - model.mask_ratio_v))
  specific = model.modality_specific_depth
  joint = model.encoder_depth - specific

  flops = 2 * patches_a * (p * p) * d + 2 * patches_v * (p * p * 3) * d  # patch embeddings
  flops += specific * (block_flops(kept_a, d, r) * use_a + block_flops(kept_v, d, r) * use_v)
  # The streams the model runs (models.CAVMAE.encode): the joint one for the decoder, the
  # audio-only and video-only ones for the contrastive loss.
  has_decoder = model.lambda_mae != 0
  has_contrast = model.lambda_c != 0 and model.modalities == "audiovisual"
  streams = [kept_a + kept_v] * has_decoder + [kept_a, kept_v] * has_contrast
  flops += joint * sum(block_flops(n, d, r) for n in streams if n)
  if has_decoder:
    dd, total = model.decoder_embed_dim, patches_a + patches_v
    flops += 2 * (kept_a + kept_v) * d * dd  # decoder_embed
    flops += model.decoder_depth * block_flops(total, dd, r)
    flops += 2 * patches_a * dd * (p * p) + 2 * patches_v * dd * (p * p * 3)  # predictions
  return float(flops)


def pretrain_step_flops(model: ml_collections.ConfigDict) -> float:
  """FLOPs of one training step (forward + backward) for one sample."""
  return 3.0 * pretrain_forward_flops(model)


def finetune_forward_flops(model: ml_collections.ConfigDict, mode: str | None = None) -> float:
  """FLOPs of one fine-tuning forward pass (no masking) for one sample in `mode`."""
  d, p, r = model.embed_dim, model.patch_size, model.mlp_ratio
  mode = mode or model.ft_mode
  use_a = model.modalities in ("audiovisual", "audio") and mode != "videoonly" and \
      mode != "missingvideoonly"
  use_v = model.modalities in ("audiovisual", "visual") and mode not in ("audioonly",
                                                                         "missingaudioonly")
  patches_a = (model.num_mel_bins // p) * (model.audio_length // p) * use_a
  patches_v = (model.image_size // p) ** 2 * use_v
  specific = model.modality_specific_depth
  joint = model.encoder_depth - specific
  streams = {"multimodal": [patches_a + patches_v], "audioonly": [patches_a],
             "videoonly": [patches_v], "missingaudioonly": [patches_a, patches_a],
             "missingvideoonly": [patches_v, patches_v]}[mode]
  flops = 2 * patches_a * (p * p) * d + 2 * patches_v * (p * p * 3) * d  # patch embeddings
  flops += specific * (block_flops(patches_a, d, r) + block_flops(patches_v, d, r))
  flops += joint * sum(block_flops(n, d, r) for n in streams if n)
  flops += 2 * d * model.num_classes  # head
  return float(flops)


def finetune_step_flops(model: ml_collections.ConfigDict, probe: bool = False) -> float:
  """FLOPs of one fine-tuning step per sample (a probe runs the frozen encoder forward only)."""
  forward = finetune_forward_flops(model)
  return forward + 4.0 * model.embed_dim * model.num_classes if probe else 3.0 * forward


def xla_flops(compiled: Any) -> float:
  """FLOPs of one call of a compiled JAX executable, from XLA's cost analysis (per partition)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0]
  if not analysis or "flops" not in analysis:
    raise ValueError("XLA's cost analysis of this executable reports no FLOPs")
  return float(analysis["flops"])


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of a chip, or None when unknown (e.g. CPU)."""
  for prefix, peak in PEAK_BF16_FLOPS.items():
    if device_kind.startswith(prefix):
      return peak
  return None


def mfu(samples_per_s: float, step_flops: float, device_kind: str,
        num_devices: int) -> float | None:
  """Model FLOPs utilization: model FLOP/s over the devices' dense bf16 peak (None if unknown)."""
  peak = peak_flops(device_kind)
  if not peak:
    return None
  return samples_per_s * step_flops / (peak * num_devices)
