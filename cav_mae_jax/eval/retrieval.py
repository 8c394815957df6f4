"""Audio <-> visual retrieval evaluator: recall@k and median rank of pooled features.

As in the original's `retrieval.py`: the audio-only and video-only encoder streams are mean-pooled
over tokens, L2-normalized, and compared by cosine similarity, here on the device
(`ranking.py`). Query i's correct item is item i. Exact ties (duplicate clips,
constant features) are scored as the original scores them (`ranking.py`): chance level for
constant features.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from cav_mae_jax.eval import common
from cav_mae_jax.eval import ranking


class RetrievalEvaluator(common.Evaluator):
  """Audio <-> visual retrieval over a split, from the task's 'features' predict function.

  The features are the mean-pooled audio-only and video-only streams of the split's first
  `max_clips` clips (all when it has fewer), a progress signal sized like the
  paper's subsets (1,725 AudioSet and 1,545 VGGSound clips) but not those class-balanced
  subsets; `tools/retrieval.py --subset` runs the paper's protocol. The first clips in shard
  order, whatever the process count: each process reads its own shard files, and gives its
  share of them (`InputPipeline.first_clips_per_process`) from its part of the batches.
  """

  FIELDS = {"max_clips": int}

  @classmethod
  def check_entry(cls, name, config, run_config):
    del run_config
    if config.max_clips < 2:
      raise ValueError(f"config.evals.{name}.max_clips={config.max_clips}: must be >= 2.")

  def __init__(self, name, config, predict_fns, mesh, batch_source):
    super().__init__(name, config, predict_fns, mesh, batch_source)
    self._features = self.jit(predict_fns["features"])

  def features(self, params: Any) -> tuple[np.ndarray, np.ndarray]:
    """Pooled audio and video features of the split's first `max_clips` clips (rows in the
    order of the global batches)."""
    audio, video = [], []
    source = self.source()
    max_clips = self.config.max_clips
    # Records: the split's first clips in shard order, each process's share of them from its
    # part of the batches, so that the same clips are scored whatever the process count.
    # Another source (in-memory arrays): the first valid rows of the global batches.
    shares = (source.first_clips_per_process(max_clips)
              if hasattr(source, "first_clips_per_process") else [max_clips])
    taken = [0] * len(shares)
    for batch in self.batches(source):
      keep = take_rows(batch["valid"], shares, taken)  # the same on every process
      if keep.any():
        batch_audio, batch_video = self._features(params, self.global_batch(batch))
        audio.append(np.asarray(batch_audio)[keep])
        video.append(np.asarray(batch_video)[keep])
      if sum(taken) == sum(shares):
        break
    if not sum(taken):
      raise ValueError(f"evaluator {self.name!r}: split {self.config.split!r} has no clips.")
    return np.concatenate(audio), np.concatenate(video)

  def run(self, params: Any) -> Iterator[tuple[str, float]]:
    audio, video = self.features(params)
    yield f"{self.name}/num_clips", float(len(audio))
    for name, value in ranking.audio_visual_retrieval(audio, video).items():
      yield f"{self.name}/{name}", value


def take_rows(valid: np.ndarray, shares: list[int], taken: list[int]) -> np.ndarray:
  """Which rows of a global batch to keep: of each process's part (the batch's rows split
  evenly among `len(shares)` parts, in process order) its first valid rows until that process
  has given its share; `taken` (kept rows so far, per process) is updated in place."""
  keep = np.zeros(len(valid), bool)
  part = len(valid) // len(shares)
  for process, share in enumerate(shares):
    rows = np.flatnonzero(valid[process * part:(process + 1) * part])[:share - taken[process]]
    keep[process * part + rows] = True
    taken[process] += len(rows)
  return keep
