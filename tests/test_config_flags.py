"""Every field of every config section can be overridden from the command line.

The overrides go through the real flag parser (`config_flags.DEFINE_config_file`, as the tools
use it), all at once, and each field must come back with its new value.
"""

import os

import pytest
from absl import flags
from ml_collections import config_flags

from cav_mae_jax import cli
from cav_mae_jax.train import run_config

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


def test_config_file_resolves_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = _parse(["--config=configs/pretrain.py:base", "--config.data.freqm=48"])
  assert config.data.freqm == 48 and config.model.embed_dim == 768
