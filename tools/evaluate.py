r"""Runs configured evaluators on a checkpoint, without training.

  python tools/evaluate.py --config configs/pretrain.py:base --workdir /ckpt/run1 [--step N] \
      [--evals val,retrieval] --config.data.eval_dir=/data/records/eval
  python tools/evaluate.py --config configs/pretrain.py:base --params ckpt/scale_pp ...

--workdir: a training workdir (checkpoint --step, default the latest; results are also appended
to its metrics.jsonl). --params: a params checkpoint written by tools/convert.py.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from cav_mae_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and arg.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to evaluate.")
_STEP = flags.DEFINE_integer("step", 0, "Checkpoint step of --workdir (0: the latest).")
_PARAMS = flags.DEFINE_string("params", None, "Params checkpoint (tools/convert.py output).")
_EVALS = flags.DEFINE_list("evals", None, "Names in config.evals to run (default: all).")
flags.mark_flags_as_required(["config"])
flags.mark_flags_as_mutual_exclusive(["workdir", "params"], required=True)


def main(argv: list[str]) -> None:
  del argv
  from cav_mae_jax.train import evaluate  # pylint: disable=g-import-not-at-top
  step, results = evaluate.evaluate(_CONFIG.value, workdir=_WORKDIR.value, step=_STEP.value,
                                    params_path=_PARAMS.value, names=_EVALS.value)
  print(f"step {step}")
  for name, value in results.items():
    print(f"{name:32s} {value:.6g}")


if __name__ == "__main__":
  cli.run(main)
