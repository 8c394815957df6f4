"""Audio <-> visual retrieval: recall@k and median rank from cosine similarity of pooled features.

As in the original's `retrieval.py`: the audio-only and video-only encoder streams are mean-pooled
over tokens, L2-normalized, and compared by cosine similarity. Query i's correct item is item i.
Ties count against the query (an item scoring equal to the correct one ranks ahead of it), so
degenerate constant features give chance-level recall, not perfect recall.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np

RECALL_KS = (1, 5, 10)
# (features of audio, features of video) for one batch, each [B, D].
FeatureFn = Callable[..., tuple[np.ndarray, np.ndarray]]


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


class RetrievalEvaluator:
  """Audio <-> visual retrieval over a held-out split.

  Built from `features_fn(params, batch) -> (audio [B, D], video [B, D])` (pooled features
  of the whole batch, host numpy) and `batches`, a callable returning a fresh iterator of host
  batch dicts with a boolean `valid` entry marking real (non-padding) examples.
  """

  def __init__(self, features_fn: FeatureFn, batches: Callable[[], Iterable[dict]],
               max_examples: int | None = None):
    self.features_fn = features_fn
    self.batches = batches
    self.max_examples = max_examples

  def features(self, params) -> tuple[np.ndarray, np.ndarray]:
    """Pooled audio and video features of every valid example, in data order."""
    audio, video, count = [], [], 0
    for batch in self.batches():
      batch_audio, batch_video = self.features_fn(params, batch)
      valid = np.asarray(batch["valid"], bool)
      audio.append(np.asarray(batch_audio)[valid])
      video.append(np.asarray(batch_video)[valid])
      count += int(valid.sum())
      if self.max_examples is not None and count >= self.max_examples:
        break
    if not count:
      raise ValueError("Retrieval evaluation got no valid examples.")
    audio, video = np.concatenate(audio), np.concatenate(video)
    return audio[:self.max_examples], video[:self.max_examples]

  def run(self, params) -> Iterator[tuple[str, float]]:
    """Yields ('retrieval/a2v/r@1', value), ... and the number of clips compared."""
    audio, video = self.features(params)
    yield "retrieval/num_clips", float(len(audio))
    for name, value in audio_visual_retrieval(audio, video).items():
      yield f"retrieval/{name}", value
