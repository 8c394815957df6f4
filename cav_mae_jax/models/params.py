"""The parameters of the model family: one initialization path (`init_params`), their shapes,
counts, and which of them require a gradient or are trained (the original's `requires_grad` and
what its objective reaches)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from cav_mae_jax.models.cav_mae import CAVMAE, CAVMAEFT
from cav_mae_jax.models.config import ModelConfig

FIXED_POS_EMBEDS = ("pos_embed_a", "pos_embed_v", "decoder_pos_embed_a", "decoder_pos_embed_v")


def requires_grad_mask(params: Any, config: Any) -> Any:
  """Pytree of bools: what the original marks `requires_grad` (all but fixed position
  embeddings)."""
  trainable_pos = ModelConfig.from_config(config).trainable_pos_embed

  def requires_grad(path: tuple[Any, ...], _: Any) -> bool:
    return trainable_pos or _key(path[-1]) not in FIXED_POS_EMBEDS

  return jax.tree_util.tree_map_with_path(requires_grad, params)


def trainable_mask(params: Any, config: Any, *, finetune: bool = False) -> Any:
  """Pytree of bools: the parameters the optimizer updates (no update, no weight decay elsewhere).

  A parameter is updated when it requires a gradient (`requires_grad_mask`) and the configured
  objective reaches it: for pretraining the streams its losses use, for fine-tuning those of
  `config.ft_mode`. torch's Adam skips parameters whose gradient is None, so the original never
  moves, e.g., the unused `norm1_a`/`norm1_v` of modality-specific blocks, or `norm_a`/`norm_v`
  when lambda_c = 0; a zero gradient here would still let the coupled L2 term move them.
  """
  cfg = ModelConfig.from_config(config)
  inputs, streams = _used_inputs_and_streams(cfg, finetune)
  requires_grad = requires_grad_mask(params, cfg)

  def used(path: tuple[Any, ...], _: Any) -> bool:
    names = [_key(k) for k in path]
    top = names[0]
    branch = _branch_of(top)
    if branch is not None and branch not in inputs:
      return False
    if top.startswith("decoder") or top == "mask_token":
      if finetune or not cfg.has_decoder:
        return False
      if not top.startswith("decoder_blocks_"):
        return True
    if top.startswith(("blocks_a_", "blocks_v_", "decoder_blocks_")):
      return not names[1].endswith(("_a", "_v"))  # These blocks only run the first norm pair.
    if top.startswith("blocks_u_"):
      if names[1].startswith("norm"):
        return _NORM_STREAM[names[1][5:]] in streams
      return bool(streams)
    if top in ("norm", "norm_a", "norm_v"):
      return _NORM_STREAM[top[4:]] in streams
    if top == "log_temperature":
      return "a" in streams and not finetune
    return True

  used_mask = jax.tree_util.tree_map_with_path(used, params)
  return jax.tree_util.tree_map(lambda a, b: bool(a and b), requires_grad, used_mask)


_NORM_STREAM = {"": "joint", "_a": "a", "_v": "v"}
_FT_USE = {  # mode -> (inputs, joint-block streams)
    "multimodal": ({"a", "v"}, {"joint"}),
    "audioonly": ({"a"}, {"a"}),
    "videoonly": ({"v"}, {"v"}),
    "missingaudioonly": ({"a"}, {"joint", "a"}),
    "missingvideoonly": ({"v"}, {"joint", "v"}),
}


def _key(entry: Any) -> str:
  return str(getattr(entry, "key", entry))


def _branch_of(top: str) -> str | None:
  """Which input ('a' or 'v') a top-level parameter belongs to, or None if shared."""
  for suffix in ("_a", "_v"):
    if top.endswith(suffix) and top not in ("norm_a", "norm_v"):
      return suffix[1]
  if top.startswith(("blocks_a_", "blocks_v_")):
    return top[7]
  return None


def _used_inputs_and_streams(cfg: ModelConfig, finetune: bool) -> tuple[set[str], set[str]]:
  """(inputs read, joint-block streams run) by the pretraining objective or fine-tuning mode."""
  available = {m for m, on in (("a", cfg.uses_audio), ("v", cfg.uses_video)) if on}
  if finetune:
    inputs, streams = _FT_USE[cfg.ft_mode]
    return inputs & available, streams
  streams = {"joint"} if cfg.has_decoder else set()
  if cfg.has_contrast and cfg.modalities == "audiovisual":
    streams |= {"a", "v"}
  return available, streams


def count_params(params: Any, mask: Any = None) -> int:
  """Number of elements in a params (or shape) pytree, optionally only where mask is True."""
  leaves = jax.tree_util.tree_leaves(params)
  if mask is None:
    return int(sum(np.prod(x.shape) for x in leaves))
  return int(sum(np.prod(x.shape) for x, m in zip(leaves, jax.tree_util.tree_leaves(mask)) if m))


def dummy_inputs(config: Any,
                 batch_size: int = 1) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  """Abstract (audio, image) inputs of the configured shapes, for init / eval_shape.

  Parameters do not depend on the batch: the models skip the contrast-group check while
  initializing, so one clip initializes every recipe.
  """
  cfg = ModelConfig.from_config(config)
  audio = jax.ShapeDtypeStruct((batch_size, cfg.audio_length, cfg.num_mel_bins), np.float32)
  image = jax.ShapeDtypeStruct((batch_size, cfg.image_size, cfg.image_size, 3), np.float32)
  return audio, image


def init_params(config: Any, rng: jax.Array, *, finetune: bool = False) -> Any:
  """Initial float32 parameters of CAVMAE (or CAVMAEFT); call under jit or eval_shape.

  The one initialization path of the project: training, conversion targets and shape queries
  all come here, so the same seed gives the same parameters everywhere.
  """
  cfg = ModelConfig.from_config(config)
  model = CAVMAEFT(cfg) if finetune else CAVMAE(cfg)
  params_rng, mask_rng = jax.random.split(rng)
  audio, image = (jax.numpy.zeros(s.shape, s.dtype) for s in dummy_inputs(cfg))
  return model.init({"params": params_rng, "mask": mask_rng}, audio, image)["params"]


def param_shapes(config: Any, finetune: bool = False) -> Any:
  """Parameter shapes (jax.ShapeDtypeStruct pytree) without materializing any weights.

  Traced once per model config and kind in a process (a base model's trace takes ~1 s, and a
  tool's or trainer's start asks several times); each call returns its own containers."""
  shapes = _traced_param_shapes(ModelConfig.from_config(config), bool(finetune))
  return jax.tree.map(lambda leaf: leaf, shapes)


@functools.lru_cache(maxsize=16)
def _traced_param_shapes(config: ModelConfig, finetune: bool) -> Any:
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0), finetune=finetune))
