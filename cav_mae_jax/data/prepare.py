"""Raw clips -> sharded clip records: the library behind tools/preprocess.py.

One function turns a clip into a record (`clip_example`); `tools/preprocess.py` (this module's
`prepare_records`) and the TFDS builder both call it, so they write the same examples.

`prepare_records` works on one machine with a pool of worker processes, one output shard at a
time per worker:
- clips are assigned to shards round-robin over the datafile order, so every machine of a
  split run (`task_index` of `num_tasks`, taking shards `s % num_tasks == task_index`) agrees;
- a shard is written to a temporary name and renamed when complete, then its sidecar JSON
  (counts, label counts, fbank sums, quarantined clips) is renamed into place; a shard whose
  sidecar exists is finished and skipped on the next run (resume);
- a clip that cannot be made into a correct record is never replaced by zeros: it is
  quarantined with a reason code (`decode.DecodeError` reasons, `unknown_label`,
  `audio_too_short`, `worker_crashed`), or, with `strict`, the run stops naming it;
- a worker process that dies (e.g. a decoder crash) loses only its current shard, which is
  redone without the clip it died on (quarantined as `worker_crashed`); the other workers go
  on and everything finished stays on disk;
- `finalize` makes `index.json`, `quarantine.jsonl` and `summary.json` from the sidecars, so
  the shards of a split run can be copied into one directory and merged.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import tensorflow as tf

from cav_mae_jax.data import records

MANIFEST = "manifest.json"
INDEX = "index.json"
QUARANTINE = "quarantine.jsonl"
SUMMARY = "summary.json"
SIDECAR_SUFFIX = ".json"

UNKNOWN_LABEL = "unknown_label"
AUDIO_TOO_SHORT = "audio_too_short"
WORKER_CRASHED = "worker_crashed"


class ClipError(Exception):
  """A clip that cannot become a record; `reason` is a short code, the message says why."""

  def __init__(self, path: str, reason: str, message: str):
    super().__init__(f"{path}: {reason}: {message}")
    self.path = path
    self.reason = reason
    self.message = message


class StrictModeError(RuntimeError):
  """Raised by `prepare_records(strict=True)` at the first clip that is not written."""

  def __init__(self, quarantined: Quarantined):
    super().__init__(f"{quarantined.path}: {quarantined.reason}: {quarantined.message}")
    self.quarantined = quarantined


class WorkerCrashError(RuntimeError):
  """A worker process died; raised in strict mode (otherwise the clip is quarantined)."""


@dataclasses.dataclass(frozen=True)
class ClipEntry:
  """One clip to process: its id, media file and label ids (e.g. AudioSet mids)."""

  video_id: str
  path: str
  label_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Quarantined:
  """A clip left out of the records, and why."""

  path: str
  video_id: str
  reason: str
  message: str

  def to_json(self) -> dict[str, str]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ClassLabels:
  """The class list of an AudioSet-format class_labels_indices.csv (index,mid,display_name)."""

  mids: tuple[str, ...]
  display_names: tuple[str, ...]
  source: str

  @property
  def num_classes(self) -> int:
    return len(self.mids)

  def index_of(self, label_id: str) -> int | None:
    """Class index of a mid (or, failing that, of a display name); None if unknown."""
    if label_id in self.mids:
      return self.mids.index(label_id)
    if label_id in self.display_names:
      return self.display_names.index(label_id)
    return None


def read_class_labels(path: str) -> ClassLabels:
  """Reads class_labels_indices.csv; indices must be 0..C-1 in order."""
  with tf.io.gfile.GFile(path) as f:
    rows = list(csv.DictReader(io.StringIO(f.read())))
  if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
    raise ValueError(f"{path}: expected a CSV with columns index,mid,display_name")
  for position, row in enumerate(rows):
    if int(row["index"]) != position:
      raise ValueError(f"{path}: row {position + 2} has index {row['index']}, expected "
                       f"{position}")
  mids = tuple(row["mid"].strip() for row in rows)
  if len(set(mids)) != len(mids):
    raise ValueError(f"{path}: duplicate mids")
  return ClassLabels(mids, tuple(row["display_name"].strip() for row in rows), path)


def _split_labels(labels: str | Sequence[str]) -> tuple[str, ...]:
  if isinstance(labels, str):
    return tuple(x.strip() for x in labels.split(",") if x.strip())
  return tuple(str(x).strip() for x in labels)


def read_datafile(path: str) -> list[ClipEntry]:
  """Reads the original's JSON datafile `{"data": [{"video_id", "wav", "video_path", "labels"}]}`.

  The media file of an entry is `video_path` when it names a file (a video with both streams);
  the original's layout, where `video_path` is a folder of extracted frames, is not usable
  here, so then `wav` must name the video. Relative paths are taken from the datafile's folder.
  The datafile may be on any file system TensorFlow reads (e.g. gs://).
  """
  with tf.io.gfile.GFile(path) as f:
    data = json.load(f)
  if not isinstance(data, dict) or not isinstance(data.get("data"), list):
    raise ValueError(f"{path}: expected a JSON object with a 'data' list")
  base = os.path.dirname(path if "://" in path else os.path.abspath(path))
  entries = []
  for position, item in enumerate(data["data"]):
    for key in ("video_id", "labels"):
      if key not in item:
        raise ValueError(f"{path}: data[{position}] has no {key!r}")
    media = item.get("video_path") or ""
    if not media or media.endswith("/") or tf.io.gfile.isdir(os.path.join(base, media)):
      media = item.get("wav") or ""
    if not media:
      raise ValueError(f"{path}: data[{position}] ({item['video_id']}) names no media file "
                       "in 'video_path' or 'wav'")
    entries.append(ClipEntry(str(item["video_id"]), os.path.join(base, media),
                             _split_labels(item["labels"])))
  return entries


# ----------------------------------------------------------------------------------------
# One clip.


def clip_example(entry: ClipEntry, labels: ClassLabels,
                 store_waveform: bool = False) -> records.ExampleValues:
  """Decodes one clip and returns its record values; raises ClipError or decode.DecodeError."""
  from cav_mae_jax.data import decode, fbank  # pylint: disable=g-import-not-at-top

  indices = []
  for label_id in entry.label_ids:
    index = labels.index_of(label_id)
    if index is None:
      raise ClipError(entry.path, UNKNOWN_LABEL,
                      f"label {label_id!r} is not in {labels.source}")
    indices.append(index)
  clip = decode.decode_clip(entry.path, num_frames=records.NUM_VIDEO_FRAMES,
                            image_size=records.IMAGE_SIZE,
                            target_sample_rate=records.WAVEFORM_SAMPLE_RATE,
                            # Exactly the audio the original's 1024 fbank frames see (10.255 s).
                            max_seconds=decode.ORIGINAL_AUDIO_SECONDS)
  features = fbank.clip_fbank(clip.waveform, records.WAVEFORM_SAMPLE_RATE,
                              records.NUM_MEL_BINS)
  if features.shape[0] == 0:
    raise ClipError(entry.path, AUDIO_TOO_SHORT,
                    f"{clip.waveform.size} samples at 16 kHz is shorter than one 25-ms window")
  return records.make_example_values(
      video_id=entry.video_id,
      labels=indices,
      label_ids=[labels.mids[i] for i in indices],
      fbank=fbank.pad_or_trim(features, records.TARGET_FBANK_FRAMES),
      fbank_num_frames=features.shape[0],
      jpeg_frames=[decode.encode_jpeg(frame) for frame in clip.frames],
      frame_indices=clip.frame_indices,
      duration_s=clip.duration_s,
      source_sample_rate=clip.source_sample_rate,
      fps=clip.fps,
      frame_count=clip.frame_count,
      waveform=clip.waveform if store_waveform else None,
  )


ClipFn = Callable[[ClipEntry, ClassLabels, bool], records.ExampleValues]


def try_clip_example(entry: ClipEntry, labels: ClassLabels, store_waveform: bool = False,
                     clip_fn: ClipFn = clip_example) -> records.ExampleValues | Quarantined:
  """Returns the clip's record values, or why it is quarantined (bad input, not a bug)."""
  from cav_mae_jax.data import decode  # pylint: disable=g-import-not-at-top

  try:
    return clip_fn(entry, labels, store_waveform)
  except ClipError as e:
    return Quarantined(entry.path, entry.video_id, e.reason, e.message)
  except decode.DecodeError as e:
    return Quarantined(entry.path, entry.video_id, e.reason,
                       e.detail or e.reason.replace("_", " "))


# ----------------------------------------------------------------------------------------
# Shards.


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  """The clips of one output shard, in datafile order."""

  shard_index: int
  num_shards: int
  entries: tuple[ClipEntry, ...]

  @property
  def file_name(self) -> str:
    return shard_file_name(self.shard_index, self.num_shards)


def shard_file_name(shard_index: int, num_shards: int) -> str:
  """File name of an output shard."""
  return f"records-{shard_index:05d}-of-{num_shards:05d}.tfrecord"


def num_shards_for(num_entries: int, examples_per_shard: int) -> int:
  """How many shards hold `num_entries` clips at most `examples_per_shard` per shard."""
  if examples_per_shard <= 0:
    raise ValueError(f"examples_per_shard must be positive, got {examples_per_shard}")
  return max(1, -(-num_entries // examples_per_shard))


def plan_shards(entries: Sequence[ClipEntry], num_shards: int) -> list[ShardPlan]:
  """Assigns clip i to shard i % num_shards (deterministic, balanced, order kept)."""
  return [ShardPlan(s, num_shards, tuple(entries[s::num_shards])) for s in range(num_shards)]


def _write_json_atomic(path: str, data: Any) -> None:
  tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)


def _remove_stale_temporaries(out_dir: str, file_name: str) -> None:
  for stale in glob.glob(os.path.join(glob.escape(out_dir), glob.escape(file_name) + ".tmp-*")):
    os.remove(stale)


def write_shard(plan: ShardPlan, out_dir: str, labels: ClassLabels, *,
                store_waveform: bool = False, strict: bool = False,
                clip_fn: ClipFn = clip_example,
                known_quarantined: dict[int, Quarantined] | None = None,
                on_clip: Callable[[int, Quarantined | None], None] | None = None,
                on_start: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Writes one shard (temp name, then rename) and its sidecar; returns the sidecar dict.

  `known_quarantined` maps positions in the shard to clips already known to be bad (a clip a
  worker died on); they are not tried again. With `strict`, the first bad clip raises
  StrictModeError and nothing of the shard is left on disk.
  """
  known_quarantined = known_quarantined or {}
  start = time.time()
  final = os.path.join(out_dir, plan.file_name)
  tmp = f"{final}.tmp-{socket.gethostname()}-{os.getpid()}"
  _remove_stale_temporaries(out_dir, plan.file_name)
  stats = records.ShardStats(num_classes=labels.num_classes)
  quarantined: list[dict[str, Any]] = []
  try:
    with tf.io.TFRecordWriter(tmp) as writer:
      for position, entry in enumerate(plan.entries):
        if on_start is not None:
          on_start(position)
        result = known_quarantined.get(position)
        if result is None:
          result = try_clip_example(entry, labels, store_waveform, clip_fn)
        if isinstance(result, Quarantined):
          if strict:
            raise StrictModeError(result)
          quarantined.append({"position": position, **result.to_json()})
        else:
          writer.write(records.serialize_example(result))
          stats.add(result)
        if on_clip is not None:
          on_clip(position, result if isinstance(result, Quarantined) else None)
    os.replace(tmp, final)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  sidecar = {
      "file": plan.file_name,
      "shard_index": plan.shard_index,
      "num_shards": plan.num_shards,
      "num_entries": len(plan.entries),
      "store_waveform": store_waveform,
      "stats": stats.to_json(),
      "quarantined": quarantined,
      "seconds": time.time() - start,
  }
  _write_json_atomic(final + SIDECAR_SUFFIX, sidecar)
  return sidecar


def read_sidecar(out_dir: str, shard_index: int, num_shards: int) -> dict[str, Any] | None:
  """The sidecar of a finished shard, or None if the shard is not finished."""
  name = shard_file_name(shard_index, num_shards)
  sidecar_path = os.path.join(out_dir, name + SIDECAR_SUFFIX)
  if not os.path.exists(sidecar_path):
    return None
  if not os.path.exists(os.path.join(out_dir, name)):
    raise ValueError(f"{sidecar_path} exists but its shard {name} does not: remove the "
                     "sidecar to redo the shard")
  with open(sidecar_path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------------------
# Worker processes.


def _worker_main(conn: multiprocessing.connection.Connection, out_dir: str,
                 labels: ClassLabels, store_waveform: bool, strict: bool,
                 clip_fn: ClipFn) -> None:
  """Child process loop: receives (plan, known_quarantined), sends progress and results."""
  while True:
    message = conn.recv()
    if message is None:
      return
    plan, known = message
    try:
      sidecar = write_shard(
          plan, out_dir, labels, store_waveform=store_waveform, strict=strict,
          clip_fn=clip_fn, known_quarantined=known,
          on_start=lambda position: conn.send(("start", position)),
          on_clip=lambda position, bad: conn.send(("clip", position, bad)))
    except StrictModeError as e:
      conn.send(("strict", e.quarantined))
    except Exception as e:  # pylint: disable=broad-except
      conn.send(("error", f"{type(e).__name__}: {e}"))
    else:
      conn.send(("done", sidecar))


_WORKER_PRELOAD = ["cav_mae_jax.data.prepare", "cav_mae_jax.data.decode",
                   "cav_mae_jax.data.fbank", "tensorflow"]


@dataclasses.dataclass
class _Worker:
  process: multiprocessing.process.BaseProcess
  conn: multiprocessing.connection.Connection
  plan: ShardPlan | None = None
  known: dict[int, Quarantined] = dataclasses.field(default_factory=dict)
  position: int | None = None


class _WorkerPool:
  """Long-lived worker processes, one shard each at a time; replaces workers that die."""

  def __init__(self, num_workers: int, worker_args: tuple[Any, ...]):
    # A fork server imports the heavy modules (TensorFlow, PyAV) once; each worker, and each
    # replacement of a dead one, is then a cheap fork of it. Workers never fork from a parent
    # that may have run TensorFlow ops.
    self._context = multiprocessing.get_context("forkserver")
    self._context.set_forkserver_preload(_WORKER_PRELOAD)
    self._worker_args = worker_args
    self.workers = [self._start() for _ in range(num_workers)]

  def _start(self) -> _Worker:
    parent, child = self._context.Pipe()
    process = self._context.Process(target=_worker_main, args=(child, *self._worker_args),
                                    daemon=True)
    process.start()
    child.close()
    return _Worker(process, parent)

  def replace(self, worker: _Worker) -> _Worker:
    worker.conn.close()
    worker.process.join()
    new = self._start()
    self.workers[self.workers.index(worker)] = new
    return new

  def close(self) -> None:
    for worker in self.workers:
      if worker.process.is_alive():
        try:
          worker.conn.send(None)
        except OSError:
          pass
    for worker in self.workers:
      worker.process.join(timeout=10)
      if worker.process.is_alive():
        worker.process.kill()
        worker.process.join()

  def terminate(self) -> None:
    for worker in self.workers:
      if worker.process.is_alive():
        worker.process.kill()
      worker.process.join()


def _run_pool(plans: list[ShardPlan], out_dir: str, labels: ClassLabels, *,
              num_workers: int, store_waveform: bool, strict: bool, clip_fn: ClipFn,
              on_clip: Callable[[], None]) -> list[str]:
  """Runs shards on worker processes; returns errors of shards that failed (not crashed)."""
  pending: list[tuple[ShardPlan, dict[int, Quarantined]]] = [(p, {}) for p in plans]
  errors: list[str] = []
  pool = _WorkerPool(min(num_workers, len(plans)),
                     (out_dir, labels, store_waveform, strict, clip_fn))
  try:
    while True:
      for worker in pool.workers:
        if worker.plan is None and pending:
          worker.plan, worker.known = pending.pop(0)
          worker.position = None
          worker.conn.send((worker.plan, worker.known))
      busy = [w for w in pool.workers if w.plan is not None]
      if not busy:
        break
      ready = multiprocessing.connection.wait(
          [w.conn for w in busy] + [w.process.sentinel for w in busy])
      for worker in busy:
        if worker.conn in ready or worker.process.sentinel in ready:
          try:
            while worker.plan is not None and worker.conn.poll():
              kind, *payload = worker.conn.recv()
              if kind == "start":
                worker.position = payload[0]
              elif kind == "clip":
                on_clip()
              elif kind == "strict":
                raise StrictModeError(payload[0])
              elif kind == "error":
                errors.append(f"{worker.plan.file_name}: {payload[0]}")
                worker.plan = None
              elif kind == "done":
                worker.plan = None
          except (EOFError, ConnectionResetError):
            pass  # The process died; handled below through its sentinel.
        if worker.plan is not None and not worker.process.is_alive():
          _handle_crash(pool, worker, pending, strict)
  except BaseException:
    pool.terminate()
    for worker in pool.workers:  # Shards cut short leave no temp files behind.
      if worker.plan is not None:
        _remove_stale_temporaries(out_dir, worker.plan.file_name)
    raise
  pool.close()
  return errors


def _handle_crash(pool: _WorkerPool, worker: _Worker,
                  pending: list[tuple[ShardPlan, dict[int, Quarantined]]],
                  strict: bool) -> None:
  """Quarantines the clip a worker died on and puts its shard back in the queue."""
  plan, exitcode, position = worker.plan, worker.process.exitcode, worker.position
  if position is None:
    raise WorkerCrashError(f"worker (exit code {exitcode}) died before starting a clip of "
                           f"{plan.file_name}")
  entry = plan.entries[position]
  bad = Quarantined(entry.path, entry.video_id, WORKER_CRASHED,
                    f"the worker process died (exit code {exitcode}) on this clip")
  if strict:
    raise StrictModeError(bad)
  known = dict(worker.known)
  known[position] = bad
  pending.insert(0, (plan, known))
  pool.replace(worker)


# ----------------------------------------------------------------------------------------
# The whole run.


@dataclasses.dataclass(frozen=True)
class Summary:
  """What summary.json says."""

  num_shards: int
  shards_finished: int
  written: int
  quarantined: int
  quarantined_by_reason: dict[str, int]
  seconds: float
  shard_seconds: float
  index_written: bool


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _check_manifest(out_dir: str, manifest: dict[str, Any]) -> None:
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.exists(path):
    _write_json_atomic(path, manifest)
    return
  with open(path) as f:
    existing = json.load(f)
  for key, value in manifest.items():
    if existing.get(key) != value:
      raise ValueError(f"{path}: {key} was {existing.get(key)!r} when this directory was "
                       f"started, now {value!r}; use a new output directory")


def prepare_records(datafile: str, labels_csv: str, out_dir: str, *, num_workers: int = 1,
                    task_index: int = 0, num_tasks: int = 1, examples_per_shard: int = 1024,
                    store_waveform: bool = False, strict: bool = False,
                    clip_fn: ClipFn = clip_example, progress: bool = True) -> Summary:
  """Writes this task's unfinished shards, then `finalize`s the directory.

  `num_workers=0` runs in this process (no crash isolation). Raises StrictModeError with
  `strict`, and RuntimeError naming the shards that failed for other reasons.
  """
  if not 0 <= task_index < num_tasks:
    raise ValueError(f"task_index must be in [0, num_tasks={num_tasks}), got {task_index}")
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}")
  start = time.time()
  entries = read_datafile(datafile)
  labels = read_class_labels(labels_csv)
  num_shards = num_shards_for(len(entries), examples_per_shard)
  os.makedirs(out_dir, exist_ok=True)
  _check_manifest(out_dir, {
      "format_version": records.FORMAT_VERSION,
      "datafile_sha256": _sha256(datafile),
      "labels_sha256": _sha256(labels_csv),
      "num_entries": len(entries),
      "num_shards": num_shards,
      "store_waveform": store_waveform,
  })
  todo = [p for p in plan_shards(entries, num_shards)
          if p.shard_index % num_tasks == task_index
          and read_sidecar(out_dir, p.shard_index, num_shards) is None]
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=sum(len(p.entries) for p in todo), unit="clip", disable=not progress,
             desc=f"task {task_index}/{num_tasks}: {len(todo)} shards")
  errors = []
  try:
    if num_workers == 0:
      for plan in todo:
        write_shard(plan, out_dir, labels, store_waveform=store_waveform, strict=strict,
                    clip_fn=clip_fn, on_clip=lambda *_: bar.update())
    elif todo:
      errors = _run_pool(todo, out_dir, labels, num_workers=num_workers,
                         store_waveform=store_waveform, strict=strict, clip_fn=clip_fn,
                         on_clip=bar.update)
  except (StrictModeError, WorkerCrashError):
    bar.close()
    finalize(out_dir, seconds=time.time() - start)  # What finished is kept and counted.
    raise
  bar.close()
  summary = finalize(out_dir, seconds=time.time() - start)
  if errors:
    raise RuntimeError("shards failed (finished shards are kept; rerun to resume):\n"
                       + "\n".join(errors))
  return summary


def _sidecars(out_dir: str) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
  with open(os.path.join(out_dir, MANIFEST)) as f:
    manifest = json.load(f)
  num_shards = manifest["num_shards"]
  sidecars = [read_sidecar(out_dir, s, num_shards) for s in range(num_shards)]
  return num_shards, [s for s in sidecars if s is not None], manifest


def finalize(out_dir: str, seconds: float = 0.0) -> Summary:
  """Writes quarantine.jsonl and summary.json from the finished shards' sidecars, and
  index.json once every shard is finished (merge mode for split runs)."""
  num_shards, sidecars, manifest = _sidecars(out_dir)
  by_reason: dict[str, int] = {}
  quarantine_path = os.path.join(out_dir, QUARANTINE)
  tmp = f"{quarantine_path}.tmp-{socket.gethostname()}-{os.getpid()}"
  with open(tmp, "w") as f:
    for sidecar in sidecars:
      for item in sidecar["quarantined"]:
        by_reason[item["reason"]] = by_reason.get(item["reason"], 0) + 1
        line = {k: item[k] for k in ("path", "video_id", "reason", "message")}
        f.write(json.dumps({**line, "shard": sidecar["file"]}) + "\n")
  os.replace(tmp, quarantine_path)
  stats = [records.ShardStats.from_json(s["stats"]) for s in sidecars]
  complete = len(sidecars) == num_shards
  index_written = False
  if complete:
    merged = stats[0]
    for other in stats[1:]:
      merged = merged.merge(other)
    if merged.num_examples > 0:
      shards = [records.ShardInfo(s["file"], s["stats"]["num_examples"]) for s in sidecars]
      records.write_index(os.path.join(out_dir, INDEX),
                          records.index_from_stats(shards, merged,
                                                   manifest["store_waveform"]))
      index_written = True
  summary = Summary(
      num_shards=num_shards,
      shards_finished=len(sidecars),
      written=sum(s.num_examples for s in stats),
      quarantined=sum(by_reason.values()),
      quarantined_by_reason=dict(sorted(by_reason.items())),
      seconds=seconds,
      shard_seconds=sum(s["seconds"] for s in sidecars),
      index_written=index_written,
  )
  _write_json_atomic(os.path.join(out_dir, SUMMARY), dataclasses.asdict(summary))
  return summary


def iter_shard_examples(out_dir: str) -> Iterator[records.ExampleValues]:
  """Reads back every example of a finished directory, in shard order (for tests and tools)."""
  index = records.read_index(os.path.join(out_dir, INDEX))
  for path in index.shard_paths(os.path.join(out_dir, INDEX)):
    for serialized in tf.data.TFRecordDataset(path):
      yield records.parsed_to_values(
          records.parse_example(serialized, with_waveform=index.store_waveform))


def format_summary(summary: Summary) -> str:
  """A few human-readable lines about a run."""
  lines = [f"written {summary.written} clips, quarantined {summary.quarantined} "
           f"({summary.shards_finished}/{summary.num_shards} shards finished) "
           f"in {summary.seconds:.1f} s"]
  for reason, count in summary.quarantined_by_reason.items():
    lines.append(f"  quarantined {reason}: {count}")
  if not summary.index_written:
    lines.append("index.json not written yet: "
                 + ("no examples" if summary.shards_finished == summary.num_shards
                    else "some shards are not finished (run the other tasks, then --merge-index)"))
  return "\n".join(lines)
