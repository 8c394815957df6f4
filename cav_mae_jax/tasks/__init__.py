"""Tasks: what a run trains. `config.task` names one; the trainer and evaluators know no other.

A task gives the loop everything model-specific (DESIGN: "Tasks and evaluators"):

  model_config   the validated `config.model`
  init_params    rng -> float32 params (call under jit / eval_shape)
  loss_fn        (params, batch, rng) -> (loss, metrics): float32 scalars; `rng` is already
                 folded with the step; the batch is the input pipeline's dict (docs/design.md)
  trainable      pytree of bools: what the optimizer updates (the rest gets no update and no
                 optimizer state)
  lr_multipliers pytree of floats (1.0 = the base rate) or None
  predict_fns    name -> function the evaluators call, e.g. 'losses' (params, batch, rng) ->
                 metrics, 'features' (params, batch) -> (audio [B, D], video [B, D])
  step_flops     model FLOPs of one training step per sample (for MFU)
  finetune       whether the parameters are the fine-tuning model's (conversion targets)

A new task is one module here with a `make_task(config) -> Task` function (and, for fields of
its own config section, a `validate_config(config)`; `USES_LABELS = True` when its loss reads
the clips' labels, so that the data's class count is checked against the model's), registered
below.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

import jax
import ml_collections

from cav_mae_jax.models.config import ModelConfig

Batch = Mapping[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]

# config.task -> module in this package.
TASKS = {"pretrain": "pretrain", "finetune": "finetune", "probe": "probe"}


@dataclasses.dataclass(frozen=True)
class Task:
  """The model-specific half of a run (see the module docstring)."""
  name: str
  model_config: ModelConfig
  init_params: Callable[[jax.Array], Any]
  loss_fn: LossFn
  trainable: Any
  lr_multipliers: Any
  predict_fns: Mapping[str, Callable[..., Any]]
  step_flops: float
  finetune: bool = False

  def param_shapes(self) -> Any:
    """The shapes `init_params` gives (the pretraining model's, or with `finetune` the
    fine-tuning model's, for `model_config`), traced once per process."""
    from cav_mae_jax import models  # pylint: disable=g-import-not-at-top
    return models.param_shapes(self.model_config, finetune=self.finetune)


def feature_fns(model: Any, model_config: ModelConfig) -> dict[str, Callable[..., Any]]:
  """{'features': (params, batch) -> the mean-pooled audio and video features of the
  modality-specific streams (retrieval)} for an audio-visual model (`model`: a Flax module with
  a `features` method); {} for a single-modality one, which has no features of the other
  modality to rank against (the evaluators then refuse retrieval, saying so)."""
  if model_config.modalities != "audiovisual":
    return {}

  def features(params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    audio, video = model.apply({"params": params}, batch["audio"], batch["image"],
                               method="features")
    return audio.mean(axis=1), video.mean(axis=1)

  return {"features": features}


def _module(config: ml_collections.ConfigDict) -> Any:
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r}: unknown task; choose one of {sorted(TASKS)}.")
  return importlib.import_module(f"cav_mae_jax.tasks.{TASKS[config.task]}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the task name and the task's own config section; raises ValueError naming the field."""
  module = _module(config)
  if hasattr(module, "validate_config"):
    module.validate_config(config)


def uses_labels(config: ml_collections.ConfigDict) -> bool:
  """Whether the task of `config` trains or evaluates on the clips' labels."""
  return getattr(_module(config), "USES_LABELS", False)


def get_task(config: ml_collections.ConfigDict) -> Task:
  """The task named by `config.task`, built from `config`."""
  return _module(config).make_task(config)
