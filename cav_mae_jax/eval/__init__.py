"""Evaluators: one file per type, one shape (see `common.Evaluator`).

`config.evals` maps a name to an entry `{type, split, dir, every_steps, at_start, batch_size,
...}`; `build_evaluators` turns it into evaluator objects whose `run(params)` yields
`(f'{name}/{metric}', value)` pairs. Types:
  losses     the task's losses on fixed masks (`losses.py`)
  retrieval  audio <-> visual recall@k and median rank (`retrieval.py`)
  classification  mAP, AUC, d-prime, accuracy, any modality mode, frame 5 or all frames
                  (`classification.py`)
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

import jax
import ml_collections

from cav_mae_jax.eval import common

# type -> (module, class, predict functions it needs)
EVALUATOR_TYPES = {
    "losses": ("losses", "LossesEvaluator", ("losses",)),
    "retrieval": ("retrieval", "RetrievalEvaluator", ("features",)),
    "classification": ("classification", "ClassificationEvaluator", ("classify",)),
}


def evaluator_class(type_name: str) -> type[common.Evaluator]:
  """The class of an evaluator type."""
  module, cls, _ = EVALUATOR_TYPES[type_name]
  return getattr(importlib.import_module(f"cav_mae_jax.eval.{module}"), cls)


def validate_evals(config: ml_collections.ConfigDict, predict_fns: Mapping[str, Any] | None,
                   num_devices: int, num_processes: int) -> None:
  """Checks every `config.evals` entry (and that the task can feed it); names the field."""
  for name, entry in config.evals.items():
    type_name = entry.get("type")
    if type_name not in EVALUATOR_TYPES:
      raise ValueError(f"config.evals.{name}.type={type_name!r}: unknown evaluator type; "
                       f"choose one of {sorted(EVALUATOR_TYPES)}.")
    needs = EVALUATOR_TYPES[type_name][2]
    missing = [] if predict_fns is None else [f for f in needs if f not in predict_fns]
    if missing:
      modalities = config.model.get("modalities", "audiovisual")
      if missing[0] == "features" and modalities != "audiovisual":
        raise ValueError(f"config.evals.{name}.type={type_name!r}: {single_modality(modalities)}; "
                         f"leave it out with --config.evals.{name}=None")
      raise ValueError(f"config.evals.{name}.type={type_name!r}: task {config.task!r} has no "
                       f"'{missing[0]}' function (it has {sorted(predict_fns)}).")
    cls = evaluator_class(type_name)
    common.validate_entry(name, entry, cls.FIELDS, num_devices, num_processes)
    cls.check_entry(name, entry, config)


def single_modality(modalities: str) -> str:
  """Why a model of `modalities` (not 'audiovisual') has no audio-visual retrieval: a pretraining
  MAE of one modality has no features of the other to rank against."""
  return (f"a single-modality model (config.model.modalities={modalities!r}) has no "
          "audio-visual retrieval")


def build_evaluators(config: ml_collections.ConfigDict, predict_fns: Mapping[str, Callable],
                     mesh: jax.sharding.Mesh, batch_source: common.BatchSource | None = None,
                     names: list[str] | None = None) -> list[common.Evaluator]:
  """The evaluators of `config.evals` (or only `names`), reading records unless `batch_source`."""
  batch_source = batch_source or common.records_batch_source(config)
  evaluators = []
  for name, entry in config.evals.items():
    if names is None or name in names:
      cls = evaluator_class(entry.type)
      evaluators.append(cls(name, entry, predict_fns, mesh, batch_source,
                            **cls.run_options(config)))
  return evaluators
