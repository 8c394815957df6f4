"""File-to-file conversions behind tools/convert.py: read, map, check, then write atomically.

Every check happens before anything is written, and outputs are written to a temporary
sibling and renamed, so a failed conversion leaves nothing at the output path.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from cav_mae_jax import models
from cav_mae_jax.convert import cavmae_checkpoint
from cav_mae_jax.convert import export
from cav_mae_jax.convert import formats
from cav_mae_jax.convert import imagenet_mae
from cav_mae_jax.convert import init_source
from cav_mae_jax.convert import io
from cav_mae_jax.convert import pos_embed as pos_embed_lib
from cav_mae_jax.convert import report as report_lib
from cav_mae_jax.convert import state_dict as sd
from cav_mae_jax.convert import target


def _config_dict(model_config: Any) -> dict[str, Any]:
  """Validated model config as a plain JSON-able dict."""
  return dataclasses.asdict(models.ModelConfig.from_config(model_config))


def imagenet_mae_to_checkpoint(src: str | os.PathLike, out: str | os.PathLike, model_config: Any, *,
                               seed: int = 0, allow_unexpected: bool = False,
                               overwrite: bool = False) -> report_lib.ConversionReport:
  """ImageNet MAE file -> CAV-MAE pretraining params checkpoint (init values where MAE has none)."""
  io.check_output_path(out, overwrite=overwrite, kind="params",  # before any work
                       inputs=(("--src", src),))
  state_dict = formats.read_state_dict(src)
  init = target.init_params(model_config, finetune=False, seed=seed)
  with sd.naming_source(os.fspath(src)):
    params, report = imagenet_mae.imagenet_mae_to_params(state_dict, init,
                                                         allow_unexpected=allow_unexpected)
  io.save_params(out, params, model_config=_config_dict(model_config), overwrite=overwrite)
  return report


def cavmae_to_checkpoint(src: str | os.PathLike, out: str | os.PathLike, model_config: Any, *,
                         finetune: bool, new_head: bool = False,
                         audio_pos_resize: pos_embed_lib.ResizeMethod | None = None,
                         seed: int = 0, allow_unexpected: bool = False,
                         overwrite: bool = False) -> report_lib.ConversionReport:
  """Released CAV-MAE file (pretrained or fine-tuned) -> our params checkpoint."""
  io.check_output_path(out, overwrite=overwrite, kind="params",  # before any work
                       inputs=(("--src", src),))
  state_dict = formats.read_state_dict(src)
  config = models.ModelConfig.from_config(model_config)
  init_source.check_architecture("cavmae", os.fspath(src), config, finetune=finetune)
  needs_init = new_head or config.learnable_temperature
  init = (target.init_params(config, finetune=finetune, seed=seed) if needs_init
          else target.param_shapes(config, finetune=finetune))
  with sd.naming_source(os.fspath(src)):
    params, report = cavmae_checkpoint.cavmae_to_params(
        state_dict, init, new_head=new_head, audio_pos_resize=audio_pos_resize,
        freq_patches=config.audio_grid[0], allow_unexpected=allow_unexpected)
  if not finetune:  # what tools/inpaint.py takes from the model config, which no weight shows
    report.notes.append(
        f"model_config.json records the config's norm_pix_loss={config.norm_pix_loss} and "
        f"mask_mode_a={config.mask_mode_a!r}, which a .pth does not say (tools/inpaint.py "
        "pictures the model by them; cav-mae-base-nonorm.pth was trained with "
        "norm_pix_loss=False, the ablations with their mask mode)")
  io.save_params(out, params, model_config=_config_dict(config), overwrite=overwrite)
  return report


def checkpoint_to_torch(src: str | os.PathLike, out: str | os.PathLike, *,
                        module_prefix: bool = False, overwrite: bool = False,
                        step: int = 0) -> list[str]:
  """Our params checkpoint or training workdir -> a state dict in the original's layout."""
  io.check_output_path(out, overwrite=overwrite, kind="file",  # before any work
                       inputs=(("--src", src),))
  formats.output_format(out)
  params = init_source.read_params(os.fspath(src), step)
  state_dict, notes = export.to_original_state_dict(params, module_prefix=module_prefix)
  formats.check_output(out, state_dict)  # named as given, not as the staged file
  with io.atomic_output(out, overwrite=overwrite) as staged:
    formats.write_state_dict(staged, state_dict)
  notes.insert(0, f"exported {len(state_dict)} arrays" + (
      " (keys prefixed 'module.', as DataParallel saves them)" if module_prefix else
      " (keys without DataParallel's 'module.' prefix)"))
  return notes


def checkpoint_to_eval_export(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str,
                              model_config: Mapping[str, Any] | None = None,
                              finetune: bool | None = None,
                              overwrite: bool = False, step: int = 0) -> None:
  """Params checkpoint or workdir -> params-only export in `dtype` with its model config JSON.

  `finetune` says which model `model_config` is for (the config's task: the fine-tuning model
  with its head, or the pretraining model with its decoder); the params must be that model's.
  Taken from the params when None: with a fine-tuning config it was, so a pretraining
  checkpoint was exported with a model_config.json claiming a head it does not have.
  """
  io.check_output_path(out, overwrite=overwrite, kind="params",  # before any work
                       inputs=(("--src", src),))
  if dtype not in export.EXPORT_DTYPES:
    raise ValueError(f"export dtype {dtype!r} not supported "
                     f"(choose from {sorted(export.EXPORT_DTYPES)})")
  config = _config_dict(model_config if model_config is not None
                        else init_source.read_model_config(os.fspath(src)))
  params = init_source.read_params(os.fspath(src), step)
  has_head = "mlp_head_1" in params
  if finetune is not None and finetune != has_head:
    params_kind = ("a pretraining model's (no classification head)",
                   "a fine-tuning model's (with a classification head)")[has_head]
    config_kind = ("pretraining", "fine-tuning")[finetune]
    raise sd.ParamsMismatchError(
        f"{os.fspath(src)}: the params are {params_kind}, the config's task is {config_kind}; "
        "give a config of the checkpoint's task, or none (the checkpoint's own model config)")
  _, fit = sd.match_to_target(params, target.param_shapes(config, finetune=has_head))
  if fit.unexpected:
    raise sd.ParamsMismatchError(f"{os.fspath(src)}: params not in the model config: "
                                 f"{', '.join(fit.unexpected)}")
  export.export_for_eval(params, config, out, dtype=dtype,
                         fbank_normalization=init_source.normalization_record(os.fspath(src)),
                         overwrite=overwrite)
