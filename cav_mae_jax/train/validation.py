"""Checks of a run's config before anything is traced: a bad value raises ValueError naming
the field.

Each section is checked in one place: `config.model` by `ModelConfig.from_config`, `config.data`
by the input pipeline's `DataConfig`, each `config.evals` entry by its evaluator type; this
module checks the rest and the relations between sections (batch vs devices, contrast groups vs
batch, data sources vs model: `cav_mae_jax.data.dataset.check_data_sources`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection
from typing import Any

import ml_collections
import numpy as np

from cav_mae_jax import seeds
from cav_mae_jax.data.config import DataConfig
from cav_mae_jax.models import masking
from cav_mae_jax.models.config import ModelConfig
from cav_mae_jax.train import mesh as mesh_lib
from cav_mae_jax.train import optim



def _fail(field: str, value: Any, why: str) -> None:
  raise ValueError(f"config.{field}={value!r}: {why}")


def validate_config(config: ml_collections.ConfigDict, num_devices: int,
                    num_processes: int = 1, check_data: bool = True,
                    training: bool = True, platforms: Collection[str] | None = None
                    ) -> ModelConfig:
  """Validates `config` for a run on `num_devices` devices; returns the checked ModelConfig.

  `check_data=False` skips what needs the data (and TensorFlow): every split the run reads
  (records directories or TFDS splits) and their shapes against the model; the fields of
  `config.data` are checked either way (`DataConfig`; SpecAugment's mask sizes against the
  model's input only with the data). `training=False` (evaluation only) does not need the
  training split. `platforms`: those of the devices the run computes on (default: JAX's devices
  here; a compile for another machine's devices gives theirs).
  """
  from cav_mae_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
  from cav_mae_jax import tasks  # pylint: disable=g-import-not-at-top
  _validate_set(config)
  if training:  # (evaluation draws nothing from it: recorded runs' configs stay evaluable)
    seeds.check("config.seed", config.seed)
  tasks.validate_config(config)
  model = ModelConfig.from_config(config.model)
  if config.task == "pretrain" and model.lambda_mae == 0 and model.lambda_c == 0:
    _fail("model.lambda_c", model.lambda_c, "lambda_mae and lambda_c are both 0: nothing to "
          "train.")
  _validate_platforms(model, platforms)
  _validate_masking(config, model, training)
  _validate_unused(config, model, training)
  if config.data.get("eval_all_frames"):
    _fail("data.eval_all_frames", config.data.eval_all_frames,
          "is set by each classification evaluator for its own passes "
          "(config.evals.<name>.all_frames=True scores all 10 frames); the losses and retrieval "
          "evaluators take one frame (config.data.eval_frame).")
  DataConfig.from_config(config, against_model=check_data)
  _validate_duration(config)
  _validate_batch(config, model, num_devices, num_processes)
  mesh_lib.mesh_shape(config.mesh, num_devices)
  _validate_optim(config)
  _validate_checkpoint(config)
  _validate_init(config, training)
  eval_lib.validate_evals(config, None, num_devices, num_processes)
  if check_data:
    from cav_mae_jax.data import input as input_lib  # pylint: disable=g-import-not-at-top
    input_lib.check_data_sources(
        config, training, num_classes=model.num_classes if tasks.uses_labels(config) else None,
        process_count=num_processes)
  return model


# The device computes in float32 (or less): a field's value must be one of its normal numbers.
_FLOAT32_TINY, _FLOAT32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)

# The fields a run may leave unset (None): exactly one of the two durations.
UNSETTABLE = ("total_steps", "total_epochs")


def _validate_set(config: ml_collections.ConfigDict, prefix: str = "") -> None:
  """Every field but `UNSETTABLE` has a value: `--config.<field>=None` (meant for those, and to
  remove an evaluator) on any other field stops here, naming it, not at its first use."""
  for key in config.keys():
    value, path = config[key], prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      _validate_set(value, path + ".")
    elif value is None and path not in UNSETTABLE:
      _fail(path, None, f"needs a value: only {' and '.join(UNSETTABLE)} can be unset (None), "
            "and an evaluator removed with --config.evals.<name>=None.")
    elif isinstance(value, float) and not math.isfinite(value):
      # No field means anything by NaN or infinity: a loss weight of NaN compiled and failed
      # at its first step, an infinite every_epochs after it, an infinite mlp_ratio in init.
      _fail(path, value, "must be finite.")
    elif isinstance(value, float) and value and not _FLOAT32_TINY <= abs(value) <= _FLOAT32_MAX:
      # 1e39 became inf on the device (a learning rate: a NaN loss at step 2), 1e-40 nearly 0.
      _fail(path, value, f"must be 0 or of magnitude in [{_FLOAT32_TINY:.4g}, "
            f"{_FLOAT32_MAX:.4g}] (float32's normal numbers).")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
      _fail(path, value, "must fit in 64 bits.")


def _validate_masking(config: ml_collections.ConfigDict, model: ModelConfig,
                      training: bool) -> None:
  """Pretraining keeps at least one token of each stream, and with the reconstruction loss
  removes at least one (its mean over removed patches is 0 / 0 otherwise); in training, a
  structured audio mask masks whole columns or rows (a check newer than recorded runs)."""
  if config.task != "pretrain":
    return
  streams = [("a", model.num_audio_patches, model.uses_audio),
             ("v", model.num_image_patches, model.uses_video)]
  for suffix, tokens, used in streams:
    if not used:
      continue
    field = f"model.mask_ratio_{suffix}"
    ratio = getattr(model, f"mask_ratio_{suffix}")
    kept = masking.num_kept(tokens, ratio)
    if kept < 1:
      _fail(field, ratio, f"keeps int({tokens} x (1 - {ratio})) = 0 of the {tokens} patches; "
            "the encoder needs at least one.")
    if model.lambda_mae > 0 and kept == tokens:
      _fail(field, ratio, f"removes none of the {tokens} patches, so the reconstruction loss "
            f"(lambda_mae={model.lambda_mae}) has nothing to reconstruct (0 / 0); mask some, or "
            "train the contrastive loss alone (lambda_mae=0).")
  if training and model.uses_audio and model.mask_ratio_a > 0:
    # The original's rule too: such a run trained with (partly) unstructured masks.
    rows, cols = model.audio_grid
    counts = masking.structured_counts(model.audio_grid, model.mask_ratio_a, model.mask_mode_a)
    lines = {"time": ("time columns", cols), "freq": ("frequency rows", rows)}
    for axis, count in counts.items():
      if count == 0:
        whole = [lines[other][0] for other, n in counts.items() if n]
        result = (f"only its {whole[0]} would be masked whole" if whole
                  else "the masks would be random")
        _fail("model.mask_mode_a", model.mask_mode_a, f"masks no whole {lines[axis][0]} of "
              f"{lines[axis][1]} at mask_ratio_a={model.mask_ratio_a} (the audio patch grid is "
              f"{rows} x {cols}): {result}; raise mask_ratio_a.")


def _validate_unused(config: ml_collections.ConfigDict, model: ModelConfig,
                     training: bool) -> None:
  """A model setting the run would ignore is refused when it asks for something: a user who sets
  it expects an effect. (Settings the recipes carry for every variant, such as the temperature
  of a model without the contrastive loss, are not checked: refusing them would
  refuse the recipes. The checks marked `training` were added after runs recorded configs that
  hold such settings: those configs are still evaluated, so the checks refuse training alone.)"""
  default = ModelConfig()
  if model.remat_policy != default.remat_policy and not model.remat:
    _fail("model.remat_policy", model.remat_policy, "chooses what rematerialization keeps, and "
          "config.model.remat is False, so nothing is rematerialized: set it True too.")
  if config.task != "pretrain" and model.learnable_temperature:
    _fail("model.learnable_temperature", True, f"learns the contrastive loss's temperature, "
          f"which only pretraining has (config.task={config.task!r}).")
  if config.task == "pretrain" and model.learnable_temperature and not model.has_contrast:
    _fail("model.learnable_temperature", True, "learns the contrastive loss's temperature, and "
          "this model has no contrastive loss (model.lambda_c=0).")
  if (training and config.task == "pretrain" and model.contrast_bidirectional
      and not model.has_contrast):
    _fail("model.contrast_bidirectional", True, "makes the contrastive loss bidirectional, and "
          "this model has no contrastive loss (model.lambda_c=0).")
  if training and config.task != "pretrain":
    # Fine-tuning's model section carries the pretraining fields of its size's recipe (mask
    # ratios, decoder, loss weights, temperature); these three no recipe of it sets.
    for field, why in (("contrast_group_size", "sizes pretraining's contrastive groups"),
                       ("contrast_bidirectional", "makes pretraining's contrastive loss "
                        "bidirectional"),
                       ("mask_mode_a", "chooses how pretraining masks the audio")):
      if getattr(model, field) != getattr(default, field):
        _fail(f"model.{field}", getattr(model, field), f"{why}; config.task={config.task!r} "
              "has no contrastive loss and masks nothing.")
  if config.task == "pretrain" and model.ft_mode != default.ft_mode:
    _fail("model.ft_mode", model.ft_mode, "chooses the streams a fine-tuned classifier uses; "
          "pretraining trains every stream the model has (model.modalities chooses them).")
  if training and config.task == "pretrain" and model.num_classes != default.num_classes:
    _fail("model.num_classes", model.num_classes, "sizes a fine-tuned classifier's head, and a "
          "pretraining model has none.")
  if config.task == "pretrain" and config.init.new_head:
    _fail("init.new_head", True, "makes a new classification head, and a pretraining model has "
          "none.")
  if training and config.data.tfds_name and config.data.train_dir and config.data.eval_dir:
    _fail("data.tfds_name", config.data.tfds_name, "names the TFDS dataset of the splits without "
          "a records directory, and both have one (config.data.train_dir and eval_dir): leave "
          "it out (--config.data.tfds_name=''), or one of the directories.")
  from cav_mae_jax import tasks  # pylint: disable=g-import-not-at-top
  if config.data.label_smooth and not tasks.uses_labels(config):
    _fail("data.label_smooth", config.data.label_smooth, "smooths the training labels, and "
          f"config.task={config.task!r} trains on none.")


def _validate_platforms(model: ModelConfig, platforms: Collection[str] | None) -> None:
  if model.attention_impl != "cudnn":
    return
  if platforms is None:
    import jax  # pylint: disable=g-import-not-at-top
    platforms = {device.platform for device in jax.devices()}
  if set(platforms) != {"gpu"}:
    _fail("model.attention_impl", model.attention_impl,
          f"cuDNN's attention runs on NVIDIA GPUs, and this run's devices are "
          f"{', '.join(sorted(platforms))}; use 'xla'")


def _validate_duration(config: ml_collections.ConfigDict) -> None:
  steps, epochs = config.total_steps, config.total_epochs
  if (steps is None) == (epochs is None):
    _fail("total_steps", steps, f"set exactly one of total_steps / total_epochs "
          f"(total_epochs={epochs!r}; on the command line --config.total_epochs=None or "
          "--config.total_steps=None unsets one).")
  if steps is not None and not steps > 0:
    _fail("total_steps", steps, "must be positive.")
  if epochs is not None and not 0 < epochs < math.inf:
    _fail("total_epochs", epochs, "must be positive and finite.")
  if not config.log_every_steps > 0:
    _fail("log_every_steps", config.log_every_steps, "must be positive.")
  if not isinstance(config.tensorboard, bool):
    _fail("tensorboard", config.tensorboard, "must be True or False.")


def _validate_batch(config: ml_collections.ConfigDict, model: ModelConfig, num_devices: int,
                    num_processes: int) -> None:
  batch = config.data.batch_size
  if batch <= 0:
    _fail("data.batch_size", batch, "must be positive.")
  if batch % num_devices:
    _fail("data.batch_size", batch, f"must be divisible by the number of devices ({num_devices}).")
  if batch % num_processes:
    _fail("data.batch_size", batch,
          f"must be divisible by the number of processes ({num_processes}).")
  group = model.contrast_group_size
  if config.task != "pretrain":
    return
  batches = {"data.batch_size": batch}
  batches.update({f"evals.{name}.batch_size": entry.batch_size
                  for name, entry in config.evals.items() if entry.type == "losses"})
  # Both pretraining losses are summed over the groups (the original's GPUs), so a model
  # without the contrastive loss uses them too (it stopped at its first step).
  for field, value in batches.items():
    if group and value % group:
      _fail("model.contrast_group_size", group, f"must divide config.{field}={value}.")
  if not model.has_contrast:
    return
  # A group of one clip has no other clip to contrast with: loss_c was 0 and c_acc 1 at every
  # step, whatever the model learned.
  if group == 1:
    _fail("model.contrast_group_size", group, "leaves each clip alone in its contrastive group: "
          "no other clip to contrast with (loss_c is 0 whatever the model); use at least 2, or 0 "
          "for the whole batch.")
  for field, value in batches.items():
    if not group and value == 1:
      _fail(field, value, "is the contrastive group (config.model.contrast_group_size=0): one "
            "clip has no other clip to contrast with (loss_c is 0 whatever the model).")


def _validate_optim(config: ml_collections.ConfigDict) -> None:
  opt = config.optim
  if not 0 < opt.learning_rate < math.inf:
    _fail("optim.learning_rate", opt.learning_rate, "must be positive and finite.")
  for field in ("b1", "b2"):
    if not 0 <= opt[field] < 1:
      _fail(f"optim.{field}", opt[field], "must be in [0, 1).")
  if not 0 < opt.eps < math.inf:
    _fail("optim.eps", opt.eps, "must be positive and finite.")
  for field in ("weight_decay", "grad_clip_norm"):
    if not 0 <= opt[field] < math.inf:
      _fail(f"optim.{field}", opt[field], "must be >= 0 and finite (0 = off).")
  sched = config.schedule
  if sched.kind not in optim.SCHEDULE_KINDS:
    _fail("schedule.kind", sched.kind, f"must be one of {optim.SCHEDULE_KINDS}.")
  if sched.kind == "multistep":
    if not 0 <= sched.first_decay_epoch < math.inf:
      _fail("schedule.first_decay_epoch", sched.first_decay_epoch, "must be >= 0 and finite.")
    if not 0 < sched.decay_every_epochs < math.inf:
      _fail("schedule.decay_every_epochs", sched.decay_every_epochs,
            "must be positive and finite.")
    if not 0 < sched.decay_factor <= 1:
      _fail("schedule.decay_factor", sched.decay_factor, "must be in (0, 1].")
  else:
    if not 0 <= sched.warmup_epochs < math.inf:
      _fail("schedule.warmup_epochs", sched.warmup_epochs, "must be >= 0 and finite.")
    if not 0 <= sched.final_lr_fraction <= 1:
      _fail("schedule.final_lr_fraction", sched.final_lr_fraction, "must be in [0, 1].")


def _validate_checkpoint(config: ml_collections.ConfigDict) -> None:
  if config.checkpoint.every_steps < 0:
    _fail("checkpoint.every_steps", config.checkpoint.every_steps, "must be >= 0 (0 = end only).")
  if config.checkpoint.keep < 1:
    _fail("checkpoint.keep", config.checkpoint.keep, "must be >= 1.")


INIT_SOURCES = ("", "workdir", "params", "cavmae", "imagenet_mae")
AUDIO_POS_RESIZE = ("", "trim", "interpolate", "sincos")


def _validate_init(config: ml_collections.ConfigDict, training: bool) -> None:
  init = config.init
  if init.source not in INIT_SOURCES:
    _fail("init.source", init.source, f"must be one of {INIT_SOURCES} ('' = random init).")
  if init.source and not init.path:
    _fail("init.path", init.path, f"init.source={init.source!r} needs a path.")
  if not init.source:  # random init: what would say where and how to load weights is unused
    for field, unused in (("path", ""), ("step", 0), ("new_head", False),
                          ("audio_pos_resize", ""), ("allow_unexpected", False)):
      if init[field] != unused:
        _fail(f"init.{field}", init[field], "applies only to a run that starts from weights, "
              "and config.init.source is '' (random init): set it to workdir, params, cavmae "
              "or imagenet_mae.")
  if init.source and not _exists(init.path):
    _fail("init.path", init.path, "does not exist.")
  if init.step < 0:
    _fail("init.step", init.step, "must be >= 0 (0 = the latest checkpoint).")
  if init.source not in ("", "workdir") and init.step:
    _fail("init.step", init.step, f"picks a checkpoint of a training workdir "
          f"(config.init.source='workdir'); config.init.source={init.source!r} is one file of "
          "weights: leave it 0.")
  if init.audio_pos_resize not in AUDIO_POS_RESIZE:
    _fail("init.audio_pos_resize", init.audio_pos_resize, f"must be one of {AUDIO_POS_RESIZE}.")
  if training and init.source == "imagenet_mae" and init.audio_pos_resize:  # (newer check)
    _fail("init.audio_pos_resize", init.audio_pos_resize, "fits a CAV-MAE checkpoint's audio "
          "position grid to another audio length; an ImageNet MAE (config.init.source="
          "'imagenet_mae') has no audio stream: leave it ''.")


def _exists(path: str) -> bool:
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (remote file systems)
    return tf.io.gfile.exists(path)
  return os.path.exists(path)
