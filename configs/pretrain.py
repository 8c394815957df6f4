r"""CAV-MAE pretraining configs: `--config configs/pretrain.py:<arg>`.

`arg` is a comma-separated list: first a recipe, then optional ablation options.

Recipes (docs/original.md, Optimization):
  tiny     tiny model, float32, a few hundred steps: seconds to minutes on a CPU.
  base     the original's base script: lr 5e-5, batch 48, 25 epochs (the paper says its base
           models and ablations ran 12: add --config.total_epochs=12; docs/original.md).
  scale+   lr 1e-4, batch 120 (the Scale+ script; the README table says 108).
  scale++  lr 2e-4, batch 256 (the recommended released model).
  vgg      VGGSound pretraining: lr 1e-4, batch 120.

Paper recipes ran under torch DataParallel on 4 GPUs, so contrastive negatives came from each
GPU's quarter of the batch and the losses were summed over GPUs; they set
`model.contrast_group_size = batch / 4` (12, 30, 64, 30) to optimize the same objective. Use
`--config.model.contrast_group_size=0` for negatives over the whole global batch.

Ablation options (the paper's Tables 1-2 and its ablation study):
  mask_ratio=R        mask ratio of both modalities (e.g. 0.65, 0.85)
  mask_mode=M         audio mask mode: unstructured | time | freq | tf
  lambda_c=X          contrastive loss weight (e.g. 0.1 as in the retrieval tables)
  symmetric           bidirectional contrastive loss (audio->visual and visual->audio)
  vanilla_avmae       one shared encoder (modality_specific_depth=0), no contrastive loss
  avmae               AV-MAE: 11+1 encoder, no contrastive loss (lambda_c=0)
  cav                 CAV: contrastive only, no decoder (lambda_mae=0)
  audio_mae / visual_mae   single-modality MAE (one shared encoder; no retrieval evaluator;
                      fine-tune with configs/finetune.py:<recipe>,encoder=audio_mae)
  cosine              warmup + cosine schedule instead of the original MultiStep
e.g. `configs/pretrain.py:base,mask_mode=time` or `configs/pretrain.py:scale++,cav`.

Every field can be overridden with `--config.<path>=<value>`. Durations: exactly one of
`total_epochs` / `total_steps` is set; epochs become steps at run time from the training
records' example count (index.json).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from cav_mae_jax.models.config import model_config
from configs import common

RECIPES = {
    # name: (model size, learning rate, global batch, contrast group size, epochs)
    "tiny": ("tiny", 1e-3, 16, 0, None),
    "base": ("base", 5e-5, 48, 12, 25),
    "scale+": ("base", 1e-4, 120, 30, 25),
    "scale++": ("base", 2e-4, 256, 64, 25),
    "vgg": ("base", 1e-4, 120, 30, 25),
}
VARIANTS = ("symmetric", "vanilla_avmae", "avmae", "cav", "audio_mae", "visual_mae", "cosine")
MODEL_VARIANTS = ("vanilla_avmae", "avmae", "cav", "audio_mae", "visual_mae")  # one at a time
NO_CONTRAST = ("vanilla_avmae", "avmae", "audio_mae", "visual_mae")  # these set lambda_c=0
VALUED_OPTIONS = ("mask_ratio", "mask_mode", "lambda_c")


def parse_arg(arg: str) -> tuple[str, dict[str, str], set[str]]:
  """Splits 'recipe,key=value,flag,...' into (recipe, options, flags); unknown names raise."""
  parts = [p.strip() for p in (arg or "tiny").split(",") if p.strip()]
  recipe, options, flags = parts[0], {}, set()
  if recipe not in RECIPES:
    raise ValueError(f"config name {recipe!r}: unknown recipe; choose one of {sorted(RECIPES)}.")
  for part in parts[1:]:
    if "=" in part:
      key, value = part.split("=", 1)
      if key not in VALUED_OPTIONS:
        raise ValueError(f"config option {key!r}: unknown; valued options are {VALUED_OPTIONS}.")
      options[key] = value
    elif part in VARIANTS:
      flags.add(part)
    else:
      raise ValueError(f"config option {part!r}: unknown; flags are {VARIANTS}.")
  return recipe, options, flags


def model_overrides(options: dict[str, str], flags: set[str]) -> dict[str, object]:
  """config.model fields set by the ablation options; options that contradict each other (two
  model variants, a contrastive setting for a variant without the contrastive loss) raise."""
  variants = [name for name in MODEL_VARIANTS if name in flags]
  if len(variants) > 1:
    raise ValueError(f"config options {', '.join(variants)}: each is a model variant of its "
                     "own; choose one.")
  contrastive = [part for part, given in (
      (f"lambda_c={options.get('lambda_c')}",
       "lambda_c" in options and common.option(options, "lambda_c", float) != 0),
      ("symmetric", "symmetric" in flags)) if given]
  if variants and variants[0] in NO_CONTRAST and contrastive:
    raise ValueError(f"config option {contrastive[0]}: {variants[0]} has no contrastive loss "
                     "(it sets lambda_c=0); leave the option out, or name no variant.")
  overrides: dict[str, object] = {}
  if "mask_ratio" in options:
    ratio = common.option(options, "mask_ratio", float)
    overrides["mask_ratio_a"] = overrides["mask_ratio_v"] = ratio
  if "mask_mode" in options:
    overrides["mask_mode_a"] = options["mask_mode"]
  if "lambda_c" in options:
    overrides["lambda_c"] = common.option(options, "lambda_c", float)
  if "symmetric" in flags:
    overrides["contrast_bidirectional"] = True
  if "vanilla_avmae" in flags:
    overrides.update(modality_specific_depth=0, lambda_c=0.0)
  if "avmae" in flags:
    overrides["lambda_c"] = 0.0
  if "cav" in flags:
    overrides["lambda_mae"] = 0.0
  if "audio_mae" in flags:  # the vanilla architecture on one modality: 12 shared blocks
    overrides.update(modalities="audio", modality_specific_depth=0, lambda_c=0.0)
  if "visual_mae" in flags:
    overrides.update(modalities="visual", modality_specific_depth=0, lambda_c=0.0)
  return overrides


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked pretraining config for `arg` (see the module docstring)."""
  recipe, options, flags = parse_arg(arg or "tiny")
  size, learning_rate, batch_size, group_size, epochs = RECIPES[recipe]
  tiny = recipe == "tiny"
  config = ml_collections.ConfigDict()
  config.task = "pretrain"
  config.seed = 0
  if tiny:
    config.total_steps = 300
    config.total_epochs = config_dict.placeholder(float)
  else:
    config.total_steps = config_dict.placeholder(int)
    config.total_epochs = float(epochs)
  config.log_every_steps = 10 if tiny else 100
  config.tensorboard = True  # TensorBoard summaries beside metrics.jsonl (imports TensorFlow)
  config.init = common.init_config()

  config.model = model_config(
      size, contrast_group_size=group_size, dtype="float32" if tiny else "bfloat16",
      **model_overrides(options, flags))

  # The original's pretraining augmentation (noise + time roll) runs in the train step on the
  # accelerator for the paper's recipes (it frees host input work), and in tf.data for `tiny`,
  # which runs on a CPU where host and device are the same cores. No mixup, no SpecAugment.
  config.data = common.data_config(batch_size, noise=True, noise_on_device=not tiny,
                                   shuffle_buffer=256 if tiny else 10_000)
  config.optim = common.optim_config(learning_rate)
  # The original: torch MultiStepLR(milestones=range(10, 1000, 5), gamma=0.5) stepped per epoch.
  config.schedule = (common.cosine_schedule() if "cosine" in flags
                     else common.multistep_schedule(first_decay_epoch=10, decay_every_epochs=5))
  config.mesh = common.mesh_config()
  config.checkpoint = common.checkpoint_config(every_steps=100 if tiny else 2000)

  # Held-out losses on fixed masks and audio<->visual retrieval of the first 1,725 clips (the
  # size of the paper's AudioSet subset; the subset itself: tools/retrieval.py --subset), both
  # on config.data.eval_dir.
  every = 100 if tiny else 5000
  config.evals = ml_collections.ConfigDict()
  config.evals.val = common.evaluator("losses", every_steps=every, batch_size=batch_size,
                                      at_start=True, mask_seed=1234)
  if config.model.modalities == "audiovisual":  # a single-modality MAE has nothing to retrieve
    config.evals.retrieval = common.evaluator("retrieval", every_steps=every,
                                              batch_size=batch_size, at_start=True,
                                              max_clips=1725)
  config.lock()
  return config
