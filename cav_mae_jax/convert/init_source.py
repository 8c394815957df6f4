"""One checkpoint world: every source of parameters a run can start from, with one accounting.

`config.init.source` names the kind of `config.init.path`:
  workdir       a training workdir of ours (params of checkpoint `step`, 0 = the latest)
  params        a params checkpoint written by tools/convert.py
  cavmae        an original CAV-MAE .pth (pretraining or fine-tuning layout, `module.` or not)
  imagenet_mae  ImageNet-MAE weights (facebookresearch/mae), mapped as the original's init
Our own params go through the original's layout first, so that every source is mapped by the
same strict rules (`cavmae_checkpoint`): a decoder dropped for a fine-tuning model, a new head
where asked, audio position grids trimmed, interpolated or recomputed where asked, and every target
parameter accounted for in the report.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from cav_mae_jax import models
from cav_mae_jax.convert import cavmae_checkpoint
from cav_mae_jax.convert import export
from cav_mae_jax.convert import formats
from cav_mae_jax.convert import imagenet_mae
from cav_mae_jax.convert import io
from cav_mae_jax.convert import report as report_lib
from cav_mae_jax.convert import state_dict as sd

REPORT_FILE = "init_report.txt"


def check_params_source(path: str) -> None:
  """Raises FileNotFoundError when `path` is neither a training workdir nor a params checkpoint
  (e.g. a records directory given by mistake), saying what each would hold."""
  from cav_mae_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  if "://" in path:  # a remote file system (gs://...): orbax reads it and says what is missing
    return
  if checkpoint.is_workdir(path) or io.holds_params(path):
    return
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: does not exist (no params checkpoint or training workdir)")
  raise FileNotFoundError(
      f"{path}: neither a training workdir (no {checkpoint.CHECKPOINT_DIR}/ inside) nor a params "
      f"checkpoint (no orbax {io.ORBAX_METADATA_FILE} file inside)")


def read_params(path: str, step: int = 0) -> dict[str, Any]:
  """Our params (NumPy) from a training workdir (checkpoint `step`, 0 = latest) or params dir."""
  from cav_mae_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  check_params_source(path)
  if checkpoint.is_workdir(path):
    return checkpoint.read_workdir_params(path, step)[0]
  return io.load_params(path)


def read_model_config(path: str) -> dict[str, Any]:
  """The model config of a training workdir (its config.json) or of a params checkpoint."""
  from cav_mae_jax.train import checkpoint, run_config  # pylint: disable=g-import-not-at-top
  if checkpoint.is_workdir(path):
    config = run_config.read_run_config(path)
    if config is None:
      raise FileNotFoundError(f"{path}: no {run_config.RUN_CONFIG_FILE} in the workdir")
    return config.model.to_dict()
  return io.load_model_config(path)


def stored_model_field(path: str, name: str) -> Any:
  """Field `name` of the model config stored with a workdir or params checkpoint, or None when
  none is stored (or it cannot be read, or lacks the field): for settings the parameters'
  shapes cannot tell apart (`ft_mode`, `norm_pix_loss`), checked against a config's."""
  try:
    return read_model_config(path).get(name)
  except (OSError, ValueError):
    return None


def normalization_settings(data: Any) -> dict[str, Any]:
  """The fields of a run's `config.data` that fix its fbank normalization, as plain JSON."""
  mean, std = data.get("fbank_mean"), data.get("fbank_std")
  return {"fbank_stats": data.get("fbank_stats", "fixed"),
          "fbank_mean": None if mean is None else float(mean),
          "fbank_std": None if std is None else float(std)}


def read_fbank_normalization(path: str) -> dict[str, Any] | None:
  """How the run behind a training workdir or params checkpoint normalized its fbanks.

  `normalization_settings` of the workdir's config.json, or what a params checkpoint records
  (tools/average.py and the eval export write it; with fbank_stats='index' also the statistics
  themselves, `mean` and `std`, when they could be read); None where nothing says.
  """
  from cav_mae_jax.train import checkpoint, run_config  # pylint: disable=g-import-not-at-top
  if checkpoint.is_workdir(path):
    config = run_config.read_run_config(path)
    if config is None or "data" not in config:
      return None
    return normalization_settings(config.data)
  return io.load_fbank_normalization(path)


def normalization_record(path: str, *, require_statistics: bool = False) -> dict[str, Any] | None:
  """`read_fbank_normalization(path)`, with fbank_stats='index' also the statistics (`mean`,
  `std`): read from the run's training split for a workdir (TensorFlow is imported then).

  A split that cannot be read any more, or a params checkpoint that does not record them,
  leaves them out, or with `require_statistics` is a ValueError saying why (never AudioSet's
  numbers in their place).
  """
  from cav_mae_jax.train import checkpoint, run_config  # pylint: disable=g-import-not-at-top
  record = read_fbank_normalization(path)
  if record is None or record["fbank_stats"] != "index" or "mean" in record:
    return record
  why = (f"{path}: the run normalized fbanks with its training split's statistics "
         "(config.data.fbank_stats='index')")
  if not checkpoint.is_workdir(path):
    if require_statistics:
      raise ValueError(f"{why}, which this params checkpoint does not record")
    return record
  from cav_mae_jax.data import dataset  # pylint: disable=g-import-not-at-top
  try:
    normalization = dataset.fbank_normalization(run_config.read_run_config(path))
  except (OSError, ValueError) as e:
    if require_statistics:
      raise ValueError(f"{why}, which cannot be read: {e}") from e
    return record
  return {**record, "mean": normalization.mean, "std": normalization.std}


def load_init_params(init: ml_collections.ConfigDict, model_config: Any, *, finetune: bool,
                     init_params: dict[str, Any]) -> tuple[dict[str, Any],
                                                           report_lib.ConversionReport]:
  """(params, report): `init.path` mapped onto the target model's `init_params` (NumPy).

  `init_params` gives the values of parameters the source does not have (a new head, a learned
  temperature, ImageNet-MAE's missing decoder) and the shapes of all others. Our own sources
  are mapped through the original's layout; what it has no place for (a learned temperature)
  is taken from them directly where the target has it too. A file that is no state dict is
  named as config.init.path.
  """
  try:
    return _load_init_params(init, model_config, finetune=finetune, init_params=init_params)
  except formats.CheckpointFileError as e:
    raise ValueError(f"config.init.path={e}") from None


def _load_init_params(init: ml_collections.ConfigDict, model_config: Any, *, finetune: bool,
                      init_params: dict[str, Any]) -> tuple[dict[str, Any],
                                                            report_lib.ConversionReport]:
  config = models.ModelConfig.from_config(model_config)
  if init.source == "imagenet_mae":
    if finetune:
      raise ValueError("config.init.source='imagenet_mae' initializes a pretraining model; "
                       "pretrain first, then fine-tune from that workdir.")
    with sd.naming_source(f"config.init.path={init.path}"):
      return imagenet_mae.imagenet_mae_to_params(
          formats.read_state_dict(init.path), init_params, allow_unexpected=init.allow_unexpected)
  check_architecture(init.source, init.path, config, finetune=finetune)
  notes, ours_only = [], {}
  if init.source == "cavmae":
    state_dict = formats.read_state_dict(init.path)
  elif init.source in ("workdir", "params"):
    from cav_mae_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
    try:  # either kind of ours, whichever `source` says; another path is named as such
      source_params = read_params(init.path, init.step)
    except checkpoint.MissingStepError as e:
      raise FileNotFoundError(f"config.init.step={init.step}: {e}") from None
    except FileNotFoundError as e:
      raise FileNotFoundError(f"config.init.path={e}") from None
    # Ours alone (a learned temperature) goes on from the checkpoint when the target has it too.
    ours_only = {name: np.asarray(source_params[name]) for name in cavmae_checkpoint.NOT_IN_ORIGINAL
                 if name in source_params and name in init_params}
    state_dict, notes = export.to_original_state_dict(
        {name: value for name, value in source_params.items() if name not in ours_only})
  else:
    raise ValueError(f"config.init.source={init.source!r}: nothing to load.")
  # A source without a classification head (a pretrained model) gets a new one; a head of
  # another class count needs init.new_head, so that replacing a head is never silent.
  has_head = any(k.startswith("mlp_head") for k in sd.remove_module_prefix(state_dict))
  new_head = init.new_head or (finetune and not has_head)
  with sd.naming_source(f"config.init.path={init.path}"):
    params, report = cavmae_checkpoint.cavmae_to_params(
        state_dict, init_params, new_head=new_head,
        audio_pos_resize=init.audio_pos_resize or None, freq_patches=config.audio_grid[0],
        allow_unexpected=init.allow_unexpected)
  report.notes.extend(notes)
  if ours_only:
    params = _carry_over(params, ours_only, report, init.path)
  return params, report


def _carry_over(params: dict[str, Any], values: dict[str, np.ndarray],
                report: report_lib.ConversionReport, path: str) -> dict[str, Any]:
  """`params` with the top-level parameters `values` (ours, absent from the original's layout,
  so the mapping kept them at init) taken from the source checkpoint at `path`."""
  params = report_lib.overlay(params, {(name,): value for name, value in values.items()}, report,
                              {(name,): f"{path} {name}" for name in values})
  for name in values:
    report.kept_init.pop(name, None)
  return params


# The original's one architecture (ViT-B encoder, 512-wide decoder): the head counts of an
# original checkpoint, which it does not store (docs/original.md).
ORIGINAL_HEADS = {"num_heads": (768, 12), "decoder_num_heads": (512, 16)}


def check_head_counts(source: str, path: str, model: models.ModelConfig, *,
                      finetune: bool) -> None:
  """Raises ValueError naming the field when the target splits attention into other heads than
  the source was trained with. Head counts are the one architecture setting the parameters'
  names and shapes do not show (qkv is embed x 3*embed for any count), so loading would succeed
  and compute another model. `source` is the kind of `path` (`config.init.source`'s names).
  Checked against the config stored with our workdirs and params checkpoints, and for an original
  .pth ('cavmae') against the original's base architecture; the decoder's only when it is loaded
  (a pretraining target)."""
  fields = ("num_heads",) if finetune else ("num_heads", "decoder_num_heads")
  width = {"num_heads": "embed_dim", "decoder_num_heads": "decoder_embed_dim"}
  for name in fields:
    ours = getattr(model, name)
    if source in ("workdir", "params"):
      theirs = stored_model_field(path, name)
      stored = stored_model_field(path, width[name])
      if theirs is None or stored != getattr(model, width[name]):
        continue  # nothing stored, or another width (the parameters' shapes tell that apart)
      where = "its stored config"
    elif source == "cavmae" and getattr(model, width[name]) == ORIGINAL_HEADS[name][0]:
      theirs = ORIGINAL_HEADS[name][1]
      where = f"the original's architecture at {width[name]}={ORIGINAL_HEADS[name][0]}"
    else:
      continue
    if theirs != ours:
      raise ValueError(f"config.model.{name}={ours}: {path} was trained with {name}={theirs} "
                       f"({where}); its parameters would load and compute another model. Set "
                       f"--config.model.{name}={theirs}")


# The original's fbank: 128 mel bins, hard-coded (docs/original.md).
ORIGINAL_MEL_BINS = 128


def check_frequency_grid(source: str, path: str, model: models.ModelConfig) -> None:
  """Raises ValueError naming config.model.num_mel_bins when the target's audio patch grid has
  another number of frequency rows than the source's: the audio position table is laid out on
  that grid, so it would be read as another one (the shapes can even agree: 8 x 128 patches and
  4 x 256), or resized along the wrong axis. Against the config stored with our workdirs and
  params checkpoints, and for an original .pth ('cavmae') of the original's width against its
  128 mel bins (as `check_head_counts`)."""
  if source in ("workdir", "params"):
    bins = stored_model_field(path, "num_mel_bins")
    patch = stored_model_field(path, "patch_size")
    if bins is None or patch is None:
      return
    where = "its stored config"
  elif source == "cavmae" and model.embed_dim == ORIGINAL_HEADS["num_heads"][0]:
    bins, patch = ORIGINAL_MEL_BINS, model.patch_size  # a file of another width: not known
    where = f"the original's fbank, at embed_dim={model.embed_dim}"
  else:
    return
  rows = bins // patch
  if rows != model.audio_grid[0]:
    raise ValueError(f"config.model.num_mel_bins={model.num_mel_bins}: {path} was trained on "
                     f"{bins} mel bins ({where}), and its audio position table is laid out on "
                     f"{rows} rows of frequency patches, this model's on {model.audio_grid[0]}. "
                     f"Set --config.model.num_mel_bins={bins} (and records of {bins} mel bins)")


def check_architecture(source: str, path: str, model: models.ModelConfig, *,
                       finetune: bool) -> None:
  """What the parameters' shapes do not show of the model `path` was trained as: its head
  counts (`check_head_counts`) and its audio frequency grid (`check_frequency_grid`)."""
  check_head_counts(source, path, model, finetune=finetune)
  check_frequency_grid(source, path, model)


def write_report(workdir: str, init: ml_collections.ConfigDict,
                 report: report_lib.ConversionReport) -> str:
  """Writes the conversion account to `workdir/init_report.txt`; returns its text."""
  text = (f"initialized from {init.source} {init.path}"
          f"{f' (step {init.step})' if init.source == 'workdir' and init.step else ''}\n"
          f"{report.summary()}\n")
  with open(os.path.join(workdir, REPORT_FILE), "w") as f:
    f.write(text)
  return text
