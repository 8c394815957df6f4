"""Resizing the audio position-embedding grid to another number of time patches.

Audio patches are ordered frequency-major: flat index = f * time_patches + t, on a grid of
`freq_patches` (8 for 128 mel bins) rows by `time_patches` (audio_length / 16) columns.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from cav_mae_jax.models import pos_embed as sincos

ResizeMethod = Literal["trim", "interpolate", "sincos"]
# How far a stored table may be from the float64-computed sin-cos table and still be it: this,
# plus one unit in the last place of the table's own dtype (a float16 or bfloat16 copy of the
# float32 table the original saves is rounded twice).
SINCOS_ATOL = 1e-6


def resize_audio_pos_embed(pos_embed: np.ndarray, *, freq_patches: int, time_patches: int,
                           method: ResizeMethod) -> np.ndarray:
  """Maps a [1, F*T, D] audio position embedding to [1, F*time_patches, D].

  'trim' keeps the first `time_patches` columns of every frequency row (only shortens; for
  the fixed sin-cos embedding it equals recomputing it on the smaller grid). 'interpolate'
  resamples each row linearly along time (half-pixel centres, as torch bilinear with
  align_corners=False), computed in float64: for a trained table (a fine-tuned checkpoint).
  'sincos' recomputes the fixed sin-cos table on the new grid, shorter or longer (every time
  patch keeps its position code; a longer grid gets new columns, where 'interpolate' would
  stretch the old ones): only for a source that is that fixed table (every pretraining
  checkpoint of the paper's recipes, which keep it fixed), refused otherwise.
  """
  if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
    raise ValueError(f"audio pos embed must be [1, patches, dim], got {pos_embed.shape}")
  _, patches, dim = pos_embed.shape
  if freq_patches <= 0 or patches % freq_patches:
    raise ValueError(f"{patches} audio patches do not form {freq_patches} frequency rows")
  if time_patches <= 0:
    raise ValueError(f"time_patches must be positive, got {time_patches}")
  source_time = patches // freq_patches
  grid = pos_embed.reshape(freq_patches, source_time, dim)
  if method == "trim":
    if time_patches > source_time:
      longer = ("method='sincos' (the table is the fixed sin-cos embedding: recomputed on the "
                "longer grid, as the original builds it)" if
                is_sincos(pos_embed, freq_patches) else
                "method='interpolate' (a trained table)")
      raise ValueError(f"cannot trim {source_time} time patches to {time_patches}; to lengthen "
                       f"use {longer}")
    resized = grid[:, :time_patches]
  elif method == "interpolate":
    resized = _interpolate_time(grid.astype(np.float64), time_patches).astype(pos_embed.dtype)
  elif method == "sincos":
    if not is_sincos(pos_embed, freq_patches):
      distance = sincos_distance(pos_embed, freq_patches)
      raise ValueError(
          f"the source table is not the fixed sin-cos embedding of its {freq_patches} x "
          f"{source_time} grid (max difference {distance:.3g}; a trained table, as a fine-tuned "
          "checkpoint's): use method='interpolate'")
    resized = sincos.sincos_2d(dim, freq_patches, time_patches).astype(pos_embed.dtype)
  else:
    raise ValueError(f"unknown resize method {method!r} (use 'trim', 'interpolate' or "
                     "'sincos')")
  return np.ascontiguousarray(resized.reshape(1, freq_patches * time_patches, dim))


def _fixed_table(pos_embed: np.ndarray, freq_patches: int) -> np.ndarray:
  """The float64 sin-cos table of a [1, F*T, D] audio table's grid."""
  _, patches, dim = pos_embed.shape
  return sincos.sincos_2d(dim, freq_patches, patches // freq_patches).reshape(pos_embed.shape)


def sincos_distance(pos_embed: np.ndarray, freq_patches: int) -> float:
  """Largest difference between a [1, F*T, D] audio table and the fixed sin-cos table of its
  grid (for messages: `is_sincos` decides)."""
  fixed = _fixed_table(pos_embed, freq_patches)
  return float(np.max(np.abs(pos_embed.astype(np.float64) - fixed)))


def is_sincos(pos_embed: np.ndarray, freq_patches: int) -> bool:
  """Whether a [1, F*T, D] audio table is the fixed sin-cos table of its grid, as every
  pretraining checkpoint of the paper's recipes keeps it, at the table's own precision (within
  SINCOS_ATOL plus one unit in the last place of its dtype)."""
  fixed = _fixed_table(pos_embed, freq_patches)
  ulp = np.spacing(np.abs(fixed).astype(pos_embed.dtype)).astype(np.float64)
  return bool(np.all(np.abs(pos_embed.astype(np.float64) - fixed) <= SINCOS_ATOL + ulp))


def _interpolate_time(grid: np.ndarray, time_patches: int) -> np.ndarray:
  source_time = grid.shape[1]
  centres = (np.arange(time_patches) + 0.5) * (source_time / time_patches) - 0.5
  centres = np.clip(centres, 0.0, source_time - 1)
  left = np.floor(centres).astype(np.int64)
  right = np.minimum(left + 1, source_time - 1)
  weight = (centres - left)[None, :, None]
  return grid[:, left] * (1.0 - weight) + grid[:, right] * weight
