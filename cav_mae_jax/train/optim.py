"""Optimizer and learning-rate schedules of the original recipes, in optax.

The original trains with `torch.optim.Adam(lr, betas=(0.95, 0.999), weight_decay=5e-7)`: a
*coupled* L2 term (the decay is added to the gradient before the Adam moments, unlike AdamW),
and a MultiStep schedule halving the learning rate at epochs 10, 15, 20, ... stepped once per
epoch. Parameters the model marks as not trainable (fixed position embeddings) get no update and
no decay.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULE_KINDS = ("multistep", "warmup_cosine")
# The `config.schedule` fields each kind reads (a schedule holds every kind's: configs/common.py).
SCHEDULE_FIELDS = {"multistep": ("first_decay_epoch", "decay_every_epochs", "decay_factor"),
                   "warmup_cosine": ("warmup_epochs", "final_lr_fraction")}


def multistep_schedule(base_lr: float, steps_per_epoch: int, first_decay_epoch: int,
                       decay_every_epochs: int, decay_factor: float) -> optax.Schedule:
  """torch MultiStepLR(milestones=range(first, inf, every)) stepped per epoch, as a step fn."""
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1.")

  def schedule(step):
    epochs_done = jnp.asarray(step) // steps_per_epoch
    num_decays = jnp.where(
        epochs_done >= first_decay_epoch,
        (epochs_done - first_decay_epoch) // decay_every_epochs + 1, 0)
    return base_lr * jnp.asarray(decay_factor, jnp.float32) ** num_decays

  return schedule


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                  total_steps: int) -> optax.Schedule:
  """The learning-rate schedule of `config.schedule` at base rate `config.optim.learning_rate`."""
  sched, base_lr = config.schedule, config.optim.learning_rate
  if sched.kind == "multistep":
    return multistep_schedule(base_lr, steps_per_epoch, sched.first_decay_epoch,
                              sched.decay_every_epochs, sched.decay_factor)
  if sched.kind == "warmup_cosine":
    warmup_steps = _warmup_steps(sched, steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=base_lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=base_lr * sched.final_lr_fraction)
  raise ValueError(f"config.schedule.kind={sched.kind!r}: expected one of {SCHEDULE_KINDS}.")


def _warmup_steps(sched: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  return int(round(sched.warmup_epochs * steps_per_epoch))


def check_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                   total_steps: int) -> None:
  """Raises ValueError naming `config.schedule.warmup_epochs` where the warmup is longer than
  the run (an epoch recipe run for a number of steps, say): the rate would never reach
  `config.optim.learning_rate`, nor the cosine start."""
  sched = config.schedule
  if sched.kind != "warmup_cosine":
    return
  warmup_steps = _warmup_steps(sched, steps_per_epoch)
  if warmup_steps > total_steps:
    raise ValueError(
        f"config.schedule.warmup_epochs={sched.warmup_epochs}: {warmup_steps} warmup steps "
        f"({steps_per_epoch} an epoch), and the run has {total_steps}: the learning rate would "
        f"not reach config.optim.learning_rate={config.optim.learning_rate:g}, nor decay; "
        "shorten the warmup.")


def make_optimizer(optim_config: ml_collections.ConfigDict, learning_rate: optax.ScalarOrSchedule,
                   trainable: Any, lr_multipliers: Any = None) -> optax.GradientTransformation:
  """Adam with coupled L2 (torch `Adam(weight_decay=...)`), optional clipping, frozen params.

  Args:
    optim_config: `config.optim` (b1, b2, eps, weight_decay, grad_clip_norm).
    learning_rate: a constant or a schedule of the step.
    trainable: pytree of bools matching the parameters (the task's `trainable`); the others get
      no update, no weight decay and no optimizer state.
    lr_multipliers: pytree of floats matching the parameters (e.g. the original's x100 for the
      fine-tuning head: a second torch param group), or None for 1.0 everywhere.
  """
  if lr_multipliers is None:
    lr_multipliers = jax.tree.map(lambda _: 1.0, trainable)

  def label(is_trainable: bool, multiplier: float) -> str:
    if not is_trainable:
      return "frozen"
    return "trainable" if multiplier == 1.0 else f"trainable_lr_x{multiplier:g}"

  labels = jax.tree.map(label, trainable, lr_multipliers)
  transforms = {"frozen": optax.set_to_zero()}
  for is_trainable, multiplier in zip(jax.tree.leaves(trainable), jax.tree.leaves(lr_multipliers)):
    name = label(is_trainable, multiplier)
    if name not in transforms:
      transforms[name] = _adam(optim_config, _scaled(learning_rate, multiplier))
  optimizer = optax.multi_transform(transforms, labels)
  if optim_config.grad_clip_norm > 0:  # one global norm over every trainable gradient
    clip = optax.masked(optax.clip_by_global_norm(optim_config.grad_clip_norm), trainable)
    optimizer = optax.chain(clip, optimizer)
  return optimizer


def _scaled(learning_rate: optax.ScalarOrSchedule, multiplier: float) -> optax.ScalarOrSchedule:
  if multiplier == 1.0:
    return learning_rate
  if callable(learning_rate):
    return lambda step: multiplier * learning_rate(step)
  return multiplier * learning_rate


def _adam(optim_config: ml_collections.ConfigDict,
          learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  steps = []
  if optim_config.weight_decay > 0:
    steps.append(optax.add_decayed_weights(optim_config.weight_decay))  # coupled: before Adam
  steps += [
      optax.scale_by_adam(b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps),
      optax.scale_by_learning_rate(learning_rate),
  ]
  return optax.chain(*steps)


def trainable_global_norm(grads: Any, trainable: Any) -> jax.Array:
  """Global L2 norm over the gradients of trainable parameters only."""
  leaves = [g for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(trainable)) if t]
  return optax.tree.norm(leaves)


def for_task(config: ml_collections.ConfigDict, task: Any, steps_per_epoch: int,
             total_steps: int) -> tuple[optax.Schedule, optax.GradientTransformation]:
  """(schedule, optimizer) of `config.schedule` / `config.optim` for a task's parameters."""
  schedule = make_schedule(config, steps_per_epoch, total_steps)
  return schedule, make_optimizer(config.optim, schedule, task.trainable, task.lr_multipliers)
