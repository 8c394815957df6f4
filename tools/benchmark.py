r"""Throughput of the train step (in-memory batches, no TensorFlow) and of the input pipeline.

  python tools/benchmark.py --config configs/pretrain.py:base            # JAX train step
  python tools/benchmark.py --config configs/pretrain.py:base --compare-torch
  python tools/benchmark.py --config configs/pretrain.py:base --cost-analysis --batch_size 12
  python tools/benchmark.py --config configs/pretrain.py:base --memory-analysis --batch_size 256 \
      [--config.model.remat=True] [--config.mesh.fsdp=8]
  python tools/benchmark.py --config configs/pretrain.py:base --memory-analysis --batch_size 256 \
      --gpu-target=h200 [--config.model.attention_impl=cudnn]    # no GPU needed
  python tools/benchmark.py --config configs/pretrain.py:base --cost-analysis --batch_size 120 \
      --gpu-target=h200 [--config.model.attention_impl=cudnn]    # roofline model, no GPU
  python tools/benchmark.py --config configs/pretrain.py:base --memory-analysis --batch_size 48 \
      --tpu-target=v5e [--config.mesh.data=8]    # XLA:TPU's plan per chip, no TPU
  python tools/benchmark.py --config configs/pretrain.py:base --profile /tmp/trace
  python tools/benchmark.py --config configs/finetune.py:as2m          # fine-tuning step
  python tools/benchmark.py --config configs/pretrain.py:tiny --input-only \
      --config.data.train_dir=/data/records/train [--samples 2000]

The train-step benchmark reports samples/s, step time, peak device memory and MFU after warm-up
steps (`cav_mae_jax/train/benchmark.py`), for any task: fine-tuning and probing configs get
random one-hot labels; `--compare-torch` (pretraining only) also times the PyTorch reference of
the original trained as the original (fp16 autocast + GradScaler on CUDA) and prints the ratio.
`--profile DIR` then traces a few more steps into DIR (a Perfetto trace, which ui.perfetto.dev
opens) and prints where their device time went: by op category (matmul, attention, elementwise,
gather, ...), by phase (forward, backward, optimizer and the rest) and by model scope
(`cav_mae_jax/train/profile.py`). `--cost-analysis` only compiles the step for one device (no
parameters are materialized; a CPU is enough) and prints XLA's FLOPs per sample against the
analytic model FLOPs. `--memory-analysis` prints what the backward pass keeps from the forward
(autodiff's residuals, per sample and fixed: the same on every backend, and what
`config.model.remat`/`remat_policy` change), then compiles the step over the config's mesh of
all devices and prints XLA's plan of one device's memory: arguments (parameters, optimizer
state, batch), temporaries (activations, workspace) and outputs not written in place. XLA's CPU
plan does not show what remat saves (a 12-layer MLP plans 384 MiB of temporaries with and
without `jax.checkpoint`), so on a CPU host read the first line; on a GPU or TPU the plan is the
compiler's own. `XLA_FLAGS=--xla_force_host_platform_device_count=8` gives a CPU host 8 devices
to plan a mesh of 8 (`--config.mesh.fsdp=8` splits the parameters and optimizer state).
With `--gpu-target=h100|h200` (and JAX's CUDA plugin installed: `pip install -e ".[cuda]"`) the
step is compiled for that GPU on this host, without one, and the GPU compiler's own plan is
printed, with whether it fits the device's memory and what the step needs where XLA had to
rematerialize to fit (`cav_mae_jax/train/gpu_target.py`); a mesh of several GPUs is planned
from `config.mesh` (give both sizes, e.g. `--config.mesh.data=1 --config.mesh.fsdp=8`).
`--cost-analysis --gpu-target=h100|h200` compiles the step for one such GPU here and prints the
roofline model of the compiled program (`cav_mae_jax/train/roofline.py`): FLOPs of its matrix
products and bytes moved per sample, the step's time if every kernel ran at the GPU's peak
FLOP/s or memory bandwidth (a ceiling on samples/s and MFU, not a measurement), and that time by
op category, phase and model scope, as `--profile` prints measured time.
With `--tpu-target=v5e|v5p|v6e` (and JAX's TPU library installed: `pip install -e ".[tpu]"`; it
loads on an x86-64 Linux host without a TPU) the step is compiled for the chips of one host of
that TPU generation (`config.mesh`'s data x fsdp of them: 1, 2, 4 or 8; v5p 1, 2 or 4) and
`--memory-analysis` prints XLA:TPU's plan per chip, which is what the step takes there (XLA:TPU
assigns the chip's memory as it compiles), or the compiler's own sentence on what a step that
does not fit needs; both analyses print XLA:TPU's FLOPs per sample (above the same step's count
on a chip with room to spare where XLA:TPU recomputed part of the forward to fit)
(`cav_mae_jax/train/tpu_target.py`). A compile takes a few minutes on a small host.
`--input-only` times the host input pipeline alone on the training split (records or TFDS, as
config.data names it): read, parse, JPEG decode + resize/crop and the configured augmentation,
batched, in one process, with no model and no device transfer; at least `--samples` clips
(default 2000; steps = samples / batch size, rounded up) after `--warmup` batches. It prints
samples per wall second and per CPU-second of this process (user + system time: the
throughput of one fully used core, which holds on a shared machine too).

`--input-only`, `--cost-analysis` and `--memory-analysis` exclude each other, and a flag the
chosen mode does not read (`--profile` or `--compare-torch` with any of them, `--samples`
without `--input-only`, `--steps` or `--warmup` with an analysis, which runs no step) is
refused with one line, as are `--gpu-target` with `--tpu-target`, `--steps` < 1, `--warmup` < 0,
`--batch_size` or `--samples` < 1: all before anything is compiled or read.
"""

from __future__ import annotations

import math
import os

from absl import flags
from ml_collections import config_flags

from cav_mae_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and arg.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps (default: 20 train steps; input: "
                              "enough batches for --samples).", lower_bound=1)
_SAMPLES = flags.DEFINE_integer("samples", 2000, "--input-only: time at least this many clips.",
                                lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps (--input-only: batches) first; the "
                               "train step is compiled before them.", lower_bound=0)
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default config.data.batch_size).",
                              lower_bound=1)
_COMPARE_TORCH = flags.DEFINE_bool("compare-torch", False, "Also time the torch reference.")
_COST_ANALYSIS = flags.DEFINE_bool("cost-analysis", False,
                                   "Print XLA's FLOPs of the compiled step vs the model FLOPs.")
_MEMORY_ANALYSIS = flags.DEFINE_bool(
    "memory-analysis", False, "Print what the step's backward keeps per sample, then compile the "
    "step over the mesh and print XLA's memory plan per device; nothing runs.")
_INPUT_ONLY = flags.DEFINE_bool("input-only", False, "Time only the tf.data pipeline.")
_PROFILE = flags.DEFINE_string("profile", None, "Also trace a few steps into this folder and "
                               "print where their device time went.")
# (A file there failed the trace only after the whole benchmark had run.)
flags.register_validator(_PROFILE.name, lambda path: path is None or not (
    os.path.exists(path) and not os.path.isdir(path)), message="is a file, not a folder")
_GPU_TARGET = flags.DEFINE_enum(
    "gpu-target", None, ["h100", "h200"], "--memory-analysis or --cost-analysis: compile for this "
    "GPU without one (needs JAX's CUDA plugin) and print the GPU compiler's memory plan, or the "
    "roofline model of the compiled step.")
_TPU_TARGET = flags.DEFINE_enum(
    "tpu-target", None, ["v5e", "v5p", "v6e"], "--memory-analysis or --cost-analysis: compile "
    "for the chips of one TPU host of this generation without one (needs JAX's TPU library) and "
    "print XLA:TPU's memory plan per chip, or its FLOP count.")
flags.mark_flags_as_required(["config"])

# What the tool does: one of these modes, or (none given) the timed train step.
_MODES = (_INPUT_ONLY, _COST_ANALYSIS, _MEMORY_ANALYSIS)
# The flags (besides --config and --batch_size) that each mode reads; None: the timed train step.
_MODE_FLAGS = {None: ("steps", "warmup", "compare-torch", "profile"),
               "input-only": ("steps", "samples", "warmup"),
               "cost-analysis": ("gpu-target", "tpu-target"),
               "memory-analysis": ("gpu-target", "tpu-target")}


def _mode_name(mode: str | None) -> str:
  return "the timed train step (no mode flag)" if mode is None else f"--{mode}"


def check_flags() -> str | None:
  """The mode the flags ask for (None: the timed train step), before any work.

  Raises ValueError naming the flags when two modes are given, or a flag the mode does not
  read (it would be ignored silently: --profile or --compare-torch with an analysis, --samples
  without --input-only, --steps or --warmup where nothing runs). The flags' ranges (--steps >=
  1, --warmup >= 0, --batch_size >= 1, --samples >= 1) are checked as they are parsed.
  """
  modes = [holder.name for holder in _MODES if holder.value]
  if len(modes) > 1:
    raise ValueError(f"{', '.join('--' + m for m in modes)}: give at most one of "
                     f"{', '.join('--' + h.name for h in _MODES)}")
  mode = modes[0] if modes else None
  cli.check_mode_flags(mode, _MODE_FLAGS, _mode_name)
  if _GPU_TARGET.value is not None and _TPU_TARGET.value is not None:
    raise ValueError("--gpu-target, --tpu-target: give at most one")
  return mode


def input_only(config) -> None:
  """Times the input pipeline alone and prints what was measured and the figures."""
  cli.import_tensorflow()
  from cav_mae_jax.data import dataset  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.data import input as input_lib  # pylint: disable=g-import-not-at-top
  if _BATCH.value is not None:
    config = config.copy_and_resolve_references()
    config.data.batch_size = _BATCH.value
  batch = config.data.batch_size
  steps = _STEPS.value if _STEPS.value is not None else math.ceil(_SAMPLES.value / batch)
  data_config = dataset.DataConfig.from_config(config)
  source = dataset.open_split(data_config, "train")
  normalization = dataset.fbank_normalization(data_config)
  ops = (dataset.example_preprocess_spec(data_config, True, source.index.num_classes) + "|" +
         dataset.batch_preprocess_spec(data_config, True, normalization.mean, normalization.std))
  result = input_lib.measure_input(config, steps, warmup_batches=_WARMUP.value)
  print(f"input pipeline alone, training split of {source.description}: {int(result['samples'])} "
        f"clips in {steps} batches of {batch} after {_WARMUP.value} warm-up batches, "
        f"{result['wall_seconds']:.1f} s; per clip: read + parse, {ops}; no model, no device")
  print(f"  {result['samples_per_second']:.0f} samples per wall second (this process, "
        f"{len(os.sched_getaffinity(0))} cores available, {result['cpu_cores_used']:.2f} busy "
        "on average)")
  print(f"  {result['samples_per_cpu_second']:.0f} samples per CPU-second (user + system time "
        "of this process = one fully used core)")


def _remat_description(config) -> str:
  return f"remat {config.model.remat_policy}" if config.model.remat else "no remat"


def _step_description(config, batch_size: int, mesh: dict) -> str:
  return (f"mesh {mesh}, batch {batch_size}, {config.model.dtype}, {_remat_description(config)}, "
          f"attention {config.model.attention_impl}")


def _fits(plan: dict) -> str:
  from cav_mae_jax.train import gpu_target  # pylint: disable=g-import-not-at-top
  if plan["fits_default_fraction"]:
    return "fits"
  if plan["fits"]:
    return (f"fits the device, not JAX's default {gpu_target.JAX_DEFAULT_MEMORY_FRACTION:.0%} of "
            "it (set XLA_PYTHON_CLIENT_MEM_FRACTION, e.g. 0.92)")
  return "does not fit"


def plan_on_gpu_target(config, batch_size: int) -> None:
  """--memory-analysis --gpu-target: XLA's plan of the step compiled for that GPU, here."""
  from cav_mae_jax.train import gpu_target  # pylint: disable=g-import-not-at-top
  target = gpu_target.TARGETS[_GPU_TARGET.value]  # one of them: the flag is an enum
  plan = gpu_target.plan_on_target(config, batch_size, target)
  print(f"XLA's plan of the step compiled for {target.device_kind} ({target.memory_gib:.1f} GiB; "
        f"no GPU here) over {_step_description(config, batch_size, plan['mesh'])}: "
        f"{plan['xla_memory_gib']:.2f} GiB per device = arguments {plan['xla_argument_gib']:.2f} "
        f"+ temporaries {plan['xla_temp_gib']:.2f} + outputs not in place "
        f"{plan['xla_unaliased_output_gib']:.2f}: " + _fits(plan))
  if "unlimited_memory_gib" in plan:
    print(f"  untouched the step needs {plan['unlimited_memory_gib']:.2f} GiB (temporaries "
          f"{plan['unlimited_temp_gib']:.2f}): XLA's compile recomputes part of it to stay "
          "within its own memory limit (about three quarters of the device's), at a cost in "
          "compute; config.model.remat or attention_impl='cudnn' choose what is kept instead")


def roofline_on_gpu_target(config, batch_size: int) -> None:
  """--cost-analysis --gpu-target: the roofline model of the step compiled for that GPU, here."""
  from cav_mae_jax.train import gpu_target  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import profile  # pylint: disable=g-import-not-at-top
  target = gpu_target.TARGETS[_GPU_TARGET.value]
  model = gpu_target.roofline_on_target(config, batch_size, target)
  flops, model_flops = model["gflop_per_sample"], model["model_gflop_per_sample_step"]
  devices = math.prod(model["mesh"].values())
  print(f"train step compiled for {target.device_kind} (no GPU here) over "
        f"{_step_description(config, batch_size, model['mesh'])}: {flops:.1f} GFLOP/sample in "
        f"matrix products vs model {model_flops:.1f} (x{flops / model_flops:.3f}); "
        f"{model['gb_per_sample']:.2f} GB/sample moved by {model['kernels']} kernels"
        + (" per device" if devices > 1 else ""))
  links = (f"; collectives {model['collective_ms']:.1f} ms ({model['collective_bytes'] / 1e9:.2f} "
           f"GB sent per device at {target.interconnect_bandwidth / 1e9:.0f} GB/s)"
           if devices > 1 else "")
  print(f"roofline model (every kernel at the device's peak, {target.memory_bandwidth / 1e12:.2f} "
        f"TB/s, one after another; not a measurement): {model['busy_ms_per_step']:.1f} ms per "
        f"step ({model['compute_bound_ms']:.1f} ms of it bound by compute{links}), "
        f"{model['samples_per_s']:.0f} samples/s, MFU at most {model['mfu_ceiling']:.1%}")
  print(profile.markdown(model, busy_label="modelled"))


def plan_on_tpu_target(config, batch_size: int) -> None:
  """--memory-analysis --tpu-target: XLA:TPU's plan of the step compiled for its chips, here."""
  from cav_mae_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import tpu_target  # pylint: disable=g-import-not-at-top
  target = tpu_target.TARGETS[_TPU_TARGET.value]
  try:
    plan = tpu_target.plan_on_target(config, batch_size, target)
  except tpu_target.DoesNotFit as e:
    chips = mesh_lib.planned_devices(config.mesh)
    print(f"XLA:TPU's compile for {chips} {target.name} chip{'s' if chips > 1 else ''} "
          f"({target.hbm_gib} GiB of HBM each; no TPU here), batch {batch_size}: does not fit: "
          f"{e.compiler_message}")
    return
  print(f"XLA:TPU's plan of the step compiled for {target.name} ({target.device_kind}, "
        f"{target.hbm_gib} GiB of HBM; no TPU here) over "
        f"{_step_description(config, batch_size, plan['mesh'])}: {plan['xla_memory_gib']:.2f} "
        f"GiB per chip = arguments {plan['xla_argument_gib']:.2f} + temporaries "
        f"{plan['xla_temp_gib']:.2f} + outputs not in place "
        f"{plan['xla_unaliased_output_gib']:.2f}: fits (XLA:TPU assigns the chip's memory as it "
        f"compiles); {_tpu_flops(plan)}")


def _tpu_flops(cost: dict) -> str:
  loops = cost["collective_matmul_loops"]
  split = (f" ({loops} products run as collective matmuls, loops whose body XLA:TPU's count takes "
           "once, so the count is below what runs: compare it only with a count on the same "
           "mesh)" if loops else "")
  return (f"XLA:TPU {cost['xla_gflop_per_sample_step']:.1f} GFLOP/sample vs model "
          f"{cost['model_gflop_per_sample_step']:.1f} (x{cost['xla_over_model_flops']:.3f})"
          + split)


def cost_on_tpu_target(config, batch_size: int) -> None:
  """--cost-analysis --tpu-target: XLA:TPU's FLOPs of the step compiled for its chips, here."""
  from cav_mae_jax.train import tpu_target  # pylint: disable=g-import-not-at-top
  target = tpu_target.TARGETS[_TPU_TARGET.value]
  cost = tpu_target.cost_on_target(config, batch_size, target)
  print(f"train step compiled for {target.name} ({target.device_kind}; no TPU here) over "
        f"{_step_description(config, batch_size, cost['mesh'])}: {_tpu_flops(cost)}; "
        f"{cost['gb_per_sample']:.2f} GB/sample accessed")


def main(argv: list[str]) -> None:
  del argv
  mode = check_flags()
  config = _CONFIG.value
  if _GPU_TARGET.value is not None:
    from cav_mae_jax.train import gpu_target  # pylint: disable=g-import-not-at-top
    gpu_target.prepare()  # before anything initializes JAX's backends
  if _TPU_TARGET.value is not None:
    from cav_mae_jax.train import tpu_target  # pylint: disable=g-import-not-at-top
    tpu_target.prepare()  # before anything initializes JAX's backends
  if mode == "input-only":
    input_only(config)
    return
  from cav_mae_jax.train import benchmark  # pylint: disable=g-import-not-at-top
  batch_size = _BATCH.value if _BATCH.value is not None else config.data.batch_size
  if _COMPARE_TORCH.value:
    benchmark.check_torch_comparable(config)  # before the JAX timing, not after it
  if mode == "cost-analysis" and _GPU_TARGET.value is not None:
    roofline_on_gpu_target(config, batch_size)
    return
  if mode == "cost-analysis" and _TPU_TARGET.value is not None:
    cost_on_tpu_target(config, batch_size)
    return
  if mode == "cost-analysis":
    results = benchmark.compiled_step_cost(config, batch_size)
    print(f"compiled train step, batch {batch_size}, {config.model.dtype}: "
          f"XLA {results['xla_gflop_per_sample_step']:.1f} GFLOP/sample vs model "
          f"{results['model_gflop_per_sample_step']:.1f} "
          f"(x{results['xla_over_model_flops']:.3f})")
    return
  if mode == "memory-analysis" and _GPU_TARGET.value is not None:
    plan_on_gpu_target(config, batch_size)
    return
  if mode == "memory-analysis" and _TPU_TARGET.value is not None:
    plan_on_tpu_target(config, batch_size)
    return
  if mode == "memory-analysis":
    saved = benchmark.saved_activations(config)
    memory = benchmark.compiled_step_memory(config, batch_size)
    devices = math.prod(memory["mesh"].values())  # the batch is split over every device
    per_sample, fixed = saved["saved_gib_per_sample"], saved["saved_fixed_gib"]
    print(f"what the backward keeps ({config.model.dtype}, {_remat_description(config)}): "
          f"{per_sample * 1024:.1f} MiB per sample + {fixed * 1024:.1f} MiB fixed = "
          f"{per_sample * batch_size + fixed:.2f} GiB for the batch of {batch_size}" + (
              f", {per_sample * batch_size / devices + fixed:.2f} GiB per device over {devices} "
              "devices" if devices > 1 else ""))
    print(f"XLA's plan of the compiled step on {memory['backend']} over mesh {memory['mesh']}: "
          f"{memory['xla_memory_gib']:.2f} GiB per device = arguments "
          f"{memory['xla_argument_gib']:.2f} + temporaries {memory['xla_temp_gib']:.2f} + outputs "
          f"not in place {memory['xla_unaliased_output_gib']:.2f}")
    return
  steps = _STEPS.value if _STEPS.value is not None else 20
  results = benchmark.benchmark_train_step(config, batch_size, steps, _WARMUP.value,
                                           profile_dir=_PROFILE.value)
  summary = results.pop("jax/profile", None)
  profile_error = results.pop("jax/profile_error", None)
  roofline_error = results.pop("roofline_error", None)
  if "jax/does_not_fit" in results:
    cli.fail(f"--batch_size {batch_size}: the train step does not fit on this device "
             f"({results['jax/does_not_fit']})")
  if _COMPARE_TORCH.value:
    results.update(benchmark.benchmark_torch(config, batch_size, steps, _WARMUP.value))
    if "torch/does_not_fit" in results:
      cli.fail(f"--batch_size {batch_size}: the torch reference's step does not fit on this "
               f"device ({results['torch/does_not_fit']})")
    results["jax_over_torch_samples_per_s"] = (results["jax/samples_per_s"] /
                                               results["torch/samples_per_s"])
  for key, value in results.items():
    print(f"{key:34s} {value:.4g}")
  if roofline_error is not None:
    print(f"roofline model of the compiled step: none ({roofline_error})")
  if summary is not None:
    from cav_mae_jax.train import profile  # pylint: disable=g-import-not-at-top
    print(f"\nwhere the device time of {summary['steps']} traced steps went (trace in "
          f"{_PROFILE.value}):\n{profile.markdown(summary)}")
  if profile_error is not None:
    cli.fail(f"--profile={_PROFILE.value}: no profile ({profile_error})")


if __name__ == "__main__":
  cli.run(main, uses_tensorflow=False)
