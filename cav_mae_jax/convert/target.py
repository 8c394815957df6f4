"""The target of a conversion: our model's freshly initialized params for a given config."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from cav_mae_jax import models, seeds


def param_shapes(model_config: Any, *, finetune: bool) -> dict[str, Any]:
  """Parameter shapes (jax.ShapeDtypeStruct tree) of the model for this config."""
  return models.param_shapes(model_config, finetune=finetune)


def init_params(model_config: Any, *, finetune: bool, seed: int = 0) -> dict[str, Any]:
  """Returns (as NumPy) the init params of CAVMAE, or CAVMAEFT when finetune=True."""
  seeds.check("seed", seed)
  config = models.ModelConfig.from_config(model_config)
  params = jax.jit(lambda rng: models.init_params(config, rng, finetune=finetune))(
      jax.random.key(seed))
  return jax.tree_util.tree_map(np.asarray, params)
