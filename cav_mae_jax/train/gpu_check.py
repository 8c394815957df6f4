"""The one prepared accelerator check of issue 11: parity on the device, then the train-step table.

`tools/gpu_check.sh` runs it. In order, within a time budget:
  1. the environment (backend, device, versions);
  2. base parity on the device: the float32 JAX model against the float32 PyTorch reference on
     the same device (max abs diff of every output within 1e-4), and the bfloat16 JAX losses
     within 1e-2 relative of the reference (`tests/parity.py`'s `compare_base`), with XLA's
     attention and, on a GPU, with cuDNN's (`compare_bf16_attention`; an attention the GPU
     rejects is reported, not fatal);
  3. the base pretraining train step in bfloat16 at the paper's batches 48, 120 and 256 with
     their contrast groups 12, 30 and 64: samples/s, step time, MFU, peak memory, XLA's FLOPs
     per sample, XLA's memory plan of the step and the roofline model's time of the compiled
     step (`train/roofline.py`: how near the measured step comes to it); the PyTorch
     reference (fp16 autocast + GradScaler, as the original trains) at the same batches and the
     JAX/torch ratio; cuDNN
     attention (`config.model.attention_impl`) and rematerialization (`config.model.remat`)
     against the default, at the largest batch first, then cuDNN at the other batches, then
     remat keeping everything but XLA attention's scores (`config.model.remat_policy=
     'attention_only'`) and keeping the matmul outputs without batch dimensions. A step larger
     than the device's memory (XLA's plan of the compiled step, or a failed allocation) is
     reported as not fitting, not as a failure. The default step at the largest batch also
     traces a few steps with the profiler (or, if it does not fit, the largest default step
     that ran): where its device time goes, by op category, phase and model scope
     (`train/profile.py`), printed under the table.
Results print as a markdown table and, with `--out` (the shell passes $OUT when set), are also
written to gpu_check.md and gpu_check.json there. `--tiny` runs the same sequence with the tiny
model on short inputs, on any backend, in about a minute: the test suite runs it so that the GPU
run cannot fail on a missing file or import.

Each measurement runs in its own subprocess (`python -m cav_mae_jax.train.gpu_check row SPEC`):
its peak device memory is then its own (JAX cannot reset its peak counter), JAX's and torch's
allocators never share the GPU, a failure (an attention the GPU rejects, an out-of-memory) costs
one row rather than the run, and the budget can stop a row that runs long. This orchestrating
process therefore imports neither JAX nor torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from cav_mae_jax import cli
from cav_mae_jax.train import profile

RESULT_PREFIX = "GPU_CHECK_RESULT "
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLOAT32_TOLERANCE = 1e-4  # max abs diff against the reference on the same GPU (issue 11)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one check measures: model preset, batches with their contrast groups, step counts."""
  preset: str
  batches: tuple[int, ...]
  groups: tuple[int, ...]
  steps: int
  warmup: int
  budget_s: float
  row_timeout_s: float


# The paper's recipes: base (48), scale+ (120), scale++ (256), contrast groups = batch / 4.
FULL = Plan(preset="base", batches=(48, 120, 256), groups=(12, 30, 64), steps=10, warmup=2,
            budget_s=420.0, row_timeout_s=150.0)
# Tiny model on short inputs, one batch: every kind of row once, in about a minute on a CPU.
TINY = Plan(preset="tiny", batches=(8,), groups=(2,), steps=2, warmup=1, budget_s=600.0,
            row_timeout_s=300.0)


@dataclasses.dataclass(frozen=True)
class Row:
  """One measurement: a framework's train step at one batch, with the JAX model options."""
  framework: str  # 'jax' or 'torch'
  batch: int
  group: int
  attention: str = "xla"
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  profile: bool = False  # also trace a few steps: where the device time goes

  @property
  def name(self) -> str:
    if self.framework == "torch":
      return "torch autocast"
    name = f"jax bf16 {self.attention}" + (" remat" if self.remat else "")
    return name + (f" {self.remat_policy}" if self.remat_policy != "nothing_saveable" else "")


def planned_rows(plan: Plan) -> list[Row]:
  """The rows in the order they run: the main comparison first, then the model options."""
  pairs = list(zip(plan.batches, plan.groups))
  largest = pairs[-1]
  rows = [Row("jax", b, g, profile=(b, g) == largest) for b, g in pairs]
  rows += [Row("torch", b, g) for b, g in pairs]
  rows += [Row("jax", *largest, attention="cudnn"), Row("jax", *largest, remat=True)]
  rows += [Row("jax", b, g, attention="cudnn") for b, g in pairs[:-1]]
  rows.append(Row("jax", *largest, attention="cudnn", remat=True))
  # Keeps everything but XLA attention's scores: base keeps 313 MiB per sample instead of 698
  # for +2% FLOPs. Keeping the projections' and MLPs' outputs keeps 90 MiB for +5%; full remat
  # 19 MiB for +24% (`--memory-analysis`). Without remat, 256 needs 149 GiB: compiled for an
  # H200, XLA recomputes part of the forward on its own to plan 103 GiB (`--gpu-target=h200`).
  rows.append(Row("jax", *largest, remat=True, remat_policy="attention_only"))
  rows.append(Row("jax", *largest, remat=True, remat_policy="dots_with_no_batch_dims_saveable"))
  return rows


def profile_fallback(rows: Sequence[tuple[Row, "Outcome"]]) -> Row | None:
  """The row to profile when the planned profile row did not run (too big for the device, an
  error): the default JAX step at the largest batch that ran; None if profiled or none ran."""
  if any(row.profile and outcome.status == "ok" for row, outcome in rows):
    return None
  ran = [row for row, outcome in rows if outcome.status == "ok" and row.framework == "jax"
         and row == Row("jax", row.batch, row.group)]
  return dataclasses.replace(max(ran, key=lambda row: row.batch), profile=True) if ran else None


# ------------------------------------------------------------------------- subprocess side


def _model_config(preset: str, row: Row) -> Any:
  """The pretraining config of a row: the base recipe, or the tiny model on short inputs."""
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config("base" if preset == "base" else "tiny")
  config.model.contrast_group_size = row.group
  config.model.attention_impl = row.attention
  config.model.remat = row.remat
  config.model.remat_policy = row.remat_policy
  if preset == "tiny":  # the accelerator recipes' numerics and augmentation, at toy sizes
    config.model.audio_length, config.model.image_size = 256, 64
    config.model.dtype = "bfloat16"
    config.data.noise_on_device = True
  return config


def run_row(preset: str, row: Row, steps: int, warmup: int) -> dict[str, Any]:
  """Times one row in this process (`benchmark_train_step` or `benchmark_torch`)."""
  from cav_mae_jax.train import benchmark  # pylint: disable=g-import-not-at-top
  config = _model_config(preset, row)
  if row.framework == "jax":
    with tempfile.TemporaryDirectory(prefix="gpu_check_trace_") as trace_dir:
      return benchmark.benchmark_train_step(config, row.batch, steps, warmup,
                                            profile_dir=trace_dir if row.profile else None)
  return benchmark.benchmark_torch(config, row.batch, steps, warmup)


def run_environment() -> dict[str, Any]:
  """Backend, device and library versions of this machine."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  env = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
         "device_count": jax.device_count(), "jax": jax.__version__, "flax": flax.__version__}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
  except ImportError:
    env["torch"] = None
  return env


def run_parity(preset: str) -> dict[str, Any]:
  """`compare_base` with the torch reference on this machine's accelerator, and its verdict."""
  import torch  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import benchmark  # pylint: disable=g-import-not-at-top
  parity = benchmark.load_test_module("parity")
  parity.exact_float32()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  results = parity.compare_base(device=device, preset=preset)
  cudnn: dict[str, Any] = {"status": "skipped: needs a GPU"}
  if device == "cuda":  # cuDNN attention computes in bfloat16: its losses against the reference
    try:
      cudnn_results = parity.compare_bf16_attention("cudnn", device=device, preset=preset)
      results.update(cudnn_results)
      cudnn = {"status": "ok", "max_relative_diff_bf16_losses": max(
          parity.relative_diff(*entry) for entry in cudnn_results.values())}
      # The backward pass too (the losses would not show a wrong one), against XLA attention's.
      cudnn["grads_relative_l2"] = parity.compare_bf16_attention_grads(
          "cudnn", device=device, preset=preset, **parity.GRAD_CHECK_DEPTHS)
      cudnn["grads_relative_tolerance"] = parity.BF16_GRAD_RELATIVE_TOLERANCE
    except Exception as e:  # pylint: disable=broad-except
      cudnn = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  failures = parity.base_failures(results, FLOAT32_TOLERANCE)
  if cudnn.get("grads_relative_l2", 0.0) > parity.BF16_GRAD_RELATIVE_TOLERANCE:
    failures["pretrain-bf16-cudnn/grads_relative_l2"] = cudnn["grads_relative_l2"]
  float32 = {k: d for k, (d, _) in results.items() if not parity.is_bf16_entry(k)}
  bf16 = {k: parity.relative_diff(*entry) for k, entry in results.items()
          if k.startswith(parity.BF16_PREFIX)}
  return {"torch_device": device, "max_abs_diff_float32": max(float32.values()),
          "worst_float32": max(float32, key=float32.get),
          "max_relative_diff_bf16_losses": max(bf16.values()), "bf16_relative": bf16,
          "cudnn_attention": cudnn, "float32_tolerance": FLOAT32_TOLERANCE,
          "bf16_relative_tolerance": parity.BF16_RELATIVE_TOLERANCE,
          "passed": not failures, "failures": failures, "results": results}


def subprocess_main(argv: Sequence[str]) -> int:
  """`env`, `parity PRESET` or `row PRESET SPEC STEPS WARMUP`: prints one result line."""
  kind = argv[0]
  if kind == "env":
    result = run_environment()
  elif kind == "parity":
    result = run_parity(argv[1])
  elif kind == "row":
    result = run_row(argv[1], Row(**json.loads(argv[2])), int(argv[3]), int(argv[4]))
  else:
    raise ValueError(f"unknown gpu_check subcommand {kind!r}")
  print(RESULT_PREFIX + json.dumps(result), flush=True)
  return 0


# ------------------------------------------------------------------------- orchestration


TOO_BIG = "does not fit"  # the Outcome status of a step larger than the device's memory


@dataclasses.dataclass
class Outcome:
  """What one subprocess gave: its result, or why there is none ('error', 'timeout', 'skipped',
  TOO_BIG)."""
  status: str
  result: dict[str, Any] = dataclasses.field(default_factory=dict)
  detail: str = ""
  seconds: float = 0.0


def run_subprocess(args: Sequence[str], timeout_s: float, env: dict[str, str]) -> Outcome:
  """Runs `python -m cav_mae_jax.train.gpu_check ARGS`; parses its result line."""
  start = time.monotonic()
  command = [sys.executable, "-m", "cav_mae_jax.train.gpu_check", *args]
  try:
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired as e:
    output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
    return Outcome("timeout", detail=f"over {timeout_s:.0f}s; {output[-600:]}",
                   seconds=time.monotonic() - start)
  seconds = time.monotonic() - start
  lines = [l for l in done.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
  if done.returncode or not lines:
    tail = (done.stdout + done.stderr).strip().splitlines()[-30:]
    return Outcome("error", detail="\n".join(tail), seconds=seconds)
  return outcome_of(json.loads(lines[-1][len(RESULT_PREFIX):]), seconds)


def outcome_of(result: dict[str, Any], seconds: float) -> Outcome:
  """A subprocess's result: 'ok', or TOO_BIG where the step did not fit in device memory (a
  measurement too, not a failure: the step needs more memory than the device has)."""
  too_big = [v for k, v in result.items() if k.endswith("/does_not_fit")]
  if too_big:
    return Outcome(TOO_BIG, result, detail=too_big[0], seconds=seconds)
  return Outcome("ok", result, seconds=seconds)


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
  """This environment with the repository first on PYTHONPATH (configs/, cav_mae_jax/)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env.update(extra or {})
  return env


def _fmt(value: Any, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def row_cells(row: Row, outcome: Outcome, torch_rates: dict[int, float], on_gpu: bool) -> list[str]:
  """One table row: measured figures, or the reason there are none."""
  r = outcome.result
  prefix = f"{row.framework}/"
  rate = r.get(prefix + "samples_per_s")
  step_s = r.get(prefix + "step_time_s")
  mfu = r.get("jax/mfu")
  ratio = rate / torch_rates[row.batch] if row.framework == "jax" and rate and torch_rates.get(
      row.batch) else None
  note = outcome.status if outcome.status != "ok" else ""
  if outcome.status == "ok" and row.framework == "jax":
    note = f"compile {r['jax/compile_s']:.0f}s"
    if "roofline_error" in r:
      note += f"; no roofline ({r['roofline_error'][:80].replace('|', '/')})"
  elif outcome.status == "ok":  # benchmark_torch: fp16 + GradScaler on CUDA, else bf16
    note = "fp16 + GradScaler" if on_gpu else "bf16 (no CUDA)"
  if outcome.status in ("error", "timeout"):
    last_line = outcome.detail.splitlines()[-1][:120] if outcome.detail else ""
    note = f"{outcome.status}: {last_line.replace('|', '/')}"
  elif outcome.status == "skipped":
    note = f"skipped: {outcome.detail}"
  elif outcome.status == TOO_BIG:
    note = f"{TOO_BIG}: {outcome.detail.replace('|', '/')}"
  return [row.name, str(row.batch), str(row.group), _fmt(rate, ".1f"),
          _fmt(step_s * 1e3 if step_s else None, ".1f"), _fmt(mfu * 100 if mfu else None, ".1f"),
          _fmt(r.get(prefix + "peak_memory_gib"), ".1f"), _fmt(r.get("xla_memory_gib"), ".1f"),
          _fmt(r.get("xla_gflop_per_sample_step"), ".4g"), _fmt(r.get("roofline_ms"), ".1f"),
          _fmt(ratio, ".2f"), note]


TABLE_HEADER = ["run", "batch", "group", "samples/s", "step ms", "MFU %", "peak GiB",
                "XLA GiB", "XLA GFLOP/sample", "roofline ms", "JAX/torch", "note"]


def markdown_report(plan: Plan, env: Outcome, parity: Outcome,
                    rows: list[tuple[Row, Outcome]], elapsed_s: float) -> str:
  """The markdown summary: environment, parity verdict and the train-step table."""
  e = env.result
  lines = [f"# gpu_check ({plan.preset}) {datetime.date.today().isoformat()}", "",
           f"device: {e.get('device', '?')} x{e.get('device_count', '?')} "
           f"(backend {e.get('backend', '?')}); jax {e.get('jax', '?')}, "
           f"flax {e.get('flax', '?')}, torch {e.get('torch', '?')}; {elapsed_s:.0f}s in all",
           ""]
  if parity.status == "ok":
    p = parity.result
    lines.append(
        f"parity (torch on {p['torch_device']}): float32 max abs diff "
        f"{p['max_abs_diff_float32']:.2e} ({p['worst_float32']}; tolerance "
        f"{p['float32_tolerance']:g}), bf16 losses max relative diff "
        f"{p['max_relative_diff_bf16_losses']:.2e} (tolerance {p['bf16_relative_tolerance']:g}): "
        f"{'PASSED' if p['passed'] else 'FAILED ' + json.dumps(p['failures'])}")
    cudnn = p.get("cudnn_attention", {})
    if cudnn.get("status") == "ok":
      lines.append(f"cuDNN attention, bf16 losses max relative diff "
                   f"{cudnn['max_relative_diff_bf16_losses']:.2e} (same tolerance); parameter "
                   f"gradients {cudnn['grads_relative_l2']:.2e} from XLA attention's (relative "
                   f"L2, tolerance {cudnn['grads_relative_tolerance']:g})")
    elif cudnn:
      lines.append(f"cuDNN attention parity: {cudnn['status']}")
  else:
    lines.append(f"parity: {parity.status}: {parity.detail}")
  lines += ["", "| " + " | ".join(TABLE_HEADER) + " |",
            "|" + "|".join("---" for _ in TABLE_HEADER) + "|"]
  torch_rates = {row.batch: o.result["torch/samples_per_s"] for row, o in rows
                 if row.framework == "torch" and o.status == "ok"}
  for row, outcome in rows:
    on_gpu = e.get("backend") == "gpu"
    lines.append("| " + " | ".join(row_cells(row, outcome, torch_rates, on_gpu)) + " |")
  lines.append("")
  lines.append("MFU: analytic model FLOPs (train/flops.py) over the chip's dense bf16 peak; "
               "peak GiB: the process's peak device memory; XLA GiB: XLA's memory plan of the "
               "compiled step (arguments + temporaries + outputs not in place); XLA GFLOP/sample: "
               "XLA's cost analysis of the compiled step (custom calls such as cuDNN attention "
               "count nothing); roofline ms: the step's time if every kernel of the compiled "
               "step ran at the chip's peak FLOP/s or memory bandwidth (train/roofline.py; step "
               "ms over it: how far the kernels are from their roofline); "
               "JAX/torch: samples/s ratio at the same batch.")
  for row, outcome in rows:
    if "jax/profile" in outcome.result:
      lines += ["", f"## Where the time goes: {row.name}, batch {row.batch}", "",
                profile.markdown(outcome.result["jax/profile"])]
    elif "jax/profile_error" in outcome.result:
      lines += ["", f"profile of {row.name}, batch {row.batch}: "
                f"{outcome.result['jax/profile_error']}"]
  return "\n".join(lines)


MIN_ROW_S = 20.0  # no row starts with less of the time budget left than this

# A JAX row has the GPU to itself: its allocator may take 92% of the memory (JAX's default,
# 75%, would leave a quarter of an H200 unused by the largest batches).
JAX_ROW_ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92"}


def run_row_subprocess(plan: Plan, row: Row, remaining_s: float,
                       shared_env: dict[str, str]) -> Outcome:
  """Runs one row in its own process within the time left; prints its outcome."""
  spec = json.dumps(dataclasses.asdict(row))
  env = subprocess_env(JAX_ROW_ENV) if row.framework == "jax" else shared_env
  outcome = run_subprocess(["row", plan.preset, spec, str(plan.steps), str(plan.warmup)],
                           min(plan.row_timeout_s, remaining_s), env)
  rate = outcome.result.get(f"{row.framework}/samples_per_s")
  print(f"{row.name} batch {row.batch}{' (profiled)' if row.profile else ''}: {outcome.status} "
        f"({outcome.seconds:.0f}s)" + (f" {rate:.1f} samples/s" if rate else f" {outcome.detail}"),
        flush=True)
  return outcome


def run_check(plan: Plan, out_dir: str | None) -> int:
  """Runs the whole check; prints and writes the report; 0 if parity passed and no row failed."""
  start = time.monotonic()
  remaining = lambda: plan.budget_s - (time.monotonic() - start)
  # torch and JAX in one process (parity) must not let JAX take most of the GPU up front.
  shared_env = subprocess_env({"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
  env = run_subprocess(["env"], 120.0, shared_env)
  print(f"environment: {env.status} {json.dumps(env.result) if env.status == 'ok' else env.detail}",
        flush=True)
  parity = run_subprocess(["parity", plan.preset], min(plan.row_timeout_s * 2, remaining()),
                          shared_env)
  print(f"parity: {parity.status} ({parity.seconds:.0f}s) "
        f"{'' if parity.status == 'ok' else parity.detail}", flush=True)
  on_gpu = env.result.get("backend") == "gpu"
  rows: list[tuple[Row, Outcome]] = []
  for row in planned_rows(plan):
    if row.attention == "cudnn" and not on_gpu:
      outcome = Outcome("skipped", detail="cuDNN attention needs a GPU")
    elif remaining() < MIN_ROW_S:
      outcome = Outcome("skipped", detail="time budget spent")
    else:
      outcome = run_row_subprocess(plan, row, remaining(), shared_env)
    rows.append((row, outcome))
  fallback = profile_fallback(rows)
  if fallback is not None and remaining() >= MIN_ROW_S:
    rows.append((fallback, run_row_subprocess(plan, fallback, remaining(), shared_env)))

  elapsed = time.monotonic() - start
  report = markdown_report(plan, env, parity, rows, elapsed)
  print(report, flush=True)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
      f.write(report + "\n")
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
      json.dump({"plan": dataclasses.asdict(plan), "environment": dataclasses.asdict(env),
                 "parity": dataclasses.asdict(parity),
                 "rows": [{"row": dataclasses.asdict(r), "name": r.name,
                           "outcome": dataclasses.asdict(o)} for r, o in rows],
                 "elapsed_s": elapsed}, f, indent=1)
  failed = [r.name for r, o in rows if o.status in ("error", "timeout")]
  passed = parity.status == "ok" and parity.result["passed"] and env.status == "ok"
  print(f"gpu_check: parity {'passed' if passed else 'FAILED'}; "
        f"{len(failed)} row(s) failed{': ' + ', '.join(failed) if failed else ''}", flush=True)
  return 0 if passed and not failed else 1


def main(argv: Sequence[str]) -> int:
  """Command line: the check (`[--tiny] [--out DIR] [--budget-s S]`) or one subprocess step."""
  if argv and argv[0] in ("env", "parity", "row"):
    return subprocess_main(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.error = lambda message: sys.exit(cli.error_line(message))
  parser.add_argument("--tiny", action="store_true", help="tiny model, short inputs, any backend")
  parser.add_argument("--out", type=cli.path_type, default=None,
                      help="write gpu_check.md and gpu_check.json here")
  parser.add_argument("--budget-s", type=float, default=None,
                      help="stop starting rows after this many seconds (default: the plan's)")
  args = parser.parse_args(argv)
  if args.out:  # Made now: an --out that cannot be made is answered before any row runs.
    try:
      os.makedirs(args.out, exist_ok=True)
    except OSError as e:
      return cli.error_line(f"--out {args.out}: cannot make this directory ({e.strerror or e})")
  plan = TINY if args.tiny else FULL
  if args.budget_s is not None:
    plan = dataclasses.replace(plan, budget_s=args.budget_s)
  return run_check(plan, args.out)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
