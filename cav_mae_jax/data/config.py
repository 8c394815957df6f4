"""The fields of `config.data` (`DataConfig`) and the clip layout they are checked against.

Free of TensorFlow, so a run's config is checked before TensorFlow's import (the input pipeline
in `dataset.py` reads the same `DataConfig`); `records.py` writes the layout below.

Fields of `config.data` (`DataConfig`; the model's input shapes come from `config.model`:
`audio_length`, `num_mel_bins`, `image_size`):
  train_dir: str           records directory of the "train" split ('' = from TFDS, see below).
  eval_dir: str            records directory of the "eval" split ('' = from TFDS, or none).
  tfds_name: str           TFDS dataset the splits without a records directory are read from,
                           'cav_mae_clips/<config>[:<version>]' ('' = none).
  tfds_data_dir: str       its TFDS data directory ('' = TFDS's default, ~/tensorflow_datasets).
  tfds_train_split: str    the TFDS split read as "train" (a TFDS split name, e.g. 'train').
  tfds_eval_split: str     the TFDS split read as "eval" (e.g. 'test' or 'validation').
  batch_size: int          global training batch size (all processes together); evaluation
                           passes its own (config.eval.batch_size) to `make_dataset`.
  shuffle_buffer: int      examples in each host's shuffle buffer (training); raw records
                           (~0.4 MB each) are buffered, so this bounds host memory (not
                           used with balanced_sampling or exact_shuffle).
  exact_shuffle: bool      each epoch reads the host's clips in a fresh random permutation, as
                           the original's shuffling loader, read at their offsets, instead of
                           streaming the shards through the shuffle buffer (training; not with
                           balanced_sampling, which draws its own clips).
  eval_frame: int          frame used in evaluation (the original uses 5).
  eval_all_frames: bool    evaluation yields all 10 frames per clip instead.
  noise: bool              noise + time-roll augmentation (training).
  noise_on_device: bool    with `noise`, leave that augmentation to the train step, which applies
                           it on the device (cav_mae_jax/train/device_augment.py); the
                           pipeline then yields normalized, un-noised fbanks.
  freqm: int               SpecAugment frequency mask size (0 = off; fine-tuning uses 48).
  timem: int               SpecAugment time mask size (0 = off; fine-tuning uses 192).
  mixup: float             probability of mixing a clip with a partner drawn uniformly from the
                           host's clips (0 = off; fine-tuning uses 0.5).
  mixup_on: str            'waveform' (as the original: mixes mean-removed waveforms and
                           recomputes the fbank; needs records written with waveforms) or
                           'fbank' (mixes raw fbanks; cheaper, not the original's).
  label_smooth: float      label smoothing (training; fine-tuning uses 0.1).
  balanced_sampling: bool  sample clips with weight sum over labels of 1000 / (count + 0.01).
  fbank_stats: str         where fbank normalization's mean and std come from (both splits):
                           'fixed': fbank_mean / fbank_std (the recipes set AudioSet's
                           -5.081 / 4.4849, the original's numbers); 'index': the training
                           split's own statistics (index.json, or the TFDS builder's metadata:
                           mean/std of the raw fbank over the valid frames).
  fbank_mean: float        normalization mean with fbank_stats='fixed' (unused with 'index').
  fbank_std: float         normalization std with fbank_stats='fixed' (unused with 'index').
  prefetch: int            batches prepared ahead.
  reads_in_flight: int     records read at once at their offsets (balanced draws, exact
                           shuffling, mixup partners): each is one small read, so the rate is
                           this over the storage's latency; an object store (gs://, ~30 ms)
                           needs about samples per second x latency (e.g. 512 for 15,000/s), a
                           local disk far fewer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

# The clip layout (`records.py`): fbank frames x mel bins, video frames of IMAGE_SIZE squared.
NUM_MEL_BINS = 128
TARGET_FBANK_FRAMES = 1024
NUM_VIDEO_FRAMES = 10
IMAGE_SIZE = 224

MIXUP_TARGETS = ("waveform", "fbank")
SPLITS = ("train", "eval")
FBANK_STATS = ("fixed", "index")
MODEL_FIELDS = ("audio_length", "num_mel_bins", "image_size")  # read from config.model
MAX_READS_IN_FLIGHT = 4096  # records read at once (config.data.reads_in_flight)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Validated view of `config.data` plus the model's input shapes."""

  batch_size: int
  train_dir: str = ""
  eval_dir: str = ""
  tfds_name: str = ""
  tfds_data_dir: str = ""
  tfds_train_split: str = "train"
  tfds_eval_split: str = "test"
  shuffle_buffer: int = 2048
  exact_shuffle: bool = False
  eval_frame: int = 5
  eval_all_frames: bool = False
  noise: bool = False
  noise_on_device: bool = False
  freqm: int = 0
  timem: int = 0
  mixup: float = 0.0
  mixup_on: str = "waveform"
  label_smooth: float = 0.0
  balanced_sampling: bool = False
  fbank_stats: str = "fixed"
  fbank_mean: float | None = None  # required with fbank_stats='fixed'
  fbank_std: float | None = None
  prefetch: int = 2
  reads_in_flight: int = 64
  # From config.model.
  audio_length: int = TARGET_FBANK_FRAMES
  num_mel_bins: int = NUM_MEL_BINS
  image_size: int = IMAGE_SIZE

  @classmethod
  def from_config(cls, config: Any, *, against_model: bool = True) -> DataConfig:
    """Reads `config.data` and `config.model`; a missing or bad field raises ValueError.
    `against_model=False` leaves out the bounds the model's input shapes set on the
    augmentations (SpecAugment's masks), for runs that read no records (`validate`)."""
    data = _as_dict(config, "data")
    model = _as_dict(config, "model")
    known = [f.name for f in dataclasses.fields(cls) if f.name not in MODEL_FIELDS]
    unknown = sorted(set(data) - set(known))
    if unknown:
      raise ValueError(f"config.data: unknown field(s) {unknown}; known: {known}")
    if data.get("batch_size") is None:
      raise ValueError("config.data.batch_size is required")
    values = {k: v for k, v in data.items()}
    for name in MODEL_FIELDS:
      if name in model:
        values[name] = model[name]
    result = cls(**values)
    result.validate(against_model=against_model)
    return result

  def validate(self, against_model: bool = True) -> None:
    """Checks values that need no files; raises ValueError naming the field. With
    `against_model=False` the SpecAugment masks need only be >= 0: their bounds, the model's
    mel bins and fbank frames, concern the input pipeline alone (a benchmark of a shorter
    model on in-memory batches runs none)."""

    def fail(field: str, why: str) -> None:
      raise ValueError(f"config.data.{field}={getattr(self, field)!r}: {why}")

    for field in ("train_dir", "eval_dir", "tfds_data_dir"):
      if not isinstance(getattr(self, field), str):
        fail(field, "must be a directory path (a string)")
    for field in ("tfds_name", "tfds_train_split", "tfds_eval_split"):
      if not isinstance(getattr(self, field), str):
        fail(field, "must be a string")
    if not self.tfds_name:  # where a TFDS dataset is read from, with none named: ignored
      for field, default in (("tfds_data_dir", ""), ("tfds_train_split", "train"),
                             ("tfds_eval_split", "test")):
        if getattr(self, field) != default:
          fail(field, "applies to a TFDS dataset, and config.data.tfds_name is '' (none): name "
               "it, or leave this field out")
    if not isinstance(self.batch_size, int) or self.batch_size <= 0:
      fail("batch_size", "must be a positive int")
    if self.shuffle_buffer < 1:
      fail("shuffle_buffer", "must be >= 1 (1 = no shuffling)")
    if not isinstance(self.reads_in_flight, int) or self.reads_in_flight < 1:
      fail("reads_in_flight", "must be a positive int")
    if self.reads_in_flight > MAX_READS_IN_FLIGHT:  # (1e9 took all of a host's memory, killed)
      fail("reads_in_flight", f"must be at most {MAX_READS_IN_FLIGHT}: each read in flight "
           "holds a clip's record in host memory (on an object store, about samples per second "
           "x latency is enough)")
    if self.exact_shuffle and self.balanced_sampling:
      fail("exact_shuffle", "balanced_sampling draws its own clips each epoch (independent "
           "weighted draws); set one of the two")
    if not 0 <= self.eval_frame < NUM_VIDEO_FRAMES:
      fail("eval_frame", f"must be in [0, {NUM_VIDEO_FRAMES})")
    for field, bound, what in (("freqm", self.num_mel_bins, "mel bins"),
                               ("timem", self.audio_length, "fbank frames")):
      if not 0 <= getattr(self, field) <= (bound if against_model else math.inf):
        fail(field, f"must be in [0, {bound}] (the model's {what})")
    if not 0.0 <= self.mixup <= 1.0:
      fail("mixup", "is a probability: must be in [0, 1]")
    if self.mixup_on not in MIXUP_TARGETS:
      fail("mixup_on", f"must be one of {MIXUP_TARGETS}")
    if not 0.0 <= self.label_smooth < 1.0:
      fail("label_smooth", "must be in [0, 1)")
    if self.fbank_stats not in FBANK_STATS:
      fail("fbank_stats", f"must be one of {FBANK_STATS} ('index': the training split's "
           "statistics)")
    if self.fbank_stats == "fixed":
      for field in ("fbank_mean", "fbank_std"):
        value = getattr(self, field)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
          fail(field, "must be a finite number with fbank_stats='fixed' (or use "
               "fbank_stats='index' for the training split's statistics)")
      if not self.fbank_std > 0:
        fail("fbank_std", "must be positive")
    if self.prefetch < 0:
      fail("prefetch", "must be >= 0")


def _as_dict(config: Any, name: str) -> dict[str, Any]:
  section = config[name] if isinstance(config, Mapping) else getattr(config, name, None)
  if section is None:
    if name == "model":
      return {}
    raise ValueError(f"config.{name} is missing")
  return dict(section.to_dict() if hasattr(section, "to_dict") else section)
