"""The account of a conversion: where every target parameter came from, what was left over."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from cav_mae_jax.convert import state_dict as sd


@dataclasses.dataclass
class ConversionReport:
  """Target paths filled (with their source), kept at init, and source keys dropped or unused."""

  mapped: dict[str, str] = dataclasses.field(default_factory=dict)
  kept_init: dict[str, str] = dataclasses.field(default_factory=dict)
  dropped: dict[str, str] = dataclasses.field(default_factory=dict)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  cast: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    """Human-readable account: counts, and every kept, dropped or unexpected key by name."""
    lines = [f"mapped: {len(self.mapped)} target arrays from the source"]
    for title, entries in (("kept at init", self.kept_init),
                           ("dropped from the source", self.dropped)):
      if entries:
        lines.append(f"{title}: {len(entries)}")
        lines.extend(f"  {name}  ({why})" for name, why in _grouped_by_module(entries))
    if self.unexpected:
      lines.append(f"unexpected (no rule, not used): {len(self.unexpected)}")
      lines.extend(f"  {key}" for key in self.unexpected)
    if self.cast:  # (every array of a float16 checkpoint: grouped, as the lists above)
      lines.append(f"cast to the target dtype: {len(self.cast)}")
      lines.extend(f"  {name}" for name, _ in _grouped_by_module(dict.fromkeys(self.cast, "")))
    lines.extend(f"note: {n}" for n in self.notes)
    return "\n".join(lines)


def _grouped_by_module(entries: Mapping[str, str]) -> list[tuple[str, str]]:
  """[(name, reason)]: arrays of one module family with one reason become
  'blocks_a_*/* (n arrays)'."""
  groups: dict[tuple[str, str], list[str]] = {}
  for key, why in sorted(entries.items()):
    family = re.sub(r"_\d+$", "_*", key.split("/")[0])
    groups.setdefault((family, why), []).append(key)
  return [(keys[0] if len(keys) == 1 else f"{module}/* ({len(keys)} arrays)", why)
          for (module, why), keys in groups.items()]


def check_no_unexpected(report: ConversionReport, allow_unexpected: bool,
                        hint: str | None = None) -> None:
  """Raises ParamsMismatchError naming unused source keys (the first 24) unless they are
  allowed; `hint` says why where the caller knows (e.g. another block layout)."""
  if report.unexpected and not allow_unexpected:
    hint = hint or ("wrong architecture or config? allow_unexpected ignores them: "
                    "--allow_unexpected of tools/convert.py, config.init.allow_unexpected=True "
                    "for training")
    raise sd.ParamsMismatchError(
        f"{len(report.unexpected)} source arrays have no place in the target model ({hint}): "
        f"{', '.join(sd.abbreviate(report.unexpected, 24))}")


def overlay(init_params: Mapping[str, Any], updates: Mapping[tuple[str, ...], np.ndarray],
            report: ConversionReport, sources: Mapping[tuple[str, ...], str]) -> dict[str, Any]:
  """Replaces init leaves by `updates` (same shape required, cast to the init dtype)."""
  flat = {path: np.asarray(leaf) for path, leaf in sd.flatten_params(init_params).items()}
  for path, value in updates.items():
    name = "/".join(path)
    if path not in flat:
      raise sd.ParamsMismatchError(
          f"{name} (from {sources[path]}) is not a parameter of the target model")
    target_shape, target_dtype = flat[path].shape, flat[path].dtype
    if tuple(value.shape) != target_shape:
      raise sd.ParamsMismatchError(
          f"shape mismatch for {name}: source {sources[path]} gives {tuple(value.shape)}, "
          f"target {target_shape}")
    if value.dtype != target_dtype:
      report.cast.append(name)
    flat[path] = np.asarray(value, dtype=target_dtype)
    report.mapped[name] = sources[path]
  return sd.unflatten_params(flat)
