"""CAV-MAE model family in Flax: pretraining model (all paper variants) and fine-tuning model.

The names below are imported on first use (PEP 562): the configs import
`cav_mae_jax.models.config` (the dataclass of the model's fields), and importing it must not
import JAX and Flax with this package, or every tool would take over a second to answer a
mistyped flag.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module of this package that defines it
_EXPORTS = {
    "CAVMAE": "cav_mae", "CAVMAEFT": "cav_mae", "check_group_size": "cav_mae",
    "check_inputs": "cav_mae",
    "FT_MODES": "config", "MASK_MODES": "config", "ModelConfig": "config",
    "model_config": "config",
    "mask_noise": "masking", "num_kept": "masking",
    "batch_split_over": "vit", "mean_tokens": "vit",
    "FIXED_POS_EMBEDS": "params", "count_params": "params", "dummy_inputs": "params",
    "init_params": "params", "param_shapes": "params", "requires_grad_mask": "params",
    "trainable_mask": "params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  module = _EXPORTS.get(name)
  if module is None:  # a submodule not imported yet: the import system imports it
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
