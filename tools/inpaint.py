r"""Inpainting picture of one clip: original, masked and reconstructed spectrogram and frame (PNG).

  python tools/inpaint.py --config configs/pretrain.py:base --config.model.norm_pix_loss=False \
      --params ckpt/nonorm --records /data/vggsound_test --clip_id 0a1b2c3d --out inpaint.png
  python tools/inpaint.py --workdir /runs/tiny --index 3 --mask_ratio_a 0.5 --mask_ratio_v 0.75 \
      --seed 1 --out inpaint.png   # --config: the run's recorded one (configs/workdir.py)

The clip is --clip_id, or the --index-th clip of the records (default config.data.eval_dir) in
data order (default: the first). Masks are drawn from --seed. Models trained with
norm_pix_loss predict normalized patches; they are un-normalized with the target patches'
mean and variance, and the picture says so. The config's model.norm_pix_loss must be the one the
model was trained with (checked against the checkpoint's stored model config). The audio mask
takes the config's model.mask_mode_a (unstructured by default, all the original's script
draws; --config.model.mask_mode_a=time|freq|tf for the paper's structured masks).
"""

from __future__ import annotations

import os

from absl import flags

from cav_mae_jax import cli, seeds

_MODEL = cli.define_model_flags()
_RECORDS = flags.DEFINE_string("records", None, "Records directory (default config.data.eval_dir).")
_INDEX = flags.DEFINE_integer("index", None, "Position of the clip in the records (default 0).")
_CLIP_ID = flags.DEFINE_string("clip_id", None, "Id of the clip in the records.")
_MASK_RATIO_A = flags.DEFINE_float("mask_ratio_a", 0.75, "Fraction of audio patches removed.")
_MASK_RATIO_V = flags.DEFINE_float("mask_ratio_v", 0.75, "Fraction of image patches removed.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the masks.")
_OUT = flags.DEFINE_string("out", None, "Output PNG file (must not exist unless --overwrite).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out file (never a "
                                "directory).")
flags.mark_flags_as_required(["out"])
# ('.png' alone is a hidden file without the extension: matplotlib wrote '.png.png'.)
flags.register_validator(_OUT.name, lambda path: path is None or (
    path.lower().endswith(".png") and len(os.path.basename(path)) > 4),
                         message="must name a .png file")
flags.register_validator(_SEED.name, seeds.valid, message=seeds.RANGE)
flags.mark_flags_as_mutual_exclusive(["index", "clip_id"])
flags.register_validator(_INDEX.name, lambda index: index is None or index >= 0,
                         message="must be >= 0 (a position in the records)")
for _flag in (_MASK_RATIO_A, _MASK_RATIO_V):
  flags.register_validator(_flag.name, lambda ratio: 0.0 <= ratio < 1.0,
                           message="must be in [0, 1)")


def main(argv: list[str]) -> None:
  del argv
  from cav_mae_jax import models  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.eval import features, inpaint  # pylint: disable=g-import-not-at-top
  config = _MODEL.config.value
  records = features.records_directory(config, _RECORDS.value or "")
  inpaint.check_norm_pix_loss(models.ModelConfig.from_config(config.model),
                              _MODEL.workdir.value or _MODEL.params.value)
  loaded = features.load(config, workdir=_MODEL.workdir.value, step=_MODEL.step.value,
                         params_path=_MODEL.params.value)
  if loaded.task.finetune:
    raise ValueError(f"task {loaded.task.name!r}: inpainting needs the pretraining model's decoder")
  index = 0 if _INDEX.value is None and _CLIP_ID.value is None else _INDEX.value
  video_id, audio, image = inpaint.record_clip(config, directory=records, index=index,
                                               video_id=_CLIP_ID.value)
  result = inpaint.inpaint(loaded.task.model_config, loaded.params, audio, image,
                           video_id=video_id, mask_ratio_a=_MASK_RATIO_A.value,
                           mask_ratio_v=_MASK_RATIO_V.value, seed=_SEED.value)
  inpaint.save_figure(result, _OUT.value)
  print(f"wrote {_OUT.value}: clip {video_id}, {inpaint.losses_text(result)}")


def _check_outputs() -> None:
  """Before any work (`cli.run`: before TensorFlow's import): an existing --out (or one that is
  an input) is refused now, not after the model ran."""
  from cav_mae_jax.eval import features  # pylint: disable=g-import-not-at-top
  features.check_output(_OUT.value, overwrite=_OVERWRITE.value,
                        inputs=[*_input_paths(), *cli.config_input_paths()])


def _input_paths() -> list[tuple[str, str | None]]:
  records = cli.records_input_path(_RECORDS.value, _MODEL.config.value)
  return [records, *cli.model_input_paths(_MODEL)]


if __name__ == "__main__":
  cli.run(main, input_paths=_input_paths, check_outputs=_check_outputs)
