r"""The one-command demo: synthetic clips -> records -> tiny CAV-MAE pretraining and fine-tuning.

  python tools/demo.py --workdir /tmp/cav_mae_demo

See `cav_mae_jax/demo.py` for what it does; everything is written under --workdir.
"""

from __future__ import annotations

import os

from absl import flags

from cav_mae_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/cav_mae_demo", "Everything is written here.")
_TRAIN_CLIPS = flags.DEFINE_integer("train_clips", 128, "Synthetic training clips.")
_EVAL_CLIPS = flags.DEFINE_integer("eval_clips", 32, "Held-out clips for evaluation.")
_CLASSES = flags.DEFINE_integer("classes", 8, "Synthetic classes.")
_CLIP_SECONDS = flags.DEFINE_float("clip_seconds", 4.0, "Clip duration (fbanks are padded to "
                                   "1024 frames, as the original does for short clips).")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps.")
_CONFIG_ARG = flags.DEFINE_string("config", "tiny,lambda_c=1.0,cosine",
                                  "Argument of configs/pretrain.py.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Processes writing the synthetic clips.")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 64, "Fine-tuning steps (each of the "
                                       "pretrained and the randomly initialized model).")


def main(argv: list[str]) -> None:
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from cav_mae_jax import demo  # pylint: disable=g-import-not-at-top
  demo.run_demo(demo.DemoOptions(
      workdir=_WORKDIR.value, train_clips=_TRAIN_CLIPS.value, eval_clips=_EVAL_CLIPS.value,
      classes=_CLASSES.value, clip_seconds=_CLIP_SECONDS.value, steps=_STEPS.value,
      config=_CONFIG_ARG.value, learning_rate=_LEARNING_RATE.value, workers=_WORKERS.value,
      finetune_steps=_FINETUNE_STEPS.value))


if __name__ == "__main__":
  cli.run(main)
