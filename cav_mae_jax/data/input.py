"""tf.data input pipeline: clip records -> host-local batch dicts of numpy arrays.

Records of a split live in one directory (`index.json` beside the shards, see `records.py`):
`config.data.train_dir` for split "train", `config.data.eval_dir` for split "eval". Each
process reads a disjoint, deterministic subset of the shard files
(`files[process_index::process_count]`) and yields batches of `batch_size // process_count`
clips, as the DESIGN.md batch dict:

  audio [B, T, 128] f32 (normalized fbank), image [B, H, W, 3] f32 (ImageNet-normalized; eval
  with all frames: [B, 10, H, W, 3]), label [B, C] f32, valid [B] bool, frame_index [B] int32
  (-1 when all frames are used).

Training: an endless stream of epochs; each epoch reads this host's files in a seeded random
order, interleaved, through a seeded shuffle buffer; one random frame per clip; the augmentations
configured below (order and semantics of the original, see `augment.py`). Batches are full
(an epoch's tail joins the next epoch). Evaluation: one pass in file order, a fixed frame or all
frames, no augmentation and no label smoothing (as the original's eval loader); every clip is
kept: the last batches are padded with zero clips marked `valid=False`, and every process yields
the same number of batches (`num_eval_batches`).

Determinism and resume: every random choice is a stateless function of (seed, epoch, position
in the epoch) or (seed, batch number), so the stream is fixed by the seed. `InputPipeline`
counts what it has handed out; `get_state()` is a small JSON dict and `set_state()` rebuilds the
stream at that point (it skips the already-seen records of the current epoch before parsing,
so resuming costs reading at most one epoch of this host's raw records).

Fields of `config.data` (the model's input shapes come from `config.model`: `audio_length`,
`num_mel_bins`, `image_size`):
  train_dir: str           records of the "train" split (tools/preprocess.py output).
  eval_dir: str            records of the "eval" split ("" when there is none).
  batch_size: int          global training batch size (all processes together); evaluation
                           passes its own (config.eval.batch_size) to `make_dataset`.
  shuffle_buffer: int      examples in each host's shuffle buffer (training); raw records
                           (~0.4 MB each) are buffered, so this bounds host memory.
  eval_frame: int          frame used in evaluation (the original uses 5).
  eval_all_frames: bool    evaluation yields all 10 frames per clip instead.
  noise: bool              noise + time-roll augmentation (training).
  noise_on_device: bool    with `noise`, leave that augmentation to the train step, which applies
                           it on the device (cav_mae_jax/train/device_augment.py); the
                           pipeline then yields normalized, un-noised fbanks.
  freqm: int               SpecAugment frequency mask size (0 = off; fine-tuning uses 48).
  timem: int               SpecAugment time mask size (0 = off; fine-tuning uses 192).
  mixup: float             probability of mixing a clip (0 = off; fine-tuning uses 0.5).
  mixup_on: str            'waveform' (as the original: mixes mean-removed waveforms and
                           recomputes the fbank; needs records written with waveforms) or
                           'fbank' (mixes raw fbanks; cheaper, not the original's).
  label_smooth: float      label smoothing (training; fine-tuning uses 0.1).
  balanced_sampling: bool  sample clips with weight sum over labels of 1000 / (count + 0.01).
  fbank_mean: float|None   fbank normalization mean; None = the records' statistics.
  fbank_std: float|None    fbank normalization std; None = the records' statistics.
  prefetch: int            batches prepared ahead.

Balanced sampling (as the original's WeightedRandomSampler with replacement over an epoch of
N draws) is done streaming: in each epoch every record is emitted k ~ Poisson(N * w / sum(w))
times before the shuffle buffer, which gives each clip the same expected count per epoch.
Epoch lengths then vary, so each process must restore its own `get_state()`.

The batches become global `jax.Array`s with `cav_mae_jax.train.mesh.global_batch`. Reading
errors and shards shorter than the index says raise `RecordReadError` naming the shard file.
Throughput is measured by `measure_input` (samples per wall second and per CPU second).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from cav_mae_jax.data import augment
from cav_mae_jax.data import records

MIXUP_TARGETS = augment.MIXUP_TARGETS
INDEX_FILE = "index.json"
SPLITS = ("train", "eval")
BALANCED_WEIGHT_NUMERATOR = 1000.0
BALANCED_COUNT_OFFSET = 0.01
INTERLEAVE_CYCLE = 16
STATE_VERSION = 1
_EPOCH, _POSITION = "_epoch", "_position"
MODEL_FIELDS = ("audio_length", "num_mel_bins", "image_size")  # read from config.model
_OUTPUT_KEYS = ("audio", "image", "label", "valid", "frame_index")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Validated view of `config.data` plus the model's input shapes."""

  batch_size: int
  train_dir: str = ""
  eval_dir: str = ""
  shuffle_buffer: int = 2048
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
  fbank_mean: float | None = None
  fbank_std: float | None = None
  prefetch: int = 2
  # From config.model.
  audio_length: int = records.TARGET_FBANK_FRAMES
  num_mel_bins: int = records.NUM_MEL_BINS
  image_size: int = records.IMAGE_SIZE

  @classmethod
  def from_config(cls, config: Any) -> DataConfig:
    """Reads `config.data` and `config.model`; a missing or bad field raises ValueError."""
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
    result.validate()
    return result

  def validate(self) -> None:
    """Checks values that need no files; raises ValueError naming the field."""

    def fail(field: str, why: str) -> None:
      raise ValueError(f"config.data.{field}={getattr(self, field)!r}: {why}")

    for field in ("train_dir", "eval_dir"):
      if not isinstance(getattr(self, field), str):
        fail(field, "must be a directory path (a string)")
    if not isinstance(self.batch_size, int) or self.batch_size <= 0:
      fail("batch_size", "must be a positive int")
    if self.shuffle_buffer < 1:
      fail("shuffle_buffer", "must be >= 1 (1 = no shuffling)")
    if not 0 <= self.eval_frame < records.NUM_VIDEO_FRAMES:
      fail("eval_frame", f"must be in [0, {records.NUM_VIDEO_FRAMES})")
    if self.freqm < 0:
      fail("freqm", "must be >= 0")
    if self.timem < 0:
      fail("timem", "must be >= 0")
    if not 0.0 <= self.mixup <= 1.0:
      fail("mixup", "is a probability: must be in [0, 1]")
    if self.mixup_on not in MIXUP_TARGETS:
      fail("mixup_on", f"must be one of {MIXUP_TARGETS}")
    if not 0.0 <= self.label_smooth < 1.0:
      fail("label_smooth", "must be in [0, 1)")
    if (self.fbank_mean is None) != (self.fbank_std is None):
      fail("fbank_std" if self.fbank_std is None else "fbank_mean",
           "fbank_mean and fbank_std must both be set or both be None")
    if self.fbank_std is not None and not self.fbank_std > 0:
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


@dataclasses.dataclass(frozen=True)
class SplitFiles:
  """One split's index and this process's share of its shard files."""

  index: records.RecordIndex
  index_path: str
  files: tuple[str, ...]
  file_examples: tuple[int, ...]  # examples in each of `files`, as the index lists them
  host_examples: tuple[int, ...]  # examples of every process, by process index

  @property
  def num_examples(self) -> int:
    return sum(self.host_examples)


def host_file_indices(num_files: int, process_index: int, process_count: int) -> list[int]:
  """The shard files one process reads: every process_count-th, from process_index."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")
  return list(range(process_index, num_files, process_count))


def load_split(config: DataConfig, split: str, process_index: int,
               process_count: int) -> SplitFiles:
  """Reads the split's index, checks it against the config, and picks this process's files."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; the input reads {SPLITS}")
  field = f"{split}_dir"
  directory = getattr(config, field)
  if not directory or not os.path.isdir(directory):
    raise ValueError(f"config.data.{field}={directory!r}: no such directory")
  index_path = os.path.join(directory, INDEX_FILE)
  if not os.path.isfile(index_path):
    raise ValueError(f"config.data.{field}={directory!r}: no {INDEX_FILE} in it "
                     f"(not a records directory)")
  index = records.read_index(index_path)
  expected = (config.audio_length, config.num_mel_bins)
  if tuple(index.fbank_shape) != expected:
    raise ValueError(f"config.model.audio_length x num_mel_bins = {expected[0]} x {expected[1]} "
                     f"but the records in {index_path} hold fbank {tuple(index.fbank_shape)}")
  paths = index.shard_paths(index_path)
  for path in paths:
    if not os.path.isfile(path):
      raise ValueError(f"{index_path} lists shard {path}, which does not exist")
  host_examples = tuple(
      sum(index.shards[i].num_examples for i in host_file_indices(len(paths), p, process_count))
      for p in range(process_count))
  mine = host_file_indices(len(paths), process_index, process_count)
  return SplitFiles(index=index, index_path=index_path, files=tuple(paths[i] for i in mine),
                    file_examples=tuple(index.shards[i].num_examples for i in mine),
                    host_examples=host_examples)


def host_batch_size(batch_size: int, process_count: int,
                    field: str = "config.data.batch_size") -> int:
  """This process's share of a global batch; it must divide evenly."""
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"{field}={batch_size}: must be a positive multiple of the process count "
                     f"{process_count}")
  return batch_size // process_count


def fbank_statistics(config: DataConfig, index: records.RecordIndex) -> tuple[float, float]:
  """(mean, std) for fbank normalization: the config's override, else the records' own."""
  if config.fbank_mean is not None:
    return float(config.fbank_mean), float(config.fbank_std)
  return float(index.fbank_mean), float(index.fbank_std)


def class_sampling_weights(label_counts: Any) -> np.ndarray:
  """Per-class balanced-sampling weight 1000 / (count + 0.01); a clip's weight is their sum."""
  counts = np.asarray(label_counts, np.float64)
  return BALANCED_WEIGHT_NUMERATOR / (counts + BALANCED_COUNT_OFFSET)


def total_sampling_weight(label_counts: Any) -> float:
  """Sum of all clips' balanced weights, from the label counts alone."""
  counts = np.asarray(label_counts, np.float64)
  return float(np.sum(counts * class_sampling_weights(counts)))


def example_preprocess_spec(config: DataConfig, training: bool, num_classes: int) -> str:
  """The per-clip op string: frame choice, JPEG decode, resize + crop, multi-hot labels."""
  if training:
    frame = f"choose_frame(None, {records.NUM_VIDEO_FRAMES})"
  elif config.eval_all_frames:
    frame = "all_frames"
  else:
    frame = f"choose_frame({config.eval_frame}, {records.NUM_VIDEO_FRAMES})"
  return f"{frame}|decode_jpeg|resize_crop({config.image_size})|multi_hot({num_classes})"


def batch_preprocess_spec(config: DataConfig, training: bool, mean: float, std: float) -> str:
  """The per-batch op string, in the original's order (evaluation: normalization only)."""
  ops = []
  if training and config.mixup > 0:
    ops.append(f"mixup({config.mixup!r}, {config.mixup_on!r})")
  if training and (config.freqm or config.timem):
    ops.append(f"specaugment({config.freqm}, {config.timem})")
  ops.append(f"normalize_fbank({mean!r}, {std!r})")
  if training and config.noise and not config.noise_on_device:
    ops.append("noise_roll")
  ops.append("normalize_image")
  if training and config.label_smooth > 0:
    ops.append(f"smooth_labels({config.label_smooth!r})")
  return "|".join(ops)


def _salted(seed: tf.Tensor, name: str, *values: tf.Tensor) -> tf.Tensor:
  """Stateless seed [2] derived from `seed`, a name and integers."""
  seed = tf.random.experimental.stateless_fold_in(seed, zlib.crc32(name.encode()) & 0x7FFFFFFF)
  for value in values:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int64))
  return seed


def _uses_waveform(config: DataConfig, training: bool) -> bool:
  return training and config.mixup > 0 and config.mixup_on == "waveform"


def _parse_fn(config: DataConfig, training: bool, num_classes: int,
              with_waveform: bool):
  example_pp = augment.get_preprocess_fn(example_preprocess_spec(config, training, num_classes))

  def parse(serialized: tf.Tensor, seed: tf.Tensor) -> dict[str, tf.Tensor]:
    parsed = records.parse_example(serialized, with_waveform=with_waveform)
    data = {
        "audio": parsed[records.FBANK],
        "frames": parsed[records.FRAMES],
        "labels": parsed[records.LABELS],
        augment.SEED_KEY: seed,
    }
    data = example_pp(data)
    out = {
        "audio": data["audio"],
        "image": data["image"],
        "label": data["label"],
        "valid": tf.constant(True),
        "frame_index": tf.cast(data["frame_index"], tf.int32),
    }
    if with_waveform:
      out["waveform"] = parsed[records.WAVEFORM]
      out["waveform_length"] = tf.shape(parsed[records.WAVEFORM], out_type=tf.int32)[0]
    return out

  return parse


def _label_indices(serialized: tf.Tensor) -> tf.Tensor:
  spec = {records.LABELS: records.feature_spec()[records.LABELS]}
  return tf.sparse.to_dense(tf.io.parse_single_example(serialized, spec)[records.LABELS])


def _epoch_records(files: tuple[str, ...], epoch: tf.Tensor, base_seed: tf.Tensor,
                   config: DataConfig, balanced: tuple[np.ndarray, float, int] | None
                   ) -> tf.data.Dataset:
  """One epoch of this host's raw records, in the epoch's deterministic shuffled order."""
  order = tf.random.experimental.stateless_shuffle(
      tf.constant(files), _salted(base_seed, "files", epoch))
  dataset = tf.data.Dataset.from_tensor_slices(order).interleave(
      tf.data.TFRecordDataset, cycle_length=min(len(files), INTERLEAVE_CYCLE), block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if balanced is not None:
    class_weights, total_weight, num_examples = balanced
    class_weights = tf.constant(class_weights, tf.float64)

    def copies(read_position: tf.Tensor, serialized: tf.Tensor) -> tf.data.Dataset:
      weight = tf.reduce_sum(tf.gather(class_weights, _label_indices(serialized)))
      rate = tf.cast(weight * num_examples / total_weight, tf.float32)
      count = tf.random.stateless_poisson(
          [], _salted(base_seed, "balanced", epoch, read_position), rate, dtype=tf.int64)
      return tf.data.Dataset.from_tensors(serialized).repeat(count)

    dataset = dataset.enumerate().flat_map(copies)
  shuffle_seed = tf.random.stateless_uniform(
      [], _salted(base_seed, "shuffle", epoch), minval=None, maxval=None, dtype=tf.int64)
  return dataset.shuffle(config.shuffle_buffer, seed=shuffle_seed)


def _batch_fn(batch_pp, base_seed: tf.Tensor, zero_padding: bool):
  def apply(batch_number: tf.Tensor, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    batch = dict(batch)
    batch[augment.SEED_KEY] = _salted(base_seed, "batch", batch_number)
    batch = batch_pp(batch)
    batch = {k: v for k, v in batch.items() if k in _OUTPUT_KEYS or k in (_EPOCH, _POSITION)}
    if zero_padding:  # padding clips are exactly zero after normalization too
      for key in ("audio", "image", "label"):
        valid = tf.reshape(batch["valid"], [-1] + [1] * (batch[key].shape.rank - 1))
        batch[key] = tf.where(valid, batch[key], tf.zeros_like(batch[key]))
    return batch

  return apply


def _batch(dataset: tf.data.Dataset, host_batch: int, with_waveform: bool) -> tf.data.Dataset:
  if with_waveform:  # waveforms differ in length: zero-pad to the batch's longest
    return dataset.padded_batch(host_batch, drop_remainder=True)
  return dataset.batch(host_batch, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)


def _options(threads: int | None) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  if threads:
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
  return options


def _host_batch(config: DataConfig, batch_size: int | None, process_count: int) -> int:
  if batch_size is None:
    return host_batch_size(config.batch_size, process_count)
  return host_batch_size(batch_size, process_count, field="batch_size (passed to the input)")


def num_eval_batches(split_files: SplitFiles, host_batch: int) -> int:
  """Batches every process yields in evaluation: enough for the process with most clips."""
  return max(math.ceil(n / host_batch) for n in split_files.host_examples)


def make_dataset(config: Any, split: str, *, process_index: int, process_count: int,
                 seed: int = 0, training: bool | None = None, start_epoch: int = 0,
                 start_position: int = 0, start_batch: int = 0, batch_size: int | None = None,
                 threads: int | None = None) -> tf.data.Dataset:
  """This process's batches of `split` as a tf.data.Dataset of dicts (see the module doc).

  `training` defaults to `split == "train"`; `batch_size` (global) overrides
  config.data.batch_size, e.g. with config.eval.batch_size for evaluation. Training batches
  also carry `_epoch` and `_position` [B] (where each clip sits in the stream, for
  `InputPipeline`'s state); the stream starts at clip `start_position` of epoch `start_epoch`,
  numbering batches from `start_batch`.
  """
  data_config = config if isinstance(config, DataConfig) else DataConfig.from_config(config)
  training = split == "train" if training is None else training
  split_files = load_split(data_config, split, process_index, process_count)
  index = split_files.index
  host_batch = _host_batch(data_config, batch_size, process_count)
  with_waveform = _uses_waveform(data_config, training)
  if with_waveform and not index.store_waveform:
    raise ValueError(f"config.data.mixup_on='waveform' needs records with waveforms, but "
                     f"{split_files.index_path} was written without them (use 'fbank' or "
                     f"rewrite the records with waveforms)")
  mean, std = fbank_statistics(data_config, index)
  parse = _parse_fn(data_config, training, index.num_classes, with_waveform)
  batch_pp = augment.get_preprocess_fn(batch_preprocess_spec(data_config, training, mean, std))
  base_seed = tf.constant([0, seed], tf.int64)

  if training:
    if min(split_files.host_examples) == 0:
      raise ValueError(f"{split_files.index_path}: process {split_files.host_examples.index(0)} "
                       f"of {process_count} gets no training examples "
                       f"({len(index.shards)} shard files); write more shards")
    balanced = None
    if data_config.balanced_sampling:
      balanced = (class_sampling_weights(index.label_counts),
                  total_sampling_weight(index.label_counts), index.num_examples)
    files = split_files.files

    def epoch_stream(epoch: tf.Tensor) -> tf.data.Dataset:
      skip = tf.where(epoch == start_epoch, tf.cast(start_position, tf.int64), 0)
      return _epoch_records(files, epoch, base_seed, data_config, balanced).enumerate().skip(
          skip).map(lambda position, serialized: (epoch, position, serialized))

    def parse_clip(epoch: tf.Tensor, position: tf.Tensor,
                   serialized: tf.Tensor) -> dict[str, tf.Tensor]:
      clip = parse(serialized, _salted(base_seed, "clip", epoch, position))
      clip[_EPOCH], clip[_POSITION] = epoch, position
      return clip

    clips = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_stream).map(
        parse_clip, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = _batch(clips, host_batch, with_waveform)
  else:
    # A process may hold no shard at all (more processes than files): it yields padding only.
    files = tf.constant(split_files.files, tf.string, shape=[len(split_files.files)])
    clips = tf.data.TFRecordDataset(files).map(
        lambda serialized: parse(serialized, base_seed), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)
    total = num_eval_batches(split_files, host_batch) * host_batch
    padding = total - split_files.host_examples[process_index]
    blank = {k: tf.zeros(s.shape, s.dtype) for k, s in clips.element_spec.items()}
    batches = clips.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding)).batch(
        host_batch, drop_remainder=True).skip(start_batch)

  batches = batches.enumerate(start=start_batch).map(
      _batch_fn(batch_pp, base_seed, zero_padding=not training),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if data_config.prefetch:
    batches = batches.prefetch(data_config.prefetch)
  return batches.with_options(_options(threads))


class RecordReadError(RuntimeError):
  """Reading or decoding the records failed; the message names the split and, if found, the file."""


def find_damaged_shard(files: Any, expected_counts: Any) -> tuple[str, str] | None:
  """The first shard that cannot be parsed to its end or holds another count than the index."""
  for path, expected in zip(files, expected_counts):
    count = 0
    try:
      for serialized in tf.data.TFRecordDataset(path):
        records.parse_example(serialized)
        count += 1
    except tf.errors.OpError as e:
      return path, e.message.strip()
    if count != expected:
      return path, f"holds {count} records, the index lists {expected} (truncated file?)"
  return None


class InputPipeline:
  """Iterator of host-local batches (dicts of numpy arrays) with a checkpointable position.

  `get_state()` returns a JSON-serializable dict; `set_state(state)` makes the next batch the
  one that followed when the state was taken. Without balanced sampling the state depends only
  on the number of batches handed out, so one process's state restores every process; with
  balanced sampling each process must restore its own state.
  """

  def __init__(self, config: Any, split: str = "train", *, training: bool | None = None,
               process_index: int | None = None, process_count: int | None = None,
               seed: int = 0, batch_size: int | None = None, threads: int | None = None):
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    self.config = DataConfig.from_config(config)
    self.split = split
    self.training = split == "train" if training is None else training
    self.process_index, self.process_count = process_index, process_count
    self.seed = seed
    self.threads = threads
    self.split_files = load_split(self.config, split, process_index, process_count)
    self.batch_size = batch_size
    self.host_batch = _host_batch(self.config, batch_size, process_count)
    self._batches = 0
    self._epoch = 0
    self._position = 0
    self._iterator: Iterator[dict[str, np.ndarray]] | None = None

  @property
  def num_batches(self) -> int | None:
    """Batches in one evaluation pass (same on every process); None for training (endless)."""
    return None if self.training else num_eval_batches(self.split_files, self.host_batch)

  def _locate(self, batches: int) -> tuple[int, int]:
    """(epoch, position) after `batches` full batches, without balanced sampling."""
    epoch_size = self.split_files.host_examples[self.process_index]
    consumed = batches * self.host_batch
    return consumed // epoch_size, consumed % epoch_size

  def _build(self) -> Iterator[dict[str, np.ndarray]]:
    dataset = make_dataset(self.config, self.split, process_index=self.process_index,
                           process_count=self.process_count, seed=self.seed,
                           training=self.training, start_epoch=self._epoch,
                           start_position=self._position, start_batch=self._batches,
                           batch_size=self.batch_size, threads=self.threads)
    return dataset.as_numpy_iterator()

  def __iter__(self) -> InputPipeline:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._build()
    try:
      batch = next(self._iterator)
    except tf.errors.OpError as e:
      raise RecordReadError(self._describe_failure(e.message)) from e
    except StopIteration:
      if not self.training and self._batches != self.num_batches:
        raise RecordReadError(self._describe_failure(
            f"ended after {self._batches} of {self.num_batches} batches")) from None
      raise
    self._batches += 1
    if self.training:
      epochs, positions = batch.pop(_EPOCH), batch.pop(_POSITION)
      if not self.config.balanced_sampling:
        self._check_epoch_ends(epochs, positions)
      self._epoch, self._position = int(epochs[-1]), int(positions[-1]) + 1
    return batch

  def _check_epoch_ends(self, epochs: np.ndarray, positions: np.ndarray) -> None:
    """An epoch must end after exactly the index's count of this host's clips."""
    epoch_size = self.split_files.host_examples[self.process_index]
    last_epoch, last_position = self._epoch, self._position - 1
    for epoch, position in zip(epochs.tolist(), positions.tolist()):
      if epoch != last_epoch and last_position != epoch_size - 1:
        raise RecordReadError(self._describe_failure(
            f"epoch {last_epoch} ended after {last_position + 1} of {epoch_size} clips"))
      last_epoch, last_position = epoch, position

  def _describe_failure(self, message: str) -> str:
    where = (f"split {self.split!r} ({self.split_files.index_path}), process "
             f"{self.process_index} of {self.process_count}, batch {self._batches}")
    damaged = find_damaged_shard(self.split_files.files, self.split_files.file_examples)
    if damaged is not None:
      return f"{where}: shard {damaged[0]} is damaged: {damaged[1]}"
    return f"{where}: {message}"

  def reset(self) -> None:
    """Rewinds to the first batch (e.g. before another evaluation pass)."""
    self._batches, self._epoch, self._position = 0, 0, 0
    self._iterator = None

  def get_state(self) -> dict[str, Any]:
    """The position in the stream as a JSON-serializable dict."""
    return {"version": STATE_VERSION, "split": self.split, "seed": self.seed,
            "process_index": self.process_index, "process_count": self.process_count,
            "batches": self._batches, "epoch": self._epoch, "position": self._position}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a state returned by `get_state` (of a pipeline with the same config)."""
    for key in ("version", "split", "seed", "process_count"):
      expected = {"version": STATE_VERSION, "split": self.split, "seed": self.seed,
                  "process_count": self.process_count}[key]
      if state.get(key) != expected:
        raise ValueError(f"input state has {key}={state.get(key)!r}, this pipeline has "
                         f"{expected!r}")
    batches = int(state["batches"])
    if self.training and self.config.balanced_sampling:
      if state.get("process_index") != self.process_index:
        raise ValueError(f"input state of process {state.get('process_index')} cannot resume "
                         f"process {self.process_index} under balanced sampling")
      epoch, position = int(state["epoch"]), int(state["position"])
    elif self.training:
      epoch, position = self._locate(batches)
    else:
      epoch, position = 0, 0
    self._batches, self._epoch, self._position = batches, epoch, position
    self._iterator = None


def benchmark_input(config: Any, num_batches: int, *, split: str = "train",
                    threads: int | None = None, warmup_batches: int = 2) -> float:
  """Samples per second (wall clock) of the input pipeline alone: read, decode, augment, batch."""
  return measure_input(config, num_batches, split=split, threads=threads,
                       warmup_batches=warmup_batches)["samples_per_second"]


def measure_input(config: Any, num_batches: int, *, split: str = "train",
                  threads: int | None = None, warmup_batches: int = 2) -> dict[str, float]:
  """Input throughput: samples per wall second and per CPU second (= per fully used core).

  CPU seconds are this process's user + system time over the timed batches, so the per-core
  figure holds on a shared machine too.
  """
  pipeline = InputPipeline(config, split, training=split == "train", process_index=0,
                           process_count=1, threads=threads)
  for _ in range(warmup_batches):
    next(pipeline)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(pipeline)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  samples = num_batches * pipeline.host_batch
  return {"samples": float(samples), "samples_per_second": samples / wall,
          "samples_per_cpu_second": samples / cpu, "cpu_cores_used": cpu / wall}
