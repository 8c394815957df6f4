"""A train step compiled for TPU chips that are not here: libtpu's deviceless ahead-of-time compile.

With JAX's TPU library installed (`pip install -e ".[tpu]"`: libtpu, which loads on an x86-64
Linux host without a TPU), a host compiles the step for the chips of one TPU host of a generation
(`TARGETS`) and reads XLA:TPU's own memory plan and FLOP count
(`tools/benchmark.py --memory-analysis --tpu-target=v5e`). XLA:TPU assigns a chip's memory when it
compiles, so its plan is what the step takes on the chip; a step that needs more than the chip
has does not compile, and the compiler's message says what its temporaries need against what the
chip makes available (`plan_on_target` returns it). The compile is libtpu's for that chip; what
is not in it is the runtime's own reserve and anything the host program puts on the chip beside
the step.

The process that compiles keeps JAX's own platform on the CPU (`prepare`), so it never waits for
or claims a TPU, also on a TPU host.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any, Sequence

import jax

from cav_mae_jax import errors
from cav_mae_jax.train import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  """One TPU generation as libtpu names it, and how many of its chips one host holds."""
  name: str  # libtpu's topology prefix ("v5e")
  device_kind: str  # jax.Device.device_kind of a chip
  hbm_gib: int  # HBM per chip, as Google Cloud publishes it
  max_chips_per_host: int
  # The host's chips in libtpu's topology: "AxB" (2D torus) or "AxBxC" (3D).
  dimensions: int = 2

  def topology(self, chips: int) -> tuple[str, list[int]]:
    """(libtpu's topology name, its chips_per_host_bounds) for `chips` chips on one host;
    ValueError for a count one host of this generation does not hold."""
    shapes = {1: (1, 1, 1), 2: (2, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}
    if chips not in shapes or chips > self.max_chips_per_host:
      counts = [n for n in shapes if n <= self.max_chips_per_host]
      raise ValueError(f"--tpu-target={self.name}: the mesh has {chips} devices; one "
                       f"{self.name} host is planned for {', '.join(map(str, counts))} chips "
                       "(config.mesh.data x config.mesh.fsdp)")
    bounds = list(shapes[chips])
    return f"{self.name}:{'x'.join(map(str, bounds[:self.dimensions]))}", bounds


TARGETS = {
    "v5e": TpuTarget("v5e", "TPU v5 lite", hbm_gib=16, max_chips_per_host=8),
    "v5p": TpuTarget("v5p", "TPU v5", hbm_gib=95, max_chips_per_host=4, dimensions=3),
    "v6e": TpuTarget("v6e", "TPU v6 lite", hbm_gib=32, max_chips_per_host=8),
}

# What libtpu reads as it loads. Without the first three a host that is not a Cloud TPU VM asks
# Google's metadata server for its TPU and prints a warning for each answer it lacks (the type
# names no attached TPU: topologies are described by `devices`); without the last a process
# that compiles for a TPU while another does (another tool, a test worker) finds libtpu's
# lockfile taken.
_LIBTPU_ENVIRONMENT = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                       "TPU_ACCELERATOR_TYPE": "v5litepod-1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def prepare() -> None:
  """Readies this process to compile for TPU chips that are not here: JAX computes on the CPU,
  and libtpu loads (when a topology is first asked for) without looking for a TPU. Call before
  anything initializes JAX's backends. ValueError if libtpu is not installed, or if JAX's
  backends were initialized already (then libtpu may have claimed a TPU, or not loaded)."""
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError("--tpu-target needs JAX's TPU library (pip install -e \".[tpu]\"; no TPU "
                     "is needed), which is not installed here")
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
    raise ValueError("--tpu-target: JAX's backends were initialized before libtpu could be "
                     "loaded for a compile only; pass it on a fresh process")
  for name, value in _LIBTPU_ENVIRONMENT.items():
    os.environ.setdefault(name, value)
  jax.config.update("jax_platforms", "cpu")


def devices(target: TpuTarget, count: int) -> Sequence[jax.Device]:
  """`count` chips of `target` on one host, to compile for (nothing runs on them)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  name, bounds = target.topology(count)
  try:
    topology = topologies.get_topology_desc(topology_name=name, platform="tpu",
                                            chips_per_host_bounds=bounds)
  except (ImportError, RuntimeError) as e:  # JaxRuntimeError is a RuntimeError
    raise ValueError(f"--tpu-target={target.name}: libtpu did not describe its topology {name}: "
                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
  if len(topology.devices) != count:  # a chip of two devices (no megacore) is not planned here
    raise ValueError(f"--tpu-target={target.name}: libtpu's topology {name} has "
                     f"{len(topology.devices)} devices for {count} chips")
  return topology.devices


class DoesNotFit(ValueError):
  """The step needs more memory than a chip has: XLA:TPU's compile refused it, saying why
  (`compiler_message`)."""

  def __init__(self, message: str, compiler_message: str):
    super().__init__(message)
    self.compiler_message = compiler_message


def _compile(config: Any, batch_size: int, target: TpuTarget) -> tuple[Any, Any]:
  """(setup, compiled step) of `config` for `mesh.planned_devices(config.mesh)` chips of
  `target`; DoesNotFit with the compiler's message where the step needs more than a chip has."""
  chips = devices(target, mesh_lib.planned_devices(config.mesh))
  from cav_mae_jax.train import benchmark  # pylint: disable=g-import-not-at-top
  setup = benchmark.setup_train_step(config, batch_size, chips)
  try:
    return setup, setup.compile()
  except jax.errors.JaxRuntimeError as e:
    message = errors.out_of_memory(e)
    if message is None:
      raise
    raise DoesNotFit(f"--batch_size {batch_size}: the step does not fit a {target.name} chip "
                     f"({message})", message) from e


# XLA:TPU's collective matmul (SPMD "windowed einsum"): a product over operands split across the
# chips runs as a while loop, one slice per chip, whose condition is named like this.
_COLLECTIVE_MATMUL_LOOP = re.compile(r"\swhile\(.*condition=%?[\w.]*windowed_dot_general")


def collective_matmul_loops(hlo_text: str) -> int:
  """How many of a compiled TPU program's products run as collective matmuls: loops whose body
  XLA's cost analysis counts once, so its FLOPs come out below what the chips compute (the tiny
  step over 8 chips with fsdp=8: x0.987 the model's FLOPs with 24 such loops, x1.151 with them
  turned off; data-parallel, without them, x1.094)."""
  return len(_COLLECTIVE_MATMUL_LOOP.findall(hlo_text))


def _flops(setup: Any, compiled: Any) -> dict[str, Any]:
  """The compiled step's FLOPs against the model's (`benchmark.step_cost`) and the count of its
  `collective_matmul_loops`, which says whether those FLOPs are low."""
  from cav_mae_jax.train import benchmark  # pylint: disable=g-import-not-at-top
  return dict(benchmark.step_cost(compiled, setup),
              collective_matmul_loops=collective_matmul_loops(compiled.as_text()))


def plan_on_target(config: Any, batch_size: int, target: TpuTarget) -> dict[str, Any]:
  """XLA:TPU's memory plan of `config`'s train step per chip of `target`, compiled for
  `mesh.planned_devices(config.mesh)` chips of one host (as `benchmark.step_memory`: `xla_*`),
  with the `mesh`, the chip's `hbm_gib` and the compiled step's FLOPs (as `benchmark.step_cost`:
  where XLA:TPU recomputed part of the forward to fit the chip, they exceed the same step's on a
  chip with room to spare); DoesNotFit where the step needs more than a chip has (its message is
  the compiler's: what the step needs, what the chip makes available). With
  `collective_matmul_loops`, the FLOPs' caveat."""
  from cav_mae_jax.train import benchmark  # pylint: disable=g-import-not-at-top
  setup, compiled = _compile(config, batch_size, target)
  result: dict[str, Any] = benchmark.step_memory(compiled)
  result.update(_flops(setup, compiled), mesh=dict(setup.mesh.shape), hbm_gib=target.hbm_gib)
  return result


def cost_on_target(config: Any, batch_size: int, target: TpuTarget) -> dict[str, Any]:
  """XLA:TPU's cost analysis of `config`'s train step compiled for
  `mesh.planned_devices(config.mesh)` chips of `target`: its FLOPs per sample against the
  model's (as `benchmark.step_cost`), the bytes its program accesses per sample over all chips
  (`gb_per_sample`), the `mesh` and `collective_matmul_loops`; DoesNotFit as `plan_on_target`."""
  setup, compiled = _compile(config, batch_size, target)
  result = _flops(setup, compiled)
  analysis = compiled.cost_analysis() or {}
  result.update(mesh=dict(setup.mesh.shape),
                gb_per_sample=(float(analysis.get("bytes accessed", math.nan)) *
                               setup.mesh.size / batch_size / 1e9))
  return result
