"""What every evaluator shares: its config entry, its batches, and the global `valid` mask.

An evaluator is built from its `config.evals.<name>` entry, the task's predict functions, the
mesh and a batch source; `run(params)` yields `(metric_name, value)` pairs, which the caller
writes with the training metrics. Every evaluator reads its own split in evaluation mode (no
augmentation, fixed frame, padded last batch) and never imports the trainer.

Fields of an entry (each type adds its own, listed in its `FIELDS`):
  type: str          the evaluator type (a module of this package)
  split: str         'train' or 'eval': the split's clips (config.data.<split>_dir, else its
                     TFDS split, see cav_mae_jax/data/dataset.py)
  dir: str           records directory to read instead of the split's ('' = the split's); its
                     fbanks are normalized as the run's are (with fbank_stats='index', by the
                     training split's statistics, not by the directory's own)
  every_steps: int   run every that many training steps (0 = off; every evaluator also runs
                     at the end of training)
  every_epochs: float  run every that many epochs (0 = off), e.g. 1.0 at every epoch end; rounded
                     to whole steps, at least one
  at_start: bool     also run on the initial parameters of a fresh run (step 0)
  batch_size: int    global batch size
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import ml_collections
import numpy as np

from cav_mae_jax.train import mesh as mesh_lib

HostBatch = dict[str, np.ndarray]
# (split, records directory or '', global batch size, **config.data overrides) -> a fresh pass
# over that split in evaluation mode.
BatchSource = Callable[..., Iterable[HostBatch]]
COMMON_FIELDS = {"type": str, "split": str, "dir": str, "every_steps": int,
                 "every_epochs": float, "at_start": bool, "batch_size": int}
SPLITS = ("train", "eval")


class Evaluator:
  """Base class: scheduling and batches; subclasses define `FIELDS` and `run(params)`."""

  FIELDS: Mapping[str, type] = {}

  def __init__(self, name: str, config: ml_collections.ConfigDict,
               predict_fns: Mapping[str, Callable[..., Any]], mesh: jax.sharding.Mesh,
               batch_source: BatchSource):
    self.name = name
    self.config = config
    self.predict_fns = predict_fns
    self.mesh = mesh
    self._batch_source = batch_source

  @classmethod
  def check_entry(cls, name: str, config: ml_collections.ConfigDict,
                  run_config: ml_collections.ConfigDict) -> None:
    """Checks the type's own fields (types and common fields are checked already), alone and
    against the run's config."""

  @classmethod
  def run_options(cls, run_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword arguments of the constructor that come from the run's config, not the entry."""
    del run_config
    return {}

  def due(self, step: int, total_steps: int, steps_per_epoch: int) -> bool:
    """Whether to run after training step `step` (0: the fresh run's initial parameters)."""
    if step == 0:
      return self.config.at_start
    every = self.config.every_steps
    every_epoch_steps = 0  # off; a fraction of an epoch shorter than a step: every step
    if self.config.every_epochs > 0:
      every_epoch_steps = max(1, int(round(self.config.every_epochs * steps_per_epoch)))
    return (step == total_steps or (every > 0 and step % every == 0) or
            (every_epoch_steps > 0 and step % every_epoch_steps == 0))

  def data_overrides(self) -> dict[str, Any]:
    """`config.data` fields this evaluator's passes set (e.g. all frames per clip)."""
    return {}

  def source(self) -> Iterable[HostBatch]:
    """A fresh pass over this evaluator's split, as its batch source gives it (host batches)."""
    return self._batch_source(self.config.split, self.config.dir, self.config.batch_size,
                              **self.data_overrides())

  def batches(self, source: Iterable[HostBatch] | None = None) -> Iterator[HostBatch]:
    """A fresh pass over this evaluator's split (or over `source`, a pass from `source()`);
    `valid` describes the global batch."""
    for batch in self.source() if source is None else source:
      yield {**batch, "valid": global_valid(batch["valid"])}

  def global_batch(self, batch: HostBatch, keys: Iterable[str] = ("audio", "image")
                   ) -> dict[str, jax.Array]:
    """The model inputs of a host batch as global arrays over the mesh."""
    return mesh_lib.global_batch({k: batch[k] for k in keys}, self.mesh)

  def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` compiled with replicated outputs (fetchable on every host)."""
    return jax.jit(fn, out_shardings=mesh_lib.replicated(self.mesh))

  def run(self, params: Any) -> Iterator[tuple[str, float]]:
    """Yields `(f'{name}/{metric}', value)` pairs."""
    raise NotImplementedError


def global_valid(valid: np.ndarray) -> np.ndarray:
  """The global batch's `valid` mask from every process's local part (the one place it is
  gathered)."""
  return global_array(np.asarray(valid, bool)).reshape(-1)


def global_array(local: np.ndarray) -> np.ndarray:
  """The global batch's rows of a host array (labels, ids) from every process's local part."""
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = np.asarray(multihost_utils.process_allgather(local))
  return gathered.reshape((-1,) + local.shape[1:])


def records_batch_source(config: ml_collections.ConfigDict) -> BatchSource:
  """Evaluation passes over the records of `config.data` (imports TensorFlow when called)."""

  def batches(split: str, directory: str, batch_size: int,
              **data_overrides: Any) -> Iterable[HostBatch]:
    from cav_mae_jax.data import input as input_lib  # pylint: disable=g-import-not-at-top
    from cav_mae_jax.data import dataset  # pylint: disable=g-import-not-at-top
    data_config, normalization = config, None
    if directory or data_overrides:
      data_config = config.copy_and_resolve_references()
      data_config.data.update(data_overrides)
      if directory:  # the clips are another directory's; the normalization stays the run's
        normalization = dataset.fbank_normalization(data_config)
        data_config.data[f"{split}_dir"] = directory
    pipeline = input_lib.InputPipeline(data_config, split, training=False, seed=config.seed,
                                       batch_size=batch_size, normalization=normalization)
    from cav_mae_jax.eval import clips  # pylint: disable=g-import-not-at-top
    host_batch = clips.useful_host_batch(pipeline.host_batch,
                                         max(pipeline.split_files.host_examples))
    if host_batch == pipeline.host_batch:
      return pipeline
    return pipeline.with_batch_size(host_batch * pipeline.process_count)

  return batches


def validate_entry(name: str, entry: ml_collections.ConfigDict, fields: Mapping[str, type],
                   num_devices: int, num_processes: int) -> None:
  """Checks one `config.evals.<name>` entry; raises ValueError naming the field."""
  where = f"config.evals.{name}"
  expected = {**COMMON_FIELDS, **fields}
  present = set(entry.keys())
  for field in sorted(set(expected) - present):
    raise ValueError(f"{where}.{field}: missing (fields of a {entry.get('type')!r} evaluator: "
                     f"{sorted(expected)}).")
  for field in sorted(present - set(expected)):
    raise ValueError(f"{where}.{field}: unknown field for a {entry.type!r} evaluator "
                     f"(fields: {sorted(expected)}).")
  for field, kind in expected.items():
    value = entry[field]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
      raise ValueError(f"{where}.{field}={value!r}: expected {kind.__name__}.")
  if entry.split not in SPLITS:
    raise ValueError(f"{where}.split={entry.split!r}: must be one of {SPLITS}.")
  if entry.every_steps < 0:
    raise ValueError(f"{where}.every_steps={entry.every_steps}: must be >= 0 (0 = off).")
  if entry.every_epochs < 0:
    raise ValueError(f"{where}.every_epochs={entry.every_epochs}: must be >= 0 (0 = off).")
  batch = entry.batch_size
  if batch <= 0 or batch % num_devices or batch % num_processes:
    raise ValueError(f"{where}.batch_size={batch}: must be positive and divisible by the "
                     f"number of devices ({num_devices}) and processes ({num_processes}).")
