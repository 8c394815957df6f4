r"""Seed sweep of the demo with the noise augmentation in tf.data vs in the train step.

  python tools/noise_sweep.py --workdir /tmp/cav_mae_demo --seeds 0,1,2,3,4

Reuses the demo's records in --workdir (when made with the demo's default clip options; else
makes them), trains the demo recipe once per seed and placement under --workdir/noise_sweep/
(finished runs are read back), then prints mean and spread of held-out R@1 and the final losses
per placement (`cav_mae_jax/noise_sweep.py`).
About 10 minutes per run on 2 CPU cores.
"""

from __future__ import annotations

import os

from absl import flags

from cav_mae_jax import cli
from cav_mae_jax import seeds
from cav_mae_jax import noise_sweep  # no JAX: main sets JAX_PLATFORMS before JAX is imported

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/cav_mae_demo", "The demo's workdir (records).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "config.seed of each run.")
_PLACEMENTS = flags.DEFINE_list("placements", ["tfdata", "device"],
                                "Where the noise runs: tfdata and/or device.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps per run (the demo's).")


def _are_seeds(values: list[str]) -> bool:
  """Whether `values` (a list flag's strings) are one or more seeds, each once."""
  try:
    numbers = [int(v) for v in values]
  except ValueError:
    return False
  return bool(numbers) and len(set(numbers)) == len(numbers) and all(map(seeds.valid, numbers))


# (A repeated seed read its run back twice, counted as two in the means and spreads; one out of
# range was refused by the trainer after the runs before it.)
flags.register_validator(_SEEDS.name, _are_seeds,
                         message=f"must be one or more different integers in [0, "
                         f"{seeds.MAX_SEED}], comma-separated (e.g. 0,1,2)")
flags.register_validator(_PLACEMENTS.name,
                         lambda names: bool(names) and set(names) <= set(noise_sweep.PLACEMENTS),
                         message=f"must be one or more of {sorted(noise_sweep.PLACEMENTS)}, "
                         "comma-separated")


def main(argv: list[str]) -> None:
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from cav_mae_jax import demo  # pylint: disable=g-import-not-at-top
  options = demo.DemoOptions(workdir=_WORKDIR.value, steps=_STEPS.value)
  results = noise_sweep.run_sweep(options, [int(s) for s in _SEEDS.value], _PLACEMENTS.value)
  print(noise_sweep.summarize(results))


if __name__ == "__main__":
  cli.run(main)
