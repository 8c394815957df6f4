r"""Fine-tuning and linear-probe configs: `--config configs/finetune.py:<recipe>[,option...]`.

Recipes (the original's fine-tuning scripts):
  as20k   AudioSet-20K: lr 5e-5, head x100, batch 36, 15 epochs, x0.5 after epoch 5 and each
          later one, no balanced sampling, BCE + mAP, weight average of epochs 3-15.
  as2m    AudioSet-2M: lr 1e-5, head x50, batch 48, 10 epochs, x0.5 after epoch 2 and each
          later one, balanced sampling, BCE + mAP, average of epochs 1-10.
  vgg     VGGSound (309 classes): lr 1e-4, head x10, batch 48, 10 epochs, x0.5 after epoch 2 and
          each later one, balanced sampling, cross-entropy on soft targets + accuracy, average
          of epochs 3-10.
  tiny    the tiny model on a CPU (the demo's synthetic classes): lr 1e-3, head x10, batch 16,
          cross-entropy, mixup on fbanks; seconds per epoch.
All real recipes: noise + time roll, SpecAugment (freq 48, time 192), mixup 0.5 with
Beta(10, 10) on the mean-removed waveforms (records written with --store-waveform; or
--config.data.mixup_on=fbank), label smoothing 0.1, AudioSet fbank statistics, trainable
position embeddings, a checkpoint at every epoch end (its params kept, for weight averaging).

Options: `classes=N` (default: the recipe's), `mode=<ft mode>` (multimodal, audioonly, videoonly,
missingaudioonly, missingvideoonly), `probe` (linear probe: encoder frozen, task 'probe'),
`encoder=<variant>`: the encoder of a pretraining variant other than CAV-MAE's (vanilla_avmae:
one shared encoder; audio_mae / visual_mae: a single-modality MAE, whose one stream the default
mode=multimodal pools, through the LayerNorms it trained).
e.g. `configs/finetune.py:vgg,mode=audioonly`, `configs/finetune.py:as20k,probe` or
`configs/finetune.py:as20k,encoder=audio_mae`.

Start from pretrained weights with `--config.init.source=workdir|params|cavmae
--config.init.path=...` (a source without a head gets a new one; a head of another class count
needs `--config.init.new_head=True`).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from cav_mae_jax.models.config import FT_MODES
from cav_mae_jax.models.config import model_config
from configs import common
from configs import pretrain

# Pretraining variants whose encoder differs from CAV-MAE's (configs/pretrain.py).
ENCODERS = ("vanilla_avmae", "audio_mae", "visual_mae")

RECIPES = {
    # name: (size, classes, lr, head x, batch, epochs, first decay epoch, balanced, loss,
    #        averaged epochs)
    "as20k": ("base", 527, 5e-5, 100.0, 36, 15, 5, False, "bce", (3, 15)),
    "as2m": ("base", 527, 1e-5, 50.0, 48, 10, 2, True, "bce", (1, 10)),
    "vgg": ("base", 309, 1e-4, 10.0, 48, 10, 2, True, "ce", (3, 10)),
    "tiny": ("tiny", 8, 1e-3, 10.0, 16, 10, 5, False, "ce", (5, 10)),
}


def parse_arg(arg: str) -> tuple[str, dict[str, str], bool]:
  """Splits 'recipe,classes=N,mode=M,probe' into (recipe, options, probe); unknowns raise."""
  recipe, *parts = [p.strip() for p in (arg or "tiny").split(",") if p.strip()]
  if recipe not in RECIPES:
    raise ValueError(f"config name {recipe!r}: unknown recipe; choose one of {sorted(RECIPES)}.")
  options, probe = {}, False
  for part in parts:
    key, sep, value = part.partition("=")
    if not sep and key == "probe":
      probe = True
    elif sep and key in ("classes", "mode", "encoder"):
      options[key] = value
    else:
      raise ValueError(f"config option {part!r}: unknown; options are classes=N, mode=M, "
                       "encoder=E, probe.")
  if options.get("mode", FT_MODES[0]) not in FT_MODES:
    raise ValueError(f"config option mode={options['mode']!r}: must be one of {FT_MODES}.")
  if options.get("encoder", ENCODERS[0]) not in ENCODERS:
    raise ValueError(f"config option encoder={options['encoder']!r}: must be one of {ENCODERS}.")
  return recipe, options, probe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked fine-tuning (or probe) config for `arg` (see the module docstring)."""
  recipe, options, probe = parse_arg(arg or "tiny")
  (size, classes, learning_rate, head_multiplier, batch_size, epochs, first_decay, balanced,
   loss, (first_avg, last_avg)) = RECIPES[recipe]
  tiny = recipe == "tiny"
  config = ml_collections.ConfigDict()
  config.task = "probe" if probe else "finetune"
  config.seed = 0
  config.total_steps = config_dict.placeholder(int)
  config.total_epochs = float(epochs)
  config.log_every_steps = 10 if tiny else 100
  config.tensorboard = True  # TensorBoard summaries beside metrics.jsonl (imports TensorFlow)
  config.init = common.init_config()

  config.model = model_config(
      size, num_classes=common.option(options, "classes", int, classes),
      ft_mode=options.get("mode", FT_MODES[0]), trainable_pos_embed=True,
      dtype="float32" if tiny else "bfloat16",
      **(pretrain.model_overrides({}, {options["encoder"]}) if "encoder" in options else {}))

  config.finetune = ml_collections.ConfigDict()
  config.finetune.loss = loss
  config.finetune.head_lr_multiplier = head_multiplier
  config.finetune.average_first_epoch = first_avg
  config.finetune.average_last_epoch = last_avg

  config.data = common.data_config(batch_size, noise=True, noise_on_device=not tiny,
                                   shuffle_buffer=256 if tiny else 10_000)
  config.data.freqm, config.data.timem = (12, 48) if tiny else (48, 192)
  config.data.mixup = 0.5
  config.data.mixup_on = "fbank" if tiny else "waveform"
  config.data.label_smooth = 0.1
  config.data.balanced_sampling = balanced

  config.optim = common.optim_config(learning_rate)
  config.schedule = common.multistep_schedule(first_decay_epoch=first_decay,
                                              decay_every_epochs=1)
  config.mesh = common.mesh_config()
  config.checkpoint = common.checkpoint_config(every_steps=0)
  config.checkpoint.every_epoch = True

  # Held-out classification at the end of every epoch (frame 5, as the original's per-epoch
  # evaluation, but on every clip); mAP for the multi-label recipes, accuracy for all.
  config.evals = ml_collections.ConfigDict()
  config.evals.val = common.evaluator("classification", every_steps=0, every_epochs=1.0,
                                      batch_size=batch_size, mode="", all_frames=False)
  config.lock()
  return config
