"""CAV-MAE losses, always computed in float32: masked reconstruction (MAE) and contrastive
(InfoNCE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """NHWC [B, h*p, w*p, C] -> [B, h*w, p*p*C], pixel order (row, column, channel) in a patch."""
  batch, height, width, channels = images.shape
  p = patch_size
  x = images.reshape(batch, height // p, p, width // p, p, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(patches: jax.Array, grid: tuple[int, int], patch_size: int) -> jax.Array:
  """[B, h*w, p*p*C] -> NHWC [B, h*p, w*p, C]: the inverse of `patchify` on an h x w grid."""
  batch, _, size = patches.shape
  rows, cols = grid
  p = patch_size
  channels = size // (p * p)
  x = patches.reshape(batch, rows, cols, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, rows * p, cols * p, channels)


def audio_as_image(audio: jax.Array) -> jax.Array:
  """Fbank [B, T, F] -> NHWC [B, F, T, 1]: frequency is the height, time the width."""
  return jnp.swapaxes(audio, 1, 2)[..., None]


def _split_groups(x: jax.Array, group_size: int) -> jax.Array:
  """[B, ...] -> [B // G, G, ...]; G = 0 means one group holding the whole batch."""
  group_size = group_size or x.shape[0]
  return x.reshape(x.shape[0] // group_size, group_size, *x.shape[1:])


def mae_loss(target_patches: jax.Array, pred: jax.Array, mask: jax.Array, *, norm_pix_loss: bool,
             group_size: int = 0) -> jax.Array:
  """Mean per-patch MSE over removed patches; per-group means are summed over groups.

  `norm_pix_loss` normalizes each target patch by its mean and unbiased variance (+1e-6).
  """
  target = target_patches.astype(jnp.float32)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)  # [B, L]
  per_patch, mask = _split_groups(per_patch, group_size), _split_groups(mask, group_size)
  per_group = (per_patch * mask).sum(axis=(1, 2)) / mask.sum(axis=(1, 2))
  return per_group.sum()


def _l2_normalize(x: jax.Array) -> jax.Array:
  """x / max(||x||, 1e-12), as torch.nn.functional.normalize."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _nce_columns(sim: jax.Array) -> tuple[jax.Array, jax.Array]:
  """InfoNCE with the softmax over axis 0 (the original's direction) and its matching accuracy."""
  log_probs = jax.nn.log_softmax(sim, axis=0)
  diag = jnp.diagonal(log_probs, axis1=-2, axis2=-1)
  nce = -jnp.mean(diag, axis=-1)
  hits = jnp.argmax(sim, axis=-2) == jnp.arange(sim.shape[-1])
  return nce, jnp.mean(hits.astype(jnp.float32), axis=-1)


def contrastive_loss(audio_rep: jax.Array, video_rep: jax.Array, temperature: jax.Array | float, *,
                     bidirectional: bool = False,
                     group_size: int = 0) -> tuple[jax.Array, jax.Array]:
  """InfoNCE between pooled audio [B, D] and video [B, D] representations.

  Negatives are the other samples of the same group (G = 0: the whole batch). Per-group losses
  are summed and accuracies averaged over groups, as the original's DataParallel does.
  """
  audio_rep = _split_groups(_l2_normalize(audio_rep.astype(jnp.float32)), group_size)
  video_rep = _split_groups(_l2_normalize(video_rep.astype(jnp.float32)), group_size)
  sim = jnp.einsum("gid,gjd->gij", audio_rep, video_rep) / temperature  # [groups, G, G]
  nce, acc = jax.vmap(_nce_columns)(sim)
  if bidirectional:
    nce_t, acc_t = jax.vmap(_nce_columns)(jnp.swapaxes(sim, 1, 2))
    nce, acc = (nce + nce_t) / 2, (acc + acc_t) / 2
  return nce.sum(), acc.mean()
