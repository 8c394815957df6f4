"""The clip record format: the one module that knows the record keys.

One `tf.train.Example` per clip. Keys (see also cav_mae_jax/data/README.md):

| key                  | stored as                      | parsed as (`parse_example`)          |
|----------------------|--------------------------------|--------------------------------------|
| `video_id`           | bytes [1] (UTF-8)              | tf.string scalar                     |
| `labels`             | int64 [L] (class indices)      | tf.int64 [L], L may be 0             |
| `label_ids`          | bytes [L] (e.g. `/m/09x0r`)    | tf.string [L]                        |
| `fbank`              | bytes [1]: float16 [1024, 128] | tf.float32 [1024, 128]               |
|                      | little-endian, raw log-mel,    |                                      |
|                      | NOT normalized, zero-padded    |                                      |
| `fbank_num_frames`   | int64 [1]: fbank frames of the | tf.int64 scalar                      |
|                      | decoded audio, at most 1024    |                                      |
|                      | (see below)                    |                                      |
| `waveform`           | bytes [1]: int16 16 kHz mono   | tf.int16 [N] (only when asked for    |
|  (optional)          | (first channel), first 10.255 s| with `with_waveform=True`)           |
| `frames`             | bytes [10]: JPEG (quality 75)  | tf.string [10]                       |
|                      | 224x224 RGB                    |                                      |
| `frame_indices`      | int64 [10]: 0-based source     | tf.int64 [10]                        |
|                      | frame numbers of `frames`      |                                      |
| `duration_s`         | float [1]: source duration     | tf.float32 scalar                    |
| `source_sample_rate` | int64 [1]: before resampling   | tf.int64 scalar                      |
| `fps`                | float [1]: source frame rate   | tf.float32 scalar                    |
| `frame_count`        | int64 [1]: source video frames | tf.int64 scalar                      |
| `rotation`           | int64 [1]: clockwise degrees   | tf.int64 scalar, 0 when absent       |
|  (only when not 0)   | applied to make the frames     |                                      |
|                      | upright (display matrix: 90,   |                                      |
|                      | 180 or 270)                    |                                      |

`fbank_num_frames` counts the frames the fbank of the decoded audio has before it is padded to
1024: the audio is cut at 10.255 s (the span of the original's 1024 frames) before the fbank,
so a clip longer than that has exactly 1024; a shorter clip has fewer (the rest is zeros).
`rotation` is written only for tagged clips, so an untagged clip's record is the same bytes as
before the key existed; records without it parse as 0, and readers that do not know it ignore
it (the format version stays 1).

A records directory holds the shard files and the index JSON (`INDEX_FILE`, `index.json`),
which lists the shard files and their example counts, per-class label counts (for balanced
sampling) and the fbank mean/std of the written examples. This module is the only one that
knows that file name: open a records directory with `open_records_dir`, which checks it and
raises `RecordsDirError` (one line naming the directory and the reason) when it is not one.
The statistics are taken over the valid fbank frames only (the first
`min(fbank_num_frames, 1024)` rows of every example, all 128 bins, on the float16 values
stored), not over the zero padding: padding is not a log-mel value. (The original's
statistics tool averages over padded batches; with 10-s clips there is no padding, so both
agree on full-length data.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from cav_mae_jax import files
from cav_mae_jax.data.config import IMAGE_SIZE, NUM_MEL_BINS, NUM_VIDEO_FRAMES
from cav_mae_jax.data.config import TARGET_FBANK_FRAMES

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
WAVEFORM_SAMPLE_RATE = 16000

VIDEO_ID = "video_id"
LABELS = "labels"
LABEL_IDS = "label_ids"
FBANK = "fbank"
FBANK_NUM_FRAMES = "fbank_num_frames"
WAVEFORM = "waveform"
FRAMES = "frames"
FRAME_INDICES = "frame_indices"
DURATION_S = "duration_s"
SOURCE_SAMPLE_RATE = "source_sample_rate"
FPS = "fps"
FRAME_COUNT = "frame_count"
ROTATION = "rotation"
ROTATIONS = (0, 90, 180, 270)

ExampleValues = dict[str, Any]


def make_example_values(
    *,
    video_id: str,
    labels: Sequence[int],
    label_ids: Sequence[str],
    fbank: np.ndarray,
    fbank_num_frames: int,
    jpeg_frames: Sequence[bytes],
    frame_indices: Sequence[int],
    duration_s: float,
    source_sample_rate: int,
    fps: float,
    frame_count: int,
    waveform: np.ndarray | None = None,
    rotation: int = 0,
) -> ExampleValues:
  """Checks and normalizes one clip's values into the record's key -> numpy value dict."""
  fbank = np.asarray(fbank)
  if fbank.shape != (TARGET_FBANK_FRAMES, NUM_MEL_BINS):
    raise ValueError(f"{video_id}: fbank has shape {fbank.shape}, expected "
                     f"({TARGET_FBANK_FRAMES}, {NUM_MEL_BINS}) (pad or cut first)")
  if not np.all(np.isfinite(fbank)):
    raise ValueError(f"{video_id}: fbank has non-finite values")
  if len(labels) != len(label_ids):
    raise ValueError(f"{video_id}: {len(labels)} labels but {len(label_ids)} label ids")
  if rotation not in ROTATIONS:
    raise ValueError(f"{video_id}: rotation {rotation!r}, expected one of {ROTATIONS}")
  if len(jpeg_frames) != NUM_VIDEO_FRAMES or len(frame_indices) != NUM_VIDEO_FRAMES:
    raise ValueError(f"{video_id}: expected {NUM_VIDEO_FRAMES} frames and frame indices, got "
                     f"{len(jpeg_frames)} and {len(frame_indices)}")
  values: ExampleValues = {
      VIDEO_ID: str(video_id),
      LABELS: np.asarray(labels, dtype=np.int64).reshape(-1),
      LABEL_IDS: [str(x) for x in label_ids],
      FBANK: fbank.astype(np.float16),
      FBANK_NUM_FRAMES: int(fbank_num_frames),
      FRAMES: [bytes(x) for x in jpeg_frames],
      FRAME_INDICES: np.asarray(frame_indices, dtype=np.int64).reshape(-1),
      DURATION_S: float(duration_s),
      SOURCE_SAMPLE_RATE: int(source_sample_rate),
      FPS: float(fps),
      FRAME_COUNT: int(frame_count),
      ROTATION: int(rotation),
  }
  if waveform is not None:
    waveform = np.asarray(waveform)
    if waveform.dtype != np.int16 or waveform.ndim != 1:
      raise ValueError(f"{video_id}: waveform must be 1-D int16, got {waveform.dtype} "
                       f"{waveform.shape}")
    values[WAVEFORM] = waveform
  return values


def _bytes(values: Sequence[bytes]) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values: Sequence[int]) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values: Sequence[float]) -> tf.train.Feature:
  return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def serialize_example(values: ExampleValues) -> bytes:
  """Serializes `make_example_values` output to a `tf.train.Example` proto string."""
  feature = {
      VIDEO_ID: _bytes([values[VIDEO_ID].encode("utf-8")]),
      LABELS: _ints(values[LABELS]),
      LABEL_IDS: _bytes([x.encode("utf-8") for x in values[LABEL_IDS]]),
      FBANK: _bytes([values[FBANK].astype("<f2").tobytes()]),
      FBANK_NUM_FRAMES: _ints([values[FBANK_NUM_FRAMES]]),
      FRAMES: _bytes(values[FRAMES]),
      FRAME_INDICES: _ints(values[FRAME_INDICES]),
      DURATION_S: _floats([values[DURATION_S]]),
      SOURCE_SAMPLE_RATE: _ints([values[SOURCE_SAMPLE_RATE]]),
      FPS: _floats([values[FPS]]),
      FRAME_COUNT: _ints([values[FRAME_COUNT]]),
  }
  if WAVEFORM in values:
    feature[WAVEFORM] = _bytes([values[WAVEFORM].astype("<i2").tobytes()])
  if values.get(ROTATION, 0):  # Untagged clips: no key, the bytes records had before it.
    feature[ROTATION] = _ints([values[ROTATION]])
  # Deterministic: map entries in key order. The default order of protobuf's map varies from
  # process to process, which made the same clips give different shard bytes on every run.
  example = tf.train.Example(features=tf.train.Features(feature=feature))
  return example.SerializeToString(deterministic=True)


def feature_spec(with_waveform: bool = False) -> dict[str, Any]:
  """The `tf.io.parse_single_example` spec of a clip record."""
  spec = {
      VIDEO_ID: tf.io.FixedLenFeature([], tf.string),
      LABELS: tf.io.VarLenFeature(tf.int64),
      LABEL_IDS: tf.io.VarLenFeature(tf.string),
      FBANK: tf.io.FixedLenFeature([], tf.string),
      FBANK_NUM_FRAMES: tf.io.FixedLenFeature([], tf.int64),
      FRAMES: tf.io.FixedLenFeature([NUM_VIDEO_FRAMES], tf.string),
      FRAME_INDICES: tf.io.FixedLenFeature([NUM_VIDEO_FRAMES], tf.int64),
      DURATION_S: tf.io.FixedLenFeature([], tf.float32),
      SOURCE_SAMPLE_RATE: tf.io.FixedLenFeature([], tf.int64),
      FPS: tf.io.FixedLenFeature([], tf.float32),
      FRAME_COUNT: tf.io.FixedLenFeature([], tf.int64),
      ROTATION: tf.io.FixedLenFeature([], tf.int64, default_value=0),
  }
  if with_waveform:
    spec[WAVEFORM] = tf.io.FixedLenFeature([], tf.string)
  return spec


def parse_example(serialized: tf.Tensor, with_waveform: bool = False) -> dict[str, tf.Tensor]:
  """Parses one serialized clip record into tensors (usable inside `tf.data.Dataset.map`).

  `fbank` comes back as float32 [1024, 128] (raw, un-normalized); `labels` and `label_ids`
  as dense 1-D tensors of the clip's own length; `waveform` (int16) only if asked for, and
  then a record without one fails to parse with an error naming the key.
  """
  parsed = tf.io.parse_single_example(serialized, feature_spec(with_waveform))
  fbank = tf.io.decode_raw(parsed[FBANK], tf.float16, little_endian=True)
  parsed[FBANK] = tf.reshape(tf.cast(fbank, tf.float32), [TARGET_FBANK_FRAMES, NUM_MEL_BINS])
  parsed[LABELS] = tf.sparse.to_dense(parsed[LABELS])
  parsed[LABEL_IDS] = tf.sparse.to_dense(parsed[LABEL_IDS])
  if with_waveform:
    parsed[WAVEFORM] = tf.io.decode_raw(parsed[WAVEFORM], tf.int16, little_endian=True)
  return parsed


def parse_labels(serialized: tf.Tensor) -> tf.Tensor:
  """The class indices (int64 [L]) of one serialized clip record, parsing nothing else."""
  spec = {LABELS: feature_spec()[LABELS]}
  return tf.sparse.to_dense(tf.io.parse_single_example(serialized, spec)[LABELS])


def parsed_rotation(parsed: Mapping[str, Any]) -> int:
  """The clockwise degrees that made a parsed clip's frames upright (0 for records written
  before the field existed)."""
  if ROTATION not in parsed:
    return 0
  rotation = parsed[ROTATION]
  return int(np.asarray(rotation.numpy() if hasattr(rotation, "numpy") else rotation))


def parsed_to_values(parsed: Mapping[str, Any]) -> ExampleValues:
  """Converts eagerly parsed tensors (or TFDS numpy examples) to `make_example_values` form."""

  def text(x: Any) -> str:
    x = x.numpy() if hasattr(x, "numpy") else x
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)

  def array(x: Any) -> np.ndarray:
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x)

  values: ExampleValues = {
      VIDEO_ID: text(parsed[VIDEO_ID]),
      LABELS: array(parsed[LABELS]).astype(np.int64).reshape(-1),
      LABEL_IDS: [text(x) for x in array(parsed[LABEL_IDS]).reshape(-1)],
      FBANK: array(parsed[FBANK]).astype(np.float16),
      FBANK_NUM_FRAMES: int(array(parsed[FBANK_NUM_FRAMES])),
      FRAMES: [bytes(x) for x in array(parsed[FRAMES]).reshape(-1)],
      FRAME_INDICES: array(parsed[FRAME_INDICES]).astype(np.int64).reshape(-1),
      DURATION_S: float(array(parsed[DURATION_S])),
      SOURCE_SAMPLE_RATE: int(array(parsed[SOURCE_SAMPLE_RATE])),
      FPS: float(array(parsed[FPS])),
      FRAME_COUNT: int(array(parsed[FRAME_COUNT])),
      ROTATION: parsed_rotation(parsed),
  }
  if WAVEFORM in parsed:
    values[WAVEFORM] = array(parsed[WAVEFORM]).astype(np.int16).reshape(-1)
  return values


# ----------------------------------------------------------------------------------------
# Statistics and the index JSON.


# Fields added after the first records were written; a sidecar, index.json or TFDS metadata
# without them reads them as their default (0: such a directory did not count them).
OPTIONAL_STATS_FIELDS = frozenset({"num_unlabeled"})


@dataclasses.dataclass
class ShardStats:
  """Mergeable per-shard statistics: example and label counts, fbank sums (float64).

  `num_unlabeled` counts the examples with no label at all (written only when the list's
  unlabeled clips were allowed, `clips.NO_LABELS`)."""

  num_classes: int
  num_examples: int = 0
  label_counts: list[int] = dataclasses.field(default_factory=list)
  fbank_count: int = 0
  fbank_sum: float = 0.0
  fbank_sum_squares: float = 0.0
  num_unlabeled: int = 0

  def __post_init__(self):
    if not self.label_counts:
      self.label_counts = [0] * self.num_classes
    if len(self.label_counts) != self.num_classes:
      raise ValueError(f"label_counts has {len(self.label_counts)} entries, expected "
                       f"num_classes={self.num_classes}")

  def add(self, values: ExampleValues) -> None:
    """Counts one example: its labels and its valid fbank frames."""
    self.num_examples += 1
    if len(values[LABELS]) == 0:
      self.num_unlabeled += 1
    for label in values[LABELS]:
      if not 0 <= label < self.num_classes:
        raise ValueError(f"{values[VIDEO_ID]}: label {label} outside [0, {self.num_classes})")
      self.label_counts[int(label)] += 1
    valid = min(int(values[FBANK_NUM_FRAMES]), TARGET_FBANK_FRAMES)
    fbank = values[FBANK][:valid].astype(np.float64)
    self.fbank_count += fbank.size
    self.fbank_sum += float(fbank.sum())
    self.fbank_sum_squares += float(np.square(fbank).sum())

  def merge(self, other: ShardStats) -> ShardStats:
    """Returns the statistics of both shards together."""
    if other.num_classes != self.num_classes:
      raise ValueError(f"cannot merge stats with num_classes {self.num_classes} and "
                       f"{other.num_classes}")
    return ShardStats(
        num_classes=self.num_classes,
        num_examples=self.num_examples + other.num_examples,
        label_counts=[a + b for a, b in zip(self.label_counts, other.label_counts)],
        fbank_count=self.fbank_count + other.fbank_count,
        fbank_sum=self.fbank_sum + other.fbank_sum,
        fbank_sum_squares=self.fbank_sum_squares + other.fbank_sum_squares,
        num_unlabeled=self.num_unlabeled + other.num_unlabeled,
    )

  def fbank_mean_std(self) -> tuple[float, float]:
    """Mean and (population) std of all counted fbank values."""
    if self.fbank_count == 0:
      raise ValueError("no fbank values counted: cannot compute mean/std of an empty set")
    mean = self.fbank_sum / self.fbank_count
    variance = max(self.fbank_sum_squares / self.fbank_count - mean * mean, 0.0)
    return mean, math.sqrt(variance)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> ShardStats:
    return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)
                  if f.name in data or f.name not in OPTIONAL_STATS_FIELDS})


@dataclasses.dataclass(frozen=True)
class ShardInfo:
  """One TFRecord file of the set: its name (relative to the index) and example count."""

  file: str
  num_examples: int


@dataclasses.dataclass(frozen=True)
class RecordIndex:
  """The contents of index.json: shards, counts and normalization statistics."""

  shards: tuple[ShardInfo, ...]
  num_examples: int
  num_classes: int
  label_counts: tuple[int, ...]
  fbank_mean: float
  fbank_std: float
  fbank_stats_count: int
  store_waveform: bool
  fbank_shape: tuple[int, int] = (TARGET_FBANK_FRAMES, NUM_MEL_BINS)
  num_unlabeled: int = 0  # examples with no label (`ShardStats.num_unlabeled`)
  num_video_frames: int = NUM_VIDEO_FRAMES
  image_size: int = IMAGE_SIZE
  waveform_sample_rate: int = WAVEFORM_SAMPLE_RATE
  format_version: int = FORMAT_VERSION

  def shard_list(self) -> list[list[Any]]:
    """[file, examples] of each shard, in order: which clips a split holds, paths apart (the
    same on every host that reads the same shards; JSON as plan.json keeps it)."""
    return [[shard.file, shard.num_examples] for shard in self.shards]

  def shard_paths(self, directory: str) -> list[str]:
    """Paths of the shard files in the records directory (absolute for local paths)."""
    if "://" not in directory:
      directory = os.path.abspath(directory)
    return [os.path.join(directory, shard.file) for shard in self.shards]


def index_from_stats(shards: Sequence[ShardInfo], stats: ShardStats,
                     store_waveform: bool) -> RecordIndex:
  """Builds the index of a finished record set from its shards and merged statistics."""
  if sum(s.num_examples for s in shards) != stats.num_examples:
    raise ValueError(f"shard counts sum to {sum(s.num_examples for s in shards)} but the "
                     f"statistics counted {stats.num_examples} examples")
  mean, std = stats.fbank_mean_std()
  return RecordIndex(
      shards=tuple(shards),
      num_examples=stats.num_examples,
      num_classes=stats.num_classes,
      label_counts=tuple(stats.label_counts),
      fbank_mean=mean,
      fbank_std=std,
      fbank_stats_count=stats.fbank_count,
      store_waveform=store_waveform,
      num_unlabeled=stats.num_unlabeled,
  )


def write_json_atomic(path: str, data: Any) -> None:
  """Writes a JSON file of the data side (index, manifest, summary, sidecars) through a
  temporary name (`files.staged_name`, tagged `files.process_tag`) and a rename (readers never see
  half; a failed write, a full disk, removes the temporary and names `path`)."""
  with files.staged_output(path, files.process_tag()) as tmp, \
      open(tmp, "w") as f:
    json.dump(data, f, indent=1)
    f.write("\n")


def write_index(path: str, index: RecordIndex) -> None:
  """Writes the index JSON atomically (`write_json_atomic`)."""
  write_json_atomic(path, dataclasses.asdict(index))


def index_path(directory: str) -> str:
  """Path of the index JSON of a records directory."""
  return os.path.join(directory, INDEX_FILE)


def read_index(path: str) -> RecordIndex:
  """Reads and checks an index JSON written by `write_index`."""
  with tf.io.gfile.GFile(path) as f:
    data = json.load(f)
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
  version = data.get("format_version")
  if version != FORMAT_VERSION:
    raise ValueError(f"{path}: format_version {version!r}, this code reads {FORMAT_VERSION}")
  fields = {f.name for f in dataclasses.fields(RecordIndex)}
  missing = fields - set(data) - OPTIONAL_STATS_FIELDS
  if missing:
    raise ValueError(f"{path}: index is missing fields {sorted(missing)}")
  unknown = set(data) - fields
  if unknown:
    raise ValueError(f"{path}: index has unknown fields {sorted(unknown)}")
  data["shards"] = tuple(ShardInfo(**s) for s in data["shards"])
  data["label_counts"] = tuple(data["label_counts"])
  data["fbank_shape"] = tuple(data["fbank_shape"])
  index = RecordIndex(**data)
  if len(index.label_counts) != index.num_classes:
    raise ValueError(f"{path}: label_counts has {len(index.label_counts)} entries but "
                     f"num_classes is {index.num_classes}")
  if sum(s.num_examples for s in index.shards) != index.num_examples:
    raise ValueError(f"{path}: shard counts do not sum to num_examples={index.num_examples}")
  return index


# ----------------------------------------------------------------------------------------
# Shard sidecars: where each record is.

# tools/preprocess.py writes `<shard file>.json` beside each shard (cav_mae_jax/data/shards.py);
# besides the shard's counts and statistics it lists every record's size in bytes
# (RECORD_BYTES) and classes (RECORD_LABELS), in file order, so that balanced sampling and
# mixup partners (dataset.HostRecords) find the records without reading them. The TFDS builder
# writes a sidecar with only these two beside each of its shards (`write_record_layout`).
SIDECAR_SUFFIX = ".json"
RECORD_BYTES, RECORD_LABELS = "record_bytes", "record_labels"
# Bytes a TFRecord adds to each record: its length (8), the length's CRC (4), the data's CRC (4).
TFRECORD_FRAMING_BYTES = 16


def read_record_layout(path: str, num_records: int,
                       num_classes: int) -> tuple[np.ndarray, list[list[int]]] | None:
  """(sizes int64 [N], classes of each record) of shard `path` from its sidecar; None when
  there is no sidecar, it predates the layout, or it does not describe this file (another
  count, sizes that do not add up to the file's size, a class outside [0, num_classes)): then
  the shard must be read. (`layout_mismatch` compares a sidecar with its shard record by
  record, to name one that passes these checks and is still wrong.)"""
  sidecar = path + SIDECAR_SUFFIX
  try:
    with tf.io.gfile.GFile(sidecar) as f:
      data = json.load(f)
    sizes = np.asarray(data[RECORD_BYTES], np.int64)
    labels = [[int(k) for k in clip] for clip in data[RECORD_LABELS]]
    file_size = tf.io.gfile.stat(path).length
  except (OSError, tf.errors.OpError, ValueError, TypeError, KeyError):
    return None
  if (not _sizes_fit(sizes, num_records, file_size) or len(labels) != num_records
      or any(not 0 <= k < num_classes for clip in labels for k in clip)):
    return None
  return sizes, labels


def _sizes_fit(sizes: np.ndarray, num_records: int, file_size: int) -> bool:
  """Whether a sidecar's record sizes are `num_records` records that, framed, make a file of
  `file_size` bytes."""
  return (sizes.shape == (num_records,)
          and int(np.sum(sizes + TFRECORD_FRAMING_BYTES)) == file_size)


def shard_size_problem(path: str, num_records: int) -> str | None:
  """What is wrong with shard `path`'s size, found without parsing its records: against its
  sidecar's record sizes when it has them (a file cut at a record boundary, or emptied, reads
  without an error and would only be found when its records run out), else against the
  smallest size `num_records` records take; None when the size fits. A sidecar that does not
  describe the file (another count, sizes that do not add up to it: a sidecar of an older
  version of the shard) is not believed: the shard's records are counted instead."""
  try:
    size = tf.io.gfile.stat(path).length
  except (OSError, tf.errors.OpError) as e:
    return f"cannot be read ({op_error_text(e) if isinstance(e, tf.errors.OpError) else e})"
  try:
    with tf.io.gfile.GFile(path + SIDECAR_SUFFIX) as f:
      sizes = np.asarray(json.load(f)[RECORD_BYTES], np.int64)
  except (OSError, tf.errors.OpError, ValueError, TypeError, KeyError):
    sizes = None  # no sidecar (or none that lists sizes): the smallest possible size
  if sizes is None:
    if size < TFRECORD_FRAMING_BYTES * num_records:
      return (f"is {size} bytes, too small for the {num_records} records the index lists "
              "(truncated file?)")
    return None
  if _sizes_fit(sizes, num_records, size):
    return None
  try:  # the sidecar is not this file's: count
    count = sum(1 for _ in tf.data.TFRecordDataset(path))
  except tf.errors.OpError as e:
    return op_error_text(e)
  return count_problem(count, num_records) if count != num_records else None


def _sizes_and_classes(path: str, labels_of: Callable[[tf.Tensor], tf.Tensor]
                       ) -> Iterator[tuple[int, list[int]]]:
  """(size in bytes, classes) of each record of shard `path`, in file order."""
  for serialized in tf.data.TFRecordDataset(path):
    yield len(serialized.numpy()), [int(k) for k in labels_of(serialized).numpy()]


def write_record_layout(path: str,
                        labels_of: Callable[[tf.Tensor], tf.Tensor] = parse_labels) -> None:
  """Reads shard `path` once and writes its sidecar with only the layout (RECORD_BYTES,
  RECORD_LABELS: `labels_of` gives a serialized record's classes), through a temporary name,
  on any file system TensorFlow writes (the TFDS builder's shards; tools/preprocess.py records
  the layout as it writes a shard)."""
  sizes, labels = [], []
  for size, classes in _sizes_and_classes(path, labels_of):
    sizes.append(size)
    labels.append(classes)
  sidecar = path + SIDECAR_SUFFIX
  tmp = files.staged_name(sidecar, files.process_tag())
  with tf.io.gfile.GFile(tmp, "w") as f:
    json.dump({RECORD_BYTES: sizes, RECORD_LABELS: labels}, f)
  tf.io.gfile.rename(tmp, sidecar, overwrite=True)


def layout_mismatch(path: str, num_records: int, num_classes: int,
                    labels_of: Callable[[tf.Tensor], tf.Tensor] = parse_labels) -> str | None:
  """Where the sidecar layout of shard `path` (`read_record_layout`) disagrees with the records
  in it, read one by one (`labels_of`: the split's label parser); None when there is no usable
  layout or it agrees."""
  layout = read_record_layout(path, num_records, num_classes)
  if layout is None:
    return None
  sizes, labels = layout
  for k, (size, classes) in enumerate(_sizes_and_classes(path, labels_of)):
    if k >= num_records or size != sizes[k] or classes != labels[k]:
      listed = (f"{sizes[k]} bytes, classes {labels[k]}" if k < num_records else "nothing")
      return (f"{path + SIDECAR_SUFFIX} does not describe its shard: record {k} is {size} "
              f"bytes, classes {classes}; the sidecar lists {listed} (remove the sidecar: "
              "the shard is then read at start)")
  return None


# ----------------------------------------------------------------------------------------
# Records directories.


def count_problem(held: int | None, listed: int) -> str:
  """Why a shard of `held` records (None: more than `listed`) is not the index's `listed`: a
  shard cut at a record boundary, or emptied, reads without an error, so its count tells."""
  if held is None:
    return f"holds more than {listed} records, the index lists {listed}"
  return f"holds {held} records, the index lists {listed}" + (
      " (truncated file?)" if held < listed else "")


def op_error_text(error: tf.errors.OpError) -> str:
  """A TensorFlow read or parse error's own words, for a one-line message: without the graph
  function's name (`{{function_node ...}}`) and the op's (`[Op:IteratorGetNext] name: ...`)."""
  text = re.sub(r"\{\{function_node [^}]*\}\}", "", error.message or "")
  text = re.sub(r"\[Op:[^\]]*\]( name: \S*)?", "", text)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


class RecordsDirError(ValueError):
  """A path that is not a usable records directory; the message is one line naming it."""

  def __init__(self, directory: str, reason: str):
    super().__init__(f"{directory}: {reason}" if directory else f"{reason} (empty path)")
    self.directory = directory
    self.reason = reason


def open_records_dir(directory: str) -> RecordIndex:
  """Checks a records directory (index and every shard present) and returns its index.

  Raises RecordsDirError for an empty path, a missing directory, a directory without
  index.json (not a records directory), an unreadable or invalid index, or missing shards.
  Works on any file system TensorFlow reads.
  """
  if not directory:
    raise RecordsDirError(directory, "no records directory given")
  if not tf.io.gfile.isdir(directory):
    reason = ("not a directory" if tf.io.gfile.exists(directory) else
              "directory does not exist")
    raise RecordsDirError(directory, reason)
  path = index_path(directory)
  if not tf.io.gfile.exists(path):
    raise RecordsDirError(directory, f"no {INDEX_FILE}: not a records directory (tools/"
                          "preprocess.py writes it once every shard is finished)")
  try:
    index = read_index(path)
  except (OSError, tf.errors.OpError, ValueError, TypeError, KeyError) as e:
    why = op_error_text(e) if isinstance(e, tf.errors.OpError) else str(e)
    why = why.replace(f"{path}: ", "").splitlines()[0] if why else type(e).__name__
    raise RecordsDirError(directory, f"unreadable {INDEX_FILE}: {why}") from None
  present = set(tf.io.gfile.listdir(directory))
  missing = [shard.file for shard in index.shards if shard.file not in present]
  if missing:
    raise RecordsDirError(directory, f"{INDEX_FILE} lists {len(missing)} shard file(s) that "
                          f"do not exist, e.g. {missing[0]}")
  return index


def iter_examples(directory: str) -> Iterator[ExampleValues]:
  """Every example of a records directory as record values, in shard order. A shard holding
  another count of records than the index lists raises ValueError naming it (one cut at a
  record boundary, or empty, reads without an error)."""
  index = open_records_dir(directory)
  for shard, path in zip(index.shards, index.shard_paths(directory)):
    count = 0
    for serialized in tf.data.TFRecordDataset(path):
      count += 1
      if count > shard.num_examples:
        break
      yield parsed_to_values(parse_example(serialized, with_waveform=index.store_waveform))
    if count != shard.num_examples:
      held = None if count > shard.num_examples else count
      raise ValueError(f"shard {path} is damaged: {count_problem(held, shard.num_examples)}")
