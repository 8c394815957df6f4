"""PyTorch state dict <-> Flax parameter tree: renames and transposes only (NumPy, no torch).

Rule (see docs/design.md), applied to every key of the original's layout:
  `blocks_a.3.attn.qkv.weight` -> ('blocks_a_3', 'attn', 'qkv', 'kernel')
  * an all-digit path segment (ModuleList / Sequential index) joins the previous one with `_`;
  * `<module>.weight` of rank 2 (Linear, [out, in]) -> `kernel` [in, out];
  * `<module>.weight` of rank 4 (Conv2d, [D, C, p, p]) -> `kernel` [p, p, C, D];
  * `<module>.weight` of rank 1 (LayerNorm) -> `scale`; `<module>.bias` -> `bias`;
  * any other key is an nn.Parameter and keeps its name and shape (`modality_a`, `pos_embed_a`).
Released checkpoints come from DataParallel and prefix every key with `module.` (removed, as
are the other prefixes of `WRAPPER_PREFIXES`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

MODULE_PREFIX = "module."
# What wrappers put before every key of the module they wrap: DataParallel and
# DistributedDataParallel (twice when wrapped twice) and torch.compile ('_orig_mod.'). A state dict
# saved through one held none of the model's keys: "not a CAV-MAE checkpoint".
WRAPPER_PREFIXES = (MODULE_PREFIX, "_orig_mod.")
_INDEXED_NAME = re.compile(r"^(.*\D)_(\d+)$")

Params = dict[str, Any]


def remove_module_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Removes the prefixes wrappers put before every key (`WRAPPER_PREFIXES`: DataParallel's
  `module.`, once or more, and torch.compile's `_orig_mod.`, in any order); all keys or none
  must carry each."""
  stripped = dict(state_dict)
  while stripped:
    for prefix in WRAPPER_PREFIXES:
      prefixed = [k.startswith(prefix) for k in stripped]
      if all(prefixed):
        stripped = {k[len(prefix):]: v for k, v in stripped.items()}
        break
      if any(prefixed):
        bare = [k for k in stripped if not k.startswith(prefix)]
        raise ValueError(
            f"state dict mixes keys with and without the '{prefix}' prefix, e.g. {bare[:3]}")
    else:
      break
  return stripped


def torch_key_to_path(key: str, ndim: int) -> tuple[tuple[str, ...], str]:
  """Returns (flax path, kind) for one torch key; kind says how the array is laid out."""
  parts = key.split(".")
  if not all(parts):
    raise ValueError(f"malformed state-dict key {key!r}")
  names: list[str] = []
  for part in parts:
    if part.isdigit():
      if not names:
        raise ValueError(f"state-dict key {key!r} starts with an index")
      names[-1] = f"{names[-1]}_{part}"
    else:
      names.append(part)
  leaf = names[-1]
  if len(names) > 1 and leaf == "weight":
    kinds = {1: ("scale", "norm"), 2: ("kernel", "linear"), 4: ("kernel", "conv")}
    if ndim not in kinds:
      raise ValueError(f"{key!r}: no rule for a rank-{ndim} weight (expected rank 1, 2 or 4)")
    new_leaf, kind = kinds[ndim]
    return (*names[:-1], new_leaf), kind
  if len(names) > 1 and leaf == "bias":
    return tuple(names), "bias"
  return tuple(names), "parameter"


def path_to_torch_key(path: tuple[str, ...], ndim: int) -> tuple[str, str]:
  """Returns (torch key, kind) for one flax path; the exact inverse of torch_key_to_path."""
  modules = []
  for name in path[:-1]:
    match = _INDEXED_NAME.match(name)
    modules.append(f"{match.group(1)}.{match.group(2)}" if match else name)
  leaf = path[-1]
  if _INDEXED_NAME.match(leaf):
    raise ValueError(f"{'/'.join(path)}: a parameter name cannot end in an index")
  if modules and leaf == "kernel":
    kinds = {2: "linear", 4: "conv"}
    if ndim not in kinds:
      raise ValueError(f"{'/'.join(path)}: no rule for a rank-{ndim} kernel (expected 2 or 4)")
    return ".".join([*modules, "weight"]), kinds[ndim]
  if modules and leaf == "scale":
    return ".".join([*modules, "weight"]), "norm"
  if modules and leaf == "bias":
    return ".".join([*modules, "bias"]), "bias"
  if modules and leaf == "weight":
    raise ValueError(f"{'/'.join(path)}: flax leaf 'weight' has no torch counterpart")
  return ".".join([*modules, leaf]), "parameter"


def _to_flax_layout(array: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(array.T)
  if kind == "conv":
    return np.ascontiguousarray(np.transpose(array, (2, 3, 1, 0)))
  return np.asarray(array)


def _to_torch_layout(array: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(array.T)
  if kind == "conv":
    return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))
  return np.asarray(array)


def flatten_params(params: Mapping[str, Any],
                   prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """Flattens a nested dict of leaves into {path tuple: leaf}."""
  flat: dict[tuple[str, ...], Any] = {}
  for name, value in params.items():
    path = (*prefix, str(name))
    if isinstance(value, Mapping):
      if not value:
        raise ValueError(f"empty sub-tree at {'/'.join(path)}")
      flat.update(flatten_params(value, path))
    else:
      flat[path] = value
  return flat


def unflatten_params(flat: Mapping[tuple[str, ...], Any]) -> Params:
  """Builds a nested dict from {path tuple: leaf}."""
  tree: Params = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
      if not isinstance(node, dict):
        raise ValueError(f"{'/'.join(path)} collides with a leaf at {name}")
    if path[-1] in node:
      raise ValueError(f"two sources map to {'/'.join(path)}")
    node[path[-1]] = value
  return tree


def torch_array_to_flax(key: str, array: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  """Converts one state-dict entry to its flax path and layout."""
  array = np.asarray(array)
  path, kind = torch_key_to_path(key, array.ndim)
  return path, _to_flax_layout(array, kind)


def torch_to_flax(state_dict: Mapping[str, np.ndarray], *,
                  strip_module_prefix: bool = True) -> Params:
  """Converts a state dict in the original's layout into a nested Flax params dict."""
  source = remove_module_prefix(state_dict) if strip_module_prefix else dict(state_dict)
  flat = {}
  for key, value in source.items():
    path, array = torch_array_to_flax(key, value)
    if path in flat:
      raise ValueError(f"two state-dict keys map to {'/'.join(path)} (second: {key!r})")
    flat[path] = array
  return unflatten_params(flat)


def flax_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Converts a nested Flax params dict into a state dict in the original's layout."""
  state_dict: dict[str, np.ndarray] = {}
  for path, value in flatten_params(params).items():
    array = np.asarray(value)
    key, kind = path_to_torch_key(path, array.ndim)
    if key in state_dict:
      raise ValueError(f"two flax paths map to torch key {key!r}")
    state_dict[key] = _to_torch_layout(array, kind)
  return state_dict


@dataclasses.dataclass(frozen=True)
class MatchReport:
  """What match_to_target did: target paths filled, source paths unused, dtype casts."""

  mapped: tuple[str, ...]
  unexpected: tuple[str, ...]
  cast: tuple[str, ...]

  def summary(self) -> str:
    """One line per category, listing unexpected and cast keys by name."""
    lines = [f"mapped {len(self.mapped)} arrays"]
    if self.unexpected:
      lines.append(f"unexpected (not in the target, not used) {len(self.unexpected)}: "
                   + ", ".join(self.unexpected))
    if self.cast:
      lines.append(f"cast to the target dtype {len(self.cast)}: " + ", ".join(self.cast))
    return "\n".join(lines)


class ParamsMismatchError(ValueError):
  """A source tree does not fit the target tree (missing key or wrong shape)."""


@contextlib.contextmanager
def naming_source(source: str) -> Iterator[None]:
  """Prefixes a ParamsMismatchError raised inside with `source` (the file: the mapping rules'
  messages name only keys)."""
  try:
    yield
  except ParamsMismatchError as e:
    raise ParamsMismatchError(f"{source}: {e}") from None


def abbreviate(names: list[str], limit: int = 12) -> list[str]:
  """The first `limit` names and how many more (a line, not a screenful, of a large model's)."""
  return names if len(names) <= limit else [*names[:limit], f"... ({len(names) - limit} more)"]


def match_to_target(converted: Mapping[str, Any],
                    target_shapes: Mapping[str, Any]) -> tuple[Params, MatchReport]:
  """Fits converted params to a target tree of shapes (e.g. jax.eval_shape of model.init).

  Every target leaf must be present with the same shape (else ParamsMismatchError naming
  the key); source leaves not in the target are reported as unexpected; values are cast to
  the target dtype (reported when that changes the dtype).
  """
  source = flatten_params(converted)
  target = flatten_params(target_shapes)
  missing = [p for p in target if p not in source]
  if missing:
    names = ", ".join(abbreviate(["/".join(p) for p in missing]))
    raise ParamsMismatchError(f"{len(missing)} target parameters missing from the source: {names}")
  wrong = [(p, np.shape(source[p]), tuple(target[p].shape)) for p in target
           if tuple(np.shape(source[p])) != tuple(target[p].shape)]
  if wrong:
    names = "; ".join(abbreviate([f"{'/'.join(p)}: source {s} vs target {t}" for p, s, t in wrong]))
    raise ParamsMismatchError(f"shape mismatch for {len(wrong)} parameters: {names}")
  out, cast = {}, []
  for path, spec in target.items():
    array = np.asarray(source[path])
    dtype = np.dtype(spec.dtype)
    if array.dtype != dtype:
      cast.append("/".join(path))
      array = array.astype(dtype)
    out[path] = array
  unexpected = tuple("/".join(p) for p in source if p not in target)
  report = MatchReport(mapped=tuple("/".join(p) for p in target), unexpected=unexpected,
                       cast=tuple(cast))
  return unflatten_params(out), report
