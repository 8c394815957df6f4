"""The target of a conversion: our model's freshly initialized params for a given config."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cav_mae_jax import models


def init_params(model_config: Any, *, finetune: bool, seed: int = 0) -> dict[str, Any]:
  """Returns (as NumPy) the init params of CAVMAE, or CAVMAEFT when finetune=True."""
  config = models.ModelConfig.from_config(model_config)
  model = models.CAVMAEFT(config) if finetune else models.CAVMAE(config)
  audio_spec, image_spec = models.dummy_inputs(config)
  audio = jnp.zeros(audio_spec.shape, audio_spec.dtype)
  image = jnp.zeros(image_spec.shape, image_spec.dtype)
  key = jax.random.key(seed)
  rngs = {"params": jax.random.fold_in(key, 0), "mask": jax.random.fold_in(key, 1)}
  params = jax.jit(lambda a, v: model.init(rngs, a, v)["params"])(audio, image)
  return jax.tree_util.tree_map(np.asarray, params)
