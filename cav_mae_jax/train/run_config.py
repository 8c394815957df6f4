"""The config a workdir was run with, and what may change when a run resumes.

The workdir records its config (`config.json`, written at the start of every run). Resuming with
a change that alters the shapes of the parameters or the optimizer state is refused with one
line naming the fields that cause it; so is a changed batch size (it re-plans epochs, learning
rate milestones and the input position silently) and a changed seed (the input order). Other
changes (durations, logging, eval cadence, data paths, the mesh) are allowed and reported.

Every process of a multi-process run must run the same code with the same config
(`check_same_on_every_process`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from cav_mae_jax import files
from cav_mae_jax.train import optim

RUN_CONFIG_FILE = "config.json"
PLAN_FILE = "plan.json"
# Changes refused on resume even though no shape depends on them, and why.
REFUSED_FIELDS = {
    "data.batch_size": "it re-plans epochs, the schedule and the input position",
    "seed": "the input order comes from it, and the checkpoint holds a position in the saved "
            "seed's order (and the training RNG, which stays the saved one)",
}


class ResumeConfigError(ValueError):
  """The config of a resumed run is incompatible with its workdir's checkpoints."""


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
  """{'model.embed_dim': 768, ...} of a ConfigDict or nested dict."""
  values = config.to_dict() if hasattr(config, "to_dict") else config
  flat = {}
  for key, value in values.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def write_run_config(workdir: str, config: ml_collections.ConfigDict,
                     steps_per_epoch: int | None = None,
                     train_shards: list[list[Any]] | None = None) -> None:
  """Records `config` (and the run's plan: its steps per epoch, its training shards [file,
  clips]) in the workdir; the main process writes.

  Each file is replaced atomically: when a multi-process run resumes, the other processes read
  the previous config.json while the main process writes the new one.
  """
  files.replace_text(os.path.join(workdir, RUN_CONFIG_FILE),
                     config.to_json_best_effort(indent=2, sort_keys=True))
  if steps_per_epoch is not None:
    plan = {"steps_per_epoch": steps_per_epoch}
    if train_shards is not None:
      plan["train_shards"] = train_shards
    files.replace_text(os.path.join(workdir, PLAN_FILE), json.dumps(plan))


def read_plan(workdir: str) -> dict[str, Any]:
  """The plan of the run in `workdir` (`write_run_config`); {} for a workdir from before it."""
  path = os.path.join(workdir, PLAN_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def read_steps_per_epoch(workdir: str) -> int:
  """The steps per epoch of the run in `workdir` (epoch-end checkpoints are at its multiples)."""
  plan = read_plan(workdir)
  if not plan:
    raise FileNotFoundError(f"{workdir}: no {PLAN_FILE} (not a training workdir)")
  return int(plan["steps_per_epoch"])


# Sections every run's config holds (configs/pretrain.py and configs/finetune.py).
RECORDED_SECTIONS = ("task", "model", "data")


def missing_run_config(workdir: str) -> str | None:
  """Why `workdir` holds no recorded config ('no such directory', 'no config.json (...)'), or
  None when it holds one."""
  if not os.path.isdir(workdir):
    return "no such directory"
  if not os.path.isfile(os.path.join(workdir, RUN_CONFIG_FILE)):
    return (f"no {RUN_CONFIG_FILE} (not a training workdir, or one from before runs recorded "
            "their config); give --config")
  return None


def read_run_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config recorded in the workdir, or None (a workdir from before this file existed)."""
  path = os.path.join(workdir, RUN_CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    try:
      recorded = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}): the run's recorded config is "
                       "damaged") from None
  missing = [s for s in RECORDED_SECTIONS if s not in recorded] if isinstance(
      recorded, dict) else RECORDED_SECTIONS
  if missing:
    raise ValueError(f"{path}: not a run's config (no {', '.join(missing)}): the recorded "
                     "config is damaged")
  return ml_collections.ConfigDict(recorded)


def changed_fields(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict
                   ) -> dict[str, tuple[Any, Any]]:
  """{field: (saved value, new value)} of every field that differs (JSON-normalized)."""
  old = flatten(json.loads(saved.to_json_best_effort()))
  new = flatten(json.loads(config.to_json_best_effort()))
  unread = set()  # fields of another schedule kind (a run recorded before they were all held)
  if old.get("schedule.kind") == new.get("schedule.kind") in optim.SCHEDULE_FIELDS:
    unread = {f"schedule.{field}" for kind, fields in optim.SCHEDULE_FIELDS.items()
              if kind != new["schedule.kind"] for field in fields}
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and k not in unread}


def check_resume(saved: ml_collections.ConfigDict | None, config: ml_collections.ConfigDict,
                 abstract_state: Callable[[ml_collections.ConfigDict], Any]
                 ) -> dict[str, tuple[Any, Any]]:
  """Returns the allowed changes from `saved` to `config`; raises ResumeConfigError otherwise.

  `abstract_state(config)` gives the train state's ShapeDtypeStruct tree for a config; a field
  is named when setting it alone on the saved config changes that tree.
  """
  if saved is None:
    return {}
  changes = changed_fields(saved, config)
  if not changes:
    return {}
  refused = [f for f in REFUSED_FIELDS if f in changes]
  if refused:
    raise ResumeConfigError(
        f"config.{refused[0]} changed ({_arrow(changes[refused[0]])}) on resume: "
        f"{REFUSED_FIELDS[refused[0]]}; keep it, or start a new workdir with "
        "config.init.source='workdir' pointing at this one")
  baseline = _signature(abstract_state(saved))
  if _signature(abstract_state(config)) == baseline:
    return changes
  culprits = []
  for field, (_, new) in changes.items():
    candidate = saved.copy_and_resolve_references()
    try:
      _set(candidate, field, new)
      if _signature(abstract_state(candidate)) != baseline:
        culprits.append(field)
    except (ValueError, KeyError, TypeError, AttributeError):
      culprits.append(field)  # not valid alone: it travels with another change
  culprits = culprits or list(changes)
  raise ResumeConfigError(
      "changed on resume, altering the parameter or optimizer-state shapes of the checkpoints: "
      + ", ".join(f"config.{f} ({_arrow(changes[f])})" for f in culprits)
      + "; keep it, or start a new workdir (config.init.source='workdir' can start from this one)")


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
  """'total_steps 6 -> 8, ...' for a log line."""
  return ", ".join(f"{field} {_arrow(values)}" for field, values in changes.items())


def _arrow(values: tuple[Any, Any]) -> str:
  return f"{values[0]!r} -> {values[1]!r}"


def _signature(abstract: Any) -> tuple[Any, ...]:
  leaves, treedef = jax.tree_util.tree_flatten(abstract)
  return str(treedef), tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def _set(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
  *parents, leaf = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value


# Fields that may differ between the processes of a run: where each host finds the files (a
# copy on its local disk may sit at another path).
_HOST_PATH_FIELDS = ("data.train_dir", "data.eval_dir", "data.tfds_data_dir", "init.path")
_SOFTWARE = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def check_same_on_every_process(config: ml_collections.ConfigDict,
                                also: dict[str, Any] | None = None) -> None:
  """Raises ValueError on every process when the processes of a run were not given the same
  config (paths apart: `_HOST_PATH_FIELDS`, `evals.*.dir`) or do not run the same software (this
  package's source, JAX, Flax, Optax, orbax, NumPy): each would trace its own step, and a
  hyperparameter that differs trained the replicas of the params apart without a word (a
  collective: every process of the run calls it). `also`: a tool's own settings that must be
  shared too ({'--step': 3}). Each names the first differing process's fields that differ from
  process 0's."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  text = json.dumps({**_run_identity(config), **(also or {})}, sort_keys=True)
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
  digests = np.asarray(multihost_utils.process_allgather(digest))
  differ = [p for p, row in enumerate(digests) if not np.array_equal(row, digests[0])]
  if not differ:
    return
  first = differ[0]  # both configs on every process: each names the same fields
  zero = _from_process(0, text)
  other = _from_process(first, text)
  diffs = [f"{field} is {_shown(zero.get(field))} on process 0, {_shown(other.get(field))} on "
           f"process {first}" for field in sorted(set(zero) | set(other))
           if zero.get(field) != other.get(field)]
  more = f" (and {len(diffs) - 3} more)" if diffs[3:] else ""
  others = f" (processes {', '.join(map(str, differ[1:]))} differ too)" if differ[1:] else ""
  raise ValueError(f"the run's processes differ: "
                   f"{'; '.join(diffs[:3])}{more}{others}: every process of a run is given the "
                   "same config and runs the same software")


def shards_line(shards: list[list[Any]]) -> str:
  """A split's shards ([file, clips] each, paths apart) in a line: their count and clips, the
  first three, and a digest of the whole list (two lists that differ later differ in it)."""
  digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:8]
  listed = ", ".join(f"{name} ({count})" for name, count in shards[:3])
  more = f", ... ({len(shards) - 3} more)" if len(shards) > 3 else ""
  return (f"{len(shards)} shard(s) of {sum(count for _, count in shards)} clips: "
          f"{listed}{more} [{digest}]")


def _from_process(source: int, text: str) -> dict[str, Any]:
  """Process `source`'s JSON `text`, decoded on every process (a collective)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  is_source = jax.process_index() == source
  data = np.frombuffer(text.encode(), np.uint8)
  length = int(multihost_utils.broadcast_one_to_all(np.int32(len(data)), is_source=is_source))
  padded = data if is_source else np.zeros(length, np.uint8)
  received = multihost_utils.broadcast_one_to_all(padded, is_source=is_source)
  return json.loads(bytes(np.asarray(received)).decode())


def _shown(value: Any) -> str:
  return "missing" if value is None else repr(value)


def _run_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'config.<field>': value, 'software.<name>': version} of what every process must share."""
  flat = flatten(json.loads(config.to_json_best_effort()))
  identity = {f"config.{field}": value for field, value in flat.items()
              if field not in _HOST_PATH_FIELDS
              and not (field.startswith("evals.") and field.endswith(".dir"))}
  for name in _SOFTWARE:
    try:
      identity[f"software.{name}"] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      identity[f"software.{name}"] = None
  identity["software.cav_mae_jax source"] = _source_digest()
  return identity


def _source_digest() -> str:
  """SHA-256 of this package's Python files (their paths and contents)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  digest = hashlib.sha256()
  for directory, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
          digest.update(f.read())
  return digest.hexdigest()[:16]
