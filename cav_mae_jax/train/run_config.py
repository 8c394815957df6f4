"""The config a workdir was run with, and what may change when a run resumes.

The workdir records its config (`config.json`, written at the start of every run). Resuming with
a change that alters the shapes of the parameters or the optimizer state is refused with one
line naming the fields that cause it; so is a changed batch size (it re-plans epochs, learning
rate milestones and the input position silently) and a changed seed (the input order). Other
changes (durations, logging, eval cadence, data paths, the mesh) are allowed and reported.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import ml_collections

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
                     steps_per_epoch: int | None = None) -> None:
  """Records `config` (and the run's steps per epoch) in the workdir; the main process writes.

  Each file is replaced atomically: when a multi-process run resumes, the other processes read
  the previous config.json while the main process writes the new one.
  """
  _replace_file(os.path.join(workdir, RUN_CONFIG_FILE),
                config.to_json_best_effort(indent=2, sort_keys=True))
  if steps_per_epoch is not None:
    _replace_file(os.path.join(workdir, PLAN_FILE),
                  json.dumps({"steps_per_epoch": steps_per_epoch}))


def _replace_file(path: str, text: str) -> None:
  staged = f"{path}.tmp-{os.getpid()}"
  with open(staged, "w") as f:
    f.write(text)
  os.replace(staged, path)


def read_steps_per_epoch(workdir: str) -> int:
  """The steps per epoch of the run in `workdir` (epoch-end checkpoints are at its multiples)."""
  path = os.path.join(workdir, PLAN_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir}: no {PLAN_FILE} (not a training workdir)")
  with open(path) as f:
    return int(json.load(f)["steps_per_epoch"])


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
