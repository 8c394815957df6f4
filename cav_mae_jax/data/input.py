"""The checkpointable input iterator: `InputPipeline`, host-local batches with a resumable position.

`InputPipeline(config, split, seed=..., batch_size=...)` iterates over the batches that
`dataset.make_dataset` builds for this process (the batch dict of docs/design.md, numpy arrays;
the graph and the augmentations are described in `dataset.py`, the config fields in
`config.py`). It counts what it has handed out: `get_state()` is a small JSON dict and
`set_state()` rebuilds the stream at that point (it skips the already-seen records of the
current epoch before parsing, so resuming costs reading at most one epoch of this host's raw
records; with balanced sampling or exact shuffling, which read the drawn records at their
offsets, it skips the draws without reading them). Every epoch has as many clips as the host's
files, so the state is a count of batches; checkpoints hold every
process's (`cav_mae_jax.train.checkpoint`).

A split is read from a records directory or from a TFDS dataset (`dataset.open_split`; the
same batch dict from both). The pipeline's `fbank_normalization` says which mean and std it
normalizes with and where they come from; the main process logs it once per split and
process. The batches become global `jax.Array`s with `cav_mae_jax.train.mesh.global_batch`.
Reading errors and shards shorter than the index says raise `RecordReadError` naming the shard
file. Throughput is measured by `measure_input` (samples per wall second and per CPU second).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from cav_mae_jax.data import dataset
from cav_mae_jax.data import records

logger = logging.getLogger(__name__)

STATE_VERSION = 1
# Names callers use from this module (the config view, the op string of the batch step, the
# split sources and the run's data check).
DataConfig = dataset.DataConfig
batch_preprocess_spec = dataset.batch_preprocess_spec
open_split = dataset.open_split
check_data_sources = dataset.check_data_sources
_logged: set[str] = set()  # log lines already written by this process


class RecordReadError(OSError):
  """Reading or decoding the records failed; the message names the split and, if found, the file.

  An OSError: damaged data on disk is bad input, which the command-line tools report in one
  `error:` line (cav_mae_jax.cli)."""


def find_damaged_shard(files: Any, expected_counts: Any,
                       parse: Callable[..., Any] = records.parse_example
                       ) -> tuple[str, str] | None:
  """The first shard that cannot be parsed to its end or holds another count than the index."""
  for path, expected in zip(files, expected_counts):
    count = 0
    try:
      for serialized in tf.data.TFRecordDataset(path):
        parse(serialized)
        count += 1
    except tf.errors.OpError as e:
      return path, records.op_error_text(e)
    if count != expected:
      return path, records.count_problem(count, expected)
  return None


class InputPipeline:
  """Iterator of host-local batches (dicts of numpy arrays) with a checkpointable position.

  `get_state()` returns a JSON-serializable dict; `set_state(state)` makes the next batch the
  one that followed when the state was taken. The state depends only on the number of batches
  handed out, so one process's state restores every process.
  """

  def __init__(self, config: Any, split: str = "train", *, training: bool | None = None,
               process_index: int | None = None, process_count: int | None = None,
               seed: int = 0, batch_size: int | None = None, threads: int | None = None,
               normalization: dataset.FbankNormalization | None = None):
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    self.config = dataset.DataConfig.from_config(config)
    self.split = split
    self.training = split == "train" if training is None else training
    self.process_index, self.process_count = process_index, process_count
    self.seed = seed
    self.threads = threads
    self.split_files = dataset.load_split(self.config, split, process_index, process_count)
    self.fbank_normalization = normalization or dataset.fbank_normalization(self.config)
    message = f"split {split!r}: {self.fbank_normalization.describe()}"
    if process_index == 0 and message not in _logged:
      _logged.add(message)
      logger.info(message)
    self.batch_size = batch_size
    self.host_batch = dataset.resolve_host_batch(self.config, batch_size, process_count)
    self._batches = 0
    self._epoch = 0
    self._position = 0
    self._iterator: Iterator[dict[str, np.ndarray]] | None = None
    self._host: dataset.HostRecords | None = None  # found once, on the first batch

  @property
  def num_batches(self) -> int | None:
    """Batches in one evaluation pass (same on every process); None for training (endless)."""
    return None if self.training else dataset.num_eval_batches(self.split_files,
                                                                  self.host_batch)

  def first_clips_per_process(self, count: int) -> list[int]:
    """Each process's share of the split's first `count` clips in shard order: the first that
    many valid clips of its part of the batches (`dataset.first_clips_per_process`)."""
    return dataset.first_clips_per_process(self.split_files.source, self.process_count, count)

  def _locate(self, batches: int) -> tuple[int, int]:
    """(epoch, position) after `batches` full batches."""
    epoch_size = self.split_files.host_examples[self.process_index]
    consumed = batches * self.host_batch
    return consumed // epoch_size, consumed % epoch_size

  def _build(self) -> Iterator[dict[str, np.ndarray]]:
    if dataset.needs_host_records(self.config, self.training) and self._host is None:
      self._host = dataset.host_records(self.split_files)
    batches = dataset.make_dataset(
        self.config, self.split, process_index=self.process_index,
        process_count=self.process_count, seed=self.seed, training=self.training,
        start_epoch=self._epoch, start_position=self._position, start_batch=self._batches,
        batch_size=self.batch_size, threads=self.threads, normalization=self.fbank_normalization,
        host=self._host, split_files=self.split_files)
    return batches.as_numpy_iterator()

  def __iter__(self) -> InputPipeline:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      if self._iterator is None:
        self._iterator = self._build()
      batch = next(self._iterator)
    except tf.errors.OpError as e:
      raise RecordReadError(self._describe_failure(records.op_error_text(e))) from e
    except StopIteration:
      if not self.training and self._batches != self.num_batches:
        raise RecordReadError(self._describe_failure(
            f"ended after {self._batches} of {self.num_batches} batches")) from None
      raise
    self._batches += 1
    if self.training:
      epochs, positions = batch.pop(dataset.EPOCH_KEY), batch.pop(dataset.POSITION_KEY)
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
    where = (f"split {self.split!r} ({self.split_files.source.description}), process "
             f"{self.process_index} of {self.process_count}, batch {self._batches}")
    damaged = find_damaged_shard(self.split_files.files, self.split_files.file_examples,
                                 self.split_files.source.parse)
    if damaged is not None:
      return f"{where}: shard {damaged[0]} is damaged: {damaged[1]}"
    if self._host is not None:  # the records were read where their sidecars put them
      for path, count in zip(self.split_files.files, self.split_files.file_examples):
        mismatch = records.layout_mismatch(path, count, self.split_files.index.num_classes,
                                           self.split_files.source.parse_labels)
        if mismatch:
          return f"{where}: {mismatch}"
    return f"{where}: {message}"

  def reset(self) -> None:
    """Rewinds to the first batch (e.g. before another evaluation pass)."""
    self._batches, self._epoch, self._position = 0, 0, 0
    self._iterator = None

  def with_batch_size(self, batch_size: int) -> InputPipeline:
    """This pipeline, not yet started, with another global batch size: its split, statistics
    and settings as they are (the split is not opened again)."""
    if self._iterator is not None or self._batches:
      raise ValueError("with_batch_size: the pipeline has started")
    other = copy.copy(self)
    other.batch_size = batch_size
    other.host_batch = dataset.resolve_host_batch(self.config, batch_size, self.process_count)
    return other

  def get_state(self) -> dict[str, Any]:
    """The position in the stream as a JSON-serializable dict."""
    return {"version": STATE_VERSION, "split": self.split, "seed": self.seed,
            "process_index": self.process_index, "process_count": self.process_count,
            "batches": self._batches, "epoch": self._epoch, "position": self._position}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a state returned by `get_state` (of a pipeline with the same config)."""
    if state.get("process_count") != self.process_count:
      raise ValueError(
          f"the input position was saved by a run of {state.get('process_count')} process(es), "
          f"this run has {self.process_count}: each process reads its own shard files, so a "
          "run resumes on the process count it started with (or a new workdir starts from "
          "this one's parameters: --config.init.source=workdir --config.init.path=<workdir>)")
    for key in ("version", "split", "seed"):
      expected = {"version": STATE_VERSION, "split": self.split, "seed": self.seed}[key]
      if state.get(key) != expected:
        raise ValueError(f"input state has {key}={state.get(key)!r}, this pipeline has "
                         f"{expected!r}")
    batches = int(state["batches"])
    if self.training:
      epoch, position = self._locate(batches)
    else:
      epoch, position = 0, 0
    self._batches, self._epoch, self._position = batches, epoch, position
    self._iterator = None


def measure_input(config: Any, num_batches: int, *, split: str = "train",
                  threads: int | None = None, warmup_batches: int = 2) -> dict[str, float]:
  """Input throughput: samples per wall second and per CPU second (= per fully used core).

  Times `num_batches` batches of the pipeline alone (read, parse, decode, augment, batch: as
  `split` is configured, on one process) after `warmup_batches`. CPU seconds are this
  process's user + system time over the timed batches, so the per-core figure holds on a
  shared machine too.
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
  return {"samples": float(samples), "wall_seconds": wall, "samples_per_second": samples / wall,
          "samples_per_cpu_second": samples / cpu, "cpu_cores_used": cpu / wall}
