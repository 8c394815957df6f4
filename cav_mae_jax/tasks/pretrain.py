"""Pretraining: CAV-MAE and its paper variants (masked reconstruction + contrastive loss).

The objective is the model's own (`models.CAVMAE`): the loss and its parts are float32 scalars,
summed over contrast groups as the original's DataParallel run sums its GPUs' losses. Masks are
drawn from the step's RNG. Evaluators get the same losses on fixed masks ('losses') and the
mean-pooled audio-only / video-only features used for retrieval ('features').
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from cav_mae_jax import models
from cav_mae_jax import tasks
from cav_mae_jax.tasks import Batch, Task
from cav_mae_jax.train import flops

METRIC_KEYS = ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc")


def make_task(config: ml_collections.ConfigDict) -> Task:
  """The pretraining task for `config.model`."""
  model_config = models.ModelConfig.from_config(config.model)
  model = models.CAVMAE(model_config)

  def init_params(rng: jax.Array) -> Any:
    return models.init_params(model_config, rng)

  def loss_fn(params: Any, batch: Batch, rng: jax.Array):
    out = model.apply({"params": params}, batch["audio"], batch["image"], rngs={"mask": rng})
    return out["loss"], {k: out[k] for k in METRIC_KEYS}

  def losses(params: Any, batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
    return loss_fn(params, batch, rng)[1]

  trainable = models.trainable_mask(models.param_shapes(model_config), model_config)
  predict_fns = {"losses": losses, **tasks.feature_fns(model, model_config)}
  return Task(name="pretrain", model_config=model_config, init_params=init_params,
              loss_fn=loss_fn, trainable=trainable, lr_multipliers=None,
              predict_fns=predict_fns,
              step_flops=flops.pretrain_step_flops(config.model))
