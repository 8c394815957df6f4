"""Metric writers (TensorBoard + JSONL through clu) and a console progress bar with ETA."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from clu import metric_writers
from clu.metric_writers import interface

METRICS_FILE = "metrics.jsonl"


class JsonlWriter(interface.MetricWriter):
  """Appends one JSON line per `write_scalars` call: {"step": s, name: value, ...}."""

  def __init__(self, path: str):
    self.path = path
    self._file = open(path, "a")  # pylint: disable=consider-using-with

  def write_summaries(self, step, values, metadata=None):
    self.write_scalars(step, {k: v for k, v in values.items() if getattr(v, "ndim", 0) == 0})

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + "\n")

  def write_images(self, step, images):
    pass  # JSONL holds scalars only; images go to TensorBoard.

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._file.write(json.dumps({"hparams": _jsonable(hparams)}) + "\n")

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (int, float, str, bool)) or value is None:
    return value
  return str(value)


def make_writer(workdir: str, is_main_process: bool) -> metric_writers.MetricWriter:
  """TensorBoard (workdir/tensorboard) + JSONL (workdir/metrics.jsonl) on the main process."""
  if not is_main_process:
    return metric_writers.MultiWriter([])
  from clu.metric_writers.summary_writer import SummaryWriter  # pylint: disable=g-import-not-at-top
  return metric_writers.MultiWriter([
      SummaryWriter(os.path.join(workdir, "tensorboard")),
      JsonlWriter(os.path.join(workdir, METRICS_FILE)),
  ])


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The scalar records of a metrics.jsonl file (hparams lines skipped)."""
  with open(path) as f:
    return [r for r in map(json.loads, f) if "step" in r]


def last_scalars(workdir: str) -> dict[str, float]:
  """The latest value of every metric logged in a workdir's metrics.jsonl (train/ prefix dropped)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return {}
  latest: dict[str, float] = {}
  for record in read_jsonl(path):
    latest.update({k.removeprefix("train/"): v for k, v in record.items() if k != "step"})
  return latest


class ProgressBar:
  """One console line: step, percent, a few metrics, elapsed and estimated time left."""

  def __init__(self, total_steps: int, start_step: int, enabled: bool = True, width: int = 24):
    self.total, self.start, self.enabled, self.width = total_steps, start_step, enabled, width
    self.started = time.monotonic()

  def update(self, step: int, metrics: Mapping[str, float]) -> None:
    """Redraws the line for `step` (steps since `start_step` set the ETA)."""
    if not self.enabled:
      return
    elapsed = time.monotonic() - self.started
    done = step - self.start
    eta = elapsed / done * (self.total - step) if done else float("nan")
    filled = int(self.width * step / max(self.total, 1))
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    print(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {step}/{self.total} "
          f"{100 * step / max(self.total, 1):3.0f}% {shown} "
          f"elapsed {_clock(elapsed)} ETA {_clock(eta)}", end="", flush=True)

  def close(self) -> None:
    if self.enabled:
      print(flush=True)


def _clock(seconds: float) -> str:
  if seconds != seconds:  # NaN
    return "--:--"
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"
