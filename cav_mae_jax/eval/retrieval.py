"""Audio <-> visual retrieval: recall@k and median rank from cosine similarity of pooled features.

As in the original's `retrieval.py`: the audio-only and video-only encoder streams are mean-pooled
over tokens, L2-normalized, and compared by cosine similarity. Query i's correct item is item i.
Ties count against the query (an item scoring equal to the correct one ranks ahead of it), so
degenerate constant features give chance-level recall, not perfect recall.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np

from cav_mae_jax.eval import common

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


class RetrievalEvaluator(common.Evaluator):
  """Audio <-> visual retrieval over a split, from the task's 'features' predict function.

  The features are the mean-pooled audio-only and video-only streams of every valid clip, in
  data order, up to `max_clips` (the paper's subsets: 1,725 AudioSet and 1,545 VGGSound clips).
  """

  FIELDS = {"max_clips": int}

  @classmethod
  def check_entry(cls, name, config):
    if config.max_clips < 2:
      raise ValueError(f"config.evals.{name}.max_clips={config.max_clips}: must be >= 2.")

  def __init__(self, name, config, predict_fns, mesh, batch_source):
    super().__init__(name, config, predict_fns, mesh, batch_source)
    self._features = self.jit(predict_fns["features"])

  def features(self, params: Any) -> tuple[np.ndarray, np.ndarray]:
    """Pooled audio and video features of the first `max_clips` valid clips."""
    audio, video, count = [], [], 0
    max_clips = self.config.max_clips
    for batch in self.batches():
      batch_audio, batch_video = self._features(params, self.global_batch(batch))
      valid = batch["valid"]
      audio.append(np.asarray(batch_audio)[valid])
      video.append(np.asarray(batch_video)[valid])
      count += int(valid.sum())
      if count >= max_clips:
        break
    if not count:
      raise ValueError(f"evaluator {self.name!r}: split {self.config.split!r} has no clips.")
    return np.concatenate(audio)[:max_clips], np.concatenate(video)[:max_clips]

  def run(self, params: Any) -> Iterator[tuple[str, float]]:
    audio, video = self.features(params)
    yield f"{self.name}/num_clips", float(len(audio))
    for name, value in audio_visual_retrieval(audio, video).items():
      yield f"{self.name}/{name}", value
