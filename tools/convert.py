r"""Converts weights between the original CAV-MAE / ImageNet MAE files and our params checkpoints.

Usage: python tools/convert.py <direction> --src=... --out=... [flags]

Directions:
  imagenet-mae  ImageNet MAE .pth/.safetensors/.npz (facebookresearch/mae, with or without its
                decoder) -> CAV-MAE pretraining params checkpoint. Needs --config.
  cavmae        released CAV-MAE checkpoint (pretrained or fine-tuned) -> params checkpoint for
                --config (configs/pretrain.py:... or configs/finetune.py:...). Options:
                --new_head (new classifier, e.g. from a pretrained model or another class
                count), --audio_pos_resize=trim|interpolate|sincos (other audio length,
                e.g. --config.model.audio_length=512; sincos recomputes a pretrained model's
                fixed table, interpolate resamples a fine-tuned model's trained one).
  to-torch      params checkpoint or training workdir (its latest checkpoint, or --step) ->
                .pth / .safetensors / .npz in the original's layout, keys prefixed with
                'module.' as the released files (--nomodule_prefix: without); loads with
                strict=True into the original CAVMAE / CAVMAEFT (in DataParallel), except
                models the original has no class for: the CAV variant (lambda_mae=0, no
                decoder) loads into CAVMAE with strict=False, one modality not at all.
  export-eval   params checkpoint or training workdir -> params-only checkpoint in --dtype,
                with model_config.json (--config's model, whose task must be the checkpoint's:
                fine-tuning or pretraining; default: the checkpoint's own model config).

Examples:
  python tools/convert.py cavmae --src=audio_model.21.pth --out=ckpt/scale_pp \
      --config=configs/pretrain.py:base
  python tools/convert.py cavmae --src=audio_model.21.pth --out=ckpt/vgg_init \
      --config=configs/finetune.py:vgg --new_head
  python tools/convert.py to-torch --src=ckpt/scale_pp --out=scale_pp.pth

Prints what was mapped, kept at init and dropped. On any error it prints one line `error: ...`
and exits with status 2, and nothing is written at --out (missing parent folders of --out are
created); a flag of another direction is such an error (`to-torch --dtype=bfloat16`: --dtype
applies to export-eval only). An existing --out is replaced only with --overwrite, and only by an
output of its kind: a file by a file, a params checkpoint directory by a params checkpoint (never
another folder); an --out that is --src or --config, or inside or around one, is refused.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from cav_mae_jax import cli, seeds

DIRECTIONS = ("imagenet-mae", "cavmae", "to-torch", "export-eval")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "imagenet-mae / cavmae / export-eval: target config, e.g. "
    "configs/pretrain.py:base or configs/finetune.py:vgg.")
_SRC = flags.DEFINE_string("src", None, "Input file or params checkpoint directory.")
_OUT = flags.DEFINE_string("out", None, "Output path (must not exist unless --overwrite).")
_NEW_HEAD = flags.DEFINE_bool("new_head", False, "cavmae: start a new classification head.")
_AUDIO_POS_RESIZE = flags.DEFINE_enum(
    "audio_pos_resize", None, ["trim", "interpolate", "sincos"],
    "cavmae: how to fit the audio position grid to another audio length.")
_ALLOW_UNEXPECTED = flags.DEFINE_bool(
    "allow_unexpected", False, "imagenet-mae / cavmae: ignore source arrays that have no place "
    "in the target (listed).")
_MODULE_PREFIX = flags.DEFINE_bool(
    "module_prefix", True, "to-torch: prefix keys with 'module.' like the released files: the "
    "original's loaders wrap the model in DataParallel first, and three load with strict=False, "
    "which would load no key of a file without it. --nomodule_prefix for a bare nn.Module.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "export-eval: dtype of the exported params.")
_SEED = flags.DEFINE_integer("seed", 0, "imagenet-mae / cavmae: seed of the init values for "
                             "parameters not in the source.")
flags.register_validator(_SEED.name, seeds.valid, message=seeds.RANGE)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out of the same kind "
                                "(a file by a file, a params checkpoint by a params checkpoint).")
_STEP = flags.DEFINE_integer("step", 0, "to-torch / export-eval from a workdir: its checkpoint "
                             "step (0: the latest).")
# The flags (besides --src, --out and --overwrite) that each direction reads; one given to another
# direction is refused (it was ignored: `to-torch --dtype=bfloat16` kept the params' dtype).
_DIRECTION_FLAGS = {
    "imagenet-mae": ("config", "seed", "allow_unexpected"),
    "cavmae": ("config", "new_head", "audio_pos_resize", "seed", "allow_unexpected"),
    "to-torch": ("module_prefix", "step"),
    "export-eval": ("config", "dtype", "step"),
}


def _model_config(required: bool):
  config = _CONFIG.value
  if config is None:
    if required:
      raise app.UsageError("--config is required for this direction")
    return None, False
  from cav_mae_jax import tasks  # pylint: disable=g-import-not-at-top
  # The task says which model its parameters are: a probe's is the fine-tuning model too.
  return config.model, tasks.get_task(config).finetune


def run(direction: str) -> None:
  """Runs one conversion and prints its account."""
  # Imported here: a bad command line is answered without JAX's import (half of its second).
  from cav_mae_jax.convert import io  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.convert import pipelines  # pylint: disable=g-import-not-at-top
  src, out = _SRC.value, _OUT.value
  # The pipelines refuse an --out that is --src (or inside or around it); the config file is an
  # input too.
  io.check_not_an_input(out, cli.config_input_paths())
  if _STEP.value:
    from cav_mae_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
    if not checkpoint.is_workdir(src):
      raise app.UsageError(f"--step picks one of the checkpoints of a training workdir; --src "
                           f"{src} is not one (a params checkpoint holds a single one)")
  if direction == "imagenet-mae":
    model_config, finetune = _model_config(required=True)
    if finetune:
      raise app.UsageError("imagenet-mae initializes a pretraining model: use configs/pretrain.py")
    report = pipelines.imagenet_mae_to_checkpoint(
        src, out, model_config, seed=_SEED.value, allow_unexpected=_ALLOW_UNEXPECTED.value,
        overwrite=_OVERWRITE.value)
    print(report.summary())
  elif direction == "cavmae":
    model_config, finetune = _model_config(required=True)
    if _NEW_HEAD.value and not finetune:
      raise app.UsageError("--new_head makes a new classification head, and a pretraining "
                           "model has none (--config configs/finetune.py:... fine-tunes)")
    report = pipelines.cavmae_to_checkpoint(
        src, out, model_config, finetune=finetune, new_head=_NEW_HEAD.value,
        audio_pos_resize=_AUDIO_POS_RESIZE.value, seed=_SEED.value,
        allow_unexpected=_ALLOW_UNEXPECTED.value, overwrite=_OVERWRITE.value)
    print(report.summary())
  elif direction == "to-torch":
    print("\n".join(pipelines.checkpoint_to_torch(src, out, module_prefix=_MODULE_PREFIX.value,
                                                  overwrite=_OVERWRITE.value, step=_STEP.value)))
  else:
    model_config, finetune = _model_config(required=False)
    pipelines.checkpoint_to_eval_export(src, out, dtype=_DTYPE.value, model_config=model_config,
                                        finetune=finetune if model_config is not None else None,
                                        overwrite=_OVERWRITE.value, step=_STEP.value)
  print(f"wrote {out}")


def check_args(argv: list[str]) -> str:
  """The direction argv names, with --src and --out given and no flag of another direction.

  `cli.run` calls it before TensorFlow's import: a mistyped direction or a flag that would be
  ignored is answered in about a second.
  """
  if len(argv) != 2 or argv[1] not in DIRECTIONS:
    raise app.UsageError(f"give one direction: {' | '.join(DIRECTIONS)}")
  if not _SRC.value or not _OUT.value:
    raise app.UsageError("--src and --out are required")
  cli.check_mode_flags(argv[1], _DIRECTION_FLAGS, mode_name=str)
  return argv[1]


def main(argv: list[str]) -> None:
  run(check_args(argv))


if __name__ == "__main__":
  # No conversion reads records: TensorFlow's import (3-4 s) is left out, and conversion runs
  # where it is not installed.
  cli.run(main, uses_tensorflow=False, check_args=check_args,
          input_paths=lambda: [("--src", _SRC.value)], interrupt_note="--out was not written")
