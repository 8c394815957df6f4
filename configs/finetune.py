"""Fine-tuning model configs: `get_config('tiny' | 'base' | 'base,classes=309')`.

The fine-tuning model (`CAVMAEFT`) takes the pretrained encoder, trainable position embeddings
and a LayerNorm + Linear head. Arg grammar: a preset name, then optional comma-separated
`classes=N` (default 527, AudioSet; VGGSound has 309) and `mode=<ft_mode>`.
"""

import ml_collections

from cav_mae_jax.models.config import model_config


def get_config(arg: str = "base") -> ml_collections.ConfigDict:
  """Returns a locked fine-tuning config."""
  size, *options = [part.strip() for part in (arg or "base").split(",")]
  overrides = {"trainable_pos_embed": True}
  for option in options:
    key, _, value = option.partition("=")
    if key == "classes":
      overrides["num_classes"] = int(value)
    elif key == "mode":
      overrides["ft_mode"] = value
    else:
      raise ValueError(f"configs/finetune.py: unknown option {option!r} in arg {arg!r} "
                       "(expected classes=N or mode=<ft_mode>)")
  config = ml_collections.ConfigDict()
  config.task = "finetune"
  config.model = model_config(size, **overrides)
  config.lock()
  return config
