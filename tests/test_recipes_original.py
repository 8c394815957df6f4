"""The paper recipes' numbers, pinned to the original's scripts (written out here, not read from
our configs: a test that took its expected values from the code under test could not fail).

Sources (YuanGongND/cav-mae at its latest commit): egs/audioset/run_cavmae_pretrain_base.sh,
run_cavmae_pretrain_scale+.sh, run_cavmae_pretrain_scale++.sh, egs/vggsound/run_cavmae_pretrain.sh,
egs/audioset/run_cavmae_ft_bal.sh (AudioSet-20K), run_cavmae_ft_full.sh (AudioSet-2M),
egs/vggsound/run_cavmae_ft.sh; src/dataloader.py (ImageNet normalization, mixup's Beta(10, 10),
the evaluation frame total_frame / 2 = 5); src/run_cavmae_ft.py, src/traintest_*.py (Adam betas
and weight decay).
"""
import numpy as np
import pytest

from configs import common
from configs import finetune as finetune_config
from configs import pretrain as pretrain_config

# Every script: dataset_mean=-5.081 dataset_std=4.4849 target_length=1024 noise=True.
SHARED = dict(fbank_mean=-5.081, fbank_std=4.4849, audio_length=1024, num_mel_bins=128,
              image_size=224, noise=True, eval_frame=5, fbank_stats="fixed")

# recipe: (lr, batch_size, epochs); every pretraining script: masking_ratio=0.75
# mask_mode=unstructured contrast_loss_weight=0.01 mae_loss_weight=1.0 tr_pos=False
# norm_pix_loss=True bal=None mixup=0.0 lrscheduler_start=10 lrscheduler_decay=0.5
# lrscheduler_step=5.
PRETRAIN = {
    "base": (5e-5, 48, 25),
    "scale+": (1e-4, 120, 25),
    "scale++": (2e-4, 256, 25),
    "vgg": (1e-4, 120, 25),
}

# recipe: (n_class, lr, head_lr, batch_size, epochs, lrscheduler_start, bal, loss, wa_start,
# wa_end); every fine-tuning script: lrscheduler_decay=0.5 lrscheduler_step=1 freqm=48
# timem=192 mixup=0.5 label_smooth=0.1.
FINETUNE = {
    "as20k": (527, 5e-5, 100.0, 36, 15, 5, False, "bce", 3, 15),
    "as2m": (527, 1e-5, 50.0, 48, 10, 2, True, "bce", 1, 10),
    "vgg": (309, 1e-4, 10.0, 48, 10, 2, True, "ce", 3, 10),
}


def _check_shared(config):
  for field in ("fbank_mean", "fbank_std", "noise", "eval_frame", "fbank_stats"):
    assert config.data[field] == SHARED[field], field
  for field in ("audio_length", "num_mel_bins", "image_size"):
    assert config.model[field] == SHARED[field], field
  # torch.optim.Adam(..., weight_decay=5e-7, betas=(0.95, 0.999)), eps torch's default.
  assert (config.optim.b1, config.optim.b2, config.optim.weight_decay, config.optim.eps) == (
      0.95, 0.999, 5e-7, 1e-8)
  assert config.optim.grad_clip_norm == 0.0  # the original does not clip
  assert config.schedule.kind == "multistep" and config.schedule.decay_factor == 0.5


@pytest.mark.parametrize("recipe", sorted(PRETRAIN))
def test_pretraining_recipe_is_the_originals(recipe):
  config = pretrain_config.get_config(recipe)
  lr, batch, epochs = PRETRAIN[recipe]
  assert (config.optim.learning_rate, config.data.batch_size, config.total_epochs) == (
      lr, batch, epochs)
  m = config.model
  assert (m.mask_ratio_a, m.mask_ratio_v, m.mask_mode_a) == (0.75, 0.75, "unstructured")
  assert (m.lambda_c, m.lambda_mae, m.norm_pix_loss, m.trainable_pos_embed) == (
      0.01, 1.0, True, False)
  # src/models/cav_mae.py forward_contrastive: similarities / 0.05, one direction (dim 0).
  assert (m.temperature, m.learnable_temperature, m.contrast_bidirectional) == (0.05, False, False)
  assert (config.schedule.first_decay_epoch, config.schedule.decay_every_epochs) == (10, 5)
  d = config.data
  assert (d.mixup, d.freqm, d.timem, d.label_smooth, d.balanced_sampling) == (
      0.0, 0, 0, 0.0, False)
  _check_shared(config)


@pytest.mark.parametrize("recipe", sorted(FINETUNE))
def test_finetuning_recipe_is_the_originals(recipe):
  config = finetune_config.get_config(recipe)
  (classes, lr, head_lr, batch, epochs, first_decay, balanced, loss, wa_start,
   wa_end) = FINETUNE[recipe]
  assert config.model.num_classes == classes
  assert (config.optim.learning_rate, config.finetune.head_lr_multiplier) == (lr, head_lr)
  assert (config.data.batch_size, config.total_epochs) == (batch, epochs)
  assert (config.schedule.first_decay_epoch, config.schedule.decay_every_epochs) == (
      first_decay, 1)
  assert (config.data.balanced_sampling, config.finetune.loss) == (balanced, loss)
  assert (config.finetune.average_first_epoch, config.finetune.average_last_epoch) == (
      wa_start, wa_end)
  d = config.data
  assert (d.freqm, d.timem, d.mixup, d.label_smooth) == (48, 192, 0.5, 0.1)
  assert config.model.trainable_pos_embed  # the fine-tuning model's pos embeddings train
  _check_shared(config)


def test_constants_are_the_originals():
  assert (common.AUDIOSET_FBANK_MEAN, common.AUDIOSET_FBANK_STD) == (-5.081, 4.4849)
  from cav_mae_jax.eval import inpaint  # pylint: disable=import-outside-toplevel
  np.testing.assert_array_equal(inpaint.IMAGENET_MEAN, np.float32([0.485, 0.456, 0.406]))
  np.testing.assert_array_equal(inpaint.IMAGENET_STD, np.float32([0.229, 0.224, 0.225]))
  pytest.importorskip("tensorflow")
  from cav_mae_jax.data import augment  # pylint: disable=import-outside-toplevel
  assert augment.IMAGENET_MEAN == (0.485, 0.456, 0.406)
  assert augment.IMAGENET_STD == (0.229, 0.224, 0.225)
  assert augment.MIXUP_BETA == 10.0  # np.random.beta(10, 10)
