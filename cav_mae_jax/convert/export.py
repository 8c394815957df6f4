"""Our params -> the original's PyTorch layout, and a params-only evaluation export."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from cav_mae_jax.convert import io
from cav_mae_jax.convert import state_dict as sd
from cav_mae_jax.convert.cavmae_checkpoint import NOT_IN_ORIGINAL

EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def to_original_state_dict(params: Mapping[str, Any], *, module_prefix: bool = False
                           ) -> tuple[dict[str, np.ndarray], list[str]]:
  """Returns (state dict loadable with strict=True into the original CAVMAE/CAVMAEFT, notes).

  Parameters the original lacks (a learned temperature) are left out and named in the notes.
  module_prefix=True writes keys as DataParallel does ('module.'), like the released files.
  """
  notes = []
  kept = {}
  for name, value in params.items():
    if name in NOT_IN_ORIGINAL:
      notes.append(f"{name} (value {np.asarray(value).tolist()}) left out: the original has no "
                   "such parameter")
    else:
      kept[name] = value
  state_dict = sd.flax_to_torch(kept)
  if module_prefix:
    state_dict = {sd.MODULE_PREFIX + k: v for k, v in state_dict.items()}
  return state_dict, notes


def cast_params(params: Mapping[str, Any], dtype: str) -> dict[str, Any]:
  """Casts every floating-point leaf to `dtype` ('float32', 'bfloat16' or 'float16')."""
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"export dtype {dtype!r} not supported (choose from {sorted(EXPORT_DTYPES)})")
  target = np.dtype(EXPORT_DTYPES[dtype])
  flat = {}
  for path, leaf in sd.flatten_params(params).items():
    array = np.asarray(leaf)
    floating = np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16
    flat[path] = array.astype(target) if floating else array
  return sd.unflatten_params(flat)


def export_for_eval(params: Mapping[str, Any], model_config: Mapping[str, Any],
                    path: str | os.PathLike, *, dtype: str = "float32",
                    fbank_normalization: Mapping[str, Any] | None = None,
                    overwrite: bool = False) -> None:
  """Writes params only, cast to `dtype`, with the model config JSON (and the run's fbank
  normalization, when known) beside them."""
  io.save_params(path, cast_params(params, dtype), model_config=model_config,
                 fbank_normalization=fbank_normalization, overwrite=overwrite)
