"""Train state, its sharded initialization, and the jit-compiled train and eval steps.

Parameters and optimizer state stay float32; the model computes in `config.model.dtype`
(bfloat16 on accelerators) and returns float32 losses. Steps take global `jax.Array`s sharded
over the mesh; jit partitions the computation (no pmap, no explicit collectives).
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cav_mae_jax import models
from cav_mae_jax.models.config import ModelConfig
from cav_mae_jax.train import device_augment
from cav_mae_jax.train import mesh as mesh_lib
from cav_mae_jax.train import optim

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LOSS_KEYS = ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc")


@flax.struct.dataclass
class TrainState:
  """Everything the train step updates: step counter, float32 params, optimizer state."""
  step: jax.Array
  params: Any
  opt_state: Any


def init_params(model: nn.Module, model_config: ModelConfig, rng: jax.Array) -> Any:
  """Initial float32 parameters (call under jit or eval_shape)."""
  params_rng, mask_rng = jax.random.split(rng)
  audio, image = (jnp.zeros(s.shape, s.dtype) for s in models.dummy_inputs(model_config))
  return model.init({"params": params_rng, "mask": mask_rng}, audio, image)["params"]


def abstract_params(model: nn.Module, model_config: ModelConfig) -> Any:
  """ShapeDtypeStructs of the parameters; nothing is materialized."""
  return jax.eval_shape(lambda: init_params(model, model_config, jax.random.PRNGKey(0)))


def _init_state_fn(model: nn.Module, model_config: ModelConfig,
                   tx: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
  def init_state(rng):
    params = init_params(model, model_config, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init_state


def abstract_train_state(model: nn.Module, model_config: ModelConfig,
                         tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """ShapeDtypeStructs (with their shardings) of the train state; nothing is materialized."""
  abstract = jax.eval_shape(_init_state_fn(model, model_config, tx), jax.random.PRNGKey(0))
  shardings = state_shardings(abstract, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def create_train_state(model: nn.Module, model_config: ModelConfig,
                       tx: optax.GradientTransformation, mesh: Mesh,
                       rng: jax.Array) -> tuple[TrainState, Any]:
  """Initializes the state born sharded over `mesh`; returns (state, its shardings)."""
  init_state = _init_state_fn(model, model_config, tx)
  shardings = state_shardings(jax.eval_shape(init_state, rng), mesh)
  state = jax.jit(init_state, in_shardings=mesh_lib.replicated(mesh),
                  out_shardings=shardings)(rng)
  return state, shardings


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
  """Parameters and optimizer moments sharded over fsdp; the step counter replicated."""
  return mesh_lib.tree_shardings(mesh, abstract_state)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, trainable: Any, mesh: Mesh,
                    shardings: TrainState, *, audio_noise: bool = False
                    ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
  """The jit train step `(state, batch, rng) -> (state, metrics)`; `state` is donated.

  `audio_noise` applies the noise + time-roll augmentation here, on the device
  (`config.data.noise_on_device`), instead of in the input pipeline.
  """

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    mask_rng = jax.random.fold_in(rng, state.step)
    audio = batch["audio"]
    if audio_noise:
      mask_rng, noise_rng = jax.random.split(mask_rng)
      audio = device_augment.noise_and_roll(audio, noise_rng)

    def loss_fn(params):
      out = model.apply({"params": params}, audio, batch["image"], rngs={"mask": mask_rng})
      return out["loss"], out

    grads, out = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {k: out[k] for k in LOSS_KEYS}
    metrics["grad_norm"] = optim.trainable_global_norm(grads, trainable)
    metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  replicated = mesh_lib.replicated(mesh)
  return jax.jit(
      train_step,
      in_shardings=(shardings, mesh_lib.batch_sharding(mesh), replicated),
      out_shardings=(shardings, replicated),
      donate_argnums=(0,))


def make_eval_step(model: nn.Module, mesh: Mesh, param_shardings: Any
                   ) -> Callable[[Any, Batch, jax.Array], Metrics]:
  """jit `(params, batch, rng) -> losses` of the pretraining objective on one batch."""

  def eval_step(params, batch, rng):
    out = model.apply({"params": params}, batch["audio"], batch["image"], rngs={"mask": rng})
    return {k: out[k] for k in LOSS_KEYS}

  replicated = mesh_lib.replicated(mesh)
  return jax.jit(eval_step, in_shardings=(param_shardings, mesh_lib.batch_sharding(mesh),
                                          replicated), out_shardings=replicated)


def make_features_step(model: nn.Module, mesh: Mesh, param_shardings: Any
                       ) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
  """jit `(params, batch) -> (audio [B, D], video [B, D])`: mean-pooled unmasked features."""

  def features_step(params, batch):
    audio, video = model.apply({"params": params}, batch["audio"], batch["image"],
                               method="features")
    return audio.mean(axis=1), video.mean(axis=1)

  return jax.jit(features_step,
                 in_shardings=(param_shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))
