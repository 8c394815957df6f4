"""Train state, its sharded initialization, and the jit-compiled train step of any task.

Parameters and optimizer state stay float32; the model computes in `config.model.dtype`
(bfloat16 on accelerators) and returns float32 losses. The step takes global `jax.Array`s
sharded over the mesh; jit partitions the computation (no pmap, no explicit collectives). What
is computed comes from the task (`cav_mae_jax.tasks`): this module knows no model and no loss.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cav_mae_jax import models
from cav_mae_jax.tasks import Task
from cav_mae_jax.train import mesh as mesh_lib
from cav_mae_jax.train import optim

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# (batch, rng) -> (augmented batch, rng left for the task): augmentation run on the device.
DeviceAugment = Callable[[Batch, jax.Array], tuple[Batch, jax.Array]]


@flax.struct.dataclass
class TrainState:
  """Everything the train step updates: step counter, float32 params, optimizer state."""
  step: jax.Array
  params: Any
  opt_state: Any


def state_from_params(params: Any, tx: optax.GradientTransformation) -> TrainState:
  """A step-0 train state around `params` (call under jit)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_train_state(task: Task, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """ShapeDtypeStructs (with their shardings) of the train state; nothing is materialized."""
  abstract = jax.eval_shape(lambda params: state_from_params(params, tx), task.param_shapes())
  shardings = mesh_lib.tree_shardings(mesh, abstract)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def abstract_state_of(config: Any) -> TrainState:
  """The train state's shapes for a config (what a checkpoint of a run of that config holds)."""
  from cav_mae_jax import tasks  # pylint: disable=g-import-not-at-top
  task = tasks.get_task(config)
  _, tx = optim.for_task(config, task, steps_per_epoch=1, total_steps=1)
  return jax.eval_shape(lambda params: state_from_params(params, tx), task.param_shapes())


def shardings_of(abstract: Any) -> Any:
  """The shardings of an abstract (or concrete) pytree."""
  return jax.tree.map(lambda x: x.sharding, abstract)


def create_train_state(task: Task, tx: optax.GradientTransformation, mesh: Mesh,
                       rng: jax.Array, params: Any = None) -> tuple[TrainState, TrainState]:
  """The step-0 state born sharded over `mesh`; returns (state, its shardings).

  The parameters are initialized from `rng`, or taken from `params` (sharded already, e.g.
  loaded by `config.init`).
  """
  shardings = shardings_of(abstract_train_state(task, tx, mesh))
  if params is None:
    init = lambda rng: state_from_params(task.init_params(rng), tx)
    state = jax.jit(init, in_shardings=mesh_lib.replicated(mesh), out_shardings=shardings)(rng)
  else:
    state = jax.jit(lambda p: state_from_params(p, tx), in_shardings=(shardings.params,),
                    out_shardings=shardings)(params)
  return state, shardings


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, shardings: TrainState, *,
                    device_augment: DeviceAugment | None = None
                    ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
  """The jit train step `(state, batch, rng) -> (state, metrics)`; `state` is donated.

  The step's randomness is `fold_in(rng, step)`; `device_augment` (e.g. the noise + time roll of
  `config.data.noise_on_device`) takes its share first, the task's loss gets the rest.
  """

  batch_sharding = mesh_lib.batch_sharding(mesh)

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    # The named scopes only label the compiled ops (profiles: train/profile.py).
    rng = jax.random.fold_in(rng, state.step)
    if device_augment is not None:
      with jax.named_scope("device_augment"):
        batch, rng = device_augment(batch, rng)
    with models.batch_split_over(batch_sharding):
      grads, metrics = jax.grad(task.loss_fn, has_aux=True)(state.params, batch, rng)
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    with jax.named_scope("metrics"):
      metrics["grad_norm"] = optim.trainable_global_norm(grads, task.trainable)
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  replicated = mesh_lib.replicated(mesh)
  return jax.jit(
      train_step,
      in_shardings=(shardings, batch_sharding, replicated),
      out_shardings=(shardings, replicated),
      donate_argnums=(0,))
