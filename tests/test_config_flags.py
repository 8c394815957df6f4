"""Every field of every config section can be overridden from the command line.

The overrides go through the real flag parser (`config_flags.DEFINE_config_file`, as the tools
use it), all at once, and each field must come back with its new value.
"""

import os
import re
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from cav_mae_jax import cli
from cav_mae_jax.train import run_config
from cav_mae_jax.train import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fields whose default is None: a value of the placeholder's type.
NONE_OVERRIDES = {"total_epochs": 2.5, "total_steps": 7}


def _other(field, value):
  """A different value of the same type."""
  if value is None:
    return NONE_OVERRIDES[field]
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 3
  if isinstance(value, float):
    return value * 2 + 0.25
  if isinstance(value, str):
    return value + "_x"
  raise AssertionError(f"{field}: no override rule for {type(value)}")


def _parse(argv):
  argv = ["prog", *cli.resolve_config_args(argv)]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize("config_arg", ["configs/pretrain.py:tiny", "configs/pretrain.py:base",
                                        "configs/pretrain.py:scale++,cav,cosine",
                                        "configs/finetune.py:tiny", "configs/finetune.py:as2m",
                                        "configs/finetune.py:vgg,probe,mode=audioonly"])
def test_every_field_overrides_from_the_command_line(config_arg):
  defaults = run_config.flatten(_parse([f"--config={os.path.join(ROOT, config_arg)}"]))
  assert {"task", "init.source", "data.freqm", "data.prefetch", "evals.val.every_steps",
          "model.decoder_depth", "mesh.fsdp", "checkpoint.every_epoch"} <= set(defaults)
  wanted = {field: _other(field, value) for field, value in defaults.items()}
  overrides = [f"--config.{field}={value}" for field, value in wanted.items()]
  parsed = run_config.flatten(_parse([f"--config={os.path.join(ROOT, config_arg)}", *overrides]))
  assert parsed == wanted


def test_a_schedule_field_counts_where_the_schedule_kind_reads_it(capsys):
  recipe = f"--config={os.path.join(ROOT, 'configs/finetune.py:tiny')}"  # multistep
  for overrides in ([], ["--config.schedule.decay_factor=0.25"],
                    ["--config.schedule.kind=warmup_cosine", "--config.schedule.warmup_epochs=2"],
                    ["--config.schedule.kind", "warmup_cosine", "--config.schedule.warmup_epochs",
                     "2"]):
    argv = ["prog", recipe, *overrides]
    cli._check_schedule_overrides("--config", _parse(argv[1:]), argv)  # pylint: disable=protected-access
  for overrides, named in ((["--config.schedule.final_lr_fraction=0.1"], "final_lr_fraction"),
                           (["--config.schedule.kind=warmup_cosine",
                             "--config.schedule.first_decay_epoch=3"], "first_decay_epoch")):
    argv = ["prog", recipe, *overrides]
    with pytest.raises(SystemExit):
      cli._check_schedule_overrides("--config", _parse(argv[1:]), argv)  # pylint: disable=protected-access
    assert f"error: --config.schedule.{named}: read by schedule kind" in capsys.readouterr().err


def test_config_file_resolves_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = _parse(["--config=configs/pretrain.py:base", "--config.data.freqm=48"])
  assert config.data.freqm == 48 and config.model.embed_dim == 768


def test_a_field_is_unset_with_none_on_the_command_line():
  # ml_collections parses a value with the field's type, so `--config.total_epochs=None` was
  # an error, and an epoch recipe could not be run for a number of steps from the command line.
  recipe = f"--config={os.path.join(ROOT, 'configs/finetune.py:as20k')}"
  argv, overrides = cli.split_none_overrides(
      [recipe, "--config.total_epochs=None", "--config.total_steps=5", "--config.init.path",
       "None", "--config.data.freqm=None", "--config.data.freqm=12"], ["config"])
  assert argv == [recipe, "--config.total_steps=5", "--config.data.freqm=12"]
  assert overrides == [("config", "total_epochs"), ("config", "init.path")]
  config = _parse(argv)
  cli.apply_none_overrides({"config": config}, overrides)
  assert (config.total_epochs, config.total_steps, config.init.path, config.data.freqm) == (
      None, 5, None, 12)
  validation._validate_duration(config)  # exactly one of them is set
  for path, message in [("model", "config.model is a group of fields, not a value"),
                        ("optim.learning_rat", "config.optim has no field 'learning_rat' (did "
                                               "you mean learning_rate?"),
                        ("total_steps.x", "config.total_steps is a value, it has no field 'x'")]:
    with pytest.raises(ValueError, match=re.escape(f"--config.{path}")) as info:
      cli.apply_none_overrides({"config": config}, [("config", path)])
    assert message in str(info.value)


def test_an_evaluator_is_removed_with_none():
  # A pretraining recipe's evaluators need held-out clips; a run without them had no way out.
  argv, overrides = cli.split_none_overrides(
      [f"--config={os.path.join(ROOT, 'configs/pretrain.py:base')}",
       "--config.evals.retrieval=None", "--config.evals.val=None"], ["config"])
  config = _parse(argv)
  assert set(config.evals) == {"val", "retrieval"}
  cli.apply_none_overrides({"config": config}, overrides)
  assert not config.evals and config.is_locked  # removed, the config stays locked
  validation.validate_config(config, num_devices=4, check_data=False)


def test_leftovers_of_an_aborted_checkpoint_read_stay_off_stderr(monkeypatch):
  """A damaged checkpoint's failed restore left dozens of 'Event loop is closed' tracebacks
  (unraisable, from TensorStore's reads still in flight) and asyncio's 'Task exception was never
  retrieved' after the tool's one error line, at random; other unraisable errors still show."""
  import logging  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable.exc_value))
  monkeypatch.setattr(logging.getLogger("asyncio"), "level", logging.NOTSET)
  cli.quiet_async_leftovers()
  leftover, other = RuntimeError("Event loop is closed"), RuntimeError("something else")
  for error in (leftover, other):
    sys.unraisablehook(types.SimpleNamespace(exc_value=error))
  assert seen == [other]
  assert not logging.getLogger("asyncio").isEnabledFor(logging.ERROR)


def test_the_configs_load_without_jax():
  """Every tool loads its --config file before it parses a flag's value; the configs import
  `cav_mae_jax.models.config`, and the package's __init__ imported JAX and Flax with it (1.4 s
  before a mistyped flag was answered)."""
  code = ("import sys\n"
          "from configs import finetune, pretrain\n"
          "pretrain.get_config('base'), finetune.get_config('tiny')\n"
          "print(sorted(m for m in ('jax', 'flax', 'optax', 'tensorflow') if m in sys.modules))\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=ROOT), timeout=120, check=True)
  assert done.stdout == "[]\n", done.stdout + done.stderr
