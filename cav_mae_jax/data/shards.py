"""The shard writer: one output shard of clip records at a time, on worker processes.

- Clips are assigned to shards round-robin over the source list (`plan_shards`), so every
  machine of a split run agrees on which clip goes where.
- A shard is written to a temporary name and renamed when complete, then its sidecar JSON
  (counts, label counts, fbank sums, quarantined clips, each record's size and classes) is
  renamed into place (a Ctrl-C or SIGTERM waits for both): a shard whose sidecar exists is
  finished (`read_sidecar`), which is what resuming relies on.
- `run_pool` runs shards on long-lived worker processes from a fork server. A worker that dies
  (e.g. a decoder crash) loses only its current shard, which is redone without the clip it
  died on (quarantined as `worker_crashed`); the other workers go on.
- The run's settings (`clips.WriteOptions`: waveform, strict, unlabeled entries) go to the
  workers as one object. With `strict`, the first clip that is not written raises
  `clips.StrictModeError` and nothing of its shard is left on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from cav_mae_jax import files
from cav_mae_jax import signals_held
from cav_mae_jax.data import clips
from cav_mae_jax.data import records
from cav_mae_jax.data import sources

SIDECAR_SUFFIX = records.SIDECAR_SUFFIX
WORKER_CRASHED = "worker_crashed"


class WorkerCrashError(RuntimeError):
  """A worker process died; raised in strict mode (otherwise the clip is quarantined)."""


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  """The clips of one output shard, in datafile order."""

  shard_index: int
  num_shards: int
  entries: tuple[sources.ClipEntry, ...]

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


def plan_shards(entries: Sequence[sources.ClipEntry], num_shards: int) -> list[ShardPlan]:
  """Assigns clip i to shard i % num_shards (deterministic, balanced, order kept)."""
  return [ShardPlan(s, num_shards, tuple(entries[s::num_shards])) for s in range(num_shards)]


write_json_atomic = records.write_json_atomic  # the index's writer, for every JSON file here


def remove_stale_temporaries(out_dir: str, file_name: str) -> None:
  """Removes temporary files of shard `file_name` and of its sidecar left by killed runs or
  dead workers (a worker ended while it wrote the sidecar leaves the latter's)."""
  for name in (file_name, file_name + SIDECAR_SUFFIX):
    pattern = glob.escape(os.path.join(out_dir, name + files.STAGED)) + "*"
    for stale in glob.glob(pattern):
      os.remove(stale)


def remove_dead_temporaries(out_dir: str, names: Sequence[str]) -> list[str]:
  """Removes the temporary files of `names` (`write_json_atomic`'s) that processes of this host
  left and that are gone (`files.dead_temporaries`); a live process's, and other hosts' (a split
  run's tasks finishing at once on a shared folder), are left alone. Returns the paths removed."""
  removed = []
  for name in names:
    for path in files.dead_temporaries(os.path.join(out_dir, name)):
      with contextlib.suppress(FileNotFoundError):  # (another run's cleanup came first)
        os.remove(path)
        removed.append(path)
  return removed


def remove_unfinished_shard(out_dir: str, file_name: str) -> None:
  """Removes what a shard cut short left: its temporary files and the shard itself when its
  sidecar is missing (a worker killed between the shard's rename and its sidecar's). A shard
  with its sidecar is finished and kept."""
  remove_stale_temporaries(out_dir, file_name)
  path = os.path.join(out_dir, file_name)
  if os.path.exists(path) and not os.path.exists(path + SIDECAR_SUFFIX):
    os.remove(path)


def write_shard(plan: ShardPlan, out_dir: str, labels: sources.ClassLabels, *,
                options: clips.WriteOptions = clips.WriteOptions(),
                clip_fn: clips.ClipFn = clips.clip_example,
                known_quarantined: dict[int, clips.Quarantined] | None = None,
                on_clip: Callable[[int, clips.Quarantined | None], None] | None = None,
                on_start: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Writes one shard (temp name, then rename) and its sidecar; returns the sidecar dict.

  `known_quarantined` maps positions in the shard to clips already known to be bad (a clip a
  worker died on); they are not tried again. With `options.strict`, the first bad clip raises
  clips.StrictModeError and nothing of the shard is left on disk. Entries without labels are
  quarantined (`clips.NO_LABELS`) unless `options.allow_unlabeled`.
  """
  known_quarantined = known_quarantined or {}
  start = time.time()
  final = os.path.join(out_dir, plan.file_name)
  tmp = files.staged_name(final, files.process_tag())
  remove_stale_temporaries(out_dir, plan.file_name)
  stats = records.ShardStats(num_classes=labels.num_classes)
  quarantined: list[dict[str, Any]] = []
  record_bytes: list[int] = []
  record_labels: list[list[int]] = []
  try:
    with tf.io.TFRecordWriter(tmp) as writer:
      for position, entry in enumerate(plan.entries):
        if on_start is not None:
          on_start(position)
        result = known_quarantined.get(position)
        if result is None:
          result = clips.try_clip_example(entry, labels, options=options, clip_fn=clip_fn)
        if isinstance(result, clips.Quarantined):
          if options.strict:
            raise clips.StrictModeError(result)
          quarantined.append({"position": position, **result.to_json()})
        else:
          serialized = records.serialize_example(result)
          writer.write(serialized)
          stats.add(result)
          record_bytes.append(len(serialized))
          record_labels.append([int(k) for k in result[records.LABELS]])
        if on_clip is not None:
          on_clip(position, result if isinstance(result, clips.Quarantined) else None)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  sidecar = {
      "file": plan.file_name,
      "shard_index": plan.shard_index,
      "num_shards": plan.num_shards,
      "num_entries": len(plan.entries),
      "store_waveform": options.store_waveform,
      "stats": stats.to_json(),
      "quarantined": quarantined,
      "seconds": time.time() - start,
      records.RECORD_BYTES: record_bytes,
      records.RECORD_LABELS: record_labels,
  }
  # The shard and its sidecar appear together: a Ctrl-C or SIGTERM that comes between the two
  # renames waits for both (it left a complete shard that resuming had to write again). A
  # SIGKILL still can come between (the pool ends its workers so when it is interrupted, and
  # then removes such a shard: `remove_unfinished_shard`); resuming redoes it.
  with signals_held.held():
    try:
      os.replace(tmp, final)
    except BaseException:
      os.remove(tmp)
      raise
    write_json_atomic(final + SIDECAR_SUFFIX, sidecar)
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
                 labels: sources.ClassLabels, options: clips.WriteOptions,
                 clip_fn: clips.ClipFn) -> None:
  """Child process loop: receives (plan, known_quarantined), sends progress and results.

  Ctrl-C reaches the whole process group; the parent alone handles it (it ends the workers and
  removes their temporary files), so a worker ignores SIGINT (from its start:
  `worker_signals`), and it exits quietly when the
  parent is gone (its end of the pipe closed), at its next message: the shard it was writing
  is left unfinished (its temporary file removed). Its malloc keeps freed memory for the next
  clip (`clips.keep_freed_memory`).
  """
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  clips.keep_freed_memory()
  while True:
    try:
      message = conn.recv()
    except (EOFError, OSError):
      return
    if message is None:
      return
    plan, known = message
    try:
      _write_shard_in_worker(conn, plan, known, out_dir, labels, options, clip_fn)
    except (BrokenPipeError, ConnectionResetError):
      return


def _write_shard_in_worker(conn: multiprocessing.connection.Connection, plan: ShardPlan,
                           known: dict[int, clips.Quarantined], out_dir: str,
                           labels: sources.ClassLabels, options: clips.WriteOptions,
                           clip_fn: clips.ClipFn) -> None:
  """Writes one shard, sending progress and the result (raises BrokenPipeError when the parent
  is gone)."""
  try:
    sidecar = write_shard(
        plan, out_dir, labels, options=options, clip_fn=clip_fn, known_quarantined=known,
        on_start=lambda position: conn.send(("start", position)),
        on_clip=lambda position, bad: conn.send(("clip", position, bad)))
  except clips.StrictModeError as e:
    conn.send(("strict", e.quarantined))
  except (BrokenPipeError, ConnectionResetError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    conn.send(("error", failure_text(e)))
  else:
    conn.send(("done", sidecar))


# worker_signals first: the fork server and its workers ignore SIGINT from the start.
_WORKER_PRELOAD = ["cav_mae_jax.data.worker_signals", "cav_mae_jax.data.worker_tensorflow",
                   "cav_mae_jax.data.shards", "cav_mae_jax.data.decode", "cav_mae_jax.data.fbank"]
# Each worker is one core's worth of work, so native thread pools (OpenBLAS runs the fbank's
# mel matmul; OpenMP) get one thread each unless the user chose otherwise: with the default (a
# thread per core in every worker) they oversubscribe the machine. Applied to the fork server's
# environment when it starts; measured about 5% more clips per second with 2 workers on 2 cores.
_WORKER_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                      "MKL_NUM_THREADS": "1"}


@contextlib.contextmanager
def _worker_environment():
  """Sets the unset `_WORKER_THREAD_ENV` variables for the block, then restores them."""
  added = [name for name in _WORKER_THREAD_ENV if name not in os.environ]
  os.environ.update({name: _WORKER_THREAD_ENV[name] for name in added})
  try:
    yield
  finally:
    for name in added:
      os.environ.pop(name, None)


# A worker is replaced by a fresh fork of the fork server after this many shards, which bounds
# whatever a long-lived worker accumulates over hundreds of thousands of clips of arbitrary media
# (native state of decoders and libraries; a fork costs milliseconds). It was added for a growth of
# tens of KB per clip that turned out to be decoded frames held in reference cycles until a full
# garbage collection (fixed in `decode.frame_rotation`; workers now stay flat, ~350 MiB over 400
# clips each). Measured before that fix on 2,000 clips in shards of 100: workers replaced after 800
# clips each, 161 s against 173 s without (noise), records byte-identical.
SHARDS_PER_WORKER = 8


@dataclasses.dataclass
class _Worker:
  process: multiprocessing.process.BaseProcess
  conn: multiprocessing.connection.Connection
  plan: ShardPlan | None = None
  known: dict[int, clips.Quarantined] = dataclasses.field(default_factory=dict)
  position: int | None = None
  shards_done: int = 0


class _WorkerPool:
  """Long-lived worker processes, one shard each at a time; replaces workers that die."""

  def __init__(self, num_workers: int, worker_args: tuple[Any, ...]):
    # A fork server imports the heavy modules (TensorFlow, PyAV) once; each worker, and each
    # replacement of a dead one, is then a cheap fork of it. Workers never fork from a parent
    # that may have run TensorFlow ops.
    self._context = multiprocessing.get_context("forkserver")
    self._context.set_forkserver_preload(_WORKER_PRELOAD)
    self._worker_args = worker_args
    with _worker_environment():  # The fork server starts with the first worker.
      self.workers = [self._start() for _ in range(num_workers)]

  def _start(self) -> _Worker:
    parent, child = self._context.Pipe()
    process = self._context.Process(target=_worker_main, args=(child, *self._worker_args),
                                    daemon=True)
    process.start()
    child.close()
    return _Worker(process, parent)

  def replace(self, worker: _Worker) -> _Worker:
    """Starts a new worker in `worker`'s place; `worker` exits when its pipe closes."""
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


def failure_text(error: Exception) -> str:
  """A shard's failure (a bug, or an I/O error: a full disk) in one line: its type, then its
  words (TensorFlow's without its op and function names)."""
  text = records.op_error_text(error) if isinstance(error, tf.errors.OpError) else str(error)
  return f"{type(error).__name__}: {' '.join(text.split())}"


def failure_line(plan: ShardPlan, text: str, position: int | None) -> str:
  """`<shard file>: <failure_text> (at clip <i> of the shard, <its path>)`."""
  where = ("" if position is None else
           f" (at clip {position} of the shard, {plan.entries[position].path})")
  return f"{plan.file_name}: {text}{where}"


def run_pool(plans: list[ShardPlan], out_dir: str, labels: sources.ClassLabels, *,
              num_workers: int, options: clips.WriteOptions, clip_fn: clips.ClipFn,
              on_clip: Callable[[], None]) -> list[str]:
  """Runs shards on worker processes; returns errors of shards that failed (not crashed)."""
  pending: list[tuple[ShardPlan, dict[int, clips.Quarantined]]] = [(p, {}) for p in plans]
  errors: list[str] = []
  pool = _WorkerPool(min(num_workers, len(plans)), (out_dir, labels, options, clip_fn))
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
                raise clips.StrictModeError(payload[0])
              elif kind == "error":  # A bug or an I/O failure, not a bad clip: say where.
                errors.append(failure_line(worker.plan, payload[0], worker.position))
                worker.plan = None
              elif kind == "done":
                worker.plan = None
                worker.shards_done += 1
                if worker.shards_done >= SHARDS_PER_WORKER and pending:
                  pool.replace(worker)
          except (EOFError, ConnectionResetError):
            pass  # The process died; handled below through its sentinel.
        if worker.plan is not None and not worker.process.is_alive():
          _handle_crash(pool, worker, pending, options)
  except BaseException:
    pool.terminate()
    for worker in pool.workers:  # Shards cut short leave nothing half-written behind.
      if worker.plan is not None:
        remove_unfinished_shard(out_dir, worker.plan.file_name)
    raise
  pool.close()
  return errors


def _handle_crash(pool: _WorkerPool, worker: _Worker,
                  pending: list[tuple[ShardPlan, dict[int, clips.Quarantined]]],
                  options: clips.WriteOptions) -> None:
  """Quarantines the clip a worker died on and puts its shard back in the queue (raises
  clips.StrictModeError instead with `options.strict`)."""
  plan, exitcode, position = worker.plan, worker.process.exitcode, worker.position
  if position is None:
    raise WorkerCrashError(f"worker (exit code {exitcode}) died before starting a clip of "
                           f"{plan.file_name}")
  entry = plan.entries[position]
  bad = clips.Quarantined(entry.path, entry.video_id, WORKER_CRASHED,
                    f"the worker process died (exit code {exitcode}) on this clip")
  if options.strict:
    raise clips.StrictModeError(bad)
  known = dict(worker.known)
  known[position] = bad
  pending.insert(0, (plan, known))
  pool.replace(worker)
