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

from typing import Any, Sequence

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


def average_params(trees: Sequence[PyTree]) -> PyTree:
  """Element-wise mean of float pytrees of one structure, as NumPy leaves of the input dtypes."""
  if not trees:
    raise ValueError("average_params needs at least one tree.")
  reference, treedef = jax.tree_util.tree_flatten_with_path(trees[0])
  for path, leaf in reference:
    if not jnp.issubdtype(_dtype(leaf), jnp.floating):
      raise ValueError(f"Cannot average the non-float leaf {jax.tree_util.keystr(path)} "
                       f"({_dtype(leaf)}).")
  leaves = [[leaf for _, leaf in reference]]
  for index, tree in enumerate(trees[1:], start=1):
    flat, other_treedef = jax.tree_util.tree_flatten_with_path(tree)
    mismatch = _first_mismatch(reference, flat)
    if mismatch is None and other_treedef != treedef:
      mismatch = f"in its container types ({other_treedef} instead of {treedef})"
    if mismatch is not None:
      raise ValueError(f"Tree {index} does not match tree 0 {mismatch}.")
    leaves.append([leaf for _, leaf in flat])
  means = []
  for position, (_, leaf) in enumerate(reference):
    total = np.array(leaf, np.float64)  # starting from zeros would turn -0.0 into +0.0
    for tree_leaves in leaves[1:]:
      total += np.asarray(tree_leaves[position], np.float64)
    means.append((total / len(trees)).astype(_dtype(leaf)))
  return jax.tree_util.tree_unflatten(treedef, means)
