"""Audio <-> visual retrieval evaluator: recall@k and median rank of pooled features.

As in the original's `retrieval.py`: the audio-only and video-only encoder streams are mean-pooled
over tokens, L2-normalized, and compared by cosine similarity, here on the device
(`ranking.py`). Query i's correct item is item i. Ties count against the query (an item scoring
equal to the correct one ranks ahead of it), so degenerate constant features give chance-level
recall, not perfect recall.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from cav_mae_jax.eval import common
from cav_mae_jax.eval import ranking


class RetrievalEvaluator(common.Evaluator):
  """Audio <-> visual retrieval over a split, from the task's 'features' predict function.

  The features are the mean-pooled audio-only and video-only streams of every valid clip, in
  data order, up to `max_clips`: the first clips of the split, a progress signal sized like the
  paper's subsets (1,725 AudioSet and 1,545 VGGSound clips) but not those class-balanced
  subsets; `tools/retrieval.py --subset` runs the paper's protocol. Data order is that of the
  global batches, every process's rows side by side, each process reading its own shard files:
  with a split larger than `max_clips`, which clips are taken depends on the process count
  (and the shard layout), so compare these figures between runs of one topology.
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
    for name, value in ranking.audio_visual_retrieval(audio, video).items():
      yield f"{self.name}/{name}", value
