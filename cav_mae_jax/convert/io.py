"""Params checkpoints (orbax, {'params': tree}) and all-or-nothing writes of output paths."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import jax
import orbax.checkpoint as ocp

from cav_mae_jax import files

MODEL_CONFIG_FILE = "model_config.json"
DIGEST_FILE = "params_digest.json"  # checksum of every parameter array (train.checkpoint)
# How the run that made the params normalized its fbanks (init_source.normalization_settings);
# absent where that is not known (e.g. a converted PyTorch checkpoint).
NORMALIZATION_FILE = "fbank_normalization.json"
# The file orbax writes into every params checkpoint and reads first: a directory without it
# holds none, and orbax's own words for that ("Metadata file ... does not exist") do not say
# what was expected there instead.
ORBAX_METADATA_FILE = "_METADATA"


# What an output path holds: a single file (.pth, .npz, .png, ...) or a params checkpoint
# directory (save_params).
OutputKind = Literal["file", "params"]
# Top-level names in a params checkpoint directory besides ours: orbax's metadata files (they
# start with '_'), its OCDBT data ('d', 'manifest.ocdbt', 'ocdbt.process_<i>'), its commit
# marker and array metadata, and the single 'checkpoint' file of its older msgpack format.
_ORBAX_ENTRIES = ("d", "manifest.ocdbt", "commit_success.txt", "array_metadatas", "descriptor",
                  "checkpoint")
_PARAMS_FILES = (MODEL_CONFIG_FILE, DIGEST_FILE, NORMALIZATION_FILE)


class OutputPathError(ValueError):
  """An output path that must not be written: one of the command's inputs (or inside or around
  one), or an existing path of another kind than the output (--overwrite replaces only a file
  by a file and a params checkpoint by a params checkpoint)."""


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False,
                      kind: OutputKind = "file",
                      inputs: Sequence[tuple[str, str | os.PathLike | None]] = (),
                      flag: str = "--out") -> str:
  """Returns the absolute output path (its parent created); raises if it exists, unless overwrite.

  An output that is, lies inside or contains one of `inputs` ((flag, path) of what the command
  reads) is refused whatever `overwrite` says: replacing it would destroy what is being read.
  `overwrite` replaces only an existing output of the same `kind` (`replaceable`): a directory
  is never replaced by a file, a file never by a directory, and a directory only if it is a
  params checkpoint, so that a mistyped --out cannot delete a training workdir, a records
  directory or /tmp.
  """
  given = os.fspath(path)
  path = os.path.abspath(given)
  check_not_an_input(given, inputs, flag=flag)
  if os.path.lexists(path):
    if not overwrite:
      raise FileExistsError(f"{path}: output already exists (--overwrite, or overwrite=True, "
                            "replaces it)")
    _check_replaceable(path, kind, flag, shown=given)
  parent = os.path.dirname(path)
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise NotADirectoryError(f"{path}: {parent} is not a directory")
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise OSError(f"{path}: cannot make its directory {parent} "
                  f"({e.strerror or e})") from e
  return path


def check_not_an_input(path: str | os.PathLike,
                       inputs: Sequence[tuple[str, str | os.PathLike | None]], *,
                       flag: str = "--out") -> None:
  """Raises OutputPathError if output `path` is, lies inside or contains one of `inputs`
  ((flag, path); empty paths and remote ones, gs://..., are skipped). Paths are compared
  resolved (symbolic links followed), so a link to an input is that input."""
  given = os.fspath(path)
  out = os.path.realpath(given)
  for input_flag, input_path in inputs:
    if not input_path or "://" in os.fspath(input_path):
      continue
    source = os.path.realpath(os.fspath(input_path))
    if out == source:
      relation = "is"
    elif out.startswith(os.path.join(source, "")):
      relation = "lies inside"
    elif source.startswith(os.path.join(out, "")):
      relation = "contains"
    else:
      continue
    raise OutputPathError(f"{flag} {given}: {relation} {input_flag} {os.fspath(input_path)}, "
                          "which this command reads; write the output elsewhere")


def replaceable(path: str | os.PathLike, kind: OutputKind) -> str | None:
  """None if --overwrite may replace the existing `path` by an output of `kind`; else why not."""
  path = os.fspath(path)
  if kind == "file":
    return "a directory, not a file" if os.path.isdir(path) else None
  if kind != "params":
    raise ValueError(f"unknown output kind {kind!r} (choose from 'file', 'params')")
  if not os.path.isdir(path):
    return "a file, not a params checkpoint directory"
  return _not_params_checkpoint(path)


def holds_params(path: str | os.PathLike) -> bool:
  """Whether `path` can be read as a params checkpoint (orbax's metadata file is there); other
  files beside it do not matter for reading (`is_params_checkpoint` is the stricter test)."""
  return os.path.isfile(os.path.join(os.fspath(path), ORBAX_METADATA_FILE))


def is_params_checkpoint(path: str | os.PathLike) -> bool:
  """Whether `path` is a directory as save_params writes it (and nothing else besides)."""
  return os.path.isdir(path) and _not_params_checkpoint(os.fspath(path)) is None


def _not_params_checkpoint(path: str) -> str | None:
  """Why directory `path` is not a params checkpoint of save_params; None if it is one.

  It is one if it holds orbax's _METADATA and our model config or checksums, and only what
  save_params writes: a training workdir, a records directory or any other folder holding
  other files is not, and neither is one of a workdir's step checkpoints (orbax's items in
  sub-folders, no params_digest.json).
  """
  try:
    names = sorted(os.listdir(path))
  except OSError as e:
    return f"a directory that cannot be listed ({e.strerror or e})"
  if "config.json" in names or "checkpoints" in names:
    return "a training workdir, not a params checkpoint"
  if ORBAX_METADATA_FILE not in names or not {MODEL_CONFIG_FILE, DIGEST_FILE} & set(names):
    return (f"a directory that is not a params checkpoint (no {ORBAX_METADATA_FILE} with "
            f"{DIGEST_FILE} or {MODEL_CONFIG_FILE})")
  others = [n for n in names if not (n in _PARAMS_FILES or n in _ORBAX_ENTRIES
                                     or n.startswith("_") or n.startswith("ocdbt.process_"))]
  if others:
    listed = ", ".join(others[:5]) + (f", ... ({len(others)} in all)" if len(others) > 5 else "")
    return f"a params checkpoint that also holds other files ({listed})"
  return None


def _check_replaceable(path: str, kind: OutputKind, flag: str, shown: str | None = None) -> None:
  """Raises OutputPathError naming `flag` and `shown` (default: `path`) unless replaceable."""
  why = replaceable(path, kind)
  if why is not None:
    what = "a file" if kind == "file" else "a params checkpoint directory"
    raise OutputPathError(f"{flag} {shown or path}: {why}; --overwrite replaces only {what} "
                          "(remove it yourself, or choose another path)")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False,
                  kind: OutputKind = "file") -> Iterator[str]:
  """Yields a temporary sibling path; renames it to `path` only if the block succeeds.

  What is at `path` is checked again before it is replaced (check_output_path's rules): it
  may have appeared, or changed, while the output was being computed.
  """
  path = check_output_path(path, overwrite=overwrite, kind=kind)
  parent = os.path.dirname(path)
  try:
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
  except OSError as e:  # it names the temporary, not the output
    raise OSError(f"{path}: cannot write in {parent} ({e.strerror or e})") from e
  staged = os.path.join(scratch, os.path.basename(path))
  try:
    with files.writing(path):  # a refused write names the output, not the temporary
      yield staged
    if not os.path.lexists(staged):
      raise RuntimeError(f"nothing was written for {path}")
    if os.path.isdir(staged) != (kind == "params"):
      raise RuntimeError(f"{path}: a {kind} output was staged as a "
                         f"{'directory' if os.path.isdir(staged) else 'file'}")
    if os.path.lexists(path):
      if not overwrite:
        raise FileExistsError(f"{path}: output appeared while it was being written (--overwrite, "
                              "or overwrite=True, replaces it)")
      _check_replaceable(path, kind, "--out")
      _remove(path)
    os.replace(staged, path)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def _remove(path: str) -> None:
  """Removes an output that _check_replaceable allowed to be replaced (a link: the link only)."""
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
  with atomic_output(path, overwrite=overwrite, kind="params") as staged:
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
    raise FileNotFoundError(
        f"{path}: no params checkpoint (expected an orbax checkpoint directory)")
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
