"""A NumPy float64 reference of the retrieval metrics, for tests.

Square similarity matrix, query i's correct item is item i; ties count against the query (an
item scoring equal to the correct one ranks ahead of it). `cav_mae_jax/eval/ranking.py` computes
the same metrics on the device from features; tests compare it with this brute-force form.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

RECALL_KS = (1, 5, 10)


def cosine_similarity(queries: np.ndarray, items: np.ndarray) -> np.ndarray:
  """[Q, I] cosine similarities of rows of `queries` [Q, D] and `items` [I, D], in float64."""
  queries = np.asarray(queries, np.float64)
  items = np.asarray(items, np.float64)
  queries = queries / np.maximum(np.linalg.norm(queries, axis=-1, keepdims=True), 1e-12)
  items = items / np.maximum(np.linalg.norm(items, axis=-1, keepdims=True), 1e-12)
  return queries @ items.T


def correct_item_ranks(similarity: np.ndarray) -> np.ndarray:
  """0-based rank of item i among all items for query i (row i of a square similarity matrix)."""
  similarity = np.asarray(similarity)
  if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
    raise ValueError(f"similarity must be square [N, N], got shape {similarity.shape}.")
  correct = np.diag(similarity)[:, None]
  others = ~np.eye(similarity.shape[0], dtype=bool)
  return np.sum((similarity >= correct) & others, axis=1)


def retrieval_metrics(similarity: np.ndarray, ks: Iterable[int] = RECALL_KS) -> dict[str, float]:
  """Recall@k (in %) and median rank (1-based) for queries = rows, items = columns."""
  ranks = correct_item_ranks(similarity)
  metrics = {f"r@{k}": 100.0 * float(np.mean(ranks < k)) for k in ks}
  metrics["median_rank"] = float(np.median(ranks + 1))
  return metrics


def audio_visual_retrieval(audio_features: np.ndarray,
                           video_features: np.ndarray) -> dict[str, float]:
  """Metrics in both directions: 'a2v/r@1', ..., 'v2a/median_rank'."""
  similarity = cosine_similarity(audio_features, video_features)
  metrics = {}
  for direction, matrix in (("a2v", similarity), ("v2a", similarity.T)):
    metrics.update({f"{direction}/{k}": v for k, v in retrieval_metrics(matrix).items()})
  return metrics
