"""noise_sweep: each run's final metrics, their mean and spread per placement, paired differences."""

import json

import pytest

from cav_mae_jax import demo
from cav_mae_jax import noise_sweep
from cav_mae_jax.train import metrics as metrics_lib


def _write_run(workdir, a2v, v2a, val_loss, train_loss):
  workdir.mkdir(parents=True)
  evals = {k: 1.0 for k in noise_sweep.REPORTED if k != "loss"}
  evals.update({"retrieval/a2v/r@1": a2v, "retrieval/v2a/r@1": v2a, "val/loss": val_loss})
  records = [{"step": 0, **{k: 0.0 for k in evals}},
             {"step": 300, "train/loss": train_loss},
             {"step": 300, **evals}]
  (workdir / metrics_lib.METRICS_FILE).write_text("\n".join(map(json.dumps, records)) + "\n")


def test_summary_reports_mean_spread_and_paired_differences(tmp_path):
  options = demo.DemoOptions(workdir=str(tmp_path))
  values = {(0, "tfdata"): (15.625, 25.0), (0, "device"): (6.25, 12.5),
            (1, "tfdata"): (9.375, 12.5), (1, "device"): (12.5, 18.75)}
  results = []
  for (seed, placement), (a2v, v2a) in values.items():
    workdir = tmp_path / noise_sweep.SWEEP_DIR / f"seed{seed}_{placement}"
    assert str(workdir) == noise_sweep.run_dir(options, seed, placement)
    _write_run(workdir, a2v, v2a, val_loss=2.0 + seed, train_loss=3.0)
    results.append(noise_sweep.final_metrics(str(workdir), seed, placement))
  assert results[0]["retrieval/a2v/r@1"] == 15.625 and results[0]["loss"] == 3.0
  assert results[0]["step"] == 300

  summary = noise_sweep.summarize(results)
  a2v_line = next(l for l in summary.splitlines() if l.startswith("retrieval/a2v/r@1"))
  assert "12.500 +-  4.419 [9.375, 15.625]" in a2v_line  # tf.data: mean, sample std, range
  assert "9.375 +-  4.419 [6.250, 12.500]" in a2v_line  # device
  assert "retrieval/a2v/r@1    mean -3.125 +- 8.839 over 2 seeds: -9.38, +3.12" in summary


def test_unfinished_run_is_reported(tmp_path):
  (tmp_path / metrics_lib.METRICS_FILE).write_text(json.dumps({"step": 10, "train/loss": 4.0}))
  with pytest.raises(ValueError, match="did the run finish"):
    noise_sweep.final_metrics(str(tmp_path), 0, "device")


def test_demo_config_applies_the_options():
  options = demo.DemoOptions(workdir="/w", steps=7, learning_rate=3e-4)
  config = demo.demo_config(options, "/w/train", "/w/eval")
  assert (config.total_steps, config.optim.learning_rate) == (7, 3e-4)
  assert (config.data.train_dir, config.data.eval_dir) == ("/w/train", "/w/eval")
  assert all(e.every_steps == 7 and e.batch_size == config.data.batch_size
             for e in config.evals.values())


def test_unknown_placement_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="unknown"):
    noise_sweep.run_sweep(demo.DemoOptions(workdir=str(tmp_path)), [0], ["gpu"])
