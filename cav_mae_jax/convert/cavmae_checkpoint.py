"""Released CAV-MAE checkpoints (original CAVMAE / CAVMAEFT state dicts) -> our params.

Handles what the original does when it loads a pretrained model for fine-tuning (the decoder
is dropped, a new head is initialized) and the options users change: a new classification
head, and a different audio length (the 8 x T/16 audio position grid trimmed, interpolated or
recomputed).
Every other target parameter must come from the checkpoint with the same shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from cav_mae_jax.convert import pos_embed as pos_embed_lib
from cav_mae_jax.convert import report as report_lib
from cav_mae_jax.convert import state_dict as sd

HEAD_MODULES = ("mlp_head_0", "mlp_head_1")
# Ours only (not in the original): kept at their init values.
NOT_IN_ORIGINAL = ("log_temperature",)
AUDIO_POS_EMBEDS = ("pos_embed_a", "decoder_pos_embed_a")
# In the original's ImageNet-MAE starting file for pretraining (src/adapt_vmae_weights.py, the
# recipes' ori_mae_11_for_pretrain.pth): MAE's CLS token, attached to the model three times. The
# original's model uses none (its pretraining loads the file with strict=False); dropped, said.
ADAPTED_CLS_TOKENS = ("cls_token_a", "cls_token_v", "cls_token_av")


def _is_visual(module: str) -> bool:
  """Whether a top-level module is the visual branch's own (the audio-only model lacks them)."""
  return module in ("patch_embed_v", "pos_embed_v", "modality_v", "norm_v") or (
      module.startswith("blocks_v_"))


def _is_imagenet_mae(module: str) -> bool:
  """Whether a top-level module is one of ImageNet MAE's single-stream ViT (CAV-MAE has none)."""
  return module in ("cls_token", "patch_embed") or re.fullmatch(r"blocks_\d+", module) is not None


def _block_counts(tree: Mapping[tuple[str, ...], Any]) -> tuple[int, int] | None:
  """(modality-specific, joint) encoder blocks of a flat params tree (audio's count stands for
  both streams'); None when a stack's block numbers are not 0..n-1 (blocks are missing)."""
  counts = []
  for prefix in ("blocks_a", "blocks_u"):
    numbers = {int(p[0].rsplit("_", 1)[1]) for p in tree if re.fullmatch(rf"{prefix}_\d+", p[0])}
    if numbers != set(range(len(numbers))):
      return None
    counts.append(len(numbers))
  return counts[0], counts[1]


def _single_modality(tree: Mapping[tuple[str, ...], Any]) -> str | None:
  """'audio' or 'visual' for the params of a single-modality MAE (one branch's patch embedding,
  no modality-specific blocks: `configs/pretrain.py:<recipe>,audio_mae`), else None."""
  modules = {path[0] for path in tree}
  branches = [name for name, suffix in (("audio", "a"), ("visual", "v"))
              if f"patch_embed_{suffix}" in modules]
  if len(branches) != 1 or any(re.fullmatch(r"blocks_[av]_\d+", m) for m in modules):
    return None
  return branches[0]


def _other_layout(source_blocks: tuple[int, int], target_blocks: tuple[int, int]) -> str:
  (a, u), (target_a, target_u) = source_blocks, target_blocks
  return (f"the checkpoint has {a} modality-specific and {u} joint blocks, the config "
          f"{target_a} and {target_u}: set config.model.modality_specific_depth={a} and "
          f"encoder_depth={a + u}, the checkpoint's model")


def _is_decoder(name: str) -> bool:
  return name.startswith("decoder_") or name == "mask_token"


def cavmae_to_params(
    state_dict: Mapping[str, np.ndarray], init_params: Mapping[str, Any], *,
    new_head: bool = False, audio_pos_resize: pos_embed_lib.ResizeMethod | None = None,
    freq_patches: int = 8, allow_unexpected: bool = False,
) -> tuple[dict[str, Any], report_lib.ConversionReport]:
  """Converts a CAV-MAE pretraining or fine-tuning state dict onto the target's init_params.

  init_params: the target model's params; shapes (jax.eval_shape) suffice where no leaf keeps
  its init value (no new head, no parameter absent from the original).

  new_head: the classification head keeps its init values (any head in the source is dropped).
  audio_pos_resize: 'trim', 'interpolate' or 'sincos' when the source's audio length differs
    (`pos_embed.resize_audio_pos_embed`).
  A decoder in the source is dropped when the target has none (fine-tuning model).
  """
  report = report_lib.ConversionReport()
  source = sd.flatten_params(sd.torch_to_flax(state_dict))
  target = sd.flatten_params(init_params)
  target_modules = {path[0] for path in target}
  target_has_decoder = any(_is_decoder(m) for m in target_modules)  # a pretraining model
  kept_at_init = {}

  for path in target:
    if path[0] in NOT_IN_ORIGINAL:
      kept_at_init[path] = "not in the original model"
    elif new_head and path[0] in HEAD_MODULES:
      kept_at_init[path] = "new classification head"
  for path in list(source):
    name = "/".join(path)
    if new_head and path[0] in HEAD_MODULES:
      report.dropped[name] = "replaced by a new classification head"
      del source[path]
    elif _is_decoder(path[0]) and not target_has_decoder:
      report.dropped[name] = "decoder, not part of the target model"
      del source[path]
    elif path[0] in ADAPTED_CLS_TOKENS and path[0] not in target_modules:
      report.dropped[name] = ("the original's adapted ImageNet-MAE file's CLS token, which its "
                              "model does not use")
      del source[path]

  resized = False
  for name in AUDIO_POS_EMBEDS:
    path = (name,)
    if path in source and path in target and source[path].shape != np.shape(target[path]):
      source[path] = _resize(name, source[path], np.shape(target[path]), audio_pos_resize,
                             freq_patches, report)
      resized = True
  if audio_pos_resize and not resized:  # asked for, and nothing done: said, not silent
    report.notes.append(f"audio_pos_resize={audio_pos_resize}: nothing resized (the checkpoint's "
                        "audio position grids already fit the target's audio length)")

  missing = [p for p in target if p not in source and p not in kept_at_init]
  if missing:
    hint = ""
    source_blocks, target_blocks = _block_counts(source), _block_counts(target)
    single_modality = _single_modality(source) if _single_modality(target) is None else None
    if any(_is_imagenet_mae(p[0]) for p in source):
      # Its decoder's names are ours (decoder_embed, mask_token): it was said to be a fine-tuned
      # checkpoint without a decoder.
      hint = (" (it is in ImageNet MAE's layout, with cls_token, patch_embed and blocks.N: map it "
              "with tools/convert.py imagenet-mae or config.init.source='imagenet_mae')")
    elif not any(p in source for p in target):
      hint = (" (it holds none of the model's parameters, so it is not a CAV-MAE checkpoint; its "
              f"keys: {', '.join(sd.abbreviate(sorted(state_dict), 8)) or 'none'})")
    elif single_modality is not None:
      config = (f"configs/pretrain.py:<recipe>,{single_modality}_mae"
                if target_has_decoder else
                f"configs/finetune.py:<recipe>,encoder={single_modality}_mae")
      hint = (f" (it is a single-modality MAE's: the {single_modality} branch only, one shared "
              f"encoder; load it into the model of {config}, which sets "
              f"config.model.modalities={single_modality!r} and modality_specific_depth=0)")
    elif (source_blocks is not None and source_blocks != target_blocks
          and any(re.fullmatch(r"blocks_[auv]_\d+", p[0]) for p in missing)):
      hint = f" ({_other_layout(source_blocks, target_blocks)})"
    elif all(p[0] in HEAD_MODULES for p in missing):
      hint = " (a pretraining checkpoint has no classification head: use new_head=True)"
    elif any(_is_decoder(p[0]) for p in missing):
      hint = " (a fine-tuned checkpoint has no decoder: it cannot initialize a pretraining model)"
    elif {p[0] for p in missing} <= {"norm_a", "norm_v"} and any(p[0] == "norm" for p in source):
      hint = (" (it has no modality-specific final norm: a single-modality MAE, whose one stream "
              "ran the joint LayerNorms; fine-tune it with ft_mode='multimodal', which pools "
              "that stream)")
    elif all(_is_visual(p[0]) for p in missing):
      hint = (" (it has no visual branch: a checkpoint of the original's audio-only CAVMAEFTAudio, "
              "which this model cannot hold; the released audio-only models are CAVMAEFT "
              "checkpoints and convert)")
    raise sd.ParamsMismatchError(
        f"{len(missing)} target parameters missing from the checkpoint{hint}: "
        f"{', '.join(sd.abbreviate(['/'.join(p) for p in missing], 24))}")
  filled_target = {p: leaf for p, leaf in target.items() if p not in kept_at_init}
  matched, match_report = sd.match_to_target(sd.unflatten_params(source),
                                             sd.unflatten_params(filled_target))
  report.mapped = {name: name for name in match_report.mapped}
  report.cast = list(match_report.cast)
  report.unexpected = list(match_report.unexpected)
  source_blocks, target_blocks = _block_counts(source), _block_counts(target)
  report_lib.check_no_unexpected(
      report, allow_unexpected,
      _other_layout(source_blocks, target_blocks)
      if source_blocks is not None and source_blocks != target_blocks else None)
  report.kept_init.update({"/".join(p): why for p, why in kept_at_init.items()})
  matched_flat = sd.flatten_params(matched)
  for path in kept_at_init:
    if not hasattr(target[path], "__array__"):
      raise ValueError(f"{'/'.join(path)} keeps its init value, so init_params must hold arrays "
                       "there, not shapes")
  params = sd.unflatten_params(
      {p: matched_flat[p] if p in matched_flat else np.asarray(leaf) for p, leaf in target.items()})
  return params, report


def _resize(name: str, value: np.ndarray, target_shape: tuple[int, ...],
            method: pos_embed_lib.ResizeMethod | None, freq_patches: int,
            report: report_lib.ConversionReport) -> np.ndarray:
  if len(target_shape) == 3 and value.ndim == 3 and target_shape[2] != value.shape[2]:
    raise sd.ParamsMismatchError(
        f"shape mismatch for {name}: checkpoint {value.shape} vs target {tuple(target_shape)} "
        f"(a different width: the checkpoint's embedding is {value.shape[2]} wide, the "
        f"config's {target_shape[2]}; use the config of the checkpoint's model size)")
  if method is None:
    raise sd.ParamsMismatchError(
        f"shape mismatch for {name}: checkpoint {value.shape} vs target {tuple(target_shape)} "
        "(a different audio length: choose audio_pos_resize='trim', 'interpolate' or 'sincos')")
  if len(target_shape) != 3 or target_shape[2] != value.shape[2] or target_shape[1] % freq_patches:
    raise sd.ParamsMismatchError(
        f"shape mismatch for {name}: checkpoint {value.shape} vs target {tuple(target_shape)} "
        "cannot be fixed by resizing the time axis")
  time_patches = target_shape[1] // freq_patches
  try:
    resized = pos_embed_lib.resize_audio_pos_embed(
        value, freq_patches=freq_patches, time_patches=time_patches, method=method)
  except ValueError as e:  # the request does not fit this table
    raise sd.ParamsMismatchError(f"{name}: {e}") from None
  report.notes.append(f"{name}: {method} {freq_patches} x {value.shape[1] // freq_patches} -> "
                      f"{freq_patches} x {time_patches} audio grid")
  if method == "interpolate" and pos_embed_lib.is_sincos(value, freq_patches):
    report.notes.append(
        f"{name}: the checkpoint's table is the fixed sin-cos embedding; 'interpolate' stretched "
        "it (a model built at this length, as the original builds one, has it recomputed: "
        "audio_pos_resize='sincos')")
  return resized
