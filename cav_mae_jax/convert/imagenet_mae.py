"""ImageNet MAE (facebookresearch/mae layout, with or without its decoder) -> CAV-MAE params.

The rules of the original's `adapt_vmae_weights.py` (docs/original.md, Initialization from
ImageNet MAE), for S = modality_specific_depth:
  blocks.i (i < S)        -> blocks_a.i and blocks_v.i
  blocks.i (i >= S)       -> blocks_u.(i-S), norm1/norm2 also copied to norm1_a/_v, norm2_a/_v
  norm                    -> norm_a, norm_v, norm
  patch_embed.proj        -> patch_embed_v.proj; patch_embed_a.proj = kernel summed over RGB
  pos_embed [1, 1+N, D]   -> pos_embed_v (CLS row dropped)
  decoder_pos_embed       -> decoder_pos_embed_v (CLS row dropped)
  decoder_pred            -> decoder_pred_v; decoder_pred_a = its first p*p output rows
  mask_token, decoder_embed, decoder_blocks.k, decoder_norm -> same names
  cls_token               -> dropped (CAV-MAE has no CLS token)
Everything else (modality embeddings, audio position embeddings, the unused norm*_a/_v of the
modality-specific and decoder blocks) keeps the target model's init values, as in the original.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from cav_mae_jax.convert import report as report_lib
from cav_mae_jax.convert import state_dict as sd

BLOCK_KEYS = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
    "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias")
ENCODER_KEYS = ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "norm.weight",
                "norm.bias")
DECODER_KEYS = ("mask_token", "decoder_embed.weight", "decoder_embed.bias", "decoder_pos_embed",
                "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight",
                "decoder_pred.bias")
_BLOCK = re.compile(r"^(decoder_blocks|blocks)\.(\d+)\.(.+)$")
# Modules of CAV-MAE's two-stream model that ImageNet MAE lacks: a file holding them is a CAV-MAE
# checkpoint, which was told only which ImageNet MAE keys it lacks.
_CAVMAE_ONLY = ("blocks_a", "blocks_v", "blocks_u", "patch_embed_a", "pos_embed_a", "modality_a")
_FINETUNED_VIT_HINT = (" (it is a fine-tuned ViT: fc_norm and a classification head instead of "
                       "the pretrained MAE's norm; start from the MAE's pretraining checkpoint, "
                       "e.g. mae_pretrain_vit_base_full.pth)")
_CAVMAE_HINT = (" (it is a CAV-MAE checkpoint, with blocks_a, blocks_v and blocks_u: map it with "
                "tools/convert.py cavmae or config.init.source='cavmae')")


def _count_indexed(params: Mapping[str, Any], prefix: str) -> int:
  return sum(1 for name in params if re.fullmatch(rf"{prefix}_\d+", name))


def _family(name: str) -> str:
  """'blocks_a_3' -> 'blocks_a': the module list a top-level name belongs to."""
  return re.sub(r"_\d+$", "", name)


def _has_decoder(state_dict: Mapping[str, np.ndarray]) -> bool:
  return any(k.startswith("decoder_") or k == "mask_token" for k in state_dict)


def required_mae_keys(encoder_depth: int, decoder_depth: int | None) -> list[str]:
  """Keys an ImageNet MAE state dict needs (decoder_depth None: encoder only)."""
  keys = list(ENCODER_KEYS)
  keys += [f"blocks.{i}.{k}" for i in range(encoder_depth) for k in BLOCK_KEYS]
  if decoder_depth is not None:
    keys += list(DECODER_KEYS)
    keys += [f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in BLOCK_KEYS]
  return keys


def mae_rules(
    state_dict: Mapping[str, np.ndarray], *, modality_specific_depth: int, patch_size: int
) -> tuple[dict[str, tuple[np.ndarray, str]], dict[str, str], list[str]]:
  """Applies the rules: ({cav-mae torch key: (array, source)}, {dropped source: why},
  unexpected)."""
  mapped: dict[str, tuple[np.ndarray, str]] = {}
  dropped: dict[str, str] = {}
  unexpected: list[str] = []
  for key, value in state_dict.items():
    block = _BLOCK.match(key)
    if block and block.group(1) == "blocks":
      index, rest = int(block.group(2)), block.group(3)
      if index < modality_specific_depth:
        mapped[f"blocks_a.{index}.{rest}"] = (value, key)
        mapped[f"blocks_v.{index}.{rest}"] = (value, key)
      else:
        joint = index - modality_specific_depth
        mapped[f"blocks_u.{joint}.{rest}"] = (value, key)
        norm = re.match(r"^(norm[12])\.(weight|bias)$", rest)
        if norm:
          for modality in ("a", "v"):
            mapped[f"blocks_u.{joint}.{norm.group(1)}_{modality}.{norm.group(2)}"] = (value, key)
    elif block:  # decoder_blocks map by name
      mapped[key] = (value, key)
    elif key in ("norm.weight", "norm.bias"):
      leaf = key.split(".")[1]
      for name in ("norm_a", "norm_v", "norm"):
        mapped[f"{name}.{leaf}"] = (value, key)
    elif key == "patch_embed.proj.weight":
      mapped["patch_embed_v.proj.weight"] = (value, key)
      mapped["patch_embed_a.proj.weight"] = (
          value.sum(axis=1, keepdims=True),
          f"{key} summed over RGB")
    elif key == "patch_embed.proj.bias":
      mapped["patch_embed_v.proj.bias"] = (value, key)
      mapped["patch_embed_a.proj.bias"] = (value, key)
    elif key in ("pos_embed", "decoder_pos_embed"):
      mapped[f"{key}_v"] = (value[:, 1:], f"{key} without its CLS row")
    elif key.startswith("decoder_pred."):
      leaf = key.split(".")[1]
      mapped[f"decoder_pred_v.{leaf}"] = (value, key)
      mapped[f"decoder_pred_a.{leaf}"] = (value[:patch_size**2],
                                          f"{key} first {patch_size**2} rows")
    elif key in ("mask_token", "decoder_embed.weight", "decoder_embed.bias",
                 "decoder_norm.weight", "decoder_norm.bias"):
      mapped[key] = (value, key)
    elif key == "cls_token":
      dropped[key] = "CAV-MAE has no CLS token"
    else:
      unexpected.append(key)
  return mapped, dropped, unexpected


_STREAM_NORMS = ("norm1_a", "norm1_v", "norm2_a", "norm2_v")


def imagenet_mae_to_params(
    mae_state_dict: Mapping[str, np.ndarray], init_params: Mapping[str, Any], *,
    allow_unexpected: bool = False,
) -> tuple[dict[str, Any], report_lib.ConversionReport]:
  """Initializes CAV-MAE pretraining params from an ImageNet MAE state dict, on top of init_params.

  Depths and patch size are read from `init_params` (the target model's initial params). A
  missing MAE key, a shape mismatch, or (unless allowed) an MAE key without a rule raises
  ParamsMismatchError naming the key.
  """
  state_dict = sd.remove_module_prefix(mae_state_dict)
  specific = max(_count_indexed(init_params, "blocks_a"), _count_indexed(init_params, "blocks_v"))
  encoder_depth = specific + _count_indexed(init_params, "blocks_u")
  decoder_depth = _count_indexed(init_params, "decoder_blocks")
  patch_kernel = next(init_params[n]["proj"]["kernel"] for n in ("patch_embed_v", "patch_embed_a")
                      if n in init_params)
  patch_size = int(np.shape(patch_kernel)[0])

  source_decoder = _has_decoder(state_dict)
  missing = [k for k in required_mae_keys(encoder_depth, decoder_depth if source_decoder else None)
             if k not in state_dict]
  if missing:
    cavmae = any(_family(k.split(".")[0]) in _CAVMAE_ONLY for k in state_dict)
    # timm's fine-tuned ViT (MAE's fine-tuning recipe) pools into fc_norm and has a head: it is
    # missing only `norm`, which said nothing of why.
    finetuned = "fc_norm.weight" in state_dict and "norm.weight" not in state_dict
    raise sd.ParamsMismatchError(
        f"not an ImageNet MAE checkpoint for a {encoder_depth}-block encoder"
        f"{f' and {decoder_depth}-block decoder' if source_decoder else ''}"
        f"{_CAVMAE_HINT if cavmae else _FINETUNED_VIT_HINT if finetuned else ''}: "
        f"{len(missing)} keys missing: {', '.join(missing[:20])}"
        f"{' ...' if len(missing) > 20 else ''}")

  report = report_lib.ConversionReport()
  mapped, report.dropped, report.unexpected = mae_rules(
      state_dict, modality_specific_depth=specific, patch_size=patch_size)
  report_lib.check_no_unexpected(report, allow_unexpected)
  families = {_family(name) for name in init_params}
  updates, sources = {}, {}
  for torch_key, (value, source) in mapped.items():
    path, array = sd.torch_array_to_flax(torch_key, value)
    if _family(path[0]) not in families:
      report.dropped[f"{source} -> {'/'.join(path)}"] = "not a parameter of this model variant"
      continue
    updates[path], sources[path] = array, source
  params = report_lib.overlay(init_params, updates, report, sources)
  for path in sd.flatten_params(init_params):
    name = "/".join(path)
    if name not in report.mapped:
      if not source_decoder and (path[0].startswith("decoder_") or path[0] == "mask_token"):
        report.kept_init[name] = "MAE checkpoint has no decoder"
      elif len(path) > 1 and path[1] in _STREAM_NORMS:
        # Read as "the audio blocks were not loaded" when listed as blocks_a_*/* alone.
        report.kept_init[name] = ("only their per-stream norms norm1_a/_v, norm2_a/_v, which a "
                                  "block of one stream does not use (the original's neither)")
      else:
        report.kept_init[name] = "not in ImageNet MAE"
  return params, report
