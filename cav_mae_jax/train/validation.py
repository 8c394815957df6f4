"""Checks of a pretraining config before anything is traced: a bad value raises ValueError
naming the field.

The model's own fields are checked by `ModelConfig.from_config`; this module checks the rest and
the relations between sections (batch vs devices, contrast groups vs batch, records vs model).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from cav_mae_jax.models.config import ModelConfig
from cav_mae_jax.train import mesh as mesh_lib
from cav_mae_jax.train import optim

INDEX_FILE = "index.json"


def _fail(field: str, value: Any, why: str) -> None:
  raise ValueError(f"config.{field}={value!r}: {why}")


def validate_config(config: ml_collections.ConfigDict, num_devices: int,
                    num_processes: int = 1, check_data: bool = True) -> ModelConfig:
  """Validates `config` for a run on `num_devices` devices; returns the checked ModelConfig."""
  model = ModelConfig.from_config(config.model)
  _validate_duration(config)
  _validate_batch(config, model, num_devices, num_processes)
  mesh_lib.mesh_shape(config.mesh, num_devices)
  _validate_optim(config)
  _validate_checkpoint_and_eval(config)
  if check_data:
    train_index = read_records_index(config.data.train_dir, "data.train_dir")
    check_records_match_model(train_index, model, "data.train_dir")
    if config.eval.every_steps > 0:
      eval_index = read_records_index(config.data.eval_dir, "data.eval_dir")
      check_records_match_model(eval_index, model, "data.eval_dir")
  return model


def _validate_duration(config: ml_collections.ConfigDict) -> None:
  steps, epochs = config.total_steps, config.total_epochs
  if (steps is None) == (epochs is None):
    _fail("total_steps", steps, f"set exactly one of total_steps / total_epochs "
          f"(total_epochs={epochs!r}).")
  if steps is not None and steps <= 0:
    _fail("total_steps", steps, "must be positive.")
  if epochs is not None and epochs <= 0:
    _fail("total_epochs", epochs, "must be positive.")
  if config.log_every_steps <= 0:
    _fail("log_every_steps", config.log_every_steps, "must be positive.")


def _validate_batch(config: ml_collections.ConfigDict, model: ModelConfig, num_devices: int,
                    num_processes: int) -> None:
  for field, batch in (("data.batch_size", config.data.batch_size),
                       ("eval.batch_size", config.eval.batch_size)):
    if batch <= 0:
      _fail(field, batch, "must be positive.")
    if batch % num_devices:
      _fail(field, batch, f"must be divisible by the number of devices ({num_devices}).")
    if batch % num_processes:
      _fail(field, batch, f"must be divisible by the number of processes ({num_processes}).")
  group = model.contrast_group_size
  if model.has_contrast and group:
    for field in ("data.batch_size", "eval.batch_size"):
      batch = config[field.split(".")[0]].batch_size
      if batch % group:
        _fail("model.contrast_group_size", group, f"must divide config.{field}={batch}.")


def _validate_optim(config: ml_collections.ConfigDict) -> None:
  opt = config.optim
  if not opt.learning_rate > 0:
    _fail("optim.learning_rate", opt.learning_rate, "must be positive.")
  for field in ("b1", "b2"):
    if not 0 <= opt[field] < 1:
      _fail(f"optim.{field}", opt[field], "must be in [0, 1).")
  if not opt.eps > 0:
    _fail("optim.eps", opt.eps, "must be positive.")
  for field in ("weight_decay", "grad_clip_norm"):
    if opt[field] < 0:
      _fail(f"optim.{field}", opt[field], "must be >= 0 (0 = off).")
  sched = config.schedule
  if sched.kind not in optim.SCHEDULE_KINDS:
    _fail("schedule.kind", sched.kind, f"must be one of {optim.SCHEDULE_KINDS}.")
  if sched.kind == "multistep":
    if sched.first_decay_epoch < 0:
      _fail("schedule.first_decay_epoch", sched.first_decay_epoch, "must be >= 0.")
    if sched.decay_every_epochs <= 0:
      _fail("schedule.decay_every_epochs", sched.decay_every_epochs, "must be positive.")
    if not 0 < sched.decay_factor <= 1:
      _fail("schedule.decay_factor", sched.decay_factor, "must be in (0, 1].")
  else:
    if sched.warmup_epochs < 0:
      _fail("schedule.warmup_epochs", sched.warmup_epochs, "must be >= 0.")
    if not 0 <= sched.final_lr_fraction <= 1:
      _fail("schedule.final_lr_fraction", sched.final_lr_fraction, "must be in [0, 1].")


def _validate_checkpoint_and_eval(config: ml_collections.ConfigDict) -> None:
  if config.checkpoint.every_steps < 0:
    _fail("checkpoint.every_steps", config.checkpoint.every_steps, "must be >= 0 (0 = end only).")
  if config.checkpoint.keep < 1:
    _fail("checkpoint.keep", config.checkpoint.keep, "must be >= 1.")
  if config.eval.every_steps < 0:
    _fail("eval.every_steps", config.eval.every_steps, "must be >= 0 (0 = no eval).")
  if config.eval.retrieval_max_clips < 2:
    _fail("eval.retrieval_max_clips", config.eval.retrieval_max_clips, "must be >= 2.")


def read_records_index(directory: str, field: str) -> Any:
  """The `records.RecordIndex` of a records directory; a missing one raises naming `field`."""
  if not directory:
    _fail(field, directory, "no records directory given.")
  if not os.path.isdir(directory):
    _fail(field, directory, "directory does not exist.")
  path = os.path.join(directory, INDEX_FILE)
  if not os.path.isfile(path):
    _fail(field, directory, f"no {INDEX_FILE} in the directory (not a records directory).")
  from cav_mae_jax.data import records  # pylint: disable=g-import-not-at-top  (imports TF)
  return records.read_index(path)


def check_records_match_model(index: Any, model: ModelConfig, field: str) -> None:
  """Records' fbank [frames, mel bins] must equal the model's [audio_length, num_mel_bins]."""
  frames, bins = index.fbank_shape
  if bins != model.num_mel_bins:
    _fail("model.num_mel_bins", model.num_mel_bins,
          f"records in config.{field} have {bins} mel bins.")
  if frames != model.audio_length:
    _fail("model.audio_length", model.audio_length,
          f"records in config.{field} have {frames}-frame fbanks.")
