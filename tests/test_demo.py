"""demo.check_options: every option the demo cannot run with is refused, naming its flag."""

import math

import pytest

from cav_mae_jax import demo


def test_the_demo_defaults_pass(tmp_path):
  demo.check_options(demo.DemoOptions(workdir=str(tmp_path)))
  demo.check_options(demo.DemoOptions(workdir=str(tmp_path), config="tiny"), finetuning=False)
  assert not list(tmp_path.iterdir())  # nothing made


@pytest.mark.parametrize("option, value, named", [
    ("train_clips", 0, "--train_clips=0: must be positive"),
    ("eval_clips", -1, "--eval_clips=-1: must be positive"),
    ("classes", 0, "--classes=0: must be positive"),
    ("workers", 0, "--workers=0: must be positive"),
    ("clip_seconds", 0.01, "--clip_seconds=0.01: must be at least 0.025"),
    ("clip_seconds", math.nan, "--clip_seconds=nan"),
    ("config", "bogus", "--config='bogus': config name 'bogus': unknown recipe"),
    ("config", "tiny,mask_ratio=x", "--config='tiny,mask_ratio=x': could not convert"),
    ("config", "base", "--config='base': the demo pretrains the tiny model"),
    ("config", "tiny,mask_ratio=1.5", "--config='tiny,mask_ratio=1.5': config.model.mask_ratio"),
    ("steps", 0, "--steps=0: config.total_steps=0: must be positive"),
    ("learning_rate", math.nan, "--learning_rate=nan: config.optim.learning_rate=nan"),
    ("finetune_steps", 0, "--finetune_steps=0: config.total_steps=0: must be positive"),
    ("train_clips", 8, "--train_clips=8: fewer than the pretraining batch of 16 clips"),
    ("eval_clips", 8, "--eval_clips=8: the pretraining evaluator config.evals.val scores full "
     "batches of 16 clips"),
])
def test_a_bad_option_names_its_flag(option, value, named, tmp_path):
  with pytest.raises(ValueError) as error:
    demo.check_options(demo.DemoOptions(workdir=str(tmp_path), **{option: value}))
  assert str(error.value).startswith(named), error.value


def test_finetune_steps_are_not_checked_without_finetuning(tmp_path):
  """The noise sweep pretrains only."""
  demo.check_options(demo.DemoOptions(workdir=str(tmp_path), finetune_steps=0), finetuning=False)


def test_finetune_configs(tmp_path):
  run = str(tmp_path / "run")
  pretrained = demo.finetune_config(demo.DemoOptions(workdir="/w", finetune_steps=5), "/t", "/e",
                                    run)
  assert (pretrained.total_steps, pretrained.total_epochs) == (5, None)
  assert (pretrained.init.source, pretrained.init.path) == ("workdir", run)
  assert sorted(pretrained.evals) == ["audio_only", "val", "video_only"]
  random_init = demo.finetune_config(demo.DemoOptions(workdir="/w"), "/t", "/e", None)
  assert random_init.init.source == "" and sorted(random_init.evals) == ["val"]
