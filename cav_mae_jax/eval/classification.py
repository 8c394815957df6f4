"""Classification of a held-out split: mAP, AUC, d-prime and top-1 accuracy of every clip.

As the original's evaluation: the logits of frame `config.data.eval_frame` (5), as its
per-epoch `validate` scores them, or, with `all_frames`, the mean over the 10 frames, run one by
one, of the task's probabilities (sigmoid for BCE-trained models, softmax for cross-entropy), as
its final multi-frame evaluation (`run_cavmae_ft.py`). A model that does not look at the picture
(an audio-only `mode`, its own `ft_mode` when `mode` is '', or an audio-only model) makes one
pass on logits, as the original's `skip_frame_agg`. Logits and sigmoid rank the clips of a class
alike; softmax does not (it renormalizes each clip), so for cross-entropy models mAP, AUC and
d-prime of one frame and of the frame average are of different scores, as in the original
(accuracy is not affected). `mode` evaluates a multimodal model with a modality missing
('missingaudioonly' keeps only the audio, 'missingvideoonly' only the video; '' = the model's
own `ft_mode`). Unlike the original's per-epoch loop (drop_last), every clip of the split is
scored exactly once: padding clips are marked by `valid` and dropped. Statistics:
`eval/stats.py`.

Besides the statistics: with one frame, `loss`, the task's loss (BCE or cross-entropy against
the hard labels) averaged over the clips, the original's per-epoch `valid_loss` (over its
drop_last-truncated set); with all frames, each frame's `frame<k>/mAP` and
`frame<k>/accuracy` of its logits, the numbers the original's multi-frame evaluation prints for
every frame before the average (`mul_frame_res.csv`).
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Iterator

import jax
import numpy as np

from cav_mae_jax.eval import common
from cav_mae_jax.eval import stats
from cav_mae_jax.models.config import FT_MODES, ModelConfig

AUDIO_ONLY_MODES = ("audioonly", "missingaudioonly")


class ClassificationEvaluator(common.Evaluator):
  """Scores of the task's 'logits' (one frame) or 'probabilities' (frames averaged)."""

  FIELDS = {"mode": str, "all_frames": bool}

  @classmethod
  def check_entry(cls, name, config, run_config):
    if config.mode and config.mode not in FT_MODES:
      raise ValueError(f"config.evals.{name}.mode={config.mode!r}: unknown mode; must be '' "
                       f"(the model's) or one of {FT_MODES}.")
    if config.mode and run_config.task in ("finetune", "probe"):  # (the others: no logits)
      problem = ModelConfig.from_config(run_config.model).mode_problem(config.mode)
      if problem is not None:
        raise ValueError(f"config.evals.{name}.mode={config.mode!r}: {problem}.")

  @classmethod
  def run_options(cls, run_config):
    model = run_config.model
    return {"model_mode": model.get("ft_mode", ""),
            "model_sees_video": model.get("modalities", "audiovisual") != "audio"}

  def __init__(self, name, config, predict_fns, mesh, batch_source, model_mode="",
               model_sees_video=True):
    """`model_mode`: the model's own `ft_mode` (for `mode=''`); `model_sees_video`: False for an
    audio-only model (`config.model.modalities='audio'`), which is scored in one pass too."""
    super().__init__(name, config, predict_fns, mesh, batch_source)
    self._mode = config.mode or None
    self._all_frames = (config.all_frames and model_sees_video and
                        (config.mode or model_mode) not in AUDIO_ONLY_MODES)
    self._classify = self.jit(functools.partial(predict_fns["classify"], mode=self._mode))

  def data_overrides(self) -> dict[str, Any]:
    return {"eval_all_frames": self._all_frames}

  def _classify_batch(self, params: Any, batch: dict[str, np.ndarray],
                      image: np.ndarray) -> dict[str, np.ndarray]:
    inputs = {"audio": batch["audio"], "image": image, "label": batch["label"]}
    outputs = self._classify(params, self.global_batch(inputs, keys=inputs.keys()))
    return jax.tree.map(np.asarray, outputs)

  def predictions(self, params: Any) -> dict[str, np.ndarray]:
    """Of every valid clip, in data order: 'scores' [clips, classes] (one frame's logits, or
    the frames' mean probabilities), 'labels' [clips, classes], and with one frame 'loss'
    [clips], with all frames 'frame_logits' [frames, clips, classes]."""
    outputs = collections.defaultdict(list)
    for batch in self.batches():
      valid = batch["valid"]
      outputs["labels"].append(common.global_array(batch["label"])[valid])
      image = batch["image"]
      if image.ndim == 4:  # one frame per clip
        frame = self._classify_batch(params, batch, image)
        outputs["scores"].append(frame["logits"].astype(np.float32)[valid])
        outputs["loss"].append(frame["loss"][valid])
        continue
      total, logits = 0.0, []
      for index in range(image.shape[1]):
        frame = self._classify_batch(params, batch, image[:, index])
        total = total + frame["probabilities"].astype(np.float64)
        logits.append(frame["logits"][valid])
      outputs["scores"].append((total / image.shape[1])[valid])
      outputs["frame_logits"].append(np.stack(logits))
    if not sum(len(s) for s in outputs["scores"]):
      raise ValueError(f"evaluator {self.name!r}: split {self.config.split!r} has no clips.")
    return {key: np.concatenate(value, axis=1 if key == "frame_logits" else 0)
            for key, value in outputs.items()}

  def run(self, params: Any) -> Iterator[tuple[str, float]]:
    outputs = self.predictions(params)
    scores, labels = outputs["scores"], outputs["labels"]
    yield f"{self.name}/num_clips", float(len(scores))
    for key, value in stats.classification_stats(scores, labels).items():
      yield f"{self.name}/{key}", float(value)
    if "loss" in outputs:
      yield f"{self.name}/loss", float(np.mean(outputs["loss"], dtype=np.float64))
    for index, logits in enumerate(outputs.get("frame_logits", ())):
      yield f"{self.name}/frame{index}/mAP", float(np.mean(stats.average_precision(logits,
                                                                                    labels)))
      yield f"{self.name}/frame{index}/accuracy", stats.top1_accuracy(logits, labels)
