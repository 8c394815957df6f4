"""Clips for feature tools: host batches with clip ids, from records or from video files.

The evaluators' batches carry no clip ids, and retrieval on the paper's subsets, feature files
and inpainting pictures all need them. Both sources here yield host-local batches in the
evaluation layout (`audio` [B, T, F] normalized fbank, `image` [B, H, W, 3] ImageNet-normalized
frame `config.data.eval_frame`, `valid` [B]) plus `video_id` [B] (str; '' for padding). Every
process yields the same number of batches; the last ones are padded with zero clips marked
`valid=False`, so every clip is counted once and padding is dropped downstream.

Both sources preprocess a clip with the evaluation pipeline's own ops (`eval_preprocess_fn`,
built from `data.dataset`'s op strings): frame choice, JPEG decoding, resize and center crop,
fbank and ImageNet normalization, so a video file gives the model what its record would.

Records (`record_batches`): this process's shard files in order (as the input pipeline splits
them), optionally only the clips whose id is in a subset list; ids of the subset missing from
the records raise an error naming them.

Video files (`video_batches`): decoded as `tools/preprocess.py` decodes them (first audio channel
at 16 kHz through 16-bit samples, 10 frames by the original's rule, resized and center-cropped to
224 and JPEG-encoded at quality 75 as the records store them), then the same ops. Audio is cut to
what the model's `audio_length` fbank frames see; shorter audio is zero-padded in raw log-mel
space before normalization, as the original loader pads (`fbank.pad_or_trim`). One difference
from records remains: records store the fbank as float16, a video's is float32. A clip that
cannot be decoded is reported to `on_error` (its row stays padding) with the data tools' reason
codes (`decode.DecodeError` reasons).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

HostBatch = dict[str, np.ndarray]
# The video file names a --videos directory lists: those of `data.sources.VIDEO_FILE_EXTENSIONS`
# (spelled out here so that importing this module does not import TensorFlow).
VIDEO_EXTENSIONS = (".3gp", ".avi", ".flv", ".m2ts", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg",
                    ".mpg", ".mts", ".mxf", ".ogv", ".ts", ".webm", ".wmv")


# ----------------------------------------------------------------------------------------
# Clip id lists and cross-process gathering.


def _read_text_file(path: str) -> str:
  """A local list file's text; a byte-order mark is not part of its first line, and text that
  is not UTF-8 is a ValueError naming the file."""
  try:
    with open(path, encoding="utf-8-sig") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_id_list(path: str) -> list[str]:
  """Clip ids of a subset file: JSON (a list of ids, or the original's datafile) or text lines."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such subset file")
  text = _read_text_file(path)
  if path.endswith(".json"):
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
      data = [item.get("video_id") if isinstance(item, dict) else None for item in data["data"]]
    if isinstance(data, list):  # an integer id as the datafile reader takes it (`str`)
      data = [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in data]
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
      raise ValueError(f"{path}: expected a JSON list of clip ids or a datafile "
                       "{'data': [{'video_id': ...}, ...]}")
    ids = [x.strip() for x in data]
  else:
    ids = [line.strip() for line in text.splitlines()]
    ids = [x for x in ids if x and not x.startswith("#")]
  if not ids:
    raise ValueError(f"{path}: the subset lists no clip ids")
  return list(dict.fromkeys(ids))  # unique, in file order


def allgather_strings(strings: Sequence[str]) -> list[list[str]]:
  """Every process's list of strings, by process index (one process: `[strings]`)."""
  if jax.process_count() == 1:
    return [list(strings)]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  encoded = np.frombuffer(json.dumps(list(strings)).encode("utf-8"), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([encoded.size]))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:encoded.size] = encoded
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(row[:n].tobytes().decode("utf-8")) for row, n in zip(gathered, lengths)]


def global_ids(local_ids: Sequence[np.ndarray]) -> np.ndarray:
  """Ids of the global batches' rows (process blocks in order) from this process's batches."""
  per_process = allgather_strings([str(x) for batch in local_ids for x in batch])
  host_batch = len(local_ids[0]) if local_ids else 0
  rows = []
  for k in range(len(local_ids)):
    for ids in per_process:
      rows.extend(ids[k * host_batch:(k + 1) * host_batch])
  return np.asarray(rows, dtype=object)


def _max_over_processes(value: int) -> int:
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.array([value]))))


def useful_host_batch(host_batch: int, most_clips: int) -> int:
  """`host_batch`, or fewer rows where one batch holds every clip already (`most_clips`: the
  most clips a process reads): a multiple of this process's devices, as a batch must be. The
  clips and every output are the same; a batch of 10**9 padded that many zero clips (hours of
  work, or no memory left, for nothing)."""
  devices = jax.local_device_count()
  return min(host_batch, max(devices, -(-most_clips // devices) * devices))


def _list_batch_rows(batch_size: int, num: int, cut_to_clips: bool = True) -> tuple[int, int]:
  """(this process's rows, all rows) of each global batch over a list of `num` clips whose
  batches every process slices in process order (`useful_host_batch`: no more than the clips
  need, unless not `cut_to_clips`)."""
  from cav_mae_jax.data import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  processes = jax.process_count()
  host_batch = dataset_lib.host_batch_size(batch_size, processes, field="batch_size")
  if cut_to_clips:
    host_batch = useful_host_batch(host_batch, -(-num // processes))
  return host_batch, host_batch * processes


def pad_batch(batch: HostBatch, size: int) -> HostBatch:
  """`batch` with zero rows (valid False, id '') appended up to `size` rows."""
  count = len(batch["valid"])
  if count == size:
    return batch
  padded = {}
  for key, value in batch.items():
    value = np.asarray(value, dtype=object if key == "video_id" else None)
    fill = np.full((size - count,) + value.shape[1:], "" if key == "video_id" else 0, value.dtype)
    padded[key] = np.concatenate([value, fill])
  return padded


def array_batches(arrays: dict[str, np.ndarray], batch_size: int,
                  cut_to_clips: bool = True) -> Iterator[HostBatch]:
  """Host batches of in-memory arrays [N, ...] (this process's rows), ids '0'..'N-1'; of
  `batch_size` rows whatever N when not `cut_to_clips` (one compiled program for every call)."""
  num = len(next(iter(arrays.values())))
  host_batch, batch_size = _list_batch_rows(batch_size, num, cut_to_clips)
  ids = np.asarray([str(i) for i in range(num)], dtype=object)
  for start in range(0, num, batch_size):
    rows = slice(start + jax.process_index() * host_batch,
                 start + (jax.process_index() + 1) * host_batch)
    batch = {k: v[rows] for k, v in arrays.items()}
    batch["valid"], batch["video_id"] = np.ones(len(ids[rows]), bool), ids[rows]
    yield pad_batch(batch, host_batch)


# ----------------------------------------------------------------------------------------
# The evaluation pipeline's preprocessing of one clip.


def eval_data_config(config: Any, frame: int | None = None) -> Any:
  """`config.data` as `data.input.DataConfig`, one evaluation frame (`frame` or eval_frame)."""
  from cav_mae_jax.data import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  data_config = dataset_lib.DataConfig.from_config(config)
  data_config = dataclasses.replace(
      data_config, eval_all_frames=False,
      eval_frame=data_config.eval_frame if frame is None else frame)
  data_config.validate()
  return data_config


def eval_preprocess_fn(data_config: Any, mean: float, std: float) -> Callable[[dict], dict]:
  """One clip {'audio': raw fbank [T, F], 'frames': [10] JPEG} -> normalized {'audio', 'image'}.

  The evaluation pipeline's example ops then its batch ops (elementwise, so one clip at a time
  gives the batch's values); works eagerly and inside tf.data.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.data import augment  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.data import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  example_ops = augment.get_preprocess_fn(
      dataset_lib.example_preprocess_spec(data_config, training=False, num_classes=1))
  batch_ops = augment.get_preprocess_fn(
      dataset_lib.batch_preprocess_spec(data_config, training=False, mean=mean, std=std))

  def preprocess(clip: dict) -> dict:
    data = example_ops({"audio": clip["audio"], "frames": clip["frames"],
                        "labels": tf.zeros([0], tf.int64)})
    data = batch_ops({"audio": data["audio"][None], "image": data["image"][None]})
    return {"audio": data["audio"][0], "image": data["image"][0]}

  return preprocess


# ----------------------------------------------------------------------------------------
# Records.


class _ShardCounts:
  """Checks that each shard holds the records its index lists, as records arrive in file order
  (each named by its shard's position): a shard that ends early or runs over raises
  RecordReadError naming it, before a batch holding another shard's clips in its place is used."""

  def __init__(self, files: Sequence[str], expected: Sequence[int], description: str):
    self._files, self._expected, self._description = list(files), list(expected), description
    self._shard, self._count = 0, 0

  def add(self, shards: Sequence[int]) -> None:
    for shard in shards:
      while shard != self._shard:  # the records of self._shard have ended
        self._check_complete()
        self._shard, self._count = self._shard + 1, 0
      self._count += 1
      if self._count > self._expected[shard]:
        self._fail(None)

  def finish(self) -> None:
    """After the last record: every shard left must be complete."""
    while self._shard < len(self._files):
      self._check_complete()
      self._shard, self._count = self._shard + 1, 0

  def _check_complete(self) -> None:
    if self._count != self._expected[self._shard]:
      self._fail(self._count)

  def _fail(self, held: int | None) -> None:
    """Raises for the current shard, which holds `held` records (None: more than listed)."""
    from cav_mae_jax.data import input as input_lib  # pylint: disable=g-import-not-at-top
    from cav_mae_jax.data import records  # pylint: disable=g-import-not-at-top
    raise input_lib.RecordReadError(
        f"{self._description}: shard {self._files[self._shard]} is damaged: "
        f"{records.count_problem(held, self._expected[self._shard])}")


def record_batches(config: Any, batch_size: int, *, directory: str = "",
                   video_ids: Sequence[str] | None = None,
                   frame: int | None = None) -> Iterator[HostBatch]:
  """Host batches of the records in `directory` (default config.data.eval_dir), with ids.

  With `video_ids`, only the clips whose id is listed (every record with such an id); an id
  that no record has raises ValueError naming it. Reads this process's shards in order (with
  `video_ids`, twice: their ids first, to count and check the subset).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.data import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.data import input as input_lib  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.data import records  # pylint: disable=g-import-not-at-top

  data_config = eval_data_config(config, frame)
  if directory:
    data_config = dataclasses.replace(data_config, eval_dir=directory)
  process, processes = jax.process_index(), jax.process_count()
  split = dataset_lib.load_split(data_config, "eval", process, processes)
  host_batch = useful_host_batch(
      dataset_lib.host_batch_size(batch_size, processes, field="batch_size"),
      max(split.host_examples))
  normalization = dataset_lib.fbank_normalization(data_config)
  preprocess = eval_preprocess_fn(data_config, normalization.mean, normalization.std)
  files = tf.constant(split.files, tf.string, shape=[len(split.files)])
  id_spec = {records.VIDEO_ID: records.feature_spec()[records.VIDEO_ID]}
  count = split.host_examples[process]
  # Each record with the position of its shard among `files`: a shard that ends early (cut at
  # a record boundary, or empty) reads without an error, and its clips would be left out.
  examples = tf.data.Dataset.from_tensor_slices((files, tf.range(len(split.files)))).flat_map(
      dataset_lib.no_autograph(
          lambda path, shard: tf.data.TFRecordDataset(path).map(lambda s: (s, shard))))
  shard_counts = _ShardCounts(split.files, split.file_examples, split.source.description)
  if video_ids is not None:
    wanted = list(dict.fromkeys(video_ids))
    if not wanted:
      raise ValueError("the subset of clip ids is empty")
    local_ids = []
    for video_id, shard in examples.map(dataset_lib.no_autograph(lambda s, shard: (
        tf.io.parse_single_example(s, id_spec)[records.VIDEO_ID], shard))).as_numpy_iterator():
      shard_counts.add([shard])
      local_ids.append(video_id.decode())
    shard_counts.finish()
    found = {x for ids in allgather_strings(sorted(set(local_ids) & set(wanted))) for x in ids}
    missing = [x for x in wanted if x not in found]
    if missing and len(wanted) == 1:  # one clip asked for (tools/inpaint.py --clip_id)
      raise ValueError(f"no clip of {split.source.description} has the id {missing[0]!r}")
    if missing:
      raise ValueError(f"{len(missing)} of the {len(wanted)} subset clips are not in "
                       f"{split.source.description}: {', '.join(missing[:20])}"
                       f"{' ...' if len(missing) > 20 else ''}")
    wanted_set = set(wanted)
    count = sum(x in wanted_set for x in local_ids)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(wanted), tf.ones(len(wanted), tf.int32)),
        default_value=0)
    examples = examples.filter(dataset_lib.no_autograph(lambda s, shard: table.lookup(
        tf.io.parse_single_example(s, id_spec)[records.VIDEO_ID]) > 0))
    shard_counts = None  # every shard was counted when the ids were read

  def parse(serialized: tf.Tensor, shard: tf.Tensor) -> dict[str, tf.Tensor]:
    parsed = split.source.parse(serialized)
    clip = preprocess({"audio": parsed[records.FBANK], "frames": parsed[records.FRAMES]})
    return {**clip, "video_id": parsed[records.VIDEO_ID], "valid": tf.constant(True),
            "shard": shard}

  batches = examples.map(dataset_lib.no_autograph(parse), num_parallel_calls=tf.data.AUTOTUNE,
                         deterministic=True)
  batches = batches.batch(host_batch).prefetch(2)
  num_batches = _max_over_processes(math.ceil(count / host_batch))
  yielded = 0
  # Named now: a generator left unfinished is closed when the program ends, by when
  # TensorFlow's modules may be torn down (`tf.errors` None: 'Exception ignored in').
  read_error = tf.errors.OpError
  try:
    for batch in batches.as_numpy_iterator():
      shards = batch.pop("shard")
      if shard_counts is not None:
        shard_counts.add(shards)  # before the batch is used: it may hold another shard's clips
      batch["video_id"] = np.asarray([x.decode() for x in batch["video_id"]], dtype=object)
      yield pad_batch(batch, host_batch)
      yielded += 1
    if shard_counts is not None:
      shard_counts.finish()
  except read_error as e:
    damaged = input_lib.find_damaged_shard(split.files, split.file_examples)
    where = (f"shard {damaged[0]} is damaged: {damaged[1]}" if damaged else
             records.op_error_text(e))
    raise input_lib.RecordReadError(f"{split.source.description}: {where}") from e
  empty = {"audio": np.zeros((0, data_config.audio_length, data_config.num_mel_bins), np.float32),
           "image": np.zeros((0, data_config.image_size, data_config.image_size, 3), np.float32),
           "valid": np.zeros(0, bool), "video_id": np.zeros(0, object)}
  for _ in range(yielded, num_batches):
    yield pad_batch(empty, host_batch)


# ----------------------------------------------------------------------------------------
# Video files.


@dataclasses.dataclass(frozen=True)
class VideoClip:
  """A video file to read and the id its features are stored under; with `frames_dir`, `path`
  is the audio file of the original's extracted layout (`sources.ClipEntry`)."""

  video_id: str
  path: str
  frames_dir: str = ""


def list_videos(source: str) -> list[VideoClip]:
  """Clips of a directory (its video files, sorted), a JSON datafile, or a text list of paths.

  Ids: the datafile's `video_id`, else the file name without its extension. Relative paths in a
  list or datafile are taken from its folder.
  """
  if os.path.isdir(source):
    names = sorted(n for n in os.listdir(source) if n.lower().endswith(VIDEO_EXTENSIONS))
    clips = [VideoClip(os.path.splitext(n)[0], os.path.join(source, n)) for n in names]
  elif not os.path.isfile(source):
    raise FileNotFoundError(f"{source}: no such video directory or list file")
  elif source.lower().endswith(VIDEO_EXTENSIONS):  # it was read as a text list: "not UTF-8"
    raise ValueError(f"{source}: a video file, not a list: give a directory of video files, a "
                     "text file of paths (one a line) or a JSON datafile")
  elif source.endswith(".json"):
    from cav_mae_jax.data import sources  # pylint: disable=g-import-not-at-top
    clips = [VideoClip(e.video_id, e.path, e.frames_dir) for e in sources.read_datafile(source)]
  else:
    base = os.path.dirname(os.path.abspath(source))
    paths = [line.strip() for line in _read_text_file(source).split("\n")
             if line.strip() and not line.startswith("#")]
    clips = [VideoClip(os.path.splitext(os.path.basename(p))[0], os.path.join(base, p))
             for p in paths]
  if not clips:
    left_out = unlisted_entries(source)
    raise ValueError(f"{source}: lists no video files (extensions {', '.join(VIDEO_EXTENSIONS)})"
                     + (f"; {left_out}" if left_out else ""))
  seen: dict[str, int] = {}
  for clip in clips:
    seen[clip.video_id] = seen.get(clip.video_id, 0) + 1
  duplicates = sorted(k for k, n in seen.items() if n > 1)
  if duplicates:
    raise ValueError(f"{source}: clip ids must be unique; repeated: {', '.join(duplicates[:20])}")
  return clips


def unlisted_entries(source: str) -> str:
  """What `list_videos` leaves out of a directory (its subfolders, which it does not enter,
  and files of other extensions), as words for the user ('not read: ...'); '' for none, or
  for a list file."""
  if not os.path.isdir(source):
    return ""
  names = sorted(n for n in os.listdir(source) if not n.lower().endswith(VIDEO_EXTENSIONS))
  folders = [n for n in names if os.path.isdir(os.path.join(source, n))]
  others = len(names) - len(folders)
  parts = []
  if folders:
    shown = ", ".join(folders[:5]) + (" ..." if len(folders) > 5 else "")
    parts.append(f"{len(folders)} subfolder(s) ({shown}; a directory lists its own video files, "
                 "a text file of paths names files anywhere)")
  if others:
    parts.append(f"{others} file(s) of other extensions")
  return f"not read: {'; '.join(parts)}" if parts else ""


def audio_window_seconds(audio_length: int, sample_rate: int = 16000) -> float:
  """Seconds of audio that `audio_length` fbank frames see (10.255 s for 1024 frames)."""
  from cav_mae_jax.data import fbank  # pylint: disable=g-import-not-at-top
  window, shift, _ = fbank.frame_geometry(sample_rate)
  return ((audio_length - 1) * shift + window) / sample_rate


def video_inputs(path: str, data_config: Any, preprocess: Callable[[dict], dict],
                 frames_dir: str = "", video_id: str = "") -> HostBatch:
  """One video file (or, with `frames_dir`, an audio file and the original's extracted frames
  of `video_id`) -> {'audio' [T, F], 'image' [H, W, 3]} as its record would give them.

  Raises `decode.DecodeError` (with a reason code) when the file cannot be decoded.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.data import decode  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.data import fbank  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.data import records  # pylint: disable=g-import-not-at-top
  media = decode.read_clip_media(path, frames_dir, video_id,
                                 num_frames=records.NUM_VIDEO_FRAMES,
                                 image_size=records.IMAGE_SIZE,
                                 target_sample_rate=records.WAVEFORM_SAMPLE_RATE,
                                 max_seconds=audio_window_seconds(data_config.audio_length))
  features = fbank.clip_fbank(media.waveform, records.WAVEFORM_SAMPLE_RATE,
                              data_config.num_mel_bins)
  # The values a record stores (float16: records.make_example_values) and its reader gives back.
  features = features.astype(np.float16).astype(np.float32)
  raw = fbank.pad_or_trim(features, data_config.audio_length)
  jpegs = tf.constant(media.jpeg_frames)
  out = preprocess({"audio": tf.constant(raw), "frames": jpegs})
  return {"audio": np.asarray(out["audio"]), "image": np.asarray(out["image"])}


def video_batches(clips: Sequence[VideoClip], config: Any, batch_size: int, *,
                  on_error: Callable[[VideoClip, Exception], None],
                  frame: int | None = None) -> Iterator[HostBatch]:
  """Host batches of video files (this process decodes its rows of each global batch).

  A clip that cannot be decoded goes to `on_error(clip, decode.DecodeError)` and stays a
  padding row.
  Normalization is the run's, as for records (`dataset.fbank_normalization`): fbank_mean /
  fbank_std with fbank_stats='fixed', the training split's statistics with 'index'.
  """
  from cav_mae_jax.data import decode  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.data import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  data_config = eval_data_config(config, frame)
  normalization = dataset_lib.fbank_normalization(data_config)
  preprocess = eval_preprocess_fn(data_config, normalization.mean, normalization.std)
  host_batch, batch_size = _list_batch_rows(batch_size, len(clips))
  first_row = jax.process_index() * host_batch
  size = data_config.image_size
  for start in range(0, len(clips), batch_size):
    mine = clips[start + first_row:start + first_row + host_batch]
    batch = {"audio": np.zeros((host_batch, data_config.audio_length, data_config.num_mel_bins),
                               np.float32),
             "image": np.zeros((host_batch, size, size, 3), np.float32),
             "valid": np.zeros(host_batch, bool), "video_id": np.full(host_batch, "", object)}
    for row, clip in enumerate(mine):
      batch["video_id"][row] = clip.video_id
      try:
        inputs = video_inputs(clip.path, data_config, preprocess, clip.frames_dir, clip.video_id)
      except decode.DecodeError as e:
        on_error(clip, e)
        continue
      batch["audio"][row], batch["image"][row] = inputs["audio"], inputs["image"]
      batch["valid"][row] = True
    yield batch



class Quarantine:
  """`on_error` for `video_batches`: one JSON line per bad clip, or a ValueError with `strict`.

  Lines are the data tools' (`path`, `video_id`, `reason`, `message`; reason codes of
  `decode.DecodeError`). The file lists exactly this run's clips: one there before is removed
  at the start, and the file is made at the first bad clip (a run without one leaves none, and
  a run that failed before one leaves nothing that a rerun would have to replace).
  """

  def __init__(self, path: str, strict: bool = False):
    self.path = path
    self.strict = strict
    self.count = 0
    self.by_reason: collections.Counter[str] = collections.Counter()
    if not strict and os.path.lexists(path):
      os.remove(path)

  def __call__(self, clip: VideoClip, error: Any) -> None:
    from cav_mae_jax.data import clips as data_clips  # pylint: disable=g-import-not-at-top
    message = error.detail or error.reason.replace("_", " ")
    if self.strict:
      raise ValueError(f"{clip.path}: {error.reason} ({message}); --strict stops at the first "
                       "clip that cannot be read")
    self.count += 1
    self.by_reason[error.reason] += 1
    entry = data_clips.Quarantined(clip.path, clip.video_id, error.reason, message)
    with open(self.path, "a") as f:
      f.write(json.dumps(entry.to_json()) + "\n")
