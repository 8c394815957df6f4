"""Metric writers (JSONL, and TensorBoard through clu) and a console progress bar with ETA.

The writers follow the part of clu's `MetricWriter` interface that the trainer uses. Importing
clu's `metric_writers` package imports TensorFlow (~7 s; its TensorBoard writer is built on
`tf.summary`), so it is imported only when TensorBoard summaries are written
(`config.tensorboard`): a run without them, on in-memory data or on a machine without
TensorFlow, imports TensorFlow only to cut back event files an earlier run left in its workdir
(`drop_summaries_after`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import time
import types
from typing import Any, Iterator, Mapping, Sequence

from cav_mae_jax import dir_lock
from cav_mae_jax import files

METRICS_FILE = "metrics.jsonl"
# Held while a run rewrites its metrics (`rewind`) and while another process appends to them
# (`appending`): an append to a file being replaced would go to the replaced file, and be lost.
METRICS_LOCK = ".metrics.lock"
TENSORBOARD_DIR = "tensorboard"
# The training rows a checkpoint's step had not logged yet (the steps since the last row), by
# checkpoint step: a run resumed there logs its next row over the same steps as an
# uninterrupted run (`save_log_window`, `read_log_window`).
LOG_WINDOW_FILE = "log_window.json"
_LOG_WINDOWS_KEPT = 16


class JsonlWriter:
  """Appends one JSON line per `write_scalars` call: {"step": s, name: value, ...}."""

  def __init__(self, path: str):
    self.path = path
    self._file = open(path, "a")  # pylint: disable=consider-using-with

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with files.writing(self.path):
      self._file.write(json.dumps(record) + "\n")

  def write_hparams(self, hparams: Mapping[str, Any]):
    with files.writing(self.path):
      self._file.write(json.dumps({"hparams": _jsonable(hparams)}) + "\n")

  def flush(self):
    with files.writing(self.path):
      self._file.flush()

  def close(self):
    with files.writing(self.path):
      self._file.close()


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (int, float, str, bool)) or value is None:
    return value
  return str(value)


class Writers:
  """Hands every write to each of `writers`, like clu's MultiWriter (which would import
  TensorFlow): the part of clu's `MetricWriter` interface the trainer and evaluator use."""

  def __init__(self, writers: Sequence[Any]):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for writer in self.writers:
      writer.write_scalars(step, scalars)

  def write_hparams(self, hparams: Mapping[str, Any]):
    for writer in self.writers:
      writer.write_hparams(hparams)

  def flush(self):
    for writer in self.writers:
      writer.flush()

  def close(self):
    for writer in self.writers:
      writer.close()


def make_writer(workdir: str, is_main_process: bool, tensorboard: bool = True) -> Writers:
  """JSONL (workdir/metrics.jsonl), and TensorBoard (workdir/tensorboard) when `tensorboard`,
  on the main process; nothing on the others."""
  if not is_main_process:
    return Writers([])
  writers: list[Any] = [JsonlWriter(os.path.join(workdir, METRICS_FILE))]
  if tensorboard:
    with _hparams_api_without_keras():
      # pylint: disable-next=g-import-not-at-top
      from clu.metric_writers.summary_writer import SummaryWriter  # imports TensorFlow
    writers.insert(0, SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR)))
  return Writers(writers)


_HPARAMS_API = "tensorboard.plugins.hparams.api"


@contextlib.contextmanager
def _hparams_api_without_keras() -> Iterator[None]:
  """clu's SummaryWriter imports TensorBoard's hparams `api` module for its `hparams` function
  (`write_hparams`); that module also defines a Keras callback class, which imports all of Keras
  (1.6 s of each training or evaluation start, more than the rest of clu). For the block, unless
  the real module is loaded, `api` is a module of what the real one takes from `summary_v2`
  (the same functions and classes, `hparams` among them); the real one is imported as usual
  afterwards (clu keeps its reference to this one)."""
  if _HPARAMS_API in sys.modules:
    yield
    return
  # pylint: disable-next=g-import-not-at-top
  from tensorboard.plugins.hparams import summary_v2
  api = types.ModuleType(_HPARAMS_API, "summary_v2's part of TensorBoard's hparams api.")
  for name in ("Discrete", "Domain", "HParam", "IntInterval", "Metric", "RealInterval",
               "hparams", "hparams_pb", "hparams_config", "hparams_config_pb"):
    if hasattr(summary_v2, name):  # (clu calls `hparams` alone)
      setattr(api, name, getattr(summary_v2, name))
  sys.modules[_HPARAMS_API] = api
  try:
    yield
  finally:
    if sys.modules.get(_HPARAMS_API) is api:
      del sys.modules[_HPARAMS_API]


@contextlib.contextmanager
def appending(workdir: str, is_main_process: bool, tensorboard: bool = True
              ) -> Iterator[Writers]:
  """`make_writer` for a process that adds to another run's metrics (an evaluation of its
  checkpoints, tools/evaluate.py), closed on exit; the run's `rewind` waits for it, and it for
  the rewind."""
  if not is_main_process:
    yield Writers([])
    return
  with dir_lock.held(workdir, METRICS_LOCK):
    writer = make_writer(workdir, is_main_process, tensorboard)
    try:
      yield writer
    finally:
      writer.close()


def rewind(workdir: str, step: int) -> None:
  """For a run starting at checkpoint `step` (0: from scratch), drops the metrics and summaries
  that it logs again (`drop_records_after`, `drop_summaries_after`), under the workdir's
  metrics lock."""
  with dir_lock.held(workdir, METRICS_LOCK):
    drop_records_after(workdir, step)
    drop_summaries_after(workdir, step)


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The scalar records of a metrics.jsonl file (hparams lines skipped)."""
  with open(path) as f:
    return [r for r in map(json.loads, f) if "step" in r]


def save_log_window(workdir: str, step: int, since: int,
                    rows: Sequence[Mapping[str, float]]) -> None:
  """Records, before checkpoint `step` is saved, the per-step training metrics of the steps
  after the last logged row (`since`) up to `step` (atomically; the newest windows kept)."""
  path = os.path.join(workdir, LOG_WINDOW_FILE)
  windows = _read_json_object(path)
  windows = {k: v for k, v in windows.items() if k.isdigit() and int(k) < step}
  windows[str(step)] = {"since": int(since), "rows": [dict(row) for row in rows]}
  kept = sorted(windows, key=int)[-_LOG_WINDOWS_KEPT:]
  files.replace_text(path, json.dumps({k: windows[k] for k in kept}))


def read_log_window(workdir: str, step: int) -> tuple[int, list[dict[str, float]]] | None:
  """(last logged step, per-step rows since) recorded for checkpoint `step`; None when there is
  none (a workdir from before the file, or one the file does not describe)."""
  window = _read_json_object(os.path.join(workdir, LOG_WINDOW_FILE)).get(str(step))
  try:
    since, rows = int(window["since"]), [dict(row) for row in window["rows"]]
  except (TypeError, KeyError, ValueError):
    return None
  return (since, rows) if since <= step and len(rows) == step - since else None


def _read_json_object(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError):
    return {}
  return data if isinstance(data, dict) else {}


def drop_records_after(workdir: str, step: int) -> int:
  """Rewrites a workdir's metrics.jsonl (atomically) without the lines that the run starting
  at checkpoint `step` writes again: for a resume, the records of later steps (logged by an
  interrupted run after its last checkpoint) and a torn last line; for a start from scratch
  (step 0), every line. Returns how many lines were dropped."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines if step > 0 else []:
    try:
      record = json.loads(line)
    except ValueError:
      continue  # a line cut short by the interruption
    if not line.endswith("\n") or record.get("step", 0) > step:
      continue
    kept.append(line)
  if len(kept) == len(lines):
    return 0
  files.replace_text(path, "".join(kept))
  return len(lines) - len(kept)


def drop_summaries_after(workdir: str, step: int) -> int:
  """`drop_records_after` for the TensorBoard event files of a workdir (imports TensorFlow when
  there are any): rewrites each file (atomically) without the summaries of steps after `step`
  and a record cut short by the interruption; every summary for a start from scratch (step 0).
  A file left with no summary is removed. Returns how many summary events were dropped. Called
  also by a run that writes no summaries (a later run that does would show them beside its
  own); where TensorFlow is not installed, it leaves the files as they are (such a run cannot
  write any, and TensorBoard needs it to read them).

  TensorBoard's own loaders do not all do this: the Python one drops the later points of a
  resumed run only where the file says a session restarted, which `tf.summary` never writes,
  and so drew both runs' points over the same steps."""
  names = summary_files(workdir)
  if not names or importlib.util.find_spec("tensorflow") is None:
    return 0
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  dropped = 0
  for path in names:
    records, torn = [], False
    try:
      for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        records.append(record)
    except tf.errors.DataLossError:
      if not _ends_inside_a_record(path, records):  # damaged inside: left as it is
        print(f"note: {path}: a damaged record after {len(records)} readable ones; the file is "
              "left as it is (TensorBoard reads up to it)")
        continue
      torn = True  # the last record cut short by the interruption
    kept = []
    for record in records:
      event = event_pb2.Event.FromString(record)
      if not event.HasField("summary") or (step > 0 and event.step <= step):
        kept.append((record, event.HasField("summary")))
    if len(kept) == len(records) and not torn:
      continue
    dropped += len(records) - len(kept)
    if not any(is_summary for _, is_summary in kept):
      os.remove(path)
      continue
    # Not named like an event file, which TensorBoard would read (an interrupted rewrite).
    staged = os.path.join(os.path.dirname(path), f".rewrite.tmp-{os.getpid()}")
    with tf.io.TFRecordWriter(staged) as out:
      for record, _ in kept:
        out.write(record)
    os.replace(staged, path)
  return dropped


def summary_files(workdir: str) -> list[str]:
  """The TensorBoard event files of a workdir (its `tensorboard` folder), in name order."""
  directory = os.path.join(workdir, TENSORBOARD_DIR)
  if not os.path.isdir(directory):
    return []
  return [os.path.join(directory, n) for n in sorted(os.listdir(directory)) if "tfevents" in n]


def _ends_inside_a_record(path: str, records: Sequence[bytes]) -> bool:
  """Whether a TFRecord file whose `records` read before a data-loss error ends inside the next
  one (its header, or its data, runs past the end of the file): a write cut short."""
  offset = sum(len(r) + 16 for r in records)  # length, its CRC, data, its CRC
  size = os.path.getsize(path)
  if size - offset < 12:
    return True
  with open(path, "rb") as f:
    f.seek(offset)
    length = int.from_bytes(f.read(8), "little")
  return offset + 16 + length > size


# Names of the results tools/evaluate.py appends to a workdir's records (`train.evaluate`),
# apart from the run's own series.
EVALUATE_TOOL_PREFIX = "evaluate/"


def evaluation_logged(workdir: str, step: int) -> bool:
  """Whether a workdir's metrics.jsonl holds the run's evaluator results (names without
  `train/`, and not tools/evaluate.py's) at `step`: the trainer writes all evaluators due at a
  step in one record, after they ran."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return False
  return any(record["step"] == step and any(
      k != "step" and not k.startswith(("train/", EVALUATE_TOOL_PREFIX)) for k in record)
             for record in read_jsonl(path))


def last_scalars(workdir: str) -> dict[str, float]:
  """The latest value of every metric logged in a workdir's metrics.jsonl (train/ prefix
  dropped)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return {}
  latest: dict[str, float] = {}
  for record in read_jsonl(path):
    latest.update({k.removeprefix("train/"): v for k, v in record.items() if k != "step"})
  return latest


class ProgressBar:
  """One console line: step, percent, a few metrics, elapsed and estimated time left; redrawn
  in place on a terminal, a line per update where stdout is a file or pipe (a cluster job's
  log, which `\r` redraws made one line of the whole run)."""

  def __init__(self, total_steps: int, start_step: int, enabled: bool = True, width: int = 24):
    self.total, self.start, self.enabled, self.width = total_steps, start_step, enabled, width
    self.started = time.monotonic()
    isatty = getattr(sys.stdout, "isatty", None)
    # A Jupyter kernel's stdout is no terminal, but its front ends draw `\r` as one.
    self.redraw = bool(isatty and isatty()) or "ipykernel" in sys.modules

  def update(self, step: int, metrics: Mapping[str, float]) -> None:
    """Redraws the line for `step` (steps since `start_step` set the ETA)."""
    if not self.enabled:
      return
    elapsed = time.monotonic() - self.started
    done = step - self.start
    eta = elapsed / done * (self.total - step) if done else float("nan")
    filled = int(self.width * step / max(self.total, 1))
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {step}/{self.total} "
            f"{100 * step / max(self.total, 1):3.0f}% {shown} "
            f"elapsed {_clock(elapsed)} ETA {_clock(eta)}")
    if self.redraw:
      print(f"\r{line}", end="", flush=True)
    else:
      print(line, flush=True)

  def close(self) -> None:
    if self.enabled and self.redraw:
      print(flush=True)


def _clock(seconds: float) -> str:
  if seconds != seconds:  # NaN
    return "--:--"
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"
