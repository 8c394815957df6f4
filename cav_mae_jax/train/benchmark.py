"""Throughput and compiled cost of a task's train step on in-memory batches (no TensorFlow), and
throughput of the PyTorch reference of the original trained the original's way, on the same device.

`setup_train_step` builds the sharded jit train step of a config and the abstract arguments it
is compiled for, so the step can be compiled and costed without materializing any parameter.
`compiled_step_cost` is XLA's FLOP count of that compiled step against the analytic model FLOPs
(`flops`): a large excess means wasted work (an extra forward, dense work on masked tokens).
`compiled_step_memory` is XLA's memory analysis of the step compiled over the config's mesh: the
bytes one device holds for the step's arguments (parameters, optimizer state, batch),
temporaries (activations kept for the backward pass, workspace) and outputs not written in place.
`benchmark_train_step` compiles the step ahead of time, times it after warm-up steps and reports
samples/s, step time, peak device memory, MFU (analytic model FLOPs over the chip's dense bf16
peak) and the compiled cost. `benchmark_torch` times the torch reference of the same size and
batch: Adam(betas 0.95/0.999, weight_decay 5e-7) under fp16 autocast with a GradScaler on CUDA
(bf16 autocast on CPU when the config computes in bf16).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import time
import types
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.extend import core as jax_core
import optax
from jax.sharding import Mesh

from cav_mae_jax import errors
from cav_mae_jax import tasks
from cav_mae_jax.train import array_input
from cav_mae_jax.train import device_augment
from cav_mae_jax.train import flops
from cav_mae_jax.train import gpu_target
from cav_mae_jax.train import mesh as mesh_lib
from cav_mae_jax.train import optim
from cav_mae_jax.train import profile
from cav_mae_jax.train import roofline
from cav_mae_jax.train import step as step_lib
from cav_mae_jax.train import validation


PROFILE_STEPS = 3  # steps traced by benchmark_train_step(profile_dir=...)


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """A task's jit train step over a mesh and the abstract (sharded) arguments it compiles for."""
  task: tasks.Task
  mesh: Mesh
  tx: optax.GradientTransformation
  batch_size: int
  train_step: Callable[..., Any]
  abstract_state: step_lib.TrainState
  abstract_batch: dict[str, jax.ShapeDtypeStruct]
  abstract_rng: jax.ShapeDtypeStruct

  def compile(self, compiler_options: dict[str, Any] | None = None) -> jax.stages.Compiled:
    """The step compiled ahead of time for its abstract arguments (nothing is materialized);
    `compiler_options`: XLA options by name, as `jax.stages.Lowered.compile` takes them."""
    return self.train_step.lower(self.abstract_state, self.abstract_batch,
                                 self.abstract_rng).compile(compiler_options)


def setup_train_step(config: ml_collections.ConfigDict, batch_size: int,
                     devices: Sequence[jax.Device] | None = None) -> StepSetup:
  """The train step of `config` (its device augmentation included) at `batch_size` over `devices`.

  Sets `config.data.batch_size` and the evaluators' batch sizes to `batch_size` (the step does
  not read the records, so their directories are not checked).
  """
  devices = list(jax.devices() if devices is None else devices)
  task = _task_at_batch_size(config, batch_size, devices)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  schedule, tx = optim.for_task(config, task, steps_per_epoch=1000, total_steps=100_000)
  abstract_state = step_lib.abstract_train_state(task, tx, mesh)
  train_step = step_lib.make_train_step(
      task, tx, schedule, mesh, step_lib.shardings_of(abstract_state),
      device_augment=device_augment.make_device_augment(config.data))
  abstract_rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=mesh_lib.replicated(mesh))
  return StepSetup(task=task, mesh=mesh, tx=tx, batch_size=batch_size, train_step=train_step,
                   abstract_state=abstract_state,
                   abstract_batch=abstract_batch(task, batch_size,
                                                 mesh_lib.batch_sharding(mesh)),
                   abstract_rng=abstract_rng)


def _task_at_batch_size(config: ml_collections.ConfigDict, batch_size: int,
                        devices: Sequence[jax.Device]) -> tasks.Task:
  """Sets `config`'s data and evaluator batch sizes to `batch_size`, validates it for
  `devices` (the records are not read, so their directories are not checked), and returns
  its task."""
  with config.unlocked():
    config.data.batch_size = batch_size
    for entry in config.evals.values():
      entry.batch_size = batch_size
  validation.validate_config(config, len(devices), jax.process_count(), check_data=False,
                             platforms={device.platform for device in devices})
  return tasks.get_task(config)


def abstract_batch(
    task: tasks.Task, batch_size: int,
    sharding: jax.sharding.Sharding | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes and dtypes of a training batch of `task` (the step's input)."""
  m = task.model_config
  batch = {
      "audio": jax.ShapeDtypeStruct((batch_size, m.audio_length, m.num_mel_bins), jnp.float32,
                                    sharding=sharding),
      "image": jax.ShapeDtypeStruct((batch_size, m.image_size, m.image_size, 3), jnp.float32,
                                    sharding=sharding),
  }
  if task.finetune:  # fine-tuning and probing also read the targets
    batch["label"] = jax.ShapeDtypeStruct((batch_size, m.num_classes), jnp.float32,
                                          sharding=sharding)
  return batch


def saved_activations(config: ml_collections.ConfigDict) -> dict[str, float]:
  """GiB the backward pass keeps from the forward (autodiff's residuals): per sample and fixed.

  The residuals of `jax.vjp` of the task's loss, traced abstractly (nothing is compiled or
  materialized) at two batch sizes: their growth per sample is the activation memory a batch
  costs before any workspace, and the rest (`fixed`: bfloat16 copies of the weights and the
  like) does not grow with the batch. The same on every backend: it is what the program keeps,
  whatever XLA's scheduling; `config.model.remat` and `remat_policy` change it, and the backward
  needs at least this much on top of the parameters and optimizer state.
  """
  group = config.model.get("contrast_group_size", 0) if config.task == "pretrain" else 0
  small = group or 4
  totals = []
  for batch_size in (small, 2 * small):
    run_config = config.copy_and_resolve_references()
    with run_config.unlocked():  # traced for one device: the mesh does not change residuals
      run_config.mesh.data, run_config.mesh.fsdp = 1, 1
    task = _task_at_batch_size(run_config, batch_size, jax.devices()[:1])
    params = task.param_shapes()
    rng = jax.random.PRNGKey(0)
    backward = lambda p, b, task=task, rng=rng: jax.vjp(lambda q: task.loss_fn(q, b, rng)[0], p)[1]
    jaxpr = jax.make_jaxpr(backward)(params, abstract_batch(task, batch_size)).jaxpr
    # Each residual once (the backward may use one array twice), the inputs not counted (the
    # parameters and the batch are kept anyway), constants neither.
    arguments = set(jaxpr.invars)
    residuals = {v for v in jaxpr.outvars if isinstance(v, jax_core.Var) and v not in arguments}
    totals.append(sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in residuals))
  per_sample = (totals[1] - totals[0]) / small
  return {"saved_gib_per_sample": per_sample / 2**30,
          "saved_fixed_gib": (totals[0] - per_sample * small) / 2**30}


def step_cost(compiled: jax.stages.Compiled, setup: StepSetup) -> dict[str, float]:
  """XLA's FLOPs per sample of a compiled step against the task's analytic model FLOPs.

  XLA costs one partition's program; times the devices, replicated work (the optimizer update of
  unsharded parameters) counts once per device: `compiled_step_cost` compiles for one device.
  """
  xla_per_sample = flops.xla_flops(compiled) * setup.mesh.size / setup.batch_size
  return {"xla_gflop_per_sample_step": xla_per_sample / 1e9,
          "model_gflop_per_sample_step": setup.task.step_flops / 1e9,
          "xla_over_model_flops": xla_per_sample / setup.task.step_flops}


def step_roofline(compiled: jax.stages.Compiled) -> dict[str, float]:
  """`roofline_ms`: the roofline model's time of one step of a compiled step on this device
  (`roofline.estimate`), where its peaks are known (the GPUs of `gpu_target.TARGETS`); else
  nothing. Measured step time over it says how near the kernels come to their roofline."""
  peaks = gpu_target.roofline_peaks(jax.devices()[0].device_kind)
  if peaks is None:
    return {}
  try:  # a module the model cannot read must not cost the measurement it accompanies
    return {"roofline_ms": roofline.estimate(compiled.as_text(), peaks)["busy_ms_per_step"]}
  except (ValueError, KeyError, IndexError, AttributeError) as e:
    return {"roofline_error": f"{type(e).__name__}: {e}"}


def compiled_step_cost(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, float]:
  """XLA's cost analysis of `config`'s train step compiled for one device, against the model FLOPs.

  One device, so that no replicated work (the optimizer update) is counted once per device.
  """
  setup = setup_train_step(config, batch_size, jax.devices()[:1])
  return step_cost(setup.compile(), setup)


def step_memory(compiled: jax.stages.Compiled) -> dict[str, float]:
  """XLA's memory analysis of a compiled step: GiB one device holds while it runs.

  `xla_memory_gib` = arguments + temporaries + outputs that do not alias (are not written into)
  a donated argument. It is the compiler's plan for this backend: a GPU's allocator adds
  fragmentation and its own workspace, and another backend fuses and schedules differently, so
  the figure is an estimate of a device's need, checked against the measured peak where a step
  runs (`benchmark_train_step`).
  """
  analysis = compiled.memory_analysis()
  if analysis is None:  # a backend without one: no figures (compiled_step_memory refuses)
    return {}
  gib = 2.0**30
  arguments = analysis.argument_size_in_bytes
  temporaries = analysis.temp_size_in_bytes
  outputs = analysis.output_size_in_bytes - analysis.alias_size_in_bytes
  return {"xla_argument_gib": arguments / gib, "xla_temp_gib": temporaries / gib,
          "xla_unaliased_output_gib": outputs / gib,
          "xla_memory_gib": (arguments + temporaries + outputs) / gib}


def compiled_step_memory(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, Any]:
  """XLA's memory analysis of `config`'s train step compiled over its mesh of all devices.

  Per device: with `config.mesh.fsdp` > 1 the parameters and optimizer state are split over the
  fsdp axis, and the batch over both axes.
  """
  setup = setup_train_step(config, batch_size)
  result: dict[str, Any] = step_memory(setup.compile())
  if not result:
    raise ValueError("XLA's memory analysis of the compiled step is not available on "
                     f"{jax.default_backend()}")
  result["mesh"] = dict(setup.mesh.shape)
  result["backend"] = jax.default_backend()
  return result


def benchmark_train_step(config: ml_collections.ConfigDict, batch_size: int, steps: int,
                         warmup: int, profile_dir: str | None = None) -> dict[str, Any]:
  """Times the sharded jit train step of `config.task` on random in-memory batches.

  With `profile_dir`, then traces `PROFILE_STEPS` more steps there and adds where their device
  time went (`train/profile.py`) as `jax/profile`, or why not as `jax/profile_error`.
  A step that does not fit in the device's memory (XLA's plan of the compiled step over the
  memory the device offers, or an allocation that fails) is not run: `jax/does_not_fit` says
  why, next to the compile time and the compiled cost and memory plan. Raises ValueError for
  `steps` < 1 or `warmup` < 0, before anything is compiled.
  """
  check_steps(steps, warmup)
  setup = setup_train_step(config, batch_size)
  compile_start = time.perf_counter()
  compiled = setup.compile()
  compile_s = time.perf_counter() - compile_start
  compiled_figures = {"jax/compile_s": compile_s, **step_cost(compiled, setup),
                      **step_memory(compiled), **step_roofline(compiled)}
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  if limit and compiled_figures.get("xla_memory_gib", 0.0) * 2**30 > limit:
    return {"jax/does_not_fit": f"XLA plans {compiled_figures['xla_memory_gib']:.1f} GiB per "
                                f"device; the device offers {limit / 2**30:.1f} GiB",
            **compiled_figures}
  try:
    result = _time_compiled_step(setup, compiled, steps, warmup, profile_dir)
  except jax.errors.JaxRuntimeError as e:
    sentence = errors.out_of_memory(e)
    if sentence is None:
      raise
    return {"jax/does_not_fit": "out of device memory: " + sentence[:200], **compiled_figures}
  result.update(compiled_figures)
  return result


def check_steps(steps: int, warmup: int) -> None:
  """Raises ValueError unless `steps` >= 1 (a rate needs a timed step) and `warmup` >= 0."""
  if steps < 1:
    raise ValueError(f"steps={steps}: must be >= 1 (the timed steps)")
  if warmup < 0:
    raise ValueError(f"warmup={warmup}: must be >= 0 (the untimed steps first)")


def _time_compiled_step(setup: StepSetup, compiled: jax.stages.Compiled, steps: int,
                        warmup: int, profile_dir: str | None) -> dict[str, Any]:
  """`benchmark_train_step`'s timing, memory, MFU and profile of a compiled step."""
  model_config, mesh, batch_size = setup.task.model_config, setup.mesh, setup.batch_size
  state, _ = step_lib.create_train_state(setup.task, setup.tx, mesh, jax.random.PRNGKey(0))
  clips = array_input.random_clips(
      batch_size, model_config.audio_length, model_config.num_mel_bins, model_config.image_size,
      num_classes=model_config.num_classes if setup.task.finetune else None)
  batch = mesh_lib.global_batch(clips, mesh)
  rng = jax.device_put(jax.random.PRNGKey(1), mesh_lib.replicated(mesh))

  warmup_start = time.perf_counter()
  metrics = None  # no warm-up step: nothing to wait for but the state
  for _ in range(warmup):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready((state, metrics))
  warmup_s = time.perf_counter() - warmup_start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - start) / steps

  device = jax.devices()[0]
  samples_per_s = batch_size / step_s
  result = {"jax/step_time_s": step_s, "jax/samples_per_s": samples_per_s,
            "jax/warmup_s": warmup_s, "jax/loss": float(metrics["loss"])}
  memory = device.memory_stats() or {}
  if "peak_bytes_in_use" in memory:
    result["jax/peak_memory_gib"] = memory["peak_bytes_in_use"] / 2**30
  mfu = flops.mfu(samples_per_s, setup.task.step_flops, device.device_kind, mesh.size)
  if mfu is not None:
    result["jax/mfu"] = mfu
  if profile_dir is not None:
    def run() -> None:
      nonlocal state, metrics
      state, metrics = compiled(state, batch, rng)
      jax.block_until_ready((state, metrics))
    try:  # the timing above stands even where the profiler fails
      trace, wall_s = profile.trace_steps(run, PROFILE_STEPS, profile_dir)
      result["jax/profile"] = profile.summarize(trace, compiled.as_text(), PROFILE_STEPS, wall_s)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
      result["jax/profile_error"] = f"{type(e).__name__}: {e}"
  print(f"device: {mesh.size} x {device.device_kind}; batch {batch_size}; "
        f"dtype {model_config.dtype}; mesh {dict(mesh.shape)}")
  return result


def load_test_module(name: str) -> types.ModuleType:
  """A module of the repository's tests/ folder (e.g. the PyTorch reference), loaded by path.

  The torch reference and the parity machinery are test code, written from the original's
  description to check parity, so they are not part of the installed package; comparisons with
  torch need the repository checkout. Loading by path (with tests/ on sys.path for their own
  imports) avoids any other `tests` package installed on the machine.
  """
  tests_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__)))), "tests")
  path = os.path.join(tests_dir, f"{name}.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: the tests come with the repository checkout")
  if tests_dir not in sys.path:
    sys.path.insert(0, tests_dir)
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def check_torch_comparable(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError unless `config` trains what the torch reference implements (pretraining)."""
  if config.task != "pretrain":
    raise ValueError(f"config.task={config.task!r}: the torch comparison times the pretraining "
                     "model only (configs/pretrain.py).")


def benchmark_torch(config, batch_size: int, steps: int, warmup: int) -> dict[str, Any]:
  """Times the torch reference trained as the original (Adam, autocast, GradScaler).

  A batch that runs out of GPU memory gives `torch/does_not_fit` instead of timings. Raises
  ValueError for `steps` < 1 or `warmup` < 0, before the model is built.
  """
  check_torch_comparable(config)
  check_steps(steps, warmup)
  import torch  # pylint: disable=g-import-not-at-top
  reference = load_test_module("torch_reference")
  m = config.model
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  model = reference.CAVMAE(
      img_size=m.image_size, audio_length=m.audio_length, patch_size=m.patch_size,
      embed_dim=m.embed_dim, modality_specific_depth=m.modality_specific_depth,
      num_heads=m.num_heads, decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
      decoder_num_heads=m.decoder_num_heads, mlp_ratio=m.mlp_ratio, norm_pix_loss=m.norm_pix_loss,
      depth=m.encoder_depth, num_mel_bins=m.num_mel_bins, temperature=m.temperature).to(device)
  trainables = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.Adam(trainables, config.optim.learning_rate,
                               weight_decay=config.optim.weight_decay,
                               betas=(config.optim.b1, config.optim.b2))
  if device.type == "cuda":
    autocast_dtype, scaler = torch.float16, torch.amp.GradScaler("cuda")
  else:
    autocast_dtype = torch.bfloat16 if m.dtype == "bfloat16" else None
    scaler = None
  generator = torch.Generator().manual_seed(0)
  audio = torch.randn(batch_size, m.audio_length, m.num_mel_bins, generator=generator).to(device)
  images = torch.randn(batch_size, 3, m.image_size, m.image_size, generator=generator).to(device)

  def step():
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
      loss = model(audio, images, m.mask_ratio_a, m.mask_ratio_v, mae_loss_weight=m.lambda_mae,
                   contrast_loss_weight=m.lambda_c, mask_mode=m.mask_mode_a,
                   bidirect_contrast=m.contrast_bidirectional,
                   contrast_group_size=m.contrast_group_size)[0]
    optimizer.zero_grad()
    if scaler is not None:
      scaler.scale(loss).backward()
      scaler.step(optimizer)
      scaler.update()
    else:
      loss.backward()
      optimizer.step()
    return loss

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  try:
    for _ in range(warmup):
      step()
    sync()
    if device.type == "cuda":
      torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
      loss = step()
    sync()
  except torch.cuda.OutOfMemoryError as e:
    return {"torch/does_not_fit": "out of device memory: " + str(e).splitlines()[0][:200]}
  step_s = (time.perf_counter() - start) / steps
  result = {"torch/step_time_s": step_s, "torch/samples_per_s": batch_size / step_s,
            "torch/loss": float(loss.detach())}
  if device.type == "cuda":
    result["torch/peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
  print(f"torch reference on {device}, autocast {autocast_dtype}")
  return result
