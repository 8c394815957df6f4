"""Device mesh with `data` and `fsdp` axes, and the shardings of parameters and batches.

Parameters are sharded over `fsdp` (a Linear's kernel along its input features, any other
array along its largest dimension that the `fsdp` size divides; small or indivisible arrays are
replicated) and replicated over `data`. Batches are split along their leading axis over both
axes, so the global batch is spread over every device.
The mesh is process-major along the batch (`process_major`): process p's rows of the global
batch are one contiguous block, after those of processes 0..p-1.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Arrays with fewer elements than this stay replicated: sharding them saves nothing.
MIN_SHARDED_SIZE = 2**12


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """Resolves (data, fsdp) sizes for `num_devices`; one size may be -1 ("all remaining")."""
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f"config.mesh.{axis}={size}: must be a positive size or -1 (all remaining).")
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError("config.mesh.data and config.mesh.fsdp are both -1: at most one may be.")
  if free:
    fixed = int(np.prod([s for a, s in sizes.items() if a not in free]))
    if num_devices % fixed:
      raise ValueError(
          f"config.mesh: {dict(sizes)} cannot cover {num_devices} devices "
          f"({num_devices} is not a multiple of {fixed}).")
    sizes[free[0]] = num_devices // fixed
  if sizes["data"] * sizes["fsdp"] != num_devices:
    raise ValueError(
        f"config.mesh: data={sizes['data']} x fsdp={sizes['fsdp']} = "
        f"{sizes['data'] * sizes['fsdp']} devices, but {num_devices} devices are available.")
  return sizes["data"], sizes["fsdp"]


def planned_devices(mesh_config: ml_collections.ConfigDict) -> int:
  """How many devices a compile for another machine's devices (`gpu_target`, `tpu_target`)
  plans `mesh_config` over: data x fsdp, a size of -1 (all remaining devices) counting as 1
  (give both sizes to plan a mesh of several devices)."""
  return int(max(int(mesh_config.data), 1) * max(int(mesh_config.fsdp), 1))


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp') mesh over `devices` (default: all global devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(process_major(grid), MESH_AXES)


def process_major(grid: np.ndarray) -> np.ndarray:
  """`grid` with its devices reordered, where needed, so that its flattened (data, fsdp) order
  lists each process's devices together, processes in order (within a process, the order kept).

  `jax.make_array_from_process_local_data` puts a process's rows on that process's slices of the
  batch axis, wherever they lie; the host-side code that gathers labels, `valid` masks and clip
  ids per process (`eval.common.global_array`, `eval.clips.global_ids`) lists the gathered rows
  in process order. The two orders agree only on a process-major mesh. The devices' default order
  is process-major on CPU and GPU hosts, but TPU's topology-aware `create_device_mesh` can
  interleave hosts along the batch (hosts of 2x2 chips on a torus), which scored clips against
  other clips' labels and wrote features under other clips' ids.
  """
  flat = grid.reshape(-1)
  owners = [device.process_index for device in flat]
  if owners == sorted(owners):
    return grid
  order = sorted(range(len(flat)), key=lambda i: (owners[i], i))
  return flat[order].reshape(grid.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of batch arrays: leading axis split over ('data', 'fsdp')."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated sharding (scalars, RNG keys, the step counter)."""
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
  """PartitionSpec sharding one `fsdp`-divisible dimension of `shape`, if worthwhile: a 2-D
  array's first (a Linear's kernel [in, out] along `in`), any other array's largest.

  A kernel split along `out`, its largest dimension for the qkv projection [D, 3D], has
  `vit.SplitDense`'s q, k and v slices spanning shards unevenly, and XLA moves them between
  devices (collective permutes, forward and backward): the base step over 8 H100s with fsdp=8
  at batch 256 sent 0.88 GB per device instead of 0.72, its roofline model 16.7 ms against 16.1
  split along `in`. Convolution kernels [h, w, in, out] keep their largest dimension (`out`):
  split along `h`, the patch embedding's gave a different forward on 8 CPU devices (XLA's
  partitioner replicates such a kernel, "involuntary full rematerialization", and the loss of
  tests/test_train_multihost.py came out 2.3382 against 2.3318 on one device)."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
    return P()
  dims = range(len(shape)) if len(shape) == 2 else sorted(range(len(shape)),
                                                          key=lambda d: -shape[d])
  for dim in dims:
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
  """NamedShardings for every array of a (abstract) pytree: fsdp-sharded or replicated."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(getattr(x, "shape", ()), fsdp_size)),
      abstract_tree)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this host's part of the batch into global arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def host_to_global(tree: Any, shardings: Any) -> Any:
  """Host arrays (the same full values on every process) placed as global arrays in `shardings`."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x)[index]),
      tree, shardings)


def process_zero_value(value: bool) -> bool:
  """Process 0's `value` on every process (a collective: every process calls it, and none
  returns before all have)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.int32(value)))
