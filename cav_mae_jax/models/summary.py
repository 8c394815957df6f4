"""Parameter counts of a model, grouped by part (encoder per modality, joint, decoder, head).

Counted from shapes only (jax.eval_shape): nothing is materialized, so the base model's summary
takes a second. Modules are listed in their natural order (`blocks_a_2` before `blocks_a_10`).
"""

from __future__ import annotations

import re
from typing import Any

from cav_mae_jax.models import count_params, param_shapes, requires_grad_mask

# (group, subgroup) of a top-level module, by name.
_GROUPS = (
    (r"^(patch_embed_a|pos_embed_a|modality_a|blocks_a_\d+)$", ("encoder", "audio")),
    (r"^(patch_embed_v|pos_embed_v|modality_v|blocks_v_\d+)$", ("encoder", "video")),
    (r"^(blocks_u_\d+|norm|norm_a|norm_v)$", ("encoder", "joint")),
    (r"^(decoder_.*|mask_token)$", ("decoder", "")),
    (r"^mlp_head_\d+$", ("head", "")),
)


def _group(name: str) -> tuple[str, str]:
  for pattern, group in _GROUPS:
    if re.match(pattern, name):
      return group
  return ("other", "")


def _natural(name: str) -> list[Any]:
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def summary_lines(model_config: Any, *, finetune: bool) -> list[str]:
  """The summary: modules by group with subtotals; the last two lines are the totals.

  `trainable_params` counts as the original does (everything but fixed position embeddings);
  `total_params` counts every element.
  """
  shapes = param_shapes(model_config, finetune=finetune)
  mask = requires_grad_mask(shapes, model_config)
  width = max(len(name) for name in shapes) + 4
  groups: dict[tuple[str, str], list[str]] = {}
  for name in sorted(shapes, key=_natural):
    groups.setdefault(_group(name), []).append(name)
  lines = [f"model {'CAVMAEFT' if finetune else 'CAVMAE'}"]
  totals: dict[str, int] = {}
  for (group, subgroup), names in sorted(groups.items(), key=lambda g: _ORDER.index(g[0])):
    count = sum(count_params(shapes[n]) for n in names)
    totals[group] = totals.get(group, 0) + count
    lines.append(f"{group}{'/' + subgroup if subgroup else ''}: {count:,d}")
    lines += [f"  {n:<{width}} {count_params(shapes[n]):>12,d}" for n in names]
  lines += [f"{group}_params {count}" for group, count in totals.items()]
  lines.append(f"trainable_params {count_params(shapes, mask)}")
  lines.append(f"total_params {count_params(shapes)}")
  return lines


_ORDER = tuple(group for _, group in _GROUPS) + (("other", ""),)
