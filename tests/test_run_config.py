"""What may change when a run resumes (train/run_config.py), checked on the recorded config."""

import re

import pytest

from cav_mae_jax.train import run_config
from cav_mae_jax.train import step as step_lib
from configs import pretrain


def _saved(tmp_path):
  config = pretrain.get_config("tiny")
  run_config.write_run_config(str(tmp_path), config, steps_per_epoch=8)
  return run_config.read_run_config(str(tmp_path))


def test_recorded_config_round_trips(tmp_path):
  saved = _saved(tmp_path)
  assert run_config.changed_fields(saved, pretrain.get_config("tiny")) == {}
  assert run_config.read_steps_per_epoch(str(tmp_path)) == 8


def test_a_run_recorded_before_every_schedule_field_was_held_resumes_unchanged(tmp_path):
  # A schedule now holds every kind's fields; a workdir recorded with only its kind's said
  # "changed fields: schedule.final_lr_fraction None -> 0.0, schedule.warmup_epochs None -> 1.0".
  saved = _saved(tmp_path)
  assert saved.schedule.kind == "multistep"
  with saved.unlocked():
    del saved.schedule["warmup_epochs"], saved.schedule["final_lr_fraction"]
  config = pretrain.get_config("tiny")
  assert run_config.changed_fields(saved, config) == {}
  config.schedule.warmup_epochs = 2.0  # another kind's field: read by no schedule here
  assert run_config.changed_fields(saved, config) == {}
  config.schedule.kind = "warmup_cosine"
  assert run_config.changed_fields(saved, config) == {
      "schedule.final_lr_fraction": (None, 0.0), "schedule.kind": ("multistep", "warmup_cosine"),
      "schedule.warmup_epochs": (None, 2.0)}


@pytest.mark.parametrize("text, why", [
    ('{"model": {}}', "not a run's config (no task, data)"), ("[1]", "not a run's config"),
    ("{'task': 1}", "not valid JSON")])
def test_a_damaged_recorded_config_is_an_error_naming_it(tmp_path, text, why):
  # It surfaced as AttributeError("'data'") or a JSONDecodeError naming no file.
  (tmp_path / run_config.RUN_CONFIG_FILE).write_text(text)
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/config.json: {why}")):
    run_config.read_run_config(str(tmp_path))


def test_allowed_changes_are_returned(tmp_path):
  config = pretrain.get_config("tiny")
  config.total_steps, config.evals.val.every_steps = 600, 50
  config.data.train_dir = "/elsewhere/records"
  changes = run_config.check_resume(_saved(tmp_path), config, step_lib.abstract_state_of)
  assert changes == {"total_steps": (300, 600), "evals.val.every_steps": (100, 50),
                     "data.train_dir": ("", "/elsewhere/records")}


def test_changed_batch_size_is_refused(tmp_path):
  config = pretrain.get_config("tiny")
  config.data.batch_size = 32
  with pytest.raises(run_config.ResumeConfigError, match=r"config\.data\.batch_size changed \(16 -> 32\)"):
    run_config.check_resume(_saved(tmp_path), config, step_lib.abstract_state_of)


def test_changed_seed_is_refused(tmp_path):
  # The checkpoint's input position is a position in the saved seed's order: it was allowed
  # (and printed as a change), then the input pipeline refused the saved state.
  config = pretrain.get_config("tiny")
  config.seed = 1
  with pytest.raises(run_config.ResumeConfigError, match=r"config\.seed changed \(0 -> 1\)"):
    run_config.check_resume(_saved(tmp_path), config, step_lib.abstract_state_of)


def test_shape_changes_name_only_the_responsible_fields(tmp_path):
  config = pretrain.get_config("tiny")
  config.model.embed_dim, config.total_steps = 128, 400
  config.optim.learning_rate = 5e-4  # no shape depends on it
  with pytest.raises(run_config.ResumeConfigError) as error:
    run_config.check_resume(_saved(tmp_path), config, step_lib.abstract_state_of)
  message = str(error.value)
  assert "config.model.embed_dim (64 -> 128)" in message and "\n" not in message
  assert "total_steps" not in message and "learning_rate" not in message


def test_a_workdir_without_a_record_resumes_as_before():
  assert run_config.check_resume(None, pretrain.get_config("tiny"), step_lib.abstract_state_of) == {}
