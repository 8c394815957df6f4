"""A NumPy float64 reference of the retrieval metrics, for tests.

Square similarity matrix, query i's correct item is item i. As the original's retrieval script
scores them (its `compute_metrics`): every position of a query's descending-sorted row whose
similarity equals the correct item's is one entry (a tie of m items gives m entries, at each of
its positions); recall@k is the share of entries before position k, the median rank the median
entry + 1. `cav_mae_jax/eval/ranking.py` computes the same metrics on the device from features;
tests compare it with this brute-force form.
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


def correct_item_positions(similarity: np.ndarray) -> np.ndarray:
  """The 0-based positions in query i's ranking (row i, sorted descending) at which the correct
  item's similarity stands, every query's concatenated (more than one where it ties)."""
  similarity = np.asarray(similarity)
  if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
    raise ValueError(f"similarity must be square [N, N], got shape {similarity.shape}.")
  descending = -np.sort(-similarity, axis=1)
  _, positions = np.nonzero(descending == np.diag(similarity)[:, None])
  return positions


def retrieval_metrics(similarity: np.ndarray, ks: Iterable[int] = RECALL_KS) -> dict[str, float]:
  """Recall@k (in %) and median rank (1-based) for queries = rows, items = columns."""
  positions = correct_item_positions(similarity)
  metrics = {f"r@{k}": 100.0 * float(np.mean(positions < k)) for k in ks}
  metrics["median_rank"] = float(np.median(positions + 1))
  return metrics


def audio_visual_retrieval(audio_features: np.ndarray,
                           video_features: np.ndarray) -> dict[str, float]:
  """Metrics in both directions: 'a2v/r@1', ..., 'v2a/median_rank'."""
  similarity = cosine_similarity(audio_features, video_features)
  metrics = {}
  for direction, matrix in (("a2v", similarity), ("v2a", similarity.T)):
    metrics.update({f"{direction}/{k}": v for k, v in retrieval_metrics(matrix).items()})
  return metrics
