"""Weight averaging: the element-wise mean of several parameter pytrees.

The paper's fine-tuning numbers come from the average of the checkpoints of an epoch range,
not from the last or the best epoch. The original adds the state dicts up in their own float32
and divides by the count, so averaging k copies of one checkpoint need not return it. Here each
leaf is summed in float64, divided once and cast back to its dtype. For float32, bfloat16 and
float16 leaves that makes two promises exact: k copies of a value sum without rounding
(24 + log2 k bits), so k identical trees return that tree bit for bit; and the float64 sum of
two values is exact or off by far less than half a unit of the leaf dtype, so two trees give
their correctly rounded mean. Float64 leaves are averaged in float64 without these promises.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _dtype(leaf: Any) -> np.dtype:
  """The leaf's dtype, without copying a device array to the host."""
  return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


def _first_mismatch(reference: list, other: list) -> str | None:
  """Where a flattened [(path, leaf)] list first differs from the reference one, or None."""
  for (path, leaf), (other_path, other_leaf) in zip(reference, other):
    name = jax.tree_util.keystr(path)
    if path != other_path:
      return f"at {name}: found {jax.tree_util.keystr(other_path)} there"
    if np.shape(leaf) != np.shape(other_leaf) or _dtype(leaf) != _dtype(other_leaf):
      return (f"at {name}: {_dtype(other_leaf)}{list(np.shape(other_leaf))} instead of "
              f"{_dtype(leaf)}{list(np.shape(leaf))}")
  if len(other) < len(reference):
    return f"at {jax.tree_util.keystr(reference[len(other)][0])}: missing"
  if len(other) > len(reference):
    return f"at {jax.tree_util.keystr(other[len(reference)][0])}: extra leaf"
  return None


def average_params(trees: Iterable[PyTree]) -> PyTree:
  """Element-wise mean of float pytrees of one structure, as NumPy leaves of the input dtypes.

  `trees` may be a generator: one tree at a time is held besides the float64 sums, so the
  checkpoints of a long epoch range can be averaged in the memory of two.
  """
  iterator = iter(trees)
  first = next(iterator, None)
  if first is None:
    raise ValueError("average_params needs at least one tree.")
  reference, treedef = jax.tree_util.tree_flatten_with_path(first)
  for path, leaf in reference:
    if not jnp.issubdtype(_dtype(leaf), jnp.floating):
      raise ValueError(f"Cannot average the non-float leaf {jax.tree_util.keystr(path)} "
                       f"({_dtype(leaf)}).")
  # Starting from the first tree, not from zeros, which would turn -0.0 into +0.0.
  totals = [np.array(leaf, np.float64) for _, leaf in reference]
  count = 1
  for index, tree in enumerate(iterator, start=1):
    flat, other_treedef = jax.tree_util.tree_flatten_with_path(tree)
    mismatch = _first_mismatch(reference, flat)
    if mismatch is None and other_treedef != treedef:
      mismatch = f"in its container types ({other_treedef} instead of {treedef})"
    if mismatch is not None:
      raise ValueError(f"Tree {index} does not match tree 0 {mismatch}.")
    for total, (_, leaf) in zip(totals, flat):
      total += np.asarray(leaf, np.float64)
    count += 1
  means = [(total / count).astype(_dtype(leaf)) for total, (_, leaf) in zip(totals, reference)]
  return jax.tree_util.tree_unflatten(treedef, means)


def average_workdir(workdir: str, first_epoch: int, last_epoch: int) -> tuple[PyTree, list[int]]:
  """(mean params, steps) of a workdir's epoch-end checkpoints of epochs first..last (1-based).

  Needs a run with `config.checkpoint.every_epoch` (epoch-end checkpoints are kept); a missing
  epoch is an error naming it.
  """
  from cav_mae_jax.train import checkpoint, run_config  # pylint: disable=g-import-not-at-top
  if not 1 <= first_epoch <= last_epoch:
    raise ValueError(f"epochs {first_epoch}..{last_epoch}: need 1 <= first <= last.")
  steps_per_epoch = run_config.read_steps_per_epoch(workdir)
  available = set(checkpoint.saved_steps(workdir))
  # Epochs beyond the last checkpoint are missing without a list of every one of them (a
  # mistyped --last_epoch=1000000000000 made a list of that length).
  last_saved = max(available, default=0) // steps_per_epoch
  steps = [epoch * steps_per_epoch
           for epoch in range(first_epoch, min(last_epoch, last_saved) + 1)]
  missing = [str(s // steps_per_epoch) for s in steps if s not in available]
  first_unsaved = max(first_epoch, last_saved + 1)
  if first_unsaved < last_epoch:
    missing.append(f"{first_unsaved}-{last_epoch}")
  elif first_unsaved == last_epoch:
    missing.append(str(last_epoch))
  if missing:
    raise FileNotFoundError(f"{workdir}: no epoch-end checkpoint of epoch(s) "
                            f"{', '.join(missing)} ({steps_per_epoch} steps per "
                            f"epoch; saved steps {sorted(available)}; was "
                            "config.checkpoint.every_epoch on?)")
  params = average_params(checkpoint.read_workdir_params(workdir, s)[0] for s in steps)
  return params, steps
