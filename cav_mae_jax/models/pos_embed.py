"""Fixed 2-D sine-cosine position embeddings (MAE style), as the original computes them."""

from __future__ import annotations

import numpy as np


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
  """[M] positions -> [M, embed_dim] float64: concat(sin(p * w), cos(p * w))."""
  if embed_dim % 2:
    raise ValueError(f"embed_dim={embed_dim} must be even")
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_height: int, grid_width: int) -> np.ndarray:
  """[H * W, embed_dim] float32 for a row-major H x W grid.

  The first half of each embedding encodes the column (time for audio), the second half the
  row, computed in float64 and cast to float32, matching the original's `get_2d_sincos_pos_embed`.
  """
  if embed_dim % 4:
    raise ValueError(f"embed_dim={embed_dim} must be a multiple of 4")
  rows, cols = np.meshgrid(np.arange(grid_height), np.arange(grid_width), indexing="ij")
  emb_col = sincos_1d(embed_dim // 2, cols.reshape(-1))
  emb_row = sincos_1d(embed_dim // 2, rows.reshape(-1))
  return np.concatenate([emb_col, emb_row], axis=1).astype(np.float32)
