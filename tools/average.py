r"""Weight averaging: the mean of a fine-tuning run's epoch-end checkpoints, as the paper reports.

  python tools/average.py --workdir /ckpt/ft_as20k --out /ckpt/ft_as20k_avg \
      [--first_epoch 3 --last_epoch 15]

The epochs default to the run's `config.finetune.average_first_epoch` / `average_last_epoch`
(the original's recipes: AS-20K 3-15, AS-2M 1-10, VGGSound 3-10). The result is a params
checkpoint for tools/evaluate.py --params, tools/convert.py to-torch or another run's
config.init, with model_config.json and fbank_normalization.json (how the run normalized its
fbanks: tools/evaluate.py checks its config against it, the HEAR API normalizes with it).
"""

from __future__ import annotations

from absl import flags

from cav_mae_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Fine-tuning workdir with epoch-end checkpoints.")
_OUT = flags.DEFINE_string("out", None, "Params checkpoint directory to write.")
_FIRST = flags.DEFINE_integer("first_epoch", None, "First averaged epoch (1-based).")
_LAST = flags.DEFINE_integer("last_epoch", None, "Last averaged epoch (inclusive).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
flags.mark_flags_as_required(["workdir", "out"])
for _flag in (_FIRST, _LAST):
  flags.register_validator(_flag.name, lambda epoch: epoch is None or epoch >= 1,
                           message="epochs count from 1")


def main(argv: list[str]) -> None:
  del argv
  from cav_mae_jax.convert import init_source, io  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import averaging, run_config  # pylint: disable=g-import-not-at-top
  io.check_output_path(_OUT.value, overwrite=_OVERWRITE.value, kind="params",
                       inputs=(("--workdir", _WORKDIR.value),))
  config = run_config.read_run_config(_WORKDIR.value)
  if config is None:
    raise FileNotFoundError(f"{_WORKDIR.value}: not a training workdir (no config.json)")
  if "finetune" not in config and (_FIRST.value is None or _LAST.value is None):
    raise ValueError(f"{_WORKDIR.value} is not a fine-tuning run: give --first_epoch and "
                     "--last_epoch")
  first = config.finetune.average_first_epoch if _FIRST.value is None else _FIRST.value
  last = config.finetune.average_last_epoch if _LAST.value is None else _LAST.value
  params, steps = averaging.average_workdir(_WORKDIR.value, first, last)
  normalization = init_source.normalization_record(_WORKDIR.value)
  io.save_params(_OUT.value, params, model_config=config.model.to_dict(),
                 fbank_normalization=normalization, overwrite=_OVERWRITE.value)
  print(f"averaged epochs {first}-{last} (steps {steps}) -> {_OUT.value}")
  if normalization and normalization["fbank_stats"] == "index" and "mean" not in normalization:
    print("note: the run's fbank statistics (fbank_stats='index') could not be read from its "
          "training split, so the checkpoint records only that they were the split's; "
          "tools/evaluate.py needs --config.data.fbank_stats=index with that split, and the "
          "HEAR API refuses it")


if __name__ == "__main__":
  cli.run(main, uses_tensorflow=False, interrupt_note="--out was not written")
