"""Prints parameter counts per top-level module of a config's model, without materializing weights.

Usage: python tools/model_summary.py --config configs/pretrain.py:base
The last line is `total_params <N>` (all elements, fixed position embeddings included); the line
before it is `trainable_params <N>`, counted as the original does (everything but the fixed
position embeddings).
"""

from absl import flags
from ml_collections import config_flags

from cav_mae_jax import cli
from cav_mae_jax import models

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:base.",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])


def summarize(config) -> list[str]:
  """Lines of the summary for a config with a `model` field."""
  finetune = config.task == "finetune"
  shapes = models.param_shapes(config.model, finetune=finetune)
  mask = models.requires_grad_mask(shapes, config.model)
  lines = [f"model {'CAVMAEFT' if finetune else 'CAVMAE'}"]
  width = max(len(name) for name in shapes)
  for name in sorted(shapes):
    lines.append(f"  {name:<{width}} {models.count_params(shapes[name]):>12,d}")
  lines.append(f"trainable_params {models.count_params(shapes, mask)}")
  lines.append(f"total_params {models.count_params(shapes)}")
  return lines


def main(argv) -> None:
  del argv
  print("\n".join(summarize(_CONFIG.value)))


if __name__ == "__main__":
  cli.run(main, uses_tensorflow=False)
