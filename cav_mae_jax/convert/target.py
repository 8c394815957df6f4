"""The target of a conversion: our model's freshly initialized params for a given config."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cav_mae_jax import models


def params_config(model_config: Any) -> models.ModelConfig:
  """The validated config with fields that do not shape parameters reset, so a batch of one inits.

  contrast_group_size (e.g. 12 in the base recipe) only splits the batch in the losses.
  """
  return dataclasses.replace(models.ModelConfig.from_config(model_config), contrast_group_size=0)


def param_shapes(model_config: Any, *, finetune: bool) -> dict[str, Any]:
  """Parameter shapes (jax.ShapeDtypeStruct tree) of the model for this config."""
  return models.param_shapes(params_config(model_config), finetune=finetune)


def init_params(model_config: Any, *, finetune: bool, seed: int = 0) -> dict[str, Any]:
  """Returns (as NumPy) the init params of CAVMAE, or CAVMAEFT when finetune=True."""
  config = params_config(model_config)
  model = models.CAVMAEFT(config) if finetune else models.CAVMAE(config)
  audio_spec, image_spec = models.dummy_inputs(config)
  audio = jnp.zeros(audio_spec.shape, audio_spec.dtype)
  image = jnp.zeros(image_spec.shape, image_spec.dtype)
  key = jax.random.key(seed)
  rngs = {"params": jax.random.fold_in(key, 0), "mask": jax.random.fold_in(key, 1)}
  params = jax.jit(lambda a, v: model.init(rngs, a, v)["params"])(audio, image)
  return jax.tree_util.tree_map(np.asarray, params)
