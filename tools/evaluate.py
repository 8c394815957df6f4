r"""Runs configured evaluators on a checkpoint, without training.

  python tools/evaluate.py --config configs/pretrain.py:base --workdir /ckpt/run1 [--step N] \
      [--evals val,retrieval] --config.data.eval_dir=/data/records/eval
  python tools/evaluate.py --config configs/pretrain.py:base --params ckpt/scale_pp ...

--workdir: a training workdir (checkpoint --step, default the latest; results are also appended
to its metrics.jsonl, named evaluate/<evaluator>/<metric> so that they never continue the run's
own series, and evaluate/<evaluator>@<settings>/<metric> when the evaluator's settings differ
from the run's, e.g. evaluate/val@mode=missingaudioonly/mAP); without --config, the config its
run recorded (configs/workdir.py:<workdir>), to which --config.<path> overrides apply.
--params: a params checkpoint written by tools/convert.py or tools/average.py.
Multi-host: the same command on every host with --distributed (as tools/train.py).
"""

from __future__ import annotations

from absl import flags

from cav_mae_jax import cli

_MODEL = cli.define_model_flags("Training workdir to evaluate.")
_DISTRIBUTED = cli.define_distributed_flags("evaluate alone, on its own devices")
_EVALS = flags.DEFINE_list("evals", None, "Names in config.evals to run (default: all).")
# An empty --evals (or an empty name in it) ran nothing and printed only the step.
flags.register_validator(_EVALS.name, lambda names: names is None or (names and all(names)),
                         message="name evaluators of config.evals, comma-separated (leave "
                         "--evals out to run them all)")


def main(argv: list[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  _DISTRIBUTED.initialize()
  from cav_mae_jax.train import evaluate  # pylint: disable=g-import-not-at-top
  step, results = evaluate.evaluate(_MODEL.config.value, workdir=_MODEL.workdir.value,
                                    step=_MODEL.step.value, params_path=_MODEL.params.value,
                                    names=_EVALS.value)
  if jax.process_index() == 0:
    print(f"step {step}")
    for name, value in results.items():
      print(f"{name:32s} {value:.6g}")


def _input_paths() -> list[tuple[str, str | None]]:
  return [("config.data.eval_dir", _MODEL.config.value.data.eval_dir),
          *cli.model_input_paths(_MODEL)]


if __name__ == "__main__":
  cli.run(main, input_paths=_input_paths)
