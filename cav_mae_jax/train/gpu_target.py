"""A train step compiled for a GPU that is not here: XLA's deviceless ahead-of-time compile.

With JAX's CUDA plugin installed (`pip install -e ".[cuda]"`), a host without a GPU can compile a
step for an H100 or H200 and read the GPU compiler's own memory plan: what a batch, remat policy
and attention implementation need on that GPU before one is rented
(`tools/benchmark.py --memory-analysis --gpu-target=h200`). The target is described to XLA by a
`GpuTargetConfig` (the device's cores, memory and bandwidth; the cuDNN and CUDA versions of the
installed libraries). XLA's compile keeps to a memory limit derived from the device's memory, as
on the device (about three quarters of it, observed): a step that needs more is rematerialized by
XLA itself where it can (at a cost in compute), so `plan_on_target` compiles once more for a
device of unlimited memory to tell what the step needs untouched.

Two things differ from a compile on the device: XLA cannot autotune without one, so GEMMs go to
cuBLAS instead of the Triton GEMM fusions a GPU may pick, and the allocator's fragmentation is not
in the plan. The plan is XLA's estimate of the device's memory; the measured peak on the device
(`benchmark_train_step`, `tools/gpu_check.sh`) is the figure that counts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Sequence

import jax

from cav_mae_jax.train import mesh as mesh_lib
from cav_mae_jax.train import roofline


# Options for every deviceless compile: Triton GEMM fusions need autotuning on a device.
COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
# The share of a GPU's memory JAX takes by default (XLA_PYTHON_CLIENT_MEM_FRACTION).
JAX_DEFAULT_MEMORY_FRACTION = 0.75
# What the compile uses as the device's memory for the plan without XLA's own rematerialization.
UNLIMITED_MEMORY_BYTES = 2**50


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """What XLA needs to know of a GPU to compile for it (NVIDIA's published figures)."""
  device_kind: str
  memory_bytes: int  # as the driver reports it (nvidia-smi's total)
  memory_bandwidth: float  # bytes/s
  interconnect_bandwidth: float = roofline.NVLINK4_BANDWIDTH
  core_count: int = 132  # SMs
  clock_rate_ghz: float = 1.98
  compute_capability: tuple[int, int] = (9, 0)
  l2_cache_bytes: int = 50 * 2**20

  @property
  def memory_gib(self) -> float:
    return self.memory_bytes / 2**30


TARGETS = {
    "h100": GpuTarget("NVIDIA H100 80GB HBM3", memory_bytes=81_559 * 2**20,
                      memory_bandwidth=3.35e12),
    "h200": GpuTarget("NVIDIA H200", memory_bytes=143_771 * 2**20, memory_bandwidth=4.8e12),
}


def roofline_peaks(device_kind: str) -> Any:
  """The roofline peaks (`roofline.Peaks`) of a GPU of `TARGETS` by its `jax.Device.device_kind`,
  or None for any other device (a CPU, a GPU whose bandwidth is not listed here)."""
  for target in TARGETS.values():
    if target.device_kind == device_kind:
      return roofline.gpu_peaks(device_kind, target.memory_bandwidth,
                                target.interconnect_bandwidth)
  return None


def _installed_versions() -> tuple[tuple[int, int], tuple[int, int]]:
  """(cuDNN, CUDA runtime) (major, minor) of the installed CUDA plugin's libraries; cuDNN 9.0 and
  CUDA 12.0 where the plugin does not say (what JAX's CUDA 12 wheels require at least)."""
  try:
    from jax_cuda12_plugin import _versions  # pylint: disable=g-import-not-at-top
    cudnn, runtime = _versions.cudnn_get_version(), _versions.cuda_runtime_get_version()
  except (ImportError, AttributeError, RuntimeError):
    return (9, 0), (12, 0)
  return (cudnn // 10000, cudnn // 100 % 100), (runtime // 1000, runtime // 10 % 100)


def target_config(target: GpuTarget, memory_bytes: int | None = None) -> str:
  """XLA's GpuTargetConfig (text proto) of `target` with the installed cuDNN and CUDA versions;
  `memory_bytes` replaces the device's memory (the limit XLA compiles to)."""
  (dnn_major, dnn_minor), (cuda_major, cuda_minor) = _installed_versions()
  major, minor = target.compute_capability
  memory = target.memory_bytes if memory_bytes is None else memory_bytes
  return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {target.core_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(target.memory_bandwidth)}
  l2_cache_size: {target.l2_cache_bytes}
  clock_rate_ghz: {target.clock_rate_ghz}
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {dnn_major} minor: {dnn_minor} }}
runtime_version {{ major: {cuda_major} minor: {cuda_minor} }}
device_description_str: "{target.device_kind}"
"""


def prepare() -> None:
  """Lets JAX register its CUDA plugin on a host without a GPU: JAX's own platform stays the CPU,
  so the plugin skips its check of the (absent) device. Call before anything initializes JAX's
  backends. ValueError if the plugin is not installed, or if the backends were initialized
  without it."""
  if importlib.util.find_spec("jax_cuda12_plugin") is None:
    raise ValueError("--gpu-target needs JAX's CUDA plugin (pip install -e \".[cuda]\"; no GPU "
                     "is needed), which is not installed here")
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
    if "cuda" not in xla_bridge.backends():
      raise ValueError("--gpu-target: JAX's backends were initialized before the CUDA plugin "
                       "could be registered; pass it on a fresh process")
    return
  jax.config.update("jax_platforms", "cpu")


def devices(target: GpuTarget, count: int, memory_bytes: int | None = None
            ) -> Sequence[jax.Device]:
  """`count` devices of `target` on one host, to compile for (nothing runs on them)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    config = target_config(target, memory_bytes)
    topology = topologies.get_topology_desc(platform="cuda", target_config=config,
                                            topology=f"1x1x{count}")
  except (ImportError, NotImplementedError, RuntimeError) as e:
    raise ValueError(f"--gpu-target needs JAX's CUDA plugin (pip install -e \".[cuda]\"; no GPU "
                     f"is needed): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                     ) from e
  return topology.devices


def plan_on_target(config: Any, batch_size: int, target: GpuTarget) -> dict[str, Any]:
  """XLA's memory plan of `config`'s train step per device of `target`, compiled for
  `mesh.planned_devices(config.mesh)` of them: the plan at the device's memory (`xla_*`, as
  `benchmark.step_memory`), and, when XLA rematerialized to fit it, the plan without a limit
  (`unlimited_*`). Also `mesh`, the device's `memory_gib`, and whether the plan `fits` in it and
  in JAX's default share of it (`fits_default_fraction`)."""
  from cav_mae_jax.train import benchmark  # pylint: disable=g-import-not-at-top
  count = mesh_lib.planned_devices(config.mesh)
  setup = benchmark.setup_train_step(config, batch_size, devices(target, count))
  result: dict[str, Any] = benchmark.step_memory(setup.compile(COMPILER_OPTIONS))
  result.update(mesh=dict(setup.mesh.shape), memory_gib=target.memory_gib,
                fits=result["xla_memory_gib"] <= target.memory_gib,
                fits_default_fraction=(result["xla_memory_gib"] <=
                                       target.memory_gib * JAX_DEFAULT_MEMORY_FRACTION))
  unlimited_setup = benchmark.setup_train_step(
      config, batch_size, devices(target, count, memory_bytes=UNLIMITED_MEMORY_BYTES))
  unlimited = benchmark.step_memory(unlimited_setup.compile(COMPILER_OPTIONS))
  if unlimited["xla_memory_gib"] > result["xla_memory_gib"] * 1.01:
    result.update({f"unlimited_{k[len('xla_'):]}": v for k, v in unlimited.items()})
  return result


def roofline_on_target(config: Any, batch_size: int, target: GpuTarget) -> dict[str, Any]:
  """The roofline model (`roofline.estimate`) of `config`'s train step compiled for
  `mesh.planned_devices(config.mesh)` devices of `target` (the program of one of them), with the
  `mesh`, the model FLOPs per sample (`model_gflop_per_sample_step`), FLOPs and bytes per sample
  over all devices (`gflop_per_sample`, `gb_per_sample`), the modelled `samples_per_s` and
  `mfu_ceiling`: the MFU the step would reach if every kernel ran at its roofline."""
  from cav_mae_jax.train import benchmark  # pylint: disable=g-import-not-at-top
  count = mesh_lib.planned_devices(config.mesh)
  setup = benchmark.setup_train_step(config, batch_size, devices(target, count))
  peaks = roofline_peaks(target.device_kind)
  result = roofline.estimate(setup.compile(COMPILER_OPTIONS).as_text(), peaks)
  seconds = result["busy_ms_per_step"] / 1e3
  result.update(mesh=dict(setup.mesh.shape),
                model_gflop_per_sample_step=setup.task.step_flops / 1e9,
                gflop_per_sample=result["flops"] * count / batch_size / 1e9,
                gb_per_sample=result["bytes"] * count / batch_size / 1e9,
                samples_per_s=batch_size / seconds,
                mfu_ceiling=(setup.task.step_flops * batch_size / seconds
                             / (peaks.flops["bf16"] * count)))
  return result
