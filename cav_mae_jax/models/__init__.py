"""CAV-MAE model family in Flax: pretraining model (all paper variants) and fine-tuning model."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from cav_mae_jax.models.cav_mae import CAVMAE, CAVMAEFT, check_group_size, check_inputs
from cav_mae_jax.models.config import FT_MODES, MASK_MODES, ModelConfig, model_config
from cav_mae_jax.models.masking import mask_noise, num_kept

FIXED_POS_EMBEDS = ("pos_embed_a", "pos_embed_v", "decoder_pos_embed_a", "decoder_pos_embed_v")

__all__ = [
    "CAVMAE", "CAVMAEFT", "ModelConfig", "model_config", "mask_noise", "num_kept", "FT_MODES",
    "MASK_MODES", "check_inputs", "check_group_size", "trainable_mask", "count_params",
    "dummy_inputs", "param_shapes",
]


def trainable_mask(params: Any, config: Any) -> Any:
  """Pytree of bools: False for the fixed sin-cos position embeddings unless trainable_pos_embed."""
  trainable_pos = ModelConfig.from_config(config).trainable_pos_embed

  def is_trainable(path: tuple[Any, ...], _: Any) -> bool:
    name = getattr(path[-1], "key", str(path[-1]))
    return trainable_pos or name not in FIXED_POS_EMBEDS

  return jax.tree_util.tree_map_with_path(is_trainable, params)


def count_params(params: Any, mask: Any = None) -> int:
  """Number of elements in a params (or shape) pytree, optionally only where mask is True."""
  leaves = jax.tree_util.tree_leaves(params)
  if mask is None:
    return int(sum(np.prod(x.shape) for x in leaves))
  return int(sum(np.prod(x.shape) for x, m in zip(leaves, jax.tree_util.tree_leaves(mask)) if m))


def dummy_inputs(config: Any, batch_size: int | None = None) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  """Abstract (audio, image) inputs of the configured shapes, for init / eval_shape.

  The default batch is the smallest the model accepts (one contrastive group, or 1).
  """
  cfg = ModelConfig.from_config(config)
  batch_size = batch_size or cfg.contrast_group_size or 1
  audio = jax.ShapeDtypeStruct((batch_size, cfg.audio_length, cfg.num_mel_bins), np.float32)
  image = jax.ShapeDtypeStruct((batch_size, cfg.image_size, cfg.image_size, 3), np.float32)
  return audio, image


def param_shapes(config: Any, finetune: bool = False) -> Any:
  """Parameter shapes (jax.ShapeDtypeStruct pytree) without materializing any weights."""
  cfg = ModelConfig.from_config(config)
  model = CAVMAEFT(cfg) if finetune else CAVMAE(cfg)
  audio, image = dummy_inputs(cfg)
  rngs = {"params": jax.random.key(0), "mask": jax.random.key(1)}
  return jax.eval_shape(lambda a, v: model.init(rngs, a, v), audio, image)["params"]
