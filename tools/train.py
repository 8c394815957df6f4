r"""Train any task: pretraining (configs/pretrain.py), fine-tuning and linear probing
(configs/finetune.py).

  python tools/train.py --config configs/pretrain.py:base --workdir /ckpt/run1 \
      --config.data.train_dir=/data/as2m --config.data.eval_dir=/data/as_eval

Resumes from the latest checkpoint in --workdir (a changed config that alters parameter or
optimizer shapes is refused, naming the field). Multi-host: run the same command on every host;
with --distributed the processes join through `jax.distributed.initialize` (arguments from the
flags below, or detected from the cluster environment: TPU pods, SLURM, Open MPI, Kubernetes).
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from cav_mae_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and arg.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics go here.")
_DISTRIBUTED = cli.define_distributed_flags("train alone")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  _DISTRIBUTED.initialize()
  from cav_mae_jax.train import trainer  # pylint: disable=g-import-not-at-top
  try:
    summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, raise_on_preemption=True)
  except trainer.Preempted as e:  # not a finished run: a job script must not go on (status 143)
    sys.exit(cli.interrupted_line(cli.Terminated(), f"step {e.step} is saved; the same command "
                                  "resumes from it"))
  if jax.process_index() == 0:
    print(" ".join(f"{k}={v:.5g}" for k, v in sorted(summary.items())))


def _check_config() -> None:
  """The trainer's checks of the config alone, before TensorFlow's import (a bad value is
  answered in about 2 s rather than 7); with --distributed the trainer's, after the processes
  join (JAX's devices must not be initialized before `jax.distributed.initialize`)."""
  if _DISTRIBUTED.distributed.value:
    return
  import jax  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import validation  # pylint: disable=g-import-not-at-top
  validation.validate_config(_CONFIG.value, jax.device_count(), jax.process_count(),
                             check_data=False)


if __name__ == "__main__":
  cli.run(main, input_paths=lambda: [("config.data.train_dir", _CONFIG.value.data.train_dir)],
          check_config=_check_config,
          interrupt_note="the last complete checkpoint is kept; the same command resumes from it")
