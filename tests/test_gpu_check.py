"""tools/gpu_check.sh: the prepared GPU check runs end to end (`--tiny`, CPU, without the packages it
does not need), and its report keeps every row and fails the check when a row fails."""

import json
import os
import subprocess
import sys
from pathlib import Path

from cav_mae_jax.train import gpu_check

import blocked_imports
import xla_flags

ROOT = Path(__file__).resolve().parents[1]


# Packages the check must run without: what the GPU machine's image lacks (TensorFlow, TFDS, clu,
# PyAV, librosa; ml_collections travels as a wheel) and what the image happens to hold but the
# check has no business needing (pytest, PIL). The parity step once imported pytest through
# tests/test_parity.py, which a Python 3.12 environment without pytest showed (2026-12-03).
NOT_NEEDED_BY_THE_CHECK = ("tensorflow", "tensorflow_datasets", "clu", "av", "librosa", "pytest",
                           "PIL")


def test_tiny_check_runs_end_to_end_without_packages_it_does_not_need(tmp_path):
  blocked_imports.blocked_packages(tmp_path / "blocked", NOT_NEEDED_BY_THE_CHECK,
                                   "the GPU check must not need it")
  out = tmp_path / "out"
  env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(tmp_path / "blocked"),
             XLA_FLAGS=xla_flags.xla_flags())  # one CPU device: faster compiles
  done = subprocess.run(["bash", "tools/gpu_check.sh", "--tiny"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
  assert "| " + " | ".join(gpu_check.TABLE_HEADER) + " |" in done.stdout
  assert "| " + " | ".join(gpu_check.TABLE_HEADER) + " |" in (out / "gpu_check.md").read_text()

  report = json.loads((out / "gpu_check.json").read_text())
  assert report["parity"]["result"]["passed"]
  assert report["parity"]["result"]["max_abs_diff_float32"] < 1e-4
  assert "cuDNN attention parity: skipped: needs a GPU" in (out / "gpu_check.md").read_text()
  outcomes = {(r["name"], r["row"]["batch"]): r["outcome"] for r in report["rows"]}
  assert len(outcomes) == len(gpu_check.planned_rows(gpu_check.TINY))
  for name in ("jax bf16 xla", "torch autocast", "jax bf16 xla remat"):
    assert outcomes[(name, 8)]["status"] == "ok", outcomes[(name, 8)]
  # XLA's count over the model FLOPs: 1.116 for the plain step (the elementwise work of this
  # tiny bf16 step with the noise on the device), 1.22 keeping the projections (recomputed
  # attention), 1.35 for full remat (jax 0.10.2). The bound leaves XLA's elementwise accounting
  # room to move between versions; any recomputation stays above it, and the order holds.
  jax_row = outcomes[("jax bf16 xla", 8)]["result"]
  assert jax_row["jax/samples_per_s"] > 0 and 1.0 < jax_row["xla_over_model_flops"] < 1.16
  full_remat = outcomes[("jax bf16 xla remat", 8)]["result"]["xla_over_model_flops"]
  dots_remat = outcomes[("jax bf16 xla remat dots_with_no_batch_dims_saveable", 8)]
  assert dots_remat["status"] == "ok"
  assert 1.16 < dots_remat["result"]["xla_over_model_flops"] < full_remat
  attention_remat = outcomes[("jax bf16 xla remat attention_only", 8)]
  assert attention_remat["status"] == "ok"
  assert (jax_row["xla_over_model_flops"] < attention_remat["result"]["xla_over_model_flops"]
          < dots_remat["result"]["xla_over_model_flops"])
  assert all(o["result"]["xla_memory_gib"] > 0 for (name, _), o in outcomes.items()
             if name.startswith("jax") and o["status"] == "ok")
  assert outcomes[("torch autocast", 8)]["result"]["torch/samples_per_s"] > 0
  assert outcomes[("jax bf16 cudnn", 8)]["status"] == "skipped"  # needs a GPU
  # The default step at the largest batch also says where its time went.
  profiled = jax_row["jax/profile"]
  assert profiled["busy_ms_per_step"] > 0 and profiled["categories"]["matmul"] > 0
  assert {"forward", "backward"} <= set(profiled["phases"])
  assert "## Where the time goes: jax bf16 xla, batch 8" in (out / "gpu_check.md").read_text()
  assert not any("jax/profile" in o["result"] for (name, _), o in outcomes.items()
                 if name != "jax bf16 xla")


def test_full_plan_measures_the_paper_batches_first():
  rows = gpu_check.planned_rows(gpu_check.FULL)
  first = [(r.framework, r.batch, r.group, r.attention, r.remat) for r in rows[:6]]
  assert first == [("jax", 48, 12, "xla", False), ("jax", 120, 30, "xla", False),
                   ("jax", 256, 64, "xla", False), ("torch", 48, 12, "xla", False),
                   ("torch", 120, 30, "xla", False), ("torch", 256, 64, "xla", False)]
  variants = {(r.attention, r.remat, r.batch) for r in rows[6:]}
  assert {("cudnn", False, 256), ("xla", True, 256), ("cudnn", False, 48),
          ("cudnn", True, 256)} <= variants
  assert rows[-1].name == "jax bf16 xla remat dots_with_no_batch_dims_saveable"
  assert rows[-2].name == "jax bf16 xla remat attention_only" and rows[-2].batch == 256


def _passing_env_or_parity(args, device):
  """A stand-in for the `env` and `parity` subprocesses on a GPU where parity passed."""
  if args[0] == "env":
    return gpu_check.Outcome("ok", {"backend": "gpu", "device": device})
  return gpu_check.Outcome("ok", {"torch_device": "cuda", "max_abs_diff_float32": 2e-5,
                                  "worst_float32": "pretrain/latent",
                                  "max_relative_diff_bf16_losses": 3e-3,
                                  "float32_tolerance": 1e-4, "bf16_relative_tolerance": 1e-2,
                                  "cudnn_attention": {"status": "ok",
                                                      "max_relative_diff_bf16_losses": 4e-3,
                                                      "grads_relative_l2": 1.2e-2,
                                                      "grads_relative_tolerance": 5e-2},
                                  "passed": True, "failures": {}})


def test_a_failed_row_fails_the_check_and_stays_in_the_report(tmp_path, monkeypatch, capsys):
  def fake_subprocess(args, timeout_s, env):
    del timeout_s, env
    if args[0] != "row":
      return _passing_env_or_parity(args, "NVIDIA H200")
    row = json.loads(args[2])
    if row["attention"] == "cudnn":
      return gpu_check.Outcome("error", detail="Traceback ...\nRuntimeError: cuDNN rejected it")
    key = f"{row['framework']}/samples_per_s"
    result = {key: 100.0 if row["framework"] == "jax" else 40.0, f"{row['framework']}/step_time_s": 0.5}
    if row["framework"] == "jax":
      result.update({"jax/compile_s": 30.0, "jax/mfu": 0.4, "xla_gflop_per_sample_step": 238.7,
                     "roofline_ms": 312.5})
      if row["profile"]:  # the profiler failed; the row's timing stands
        result["jax/profile_error"] = "RuntimeError: no CUPTI"
    return gpu_check.Outcome("ok", result)

  monkeypatch.setattr(gpu_check, "run_subprocess", fake_subprocess)
  assert gpu_check.run_check(gpu_check.TINY, str(tmp_path)) == 1
  report = (tmp_path / "gpu_check.md").read_text()
  assert "error: RuntimeError: cuDNN rejected it" in report
  assert ("cuDNN attention, bf16 losses max relative diff 4.00e-03 (same tolerance); parameter "
          "gradients 1.20e-02 from XLA attention's (relative L2, tolerance 0.05)") in report
  assert "profile of jax bf16 xla, batch 8: RuntimeError: no CUPTI" in report
  assert "| jax bf16 xla | 8 | 2 | 100.0 | 500.0 | 40.0 | - | - | 238.7 | 312.5 | 2.50 |" in report
  assert "2 row(s) failed: jax bf16 cudnn, jax bf16 cudnn remat" in capsys.readouterr().out


def test_a_step_too_big_for_the_device_is_reported_and_the_largest_that_ran_is_profiled(
    tmp_path, monkeypatch, capsys):
  """Base at batch 256 keeps 175 GiB of activations without remat: more than one GPU has. That
  row says so (not a failure), and the default step at the largest batch that ran is profiled."""
  runs = []

  def fake_subprocess(args, timeout_s, env):
    del timeout_s
    if args[0] != "row":
      return _passing_env_or_parity(args, "NVIDIA H100")
    row = gpu_check.Row(**json.loads(args[2]))
    runs.append(row)
    if row.framework == "jax":
      assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.92"
    if row.batch == 256 and not row.remat and row.attention == "xla":
      result = {f"{row.framework}/does_not_fit": "XLA plans 176.2 GiB per device; the device "
                "offers 73.2 GiB", "xla_memory_gib": 176.2}
    else:
      result = {f"{row.framework}/samples_per_s": 100.0, f"{row.framework}/step_time_s": 0.5,
                "jax/compile_s": 30.0}
      if row.profile:
        result["jax/profile_error"] = "RuntimeError: no CUPTI"
    return gpu_check.outcome_of(result, 1.0)

  monkeypatch.setattr(gpu_check, "run_subprocess", fake_subprocess)
  assert gpu_check.run_check(gpu_check.FULL, str(tmp_path)) == 0
  report = (tmp_path / "gpu_check.md").read_text()
  assert ("| jax bf16 xla | 256 | 64 | - | - | - | - | 176.2 | - | - | - | does not fit: XLA plans "
          "176.2 GiB per device; the device offers 73.2 GiB |") in report
  assert runs[-1] == gpu_check.Row("jax", 120, 30, profile=True)
  assert "profile of jax bf16 xla, batch 120: RuntimeError: no CUPTI" in report
  assert "0 row(s) failed" in capsys.readouterr().out


def test_does_not_fit_results_are_their_own_outcome():
  assert gpu_check.outcome_of({"jax/samples_per_s": 3.0}, 1.0).status == "ok"
  outcome = gpu_check.outcome_of({"torch/does_not_fit": "out of device memory: CUDA"}, 1.0)
  assert (outcome.status, outcome.detail) == (gpu_check.TOO_BIG, "out of device memory: CUDA")


def test_bad_flags_and_an_out_that_cannot_be_made_are_one_error_line(tmp_path):
  # Answered before any row runs (a check on the GPU machine is minutes of its device time).
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  for args, expected in ((["--bogus"], "error: unrecognized arguments: --bogus"),
                         (["--budget-s", "abc"], "error: argument --budget-s: invalid float value"),
                         (["--out", str(blocker / "out")], f"error: --out {blocker / 'out'}: cannot "
                          "make this directory"),
                         (["--out="], "error: argument --out: must not be empty (a path)")):
    done = subprocess.run([sys.executable, "-m", "cav_mae_jax.train.gpu_check", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and done.stdout == "", (args, done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(expected), (args, done.stderr)


def _fake_wheel(directory: Path, name: str, source: str) -> None:
  """A pure-Python wheel of package `name` whose __init__ is `source`."""
  import zipfile  # pylint: disable=import-outside-toplevel
  info = f"{name}-1.1.0.dist-info"
  directory.mkdir(parents=True)
  with zipfile.ZipFile(directory / f"{name}-1.1.0-py3-none-any.whl", "w") as wheel:
    wheel.writestr(f"{name}/__init__.py", source)
    wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.1.0\n")
    wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: "
                   "true\nTag: py3-none-any\n")
    wheel.writestr(f"{info}/RECORD", "")


def test_wheels_that_do_not_import_are_one_error_line(tmp_path):
  # The device machine has no ml_collections; the check installs it from .whl/. Where what it
  # imports is missing too (absl-py, on the device machine), one line says so, no traceback.
  (tmp_path / "tools").mkdir()
  (tmp_path / "tools" / "gpu_check.sh").write_text((ROOT / "tools" / "gpu_check.sh").read_text())
  _fake_wheel(tmp_path / ".whl", "ml_collections", "import absl_not_on_this_machine\n")
  # The environment's own, out of sight.
  blocked_imports.blocked_packages(tmp_path / "hidden", ["ml_collections"], "not on this machine")
  env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(tmp_path),
             PYTHONPATH=str(tmp_path / "hidden"))
  done = subprocess.run(["bash", "tools/gpu_check.sh", "--tiny"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 2, done.stdout + done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ml_collections from .whl/ does not "
                                                 "import ("), done.stderr
  assert "absl_not_on_this_machine" in lines[0] and "Traceback" not in done.stderr
