"""Does where the noise augmentation runs change what the demo model learns? (issue 11, item 4)

The original's noise + time roll runs either in tf.data (`noise_roll`, cav_mae_jax/data/augment.py)
or in the jit train step (`config.data.noise_on_device`, cav_mae_jax/train/device_augment.py).
One demo run each gave held-out R@1 15.6% (tf.data) and 6.25% (device); on 32 held-out clips one
clip is 3.1 points, so a single pair cannot tell a real difference from seed-to-seed variation.
`run_sweep` trains the demo's recipe on the demo's records for several seeds in both placements
(one run at a time, each in its own workdir; a finished run is read back, not retrained) and
`summarize` reports, per placement, the mean, sample standard deviation and range of the held-out
retrieval R@1 in both directions and of the final losses, plus the per-seed paired differences
(same seed: same initialization and data order). `tools/noise_sweep.py` is the command line.

Measured (seeds 0-4, 300 steps, 2 shared CPU cores), mean +- sample std [range] over 5 seeds:
  held-out a2v R@1   tf.data 13.1 +- 4.1 [9.4, 18.8]    device 18.8 +- 10.6 [6.3, 31.3]
  held-out v2a R@1   tf.data 20.6 +- 4.7 [15.6, 25.0]   device 22.5 +-  4.1 [18.8, 28.1]
  held-out loss      tf.data 3.00 +- 0.38               device 3.09 +- 0.32
  held-out loss_c    tf.data 2.00 +- 0.14               device 2.03 +- 0.15
Paired by seed (device - tf.data): a2v R@1 +5.6 +- 10.9, v2a R@1 +1.9 +- 7.5, held-out loss
+0.09 +- 0.36, loss_c +0.03 +- 0.20; the largest, v2a R@5 -8.1 +- 9.0 (lower in 4 of 5 seeds,
paired t -2.0, p about 0.1), points the other way from R@1. No evidence that the device placement
learns worse: the 15.6 vs 6.25 of one demo pair was seed 0, and the seed-to-seed spread (R@1 from
6 to 31 within one placement) dwarfs any placement effect. Both placements draw the same
distributions (tests/test_device_augment.py), from independent RNG streams.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

from cav_mae_jax import demo
from cav_mae_jax.train import metrics as metrics_lib

# placement name -> config.data.noise_on_device
PLACEMENTS = {"tfdata": False, "device": True}
REPORTED = ("retrieval/a2v/r@1", "retrieval/v2a/r@1", "retrieval/a2v/r@5", "retrieval/v2a/r@5",
            "val/loss", "val/loss_mae_a", "val/loss_mae_v", "val/loss_c", "loss")
SWEEP_DIR = "noise_sweep"
RESULTS_FILE = "results.json"


def run_dir(options: demo.DemoOptions, seed: int, placement: str) -> str:
  """The workdir of one run of the sweep."""
  return os.path.join(options.workdir, SWEEP_DIR, f"seed{seed}_{placement}")


def run_sweep(options: demo.DemoOptions, seeds: Sequence[int],
              placements: Sequence[str] = tuple(PLACEMENTS)) -> list[dict[str, Any]]:
  """Trains (or reads back) every (seed, placement) run; returns their final metrics."""
  unknown = sorted(set(placements) - set(PLACEMENTS))
  if unknown:
    raise ValueError(f"noise placements {unknown}: unknown; choose from {sorted(PLACEMENTS)}")
  demo.check_options(options, finetuning=False)  # a bad option is refused before the records
  train_dir, eval_dir = demo.prepare_demo_records(options)
  results = []
  for seed in seeds:
    for placement in placements:
      config = demo.demo_config(options, train_dir, eval_dir)
      config.seed = seed
      config.data.noise_on_device = PLACEMENTS[placement]
      workdir = run_dir(options, seed, placement)
      print(f"seed {seed}, noise in {placement}: {workdir}", flush=True)
      demo.train(config, workdir)
      results.append(final_metrics(workdir, seed, placement))
  with open(os.path.join(options.workdir, SWEEP_DIR, RESULTS_FILE), "w") as f:
    json.dump(results, f, indent=1)
  return results


def final_metrics(workdir: str, seed: int, placement: str) -> dict[str, Any]:
  """A finished run's last logged value of each reported metric (`loss`: the last train window)."""
  latest = metrics_lib.last_scalars(workdir)
  missing = [k for k in REPORTED if k not in latest]
  if missing:
    raise ValueError(f"{workdir}: no {missing} in its metrics; did the run finish?")
  records = metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.METRICS_FILE))
  return {"seed": seed, "placement": placement, "step": max(r["step"] for r in records),
          **{k: float(latest[k]) for k in REPORTED}}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(results: Sequence[dict[str, Any]]) -> str:
  """Per placement: mean +- std [min, max] of each metric; per seed: device minus tf.data."""
  placements = [p for p in PLACEMENTS if any(r["placement"] == p for r in results)]
  lines = [f"{'metric':22s}" + "".join(
      f"{p + ' (n=' + str(sum(r['placement'] == p for r in results)) + ')':>34s}"
      for p in placements)]
  for key in REPORTED:
    cells = []
    for placement in placements:
      values = [r[key] for r in results if r["placement"] == placement]
      mean, std = mean_std(values)
      cells.append(f"{mean:9.3f} +- {std:6.3f} [{min(values):.3f}, {max(values):.3f}]")
    lines.append(f"{key:22s}" + "".join(f"{c:>34s}" for c in cells))
  by_seed: dict[int, dict[str, dict[str, Any]]] = {}
  for r in results:
    by_seed.setdefault(r["seed"], {})[r["placement"]] = r
  paired = {s: runs for s, runs in sorted(by_seed.items()) if set(PLACEMENTS) <= set(runs)}
  if paired:
    lines.append("paired by seed (device - tf.data):")
    for key in ("retrieval/a2v/r@1", "retrieval/v2a/r@1", "retrieval/a2v/r@5", "retrieval/v2a/r@5",
                "val/loss", "val/loss_c"):
      diffs = [runs["device"][key] - runs["tfdata"][key] for runs in paired.values()]
      mean, std = mean_std(diffs)
      lines.append(f"  {key:20s} mean {mean:+.3f} +- {std:.3f} over {len(diffs)} seeds: "
                   + ", ".join(f"{d:+.2f}" for d in diffs))
  return "\n".join(lines)
