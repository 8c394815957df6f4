"""Params checkpoints (orbax, {'params': tree}) and all-or-nothing writes of output paths."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

MODEL_CONFIG_FILE = "model_config.json"
DIGEST_FILE = "params_digest.json"  # checksum of every parameter array (train.checkpoint)
# How the run that made the params normalized its fbanks (init_source.normalization_settings);
# absent where that is not known (e.g. a converted PyTorch checkpoint).
NORMALIZATION_FILE = "fbank_normalization.json"


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False) -> str:
  """Returns the absolute output path (its parent created); raises if it exists, unless overwrite."""
  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(f"{path}: output already exists (--overwrite, or overwrite=True, "
                          "replaces it)")
  parent = os.path.dirname(path)
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise NotADirectoryError(f"{path}: {parent} is not a directory")
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise OSError(f"{path}: cannot make its directory {parent} "
                  f"({e.strerror or e})") from e
  return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling path; renames it to `path` only if the block succeeds."""
  path = check_output_path(path, overwrite=overwrite)
  parent = os.path.dirname(path)
  try:
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
  except OSError as e:  # it names the temporary, not the output
    raise OSError(f"{path}: cannot write in {parent} ({e.strerror or e})") from e
  staged = os.path.join(scratch, os.path.basename(path))
  try:
    yield staged
    if not os.path.lexists(staged):
      raise RuntimeError(f"nothing was written for {path}")
    if os.path.lexists(path):
      _remove(path)
    os.replace(staged, path)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  else:
    os.remove(path)


def save_params(path: str | os.PathLike, params: Mapping[str, Any], *,
                model_config: Mapping[str, Any] | None = None,
                fbank_normalization: Mapping[str, Any] | None = None,
                overwrite: bool = False) -> None:
  """Writes {'params': params} as an orbax checkpoint directory, with the model config, the
  params' checksums (`DIGEST_FILE`, checked by load_params) and, when known, the run's fbank
  normalization (`NORMALIZATION_FILE`) beside it."""
  from cav_mae_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  with atomic_output(path, overwrite=overwrite) as staged:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(staged, {"params": params})
    checkpointer.wait_until_finished()
    checkpointer.close()
    with open(os.path.join(staged, DIGEST_FILE), "w") as f:
      json.dump(checkpoint.tree_digest(params), f, indent=1, sort_keys=True)
    if model_config is not None:
      with open(os.path.join(staged, MODEL_CONFIG_FILE), "w") as f:
        json.dump(dict(model_config), f, indent=2, sort_keys=True)
    if fbank_normalization is not None:
      with open(os.path.join(staged, NORMALIZATION_FILE), "w") as f:
        json.dump(dict(fbank_normalization), f, indent=2, sort_keys=True)


def load_params(path: str | os.PathLike, target: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Returns the params tree of a checkpoint written by save_params.

  `target` (e.g. jax.eval_shape of the model's params, with shardings) restores straight into
  that structure, shapes, dtypes and placement (an array whose target dtype differs is read as
  saved, then cast); without it, arrays come back as saved. Either way they are checked
  against the checksums saved with them (CheckpointReadError if a data file was damaged;
  checkpoints written without checksums are not checked).
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no params checkpoint (expected an orbax checkpoint directory)")
  from cav_mae_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.StandardCheckpointer()
  try:
    as_saved = None
    if target is not None:
      with checkpoint.reading(path):
        saved = _saved_params_metadata(checkpointer, path)
      as_saved = {"params": _with_saved_dtypes(path, target, saved)}
    with checkpoint.reading(path):
      restored = checkpointer.restore(path, as_saved)
  finally:
    checkpointer.close()
  if "params" not in restored:
    raise ValueError(f"{path}: checkpoint has no 'params' entry (top level: {sorted(restored)})")
  params = restored["params"]
  digest_path = os.path.join(path, DIGEST_FILE)
  if os.path.isfile(digest_path):
    with open(digest_path) as f:
      checkpoint.verify_digest(path, params, json.load(f))
  if target is not None:
    params = jax.tree_util.tree_map(
        lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype), params, dict(target))
  return params


def _saved_params_metadata(checkpointer: ocp.StandardCheckpointer, path: str) -> Mapping[str, Any]:
  """The params tree of the checkpoint's array metadata (shape and dtype of each array)."""
  from cav_mae_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  metadata = checkpointer.metadata(path)
  tree = getattr(metadata, "item_metadata", metadata)  # orbax >= 0.11: StepMetadata
  tree = getattr(tree, "tree", tree)
  if not isinstance(tree, Mapping):  # orbax logs why and returns None
    raise checkpoint.CheckpointReadError(
        f"{path}: the checkpoint cannot be read (the metadata of its arrays cannot be read: a "
        "file inside is damaged or missing)")
  saved = tree.get("params")
  if saved is None:
    raise ValueError(f"{path}: checkpoint has no 'params' entry (top level: {sorted(tree)})")
  return saved


def _with_saved_dtypes(path: str, target: Mapping[str, Any],
                       saved: Mapping[str, Any]) -> dict[str, Any]:
  """`target` (abstract arrays) with each leaf's dtype as the checkpoint stores it."""
  from cav_mae_jax.convert import state_dict  # pylint: disable=g-import-not-at-top
  wanted, stored = state_dict.flatten_params(target), state_dict.flatten_params(saved)
  problems = []
  for what, names in (("not in the checkpoint", wanted.keys() - stored.keys()),
                      ("not in the target", stored.keys() - wanted.keys()),
                      ("of other shapes", {n for n in wanted.keys() & stored.keys()
                                           if tuple(wanted[n].shape) != tuple(stored[n].shape)})):
    if names:
      problems.append(f"{what}: " + ", ".join(
          state_dict.abbreviate(sorted("/".join(n) for n in names))))
  if problems:
    raise ValueError(f"{path}: the target's parameters are not the checkpoint's ("
                     + "; ".join(problems) + ")")
  return jax.tree_util.tree_map(
      lambda t, m: jax.ShapeDtypeStruct(t.shape, m.dtype, sharding=getattr(t, "sharding", None)),
      dict(target), dict(saved))


def load_model_config(path: str | os.PathLike) -> dict[str, Any]:
  """Returns the model config saved beside a params checkpoint."""
  config_path = os.path.join(os.fspath(path), MODEL_CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path}: no model config beside the params checkpoint")
  with open(config_path) as f:
    return json.load(f)


def load_fbank_normalization(path: str | os.PathLike) -> dict[str, Any] | None:
  """The run's fbank normalization saved beside a params checkpoint; None if none was saved."""
  file_path = os.path.join(os.fspath(path), NORMALIZATION_FILE)
  if not os.path.isfile(file_path):
    return None
  try:
    with open(file_path) as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{file_path}: cannot be read: {e}") from e
  if not isinstance(recorded, dict) or recorded.get("fbank_stats") not in ("fixed", "index"):
    raise ValueError(f"{file_path}: not a record of an fbank normalization (expected an object "
                     "with fbank_stats 'fixed' or 'index')")
  return recorded
