"""Audio <-> visual retrieval ranks on the device: recall@k and median rank in both directions.

The original's retrieval script compares L2-normalized, mean-pooled audio and video features
by cosine similarity and scores, for query i, the rank of item i, in a Python double loop that
takes tens of minutes for a few thousand clips. Here the similarity is a jitted matrix product,
computed in chunks of queries so that only a chunk x N block ever exists (20k clips need no
N x N host matrix), and each query's rank is counted on the device.

Ties (exactly equal similarities: duplicate clips, constant features) are scored as the
original's `compute_metrics` scores them: a correct item tied with m - 1 others stands at each of
the m positions of the tie, and every position counts as one entry of the recalls and the median
(so constant features give chance-level recall). The correct item's score is read from the same
similarity block as its competitors, so equal features really tie.
Float32 products use `Precision.HIGHEST`: accelerators would otherwise round the inputs of a
float32 matrix product to bfloat16 or TF32, and near-ties would rank differently.
"""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

RECALL_KS = (1, 5, 10)


def _normalize(features: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm (all-zero rows stay zero)."""
  norm = jnp.linalg.norm(features, axis=-1, keepdims=True)
  return features / jnp.maximum(norm, 1e-12)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _positions(queries: jax.Array, items: jax.Array, chunk_size: int
               ) -> tuple[jax.Array, jax.Array]:
  """(items above item i, items equal to it) for query i, chunk_size queries at a time."""
  num = queries.shape[0]
  num_chunks = -(-num // chunk_size)
  queries = _normalize(queries)
  items = _normalize(items)
  padded = jnp.pad(queries, ((0, num_chunks * chunk_size - num), (0, 0)))

  def chunk_positions(args):
    chunk, first = args
    similarity = jnp.matmul(chunk, items.T, precision=jax.lax.Precision.HIGHEST)  # [chunk, N]
    correct_index = jnp.minimum(first + jnp.arange(chunk_size), num - 1)  # padding: any item
    correct = jnp.take_along_axis(similarity, correct_index[:, None], axis=1)
    return (jnp.sum(similarity > correct, axis=1, dtype=jnp.int32),
            jnp.sum(similarity == correct, axis=1, dtype=jnp.int32))

  firsts = jnp.arange(num_chunks) * chunk_size
  ahead, tied = jax.lax.map(chunk_positions,
                            (padded.reshape(num_chunks, chunk_size, -1), firsts))
  return ahead.reshape(-1)[:num], tied.reshape(-1)[:num]


def correct_item_positions(queries: ArrayLike, items: ArrayLike, *, chunk_size: int = 1024,
                           dtype: DTypeLike = jnp.float32) -> tuple[np.ndarray, np.ndarray]:
  """Where items[i] stands among all items for queries[i] by cosine similarity: (ahead, tied),
  [N] int each on the host; `ahead[i]` items score above it and `tied[i]` (itself included)
  equal it, so it occupies the 0-based positions ahead[i] .. ahead[i] + tied[i] - 1."""
  if jax.dtypes.canonicalize_dtype(dtype) != jnp.dtype(dtype):
    raise ValueError(f"Cannot compute in {jnp.dtype(dtype)}: float64 needs jax_enable_x64.")
  queries = jnp.asarray(queries, dtype)
  items = jnp.asarray(items, dtype)
  if queries.ndim != 2 or queries.shape != items.shape or queries.shape[0] == 0:
    raise ValueError(f"queries and items must both be [N, D] with N >= 1; "
                     f"got {queries.shape} and {items.shape}.")
  if not (jnp.isfinite(queries).all() and jnp.isfinite(items).all()):
    raise ValueError("Retrieval features contain NaN or infinite values.")
  chunk_size = max(1, min(chunk_size, queries.shape[0]))
  ahead, tied = _positions(queries, items, chunk_size=chunk_size)
  return np.asarray(ahead), np.asarray(tied)


def recall_and_median_rank(ahead: np.ndarray, tied: np.ndarray,
                           ks: Iterable[int] = RECALL_KS) -> dict[str, float]:
  """Recall@k in % and the median 1-based rank of `correct_item_positions`: each query counts
  once per position of its tie (the original's `compute_metrics`; without ties, once)."""
  ahead, tied = np.asarray(ahead, np.int64), np.asarray(tied, np.int64)
  entries = int(tied.sum())
  metrics = {f"r@{k}": 100.0 * float(np.clip(k - ahead, 0, tied).sum() / entries) for k in ks}
  # Entries per position (0 .. N - 1), then the middle one or two of them in sorted order.
  per_position = np.zeros(len(ahead) + 1, np.int64)
  np.add.at(per_position, ahead, 1)
  np.add.at(per_position, ahead + tied, -1)
  up_to = np.cumsum(np.cumsum(per_position))  # entries at positions <= p
  middle = np.searchsorted(up_to, [(entries - 1) // 2, entries // 2], side="right")
  metrics["median_rank"] = float(np.mean(middle)) + 1.0
  return metrics


def audio_visual_retrieval(audio_features: ArrayLike, video_features: ArrayLike, *,
                           chunk_size: int = 1024,
                           dtype: DTypeLike = jnp.float32) -> dict[str, float]:
  """'a2v/r@1', ..., 'a2v/median_rank', 'v2a/r@1', ... of paired features [N, D] (host or jax)."""
  metrics = {}
  for direction, queries, items in (("a2v", audio_features, video_features),
                                    ("v2a", video_features, audio_features)):
    positions = correct_item_positions(queries, items, chunk_size=chunk_size, dtype=dtype)
    metrics.update({f"{direction}/{k}": v for k, v in recall_and_median_rank(*positions).items()})
  return metrics
