r"""The config a training workdir was run with: `--config configs/workdir.py:/runs/base`.

Returns the config the workdir's last run started with (its config.json), locked like any
recipe's, so that `--config.<path>=<value>` overrides it as usual. The tools that load a
checkpoint (tools/evaluate.py, retrieval.py, extract_features.py, inpaint.py) use it when
--workdir is given without --config:

  python tools/extract_features.py --workdir /runs/base --out features.npz
  python tools/evaluate.py --workdir /runs/base --config.data.eval_dir=/data/records/test

A field the run left unset (None in config.json, e.g. `total_steps` of an epoch-based recipe)
takes its type from the task's tiny recipe, so it can still be overridden.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from cav_mae_jax.train import run_config
from configs import finetune
from configs import pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config recorded in the training workdir `arg`."""
  if not arg:
    raise ValueError("configs/workdir.py needs a training workdir: "
                     "--config configs/workdir.py:/path/to/workdir")
  why = run_config.missing_run_config(arg)
  if why:
    raise ValueError(f"configs/workdir.py:{arg}: {why}")
  config = run_config.read_run_config(arg)
  template = (pretrain.get_config("tiny") if config.get("task") == "pretrain"
              else finetune.get_config("tiny"))
  _type_unset_fields(config, template)
  config.lock()
  return config


def _type_unset_fields(config: ml_collections.ConfigDict,
                       template: ml_collections.ConfigDict) -> None:
  """Makes each None field of `config` a placeholder of the type `template` gives it (config
  overrides parse a value with its field's type; a plain None field cannot be overridden)."""
  for key in list(config.keys()):
    value = config[key]
    if key not in template:
      continue
    if isinstance(value, ml_collections.ConfigDict):
      if isinstance(template[key], ml_collections.ConfigDict):
        _type_unset_fields(value, template[key])
    elif value is None:
      field_type = template.get_type(key)
      if field_type is not type(None):
        config[key] = config_dict.placeholder(field_type)
