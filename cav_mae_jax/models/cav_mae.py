"""CAV-MAE pretraining model (and its variants) and the fine-tuning model, in Flax linen.

Parameter names mirror the original PyTorch modules (see `cav_mae_jax/convert/state_dict.py`).
Inputs: `audio` [B, T, F] normalized fbank (T frames, F mel bins), `image` [B, H, W, 3] NHWC.

Variants are chosen by `ModelConfig` fields, not by classes:
  CAV-MAE            lambda_mae > 0, lambda_c > 0 (default)
  AV-MAE             lambda_c = 0
  vanilla AV-MAE     lambda_c = 0, modality_specific_depth = 0 (one shared encoder)
  CAV                lambda_mae = 0 (contrastive only; no decoder parameters are built)
  audio-/visual-MAE  modalities = 'audio' / 'visual' (vanilla architecture, one modality)

One deliberate difference from the original: with more than one joint block, the original's
pretraining forward applies each joint block to the modality-specific output separately and keeps
only the last (`for blk in blocks_u: ca = blk(a, 'a')`) for the contrastive streams; we chain the
blocks, as its own fine-tuning and feature code does. The two agree for the paper's models (one
joint block), and for vanilla AV-MAE the contrastive streams are unused (lambda_c = 0).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cav_mae_jax.models import losses, masking, vit
from cav_mae_jax.models.config import ATTENTION_ONLY, FT_MODES, ModelConfig
from cav_mae_jax.models.pos_embed import sincos_2d
from cav_mae_jax.models.vit import Block, PatchEmbed, add_param, dense, layer_norm

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_inputs(config: ModelConfig, audio: Optional[jax.Array], image: Optional[jax.Array],
                 *, need_audio: bool, need_image: bool) -> None:
  """Raises ValueError naming the field when input shapes do not match the model config."""
  if need_audio:
    if audio is None:
      raise ValueError("audio is required by this model/mode but was None")
    expected = (config.audio_length, config.num_mel_bins)
    if audio.ndim != 3 or tuple(audio.shape[1:]) != expected:
      raise ValueError(f"audio has shape {tuple(audio.shape)}, "
                       f"expected [B, {expected[0]}, {expected[1]}] "
                       f"(config.model.audio_length={config.audio_length}, "
                       f"config.model.num_mel_bins={config.num_mel_bins})")
  if need_image:
    if image is None:
      raise ValueError("image is required by this model/mode but was None")
    size = config.image_size
    if image.ndim != 4 or tuple(image.shape[1:]) != (size, size, 3):
      raise ValueError(f"image has shape {tuple(image.shape)}, expected [B, {size}, {size}, 3] "
                       f"(config.model.image_size={size})")
  if need_audio and need_image and audio.shape[0] != image.shape[0]:
    raise ValueError(f"audio batch {audio.shape[0]} != image batch {image.shape[0]}")


def check_group_size(config: ModelConfig, batch_size: int) -> None:
  """Raises ValueError naming contrast_group_size when it does not divide the batch."""
  group = config.contrast_group_size
  if group and batch_size % group:
    raise ValueError(f"config.model.contrast_group_size={group} does not divide the batch size "
                     f"{batch_size}")


def _fixed_table(table: Any):
  """A parameter initializer returning a precomputed table (position embeddings)."""
  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    del key
    return jnp.asarray(table, dtype).reshape(shape)
  return init


def _block_class(config: ModelConfig) -> Callable[..., nn.Module]:
  """Block, or Block under `nn.remat` when `config.remat`: recomputed in the backward pass.

  `config.remat_policy` says what the forward keeps (a `jax.checkpoint_policies` name), or
  'attention_only': the blocks keep everything but the attention scores, whose core is
  recomputed (`vit.Attention.recompute`). The block's `modality` is a static argument of the
  remat (it picks LayerNorms, not values), so every call passes it positionally, `blk(x, None)`
  included: remat counts positional arguments.
  """
  if not config.remat:
    return Block
  if config.remat_policy == ATTENTION_ONLY:
    return functools.partial(Block, recompute_attention=True)
  policy = getattr(jax.checkpoint_policies, config.remat_policy)
  return nn.remat(Block, static_argnums=(2,), policy=policy)


class _Encoder(nn.Module):
  """Shared encoder of CAVMAE and CAVMAEFT: embeddings, modality blocks, joint blocks, norms."""

  config: ModelConfig

  @property
  def dtype(self) -> Any:
    return _DTYPES[self.config.dtype]

  def setup(self) -> None:
    cfg = self.config
    dim = cfg.embed_dim
    block = _block_class(cfg)
    make_block = lambda: block(dim, cfg.num_heads, cfg.mlp_ratio, self.dtype, cfg.attention_impl)
    normal = nn.initializers.normal(stddev=0.02)
    if cfg.uses_audio:
      self.patch_embed_a = PatchEmbed(dim, cfg.patch_size, self.dtype)
      self.modality_a = self.param("modality_a", normal, (1, 1, dim), jnp.float32)
      self.pos_embed_a = self.param("pos_embed_a", _fixed_table(sincos_2d(dim, *cfg.audio_grid)),
                                    (1, cfg.num_audio_patches, dim), jnp.float32)
      self.blocks_a = [make_block() for _ in range(cfg.modality_specific_depth)]
      self.norm_a = layer_norm("norm_a", self.dtype)
    if cfg.uses_video:
      self.patch_embed_v = PatchEmbed(dim, cfg.patch_size, self.dtype)
      self.modality_v = self.param("modality_v", normal, (1, 1, dim), jnp.float32)
      self.pos_embed_v = self.param("pos_embed_v", _fixed_table(sincos_2d(dim, *cfg.image_grid)),
                                    (1, cfg.num_image_patches, dim), jnp.float32)
      self.blocks_v = [make_block() for _ in range(cfg.modality_specific_depth)]
      self.norm_v = layer_norm("norm_v", self.dtype)
    self.blocks_u = [make_block() for _ in range(cfg.joint_depth)]
    self.norm = layer_norm("norm", self.dtype)

  def _pos(self, table: jax.Array) -> jax.Array:
    return table if self.config.trainable_pos_embed else jax.lax.stop_gradient(table)

  def embed_audio(self, audio: jax.Array) -> jax.Array:
    """[B, T, F] fbank -> [B, La, D] tokens with position and modality embeddings."""
    x = self.patch_embed_a(losses.audio_as_image(audio).astype(self.dtype))
    return add_param(x, self._pos(self.pos_embed_a) + self.modality_a)

  def embed_video(self, image: jax.Array) -> jax.Array:
    """[B, H, W, 3] image -> [B, Lv, D] tokens with position and modality embeddings."""
    x = self.patch_embed_v(image.astype(self.dtype))
    return add_param(x, self._pos(self.pos_embed_v) + self.modality_v)

  def audio_blocks(self, x: jax.Array) -> jax.Array:
    for blk in self.blocks_a:
      x = blk(x, None)
    return x

  def video_blocks(self, x: jax.Array) -> jax.Array:
    for blk in self.blocks_v:
      x = blk(x, None)
    return x

  def joint(self, x: jax.Array, modality: Optional[str] = None) -> jax.Array:
    """Joint blocks with the stream's LayerNorms, then its final norm (norm / norm_a / norm_v)."""
    for blk in self.blocks_u:
      x = blk(x, modality)
    final = {None: self.norm, "a": getattr(self, "norm_a", None),
             "v": getattr(self, "norm_v", None)}
    return final[modality](x)

  def alone_norms(self, modality: str) -> Optional[str]:
    """`joint`'s `modality` for modality 'a' or 'v' run alone: its own LayerNorms (`norm1_a`, ...,
    `norm_a`), as the original's `forward_feat` and its audio-only fine-tuning model."""
    return modality

  def features(self, audio: Optional[jax.Array], image: Optional[jax.Array]) -> tuple[Any, Any]:
    """Unmasked audio-only and video-only stream tokens [B, L, D] (float32), used for retrieval."""
    streams = self.streams(audio, image, joint=False)
    return streams.get("audio"), streams.get("video")

  def streams(self, audio: Optional[jax.Array], image: Optional[jax.Array], *,
              joint: bool = True) -> dict[str, jax.Array]:
    """Unmasked token streams after the joint blocks (float32), for the inputs given.

    'audio' [B, La, D] (audio-only stream, `norm_a`; the original's `forward_feat` audio output),
    'video' [B, Lv, D] (video-only stream, `norm_v`) and, with both inputs and `joint`,
    'joint' [B, La + Lv, D] (the audio+video stream, `norm`, as multimodal fine-tuning pools it).
    A single-modality model's one stream runs the LayerNorms of `alone_norms`.
    """
    cfg = self.config
    check_inputs(cfg, audio, image, need_audio=cfg.uses_audio and audio is not None,
                 need_image=cfg.uses_video and image is not None)
    a = v = None
    out = {}
    if cfg.uses_audio and audio is not None:
      a = self.audio_blocks(self.embed_audio(audio))
      out["audio"] = self.joint(a, self.alone_norms("a")).astype(jnp.float32)
    if cfg.uses_video and image is not None:
      v = self.video_blocks(self.embed_video(image))
      out["video"] = self.joint(v, self.alone_norms("v")).astype(jnp.float32)
    if joint and a is not None and v is not None:
      out["joint"] = self.joint(jnp.concatenate([a, v], axis=1)).astype(jnp.float32)
    return out


class CAVMAE(_Encoder):
  """CAV-MAE pretraining model: masked encoder, joint decoder, reconstruction + contrastive
  losses."""

  def setup(self) -> None:
    super().setup()
    cfg = self.config
    if cfg.learnable_temperature:
      self.log_temperature = self.param(
          "log_temperature", nn.initializers.constant(jnp.log(cfg.temperature)), (), jnp.float32)
    if not cfg.has_decoder:
      return
    dim = cfg.decoder_embed_dim
    normal = nn.initializers.normal(stddev=0.02)
    self.decoder_embed = dense(dim, "decoder_embed", self.dtype)
    self.mask_token = self.param("mask_token", normal, (1, 1, dim), jnp.float32)
    if cfg.uses_audio:
      self.decoder_modality_a = self.param("decoder_modality_a", normal, (1, 1, dim), jnp.float32)
      self.decoder_pos_embed_a = self.param(
          "decoder_pos_embed_a", _fixed_table(sincos_2d(dim, *cfg.audio_grid)),
          (1, cfg.num_audio_patches, dim), jnp.float32)
      self.decoder_pred_a = dense(cfg.patch_size**2, "decoder_pred_a", self.dtype)
    if cfg.uses_video:
      self.decoder_modality_v = self.param("decoder_modality_v", normal, (1, 1, dim), jnp.float32)
      self.decoder_pos_embed_v = self.param(
          "decoder_pos_embed_v", _fixed_table(sincos_2d(dim, *cfg.image_grid)),
          (1, cfg.num_image_patches, dim), jnp.float32)
      self.decoder_pred_v = dense(cfg.patch_size**2 * 3, "decoder_pred_v", self.dtype)
    block = _block_class(cfg)
    self.decoder_blocks = [block(dim, cfg.decoder_num_heads, cfg.mlp_ratio, self.dtype,
                                 cfg.attention_impl) for _ in range(cfg.decoder_depth)]
    self.decoder_norm = layer_norm("decoder_norm", self.dtype)

  def alone_norms(self, modality: str) -> Optional[str]:
    """A single-modality MAE (the paper's audio-only and visual-only MAE) trains only the joint
    LayerNorms (`norm1`, `norm2`, `norm`), so its one stream runs those."""
    return modality if self.config.modalities == "audiovisual" else None

  def _mask_noise(self, batch: int, grid: tuple[int, int], ratio: float, mode: str,
                  noise: Optional[jax.Array]) -> jax.Array:
    if noise is not None:
      return noise
    return masking.mask_noise(self.make_rng("mask"), batch, grid, ratio, mode)

  def encode(self, audio: Optional[jax.Array], image: Optional[jax.Array],
             noise_a: Optional[jax.Array] = None,
             noise_v: Optional[jax.Array] = None) -> dict[str, Any]:
    """Masks and encodes. Returns the joint stream `x`, contrastive streams and mask bookkeeping."""
    cfg = self.config
    out: dict[str, Any] = {}
    streams = []
    if cfg.uses_audio:
      a = self.embed_audio(audio)
      noise_a = self._mask_noise(a.shape[0], cfg.audio_grid, cfg.mask_ratio_a, cfg.mask_mode_a,
                                 noise_a)
      keep_a = masking.num_kept(cfg.num_audio_patches, cfg.mask_ratio_a)
      a, out["mask_a"], out["ids_restore_a"] = masking.random_masking(a, noise_a, keep_a)
      a = self.audio_blocks(a)
      streams.append(a)
    if cfg.uses_video:
      v = self.embed_video(image)
      noise_v = self._mask_noise(v.shape[0], cfg.image_grid, cfg.mask_ratio_v, "unstructured",
                                 noise_v)
      keep_v = masking.num_kept(cfg.num_image_patches, cfg.mask_ratio_v)
      v, out["mask_v"], out["ids_restore_v"] = masking.random_masking(v, noise_v, keep_v)
      v = self.video_blocks(v)
      streams.append(v)
    if cfg.has_decoder or self.is_initializing():
      out["x"] = self.joint(jnp.concatenate(streams, axis=1))
    if cfg.modalities == "audiovisual" and (cfg.has_contrast or self.is_initializing()):
      out["latent_c_a"] = self.joint(a, "a")
      out["latent_c_v"] = self.joint(v, "v")
    return out

  def decode(self, x: jax.Array,
             enc: dict[str, Any]) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
    """Joint decoder: mask tokens, position/modality embeddings, blocks, per-modality
    predictions."""
    cfg = self.config
    x = self.decoder_embed(x)
    pieces = []
    start = 0
    for name in ("a", "v"):
      if f"ids_restore_{name}" not in enc:
        continue
      ids_restore = enc[f"ids_restore_{name}"]
      keep = masking.num_kept(ids_restore.shape[1], getattr(cfg, f"mask_ratio_{name}"))
      tokens = masking.restore_with_mask_tokens(x[:, start:start + keep], self.mask_token,
                                                ids_restore)
      pos = self._pos(getattr(self, f"decoder_pos_embed_{name}"))
      tokens = add_param(tokens, pos + getattr(self, f"decoder_modality_{name}"))
      pieces.append((name, tokens))
      start += keep
    lengths = [t.shape[1] for _, t in pieces]
    y = jnp.concatenate([t for _, t in pieces], axis=1)
    for blk in self.decoder_blocks:
      y = blk(y, None)
    y = self.decoder_norm(y)
    preds: dict[str, Optional[jax.Array]] = {"a": None, "v": None}
    offset = 0
    for (name, _), length in zip(pieces, lengths):
      head = getattr(self, f"decoder_pred_{name}")
      preds[name] = head(y[:, offset:offset + length]).astype(jnp.float32)
      offset += length
    return preds["a"], preds["v"]

  def _targets(self, audio: Optional[jax.Array],
               image: Optional[jax.Array]) -> dict[str, jax.Array]:
    p = self.config.patch_size
    targets = {}
    if audio is not None:
      targets["a"] = losses.patchify(losses.audio_as_image(audio.astype(jnp.float32)), p)
    if image is not None:
      targets["v"] = losses.patchify(image.astype(jnp.float32), p)
    return targets

  def __call__(self, audio: Optional[jax.Array], image: Optional[jax.Array], *,
               noise_a: Optional[jax.Array] = None, noise_v: Optional[jax.Array] = None,
               return_details: bool = False) -> dict[str, jax.Array]:
    """Pretraining forward: float32 scalar losses (and masks/predictions if return_details)."""
    cfg = self.config
    check_inputs(cfg, audio, image, need_audio=cfg.uses_audio, need_image=cfg.uses_video)
    if self.is_initializing():  # parameters do not depend on the batch: any batch initializes
      return self._forward(audio, image, noise_a, noise_v, 0, return_details)
    check_group_size(cfg, (audio if cfg.uses_audio else image).shape[0])
    return self._forward(audio, image, noise_a, noise_v, cfg.contrast_group_size, return_details)

  def _forward(self, audio: Optional[jax.Array], image: Optional[jax.Array],
               noise_a: Optional[jax.Array], noise_v: Optional[jax.Array], group_size: int,
               return_details: bool) -> dict[str, jax.Array]:
    """Losses with negatives and loss sums over groups of `group_size` (0: the whole batch)."""
    cfg = self.config
    enc = self.encode(audio, image, noise_a, noise_v)
    zero = jnp.zeros((), jnp.float32)
    out = {"loss_mae_a": zero, "loss_mae_v": zero, "loss_mae": zero, "loss_c": zero, "c_acc": zero}
    details: dict[str, jax.Array] = {k: enc[k] for k in ("mask_a", "mask_v") if k in enc}
    if cfg.has_decoder:
      pred_a, pred_v = self.decode(enc["x"], enc)
      targets = self._targets(audio if cfg.uses_audio else None, image if cfg.uses_video else None)
      for name, pred in (("a", pred_a), ("v", pred_v)):
        if pred is not None:
          out[f"loss_mae_{name}"] = losses.mae_loss(
              targets[name], pred, enc[f"mask_{name}"], norm_pix_loss=cfg.norm_pix_loss,
              group_size=group_size)
          details[f"pred_{name}"] = pred
      out["loss_mae"] = cfg.lambda_mae * (out["loss_mae_a"] + out["loss_mae_v"])
    if "latent_c_a" in enc and (cfg.has_contrast or self.is_initializing()):
      temperature = jnp.exp(self.log_temperature) if cfg.learnable_temperature else cfg.temperature
      nce, out["c_acc"] = losses.contrastive_loss(
          vit.mean_tokens(enc["latent_c_a"]), vit.mean_tokens(enc["latent_c_v"]), temperature,
          bidirectional=cfg.contrast_bidirectional, group_size=group_size)
      out["loss_c"] = cfg.lambda_c * nce
    out["loss"] = out["loss_mae"] + out["loss_c"]
    if return_details:
      out.update(details)
    return out

  def inpaint(self, audio: jax.Array, image: jax.Array, *, noise_a: Optional[jax.Array] = None,
              noise_v: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """Reconstructions, masks and per-modality reconstruction losses (the original's
    forward_inpaint).

    Losses are means over the whole batch: the original calls forward_inpaint outside
    DataParallel, so contrast groups do not apply here.
    """
    cfg = self.config
    if not cfg.has_decoder:
      raise ValueError("inpaint needs a decoder; config.model.lambda_mae is 0 (CAV has no decoder)")
    check_inputs(cfg, audio, image, need_audio=cfg.uses_audio, need_image=cfg.uses_video)
    out = self._forward(audio, image, noise_a, noise_v, 0, True)
    keys = ("pred_a", "pred_v", "mask_a", "mask_v", "loss_mae_a", "loss_mae_v")
    return {k: out[k] for k in keys if k in out}


class CAVMAEFT(_Encoder):
  """Fine-tuning model: unmasked encoder + LayerNorm/Linear head on mean-pooled tokens."""

  def setup(self) -> None:
    super().setup()
    self.mlp_head_0 = layer_norm("mlp_head_0", jnp.float32)
    self.mlp_head_1 = nn.Dense(self.config.num_classes,
                               kernel_init=nn.initializers.xavier_uniform(),
                               bias_init=nn.initializers.zeros, dtype=jnp.float32,
                               param_dtype=jnp.float32, name="mlp_head_1")

  def alone_norms(self, modality: str) -> Optional[str]:
    """A single-modality model fine-tuned in 'multimodal' mode pools its one stream through the
    joint LayerNorms, as a single-modality MAE trained them; in its own modality's mode through
    that modality's (the original's audio-only fine-tuning of an audio-visual model)."""
    single = self.config.modalities != "audiovisual"
    return None if single and self.config.ft_mode == "multimodal" else modality

  def _head(self, pooled: jax.Array) -> jax.Array:
    return self.mlp_head_1(self.mlp_head_0(pooled.astype(jnp.float32)))

  def __call__(self, audio: Optional[jax.Array], image: Optional[jax.Array],
               mode: Optional[str] = None) -> jax.Array:
    """Logits [B, num_classes] (float32) for one of the five modality modes."""
    cfg = self.config
    mode = cfg.ft_mode if mode is None else mode
    problem = cfg.mode_problem(mode)
    if problem is not None and (mode not in FT_MODES or not self.is_initializing()):
      raise ValueError(problem)
    need_audio = mode in ("multimodal", "audioonly", "missingaudioonly") or self.is_initializing()
    need_image = mode in ("multimodal", "videoonly", "missingvideoonly") or self.is_initializing()
    need_audio &= cfg.uses_audio
    need_image &= cfg.uses_video
    check_inputs(cfg, audio, image, need_audio=need_audio, need_image=need_image)
    if self.is_initializing():
      # Create every parameter: the multimodal stream and both single-modality streams, or a
      # single-modality model's for its own mode.
      self.features(audio if need_audio else None, image if need_image else None)
      mode = "multimodal" if cfg.modalities == "audiovisual" else cfg.ft_mode
    a = self.audio_blocks(self.embed_audio(audio)) if need_audio else None
    v = self.video_blocks(self.embed_video(image)) if need_image else None
    mean = vit.mean_tokens
    if mode == "multimodal":
      pooled = mean(self.joint(jnp.concatenate([t for t in (a, v) if t is not None], axis=1)))
    elif mode in ("audioonly", "videoonly"):
      tokens, name = (a, "a") if mode == "audioonly" else (v, "v")
      pooled = mean(self.joint(tokens, self.alone_norms(name)))
    else:
      tokens, name = (a, "a") if mode == "missingaudioonly" else (v, "v")
      pooled = (mean(self.joint(tokens)) + mean(self.joint(tokens, name))) / 2
    return self._head(pooled)
