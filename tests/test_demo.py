"""demo.check_options: every option the demo cannot run with is refused, naming its flag."""

import dataclasses
import math
import os

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
    ("config", "tiny,mask_ratio=x", "--config='tiny,mask_ratio=x': config option mask_ratio='x': "
     "must be a number."),
    ("config", "base", "--config='base': the demo pretrains the tiny model"),
    ("config", "tiny,mask_ratio=1.5", "--config='tiny,mask_ratio=1.5': config.model.mask_ratio"),
    ("config", "tiny,audio_mae", "--config='tiny,audio_mae': the demo reports held-out "
     "audio<->visual retrieval, and this variant has no retrieval evaluator"),
    ("steps", 0, "--steps=0: config.total_steps=0: must be positive"),
    ("learning_rate", math.nan, "--learning_rate=nan: config.optim.learning_rate=nan"),
    ("finetune_steps", 0, "--finetune_steps=0: config.total_steps=0: must be positive"),
    ("train_clips", 8, "--train_clips=8 (pretraining): config.data.batch_size=16 exceeds the 8 "
     "training examples"),
    ("eval_clips", 8, "--eval_clips=8 (pretraining): config.evals.val.batch_size=16: the losses "
     "evaluator scores full batches only, and the demo's held-out split has 8 clips"),
    # The cosine schedule's warmup (an epoch: 128 clips in batches of 16) outlasted the run.
    ("steps", 5, "--steps=5 (pretraining): config.schedule.warmup_epochs=1.0: 8 warmup steps (8 "
     "an epoch), and the run has 5"),
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
  assert pretrained.model.modality_specific_depth == random_init.model.modality_specific_depth == 2


def test_finetuning_takes_the_pretrained_encoder(tmp_path):
  """vanilla_avmae pretrains every block shared; both fine-tuned models are built the same (the
  random-init one too, for a fair comparison)."""
  options = demo.DemoOptions(workdir=str(tmp_path), config="tiny,vanilla_avmae")
  demo.check_options(options)
  for pretrained in (str(tmp_path / "run"), None):
    config = demo.finetune_config(options, "/t", "/e", pretrained)
    assert config.model.modality_specific_depth == 0
    assert config.model.encoder_depth == demo.demo_config(options, "/t", "/e").model.encoder_depth


def _num_records(directory):
  from cav_mae_jax.data import records  # pylint: disable=g-import-not-at-top
  return records.open_records_dir(directory).num_examples


def test_records_of_other_options_are_made_again_and_the_demo_says_so(tmp_path, capsys):
  """An earlier run's records are reused only when made with the same clip count, classes and
  clip length (else --eval_clips etc. would be ignored, and the report's chance level wrong)."""
  small = demo.DemoOptions(workdir=str(tmp_path), eval_clips=2, classes=2, clip_seconds=0.1,
                           workers=1)
  directory = demo.make_records(small, "eval")
  assert _num_records(directory) == 2 and demo.stale_records(small, "eval") == ""
  assert demo.stale_records(small, "train") is None  # not made
  assert demo.make_records(small, "eval") == directory and not capsys.readouterr().out  # reused

  larger = dataclasses.replace(small, eval_clips=3)
  assert demo.stale_records(larger, "eval") == "made with --eval_clips=2"
  with pytest.raises(ValueError, match="--eval_clips=3 .* held-out split has 3 clips"):
    demo.check_options(larger, finetuning=False)  # checked as the records to make, not the old
  assert demo.make_records(larger, "eval") == directory and _num_records(directory) == 3
  assert "were made with --eval_clips=2: making new ones" in capsys.readouterr().out
  assert demo.stale_records(larger, "eval") == ""
  assert demo.stale_records(dataclasses.replace(larger, classes=3, clip_seconds=0.2),
                            "eval") == "made with --classes=2, --clip_seconds=0.1"
  os.remove(tmp_path / "records" / "eval_made_with.json")  # records of an earlier version
  assert "unknown options" in demo.stale_records(larger, "eval")


def test_sigterm_during_a_run_ends_the_demo(monkeypatch):
  # The runs stopped at the preemption notice and the demo went on to the next stage (minutes
  # of fine-tuning, then a report and exit 0): a run that is preempted ends the program.
  from cav_mae_jax import cli  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import trainer  # pylint: disable=import-outside-toplevel
  calls = []

  def preempted(config, workdir, raise_on_preemption=False):
    calls.append((config, workdir, raise_on_preemption))
    if raise_on_preemption:
      raise trainer.Preempted(3, {})
    return {}

  monkeypatch.setattr(trainer, "train_and_evaluate", preempted)
  with pytest.raises(cli.Terminated):
    demo.train("config", "workdir")
  assert calls == [("config", "workdir", True)]
