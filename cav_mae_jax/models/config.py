"""Model configuration: presets and a validated, immutable view of `config.model`.

Every field is checked here, in plain Python, before anything is traced or compiled; a bad
value raises `ValueError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import ml_collections

MASK_MODES = ("unstructured", "time", "freq", "tf")
FT_MODES = ("multimodal", "audioonly", "videoonly", "missingaudioonly", "missingvideoonly")
MODALITIES = ("audiovisual", "audio", "visual")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("xla", "cudnn")
# What a rematerialized block keeps from its forward pass (names in jax.checkpoint_policies):
# nothing (recompute the whole block), every matmul output, or the matmul outputs without batch
# dimensions (the projections and MLP, not the attention scores); or everything but XLA
# attention's [B, H, N, N] scores and probabilities, whose core alone is recomputed.
ATTENTION_ONLY = "attention_only"
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  ATTENTION_ONLY)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Validated model hyper-parameters (the fields of `config.model`)."""

  # Encoder.
  embed_dim: int = 768
  encoder_depth: int = 12
  modality_specific_depth: int = 11
  num_heads: int = 12
  mlp_ratio: float = 4.0
  # Decoder.
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  # Inputs.
  audio_length: int = 1024
  num_mel_bins: int = 128
  image_size: int = 224
  patch_size: int = 16
  modalities: str = "audiovisual"
  # Pretraining objective.
  norm_pix_loss: bool = True
  mask_ratio_a: float = 0.75
  mask_ratio_v: float = 0.75
  mask_mode_a: str = "unstructured"
  lambda_mae: float = 1.0
  lambda_c: float = 0.01
  contrast_bidirectional: bool = False
  temperature: float = 0.05
  learnable_temperature: bool = False
  contrast_group_size: int = 0
  # Parameters and compute.
  trainable_pos_embed: bool = False
  dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  attention_impl: str = "xla"
  # Fine-tuning.
  num_classes: int = 527
  ft_mode: str = "multimodal"

  @classmethod
  def from_config(
      cls, config: ModelConfig | Mapping[str, Any] | ml_collections.ConfigDict) -> ModelConfig:
    """Builds a validated ModelConfig; unknown keys and bad values raise ValueError naming the
    field."""
    if isinstance(config, ModelConfig):
      return config
    values = dict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(
          f"config.model: unknown field(s) {unknown}; known fields are {sorted(known)}")
    for f in dataclasses.fields(cls):
      if f.name in values:
        values[f.name] = _coerce(f.name, values[f.name], type(getattr(cls, f.name)))
    model_config = cls(**values)
    model_config.validate()
    return model_config

  def validate(self) -> None:
    """Raises ValueError naming the first invalid field."""
    def fail(field: str, why: str) -> None:
      raise ValueError(f"config.model.{field}={getattr(self, field)!r}: {why}")

    for field in ("embed_dim", "encoder_depth", "num_heads", "decoder_embed_dim", "decoder_depth",
                  "decoder_num_heads", "audio_length", "num_mel_bins", "image_size", "patch_size",
                  "num_classes"):
      if getattr(self, field) <= 0:
        fail(field, "must be positive")
    if not 0 < self.mlp_ratio < math.inf:
      fail("mlp_ratio", "must be positive and finite")
    if int(min(self.embed_dim, self.decoder_embed_dim) * self.mlp_ratio) < 1:
      fail("mlp_ratio", "gives an MLP of no hidden units (int(embed_dim * mlp_ratio), and "
           "with decoder_embed_dim, must be at least 1)")
    if self.embed_dim % self.num_heads:
      fail("num_heads", f"must divide embed_dim={self.embed_dim}")
    if self.decoder_embed_dim % self.decoder_num_heads:
      fail("decoder_num_heads", f"must divide decoder_embed_dim={self.decoder_embed_dim}")
    if self.embed_dim % 4 or self.decoder_embed_dim % 4:
      fail("embed_dim" if self.embed_dim % 4 else "decoder_embed_dim",
           "must be a multiple of 4 (2-D sin-cos position embedding)")
    if not 0 <= self.modality_specific_depth < self.encoder_depth:
      fail("modality_specific_depth", f"must be in [0, encoder_depth={self.encoder_depth}) "
           "so that at least one joint block remains")
    if self.audio_length % self.patch_size:
      fail("audio_length", f"must be a multiple of patch_size={self.patch_size}")
    if self.num_mel_bins % self.patch_size:
      fail("num_mel_bins", f"must be a multiple of patch_size={self.patch_size}")
    if self.image_size % self.patch_size:
      fail("image_size", f"must be a multiple of patch_size={self.patch_size}")
    if self.modalities not in MODALITIES:
      fail("modalities", f"must be one of {MODALITIES}")
    for field in ("mask_ratio_a", "mask_ratio_v"):
      if not 0.0 <= getattr(self, field) < 1.0:
        fail(field, "must be in [0, 1)")
    if self.mask_mode_a not in MASK_MODES:
      fail("mask_mode_a", f"unknown audio mask mode; must be one of {MASK_MODES}")
    if self.lambda_mae < 0:
      fail("lambda_mae", "must be >= 0")
    if self.lambda_c < 0:
      fail("lambda_c", "must be >= 0")
    if self.modalities != "audiovisual" and self.lambda_c != 0:
      fail("lambda_c", f"must be 0 for a single-modality model (modalities={self.modalities!r})")
    if self.modalities != "audiovisual" and self.lambda_mae == 0:
      fail("lambda_mae", "must be > 0 for a single-modality model")
    if not 0 < self.temperature < math.inf:
      fail("temperature", "must be positive and finite")
    if self.contrast_group_size < 0:
      fail("contrast_group_size", "must be >= 0 (0 = the whole batch is one group)")
    if self.dtype not in DTYPES:
      fail("dtype", f"must be one of {DTYPES}")
    if self.remat_policy not in REMAT_POLICIES:
      fail("remat_policy", f"must be one of {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      fail("attention_impl", f"must be one of {ATTENTION_IMPLS}")
    if self.remat and self.remat_policy == ATTENTION_ONLY and self.attention_impl == "cudnn":
      fail("remat_policy", f"{ATTENTION_ONLY!r} recomputes XLA attention's scores; cuDNN's "
           "attention (attention_impl='cudnn') keeps none, so there is nothing to recompute")
    if self.attention_impl == "cudnn" and self.dtype != "bfloat16":
      fail("attention_impl", f"cuDNN's attention computes in bfloat16 (or float16), so it needs "
           f"dtype='bfloat16', not {self.dtype!r}; use 'xla' in float32")
    if self.ft_mode not in FT_MODES:
      fail("ft_mode", f"unknown fine-tuning mode; must be one of {FT_MODES}")
    absent = self.absent_modality
    if absent and absent in self.ft_mode:
      fail("ft_mode", f"needs the {absent}, which a modalities={self.modalities!r} model does "
           "not have")

  # Derived quantities.
  @property
  def joint_depth(self) -> int:
    """Number of joint (shared) encoder blocks."""
    return self.encoder_depth - self.modality_specific_depth

  @property
  def audio_grid(self) -> tuple[int, int]:
    """(frequency rows, time columns) of the audio patch grid."""
    return self.num_mel_bins // self.patch_size, self.audio_length // self.patch_size

  @property
  def image_grid(self) -> tuple[int, int]:
    """(rows, columns) of the image patch grid."""
    return self.image_size // self.patch_size, self.image_size // self.patch_size

  @property
  def num_audio_patches(self) -> int:
    return self.audio_grid[0] * self.audio_grid[1]

  @property
  def num_image_patches(self) -> int:
    return self.image_grid[0] * self.image_grid[1]

  @property
  def uses_audio(self) -> bool:
    return self.modalities in ("audiovisual", "audio")

  @property
  def uses_video(self) -> bool:
    return self.modalities in ("audiovisual", "visual")

  @property
  def absent_modality(self) -> str | None:
    """'video' for an audio-only model, 'audio' for a visual-only one (as the modes spell
    them), None for an audio-visual one."""
    return {"audio": "video", "visual": "audio"}.get(self.modalities)

  def mode_problem(self, mode: str) -> str | None:
    """Why the fine-tuned model of this config cannot score in modality mode `mode` (None: it
    can): a single-modality model has no stream of the other modality, and has the final
    LayerNorms of its own `ft_mode` only (the joint ones after 'multimodal', its modality's
    after its modality's modes)."""
    if mode not in FT_MODES:
      return f"unknown fine-tuning mode {mode!r}; must be one of {FT_MODES}"
    if self.modalities == "audiovisual":
      return None
    if self.absent_modality in mode:  # (the rule `validate` applies to ft_mode)
      return (f"mode {mode!r} needs a modality that config.model.modalities="
              f"{self.modalities!r} does not have")
    missing = self._final_norms(mode) - self._final_norms(self.ft_mode)
    if missing:
      return (f"mode {mode!r} pools through LayerNorms ({', '.join(sorted(missing))}) that a "
              f"modalities={self.modalities!r} model fine-tuned with ft_mode={self.ft_mode!r} "
              "does not have")
    return None

  def _final_norms(self, mode: str) -> set[str]:
    """The final LayerNorms a single-modality fine-tuned model's `mode` pools through: the joint
    `norm` after 'multimodal' (as its MAE trained them), its modality's after its own modes."""
    if mode == "multimodal":
      return {"norm"}
    own = {"norm" if self.ft_mode == "multimodal" else "norm_" + ("a" if self.uses_audio else "v")}
    return own | {"norm"} if mode.startswith("missing") else own

  @property
  def has_decoder(self) -> bool:
    return self.lambda_mae != 0

  @property
  def has_contrast(self) -> bool:
    return self.lambda_c != 0


def _coerce(field: str, value: Any, expected: type) -> Any:
  """Checks a config value's type (ints accepted for floats); raises ValueError naming the field."""
  if expected is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if expected is int and isinstance(value, bool):
    raise ValueError(f"config.model.{field}={value!r}: expected int, got bool")
  if not isinstance(value, expected):
    raise ValueError(f"config.model.{field}={value!r}: expected {expected.__name__}, "
                     f"got {type(value).__name__}")
  return value


_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's model: 11 modality-specific + 1 joint block, width 768; decoder 8 x 512.
    "base": {},
    # Seconds on a CPU; same input shapes as base so it runs on real records.
    "tiny": dict(embed_dim=64, encoder_depth=3, modality_specific_depth=2, num_heads=4,
                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4),
}


def model_config(size: str = "base", **overrides: Any) -> ml_collections.ConfigDict:
  """Returns `config.model` for a preset ('tiny' or 'base') with optional field overrides."""
  if size not in _PRESETS:
    raise ValueError(f"unknown model size {size!r}; choose one of {sorted(_PRESETS)}")
  values = dataclasses.asdict(ModelConfig())
  values.update(_PRESETS[size])
  values.update(overrides)
  ModelConfig.from_config(values)  # Fail early on a bad override.
  return ml_collections.ConfigDict(values)
