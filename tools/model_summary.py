"""Prints parameter counts of a config's model by part, without materializing weights.

Usage: python tools/model_summary.py --config configs/pretrain.py:base
Modules are grouped (encoder audio / video / joint, decoder, head) with subtotals, then
`encoder_params`, `decoder_params`, ... The last line is `total_params <N>` (all elements, fixed
position embeddings included); the line before it is `trainable_params <N>`, counted as the
original does (everything but the fixed position embeddings).
"""

from absl import flags
from ml_collections import config_flags

from cav_mae_jax import cli
from cav_mae_jax.models import summary

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Config file, e.g. configs/pretrain.py:base.",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  print("\n".join(summary.summary_lines(config.model,
                                        finetune=config.task in ("finetune", "probe"))))


if __name__ == "__main__":
  cli.run(main, uses_tensorflow=False)
