"""Audio <-> visual retrieval ranks on the device: recall@k and median rank in both directions.

The original's retrieval script compares L2-normalized, mean-pooled audio and video features
by cosine similarity and scores, for query i, the rank of item i, in a Python double loop that
takes tens of minutes for a few thousand clips. Here the similarity is a jitted matrix product,
computed in chunks of queries so that only a chunk x N block ever exists (20k clips need no
N x N host matrix), and each query's rank is counted on the device.

Ties count against the query: an item scoring equal to the correct one ranks ahead of it, so
constant features give chance-level recall, not perfect recall. The correct item's score is
read from the same similarity block as its competitors, so equal features really tie.
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
def _ranks(queries: jax.Array, items: jax.Array, chunk_size: int) -> jax.Array:
  """0-based rank of item i for query i, chunk_size queries at a time; [N] int32."""
  num = queries.shape[0]
  num_chunks = -(-num // chunk_size)
  queries = _normalize(queries)
  items = _normalize(items)
  padded = jnp.pad(queries, ((0, num_chunks * chunk_size - num), (0, 0)))
  item_index = jnp.arange(num)

  def chunk_ranks(args):
    chunk, first = args
    similarity = jnp.matmul(chunk, items.T, precision=jax.lax.Precision.HIGHEST)  # [chunk, N]
    correct_index = jnp.minimum(first + jnp.arange(chunk_size), num - 1)  # padding: any item
    correct = jnp.take_along_axis(similarity, correct_index[:, None], axis=1)
    ahead = (similarity >= correct) & (item_index[None, :] != correct_index[:, None])
    return jnp.sum(ahead, axis=1, dtype=jnp.int32)

  firsts = jnp.arange(num_chunks) * chunk_size
  ranks = jax.lax.map(chunk_ranks, (padded.reshape(num_chunks, chunk_size, -1), firsts))
  return ranks.reshape(-1)[:num]


def correct_item_ranks(queries: ArrayLike, items: ArrayLike, *, chunk_size: int = 1024,
                       dtype: DTypeLike = jnp.float32) -> np.ndarray:
  """0-based rank of items[i] among all items for queries[i] by cosine similarity; [N] host."""
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
  return np.asarray(_ranks(queries, items, chunk_size=chunk_size))


def recall_and_median_rank(ranks: np.ndarray, ks: Iterable[int] = RECALL_KS) -> dict[str, float]:
  """Recall@k in % and the median 1-based rank of 0-based ranks."""
  ranks = np.asarray(ranks)
  metrics = {f"r@{k}": 100.0 * float(np.mean(ranks < k)) for k in ks}
  metrics["median_rank"] = float(np.median(ranks + 1))
  return metrics


def audio_visual_retrieval(audio_features: ArrayLike, video_features: ArrayLike, *,
                           chunk_size: int = 1024,
                           dtype: DTypeLike = jnp.float32) -> dict[str, float]:
  """'a2v/r@1', ..., 'a2v/median_rank', 'v2a/r@1', ... of paired features [N, D] (host or jax)."""
  metrics = {}
  for direction, queries, items in (("a2v", audio_features, video_features),
                                    ("v2a", video_features, audio_features)):
    ranks = correct_item_ranks(queries, items, chunk_size=chunk_size, dtype=dtype)
    metrics.update({f"{direction}/{k}": v for k, v in recall_and_median_rank(ranks).items()})
  return metrics
