r"""Per-clip audio, visual and joint embeddings of video files or records, to one .npz.

  python tools/extract_features.py --config configs/pretrain.py:base --params ckpt/scale_pp \
      --videos /data/clips --out features.npz [--patches] [--quarantine bad.jsonl] [--strict]
  python tools/extract_features.py --workdir /runs/base --records /data/vggsound_test \
      [--subset ids.txt] --out vgg_test.npz

With --workdir, --config defaults to the config the run recorded (configs/workdir.py:<workdir>).

The .npz holds `ids` [N] (unicode; row i of every array is clip ids[i]: records in data order,
shard by shard, or with --distributed the global batches' order, every process's rows side by
side; --videos in list order, unreadable files left out) and `audio`, `video`, `joint`
[N, D] float32: the mean-pooled audio-only (norm_a), video-only (norm_v) and audio+video (norm)
streams after the joint block (a single-modality MAE: its one stream, norm), not L2-normalized
(the original's retrieval normalizes them before its cosine similarity). --patches adds the float32
tokens they are the means of: `audio_patches` [N, La, D] (La = 8 mel rows * audio_length/16 time
columns, frequency-major: token r * audio_length/16 + c is mel bins 16r..16r+15, from the lowest, of
frames 16c..16c+15), `video_patches` [N, Lv, D] (Lv = (image_size / 16)^2, row-major from the top
left) and `joint_patches` [N, La + Lv, D] (audio tokens first, then video).

--videos: a directory of video files (its own, not its subfolders'; ids: file names without
extension), a text file of paths (one a line) or the original's JSON datafile (ids: video_id).
Each file is decoded and preprocessed as tools/preprocess.py and the evaluation input do (frame
config.data.eval_frame, fbank normalized as the records are: config.data.fbank_mean / fbank_std,
or the training split's statistics with fbank_stats='index'); audio longer than the model's
audio_length frames is cut, shorter audio zero-padded in log-mel space as the original pads.
A file that cannot be decoded is listed in --quarantine (JSON lines: path, video_id, reason,
message; default <out>.quarantine.jsonl; an existing list is replaced only with --overwrite) and
left out; --strict stops at the first one instead.
--records (default config.data.eval_dir when --videos is not given) reads clip records; with
--distributed (as tools/train.py) every process of a multi-host run reads its shards and
process 0 writes --out.
"""

from __future__ import annotations

from absl import flags

from cav_mae_jax import cli

_MODEL = cli.define_model_flags()
_VIDEOS = flags.DEFINE_string("videos", None, "Video directory, list file or JSON datafile.")
_RECORDS = flags.DEFINE_string("records", None, "Records directory (default config.data.eval_dir).")
_SUBSET = flags.DEFINE_string("subset", None, "With records: file of clip ids to keep.")
_OUT = flags.DEFINE_string("out", None, "Output .npz file (must not exist unless --overwrite).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out file (never a "
                                "directory) and --quarantine list.")
_PATCHES = flags.DEFINE_bool("patches", False, "Also write the per-patch tokens.")
_BATCH_SIZE = cli.define_batch_size_flag()
_QUARANTINE = flags.DEFINE_string("quarantine", None, "JSONL of unreadable videos "
                                  "(default <out>.quarantine.jsonl).")
_STRICT = flags.DEFINE_bool("strict", False, "Stop at the first video that cannot be read.")
_DISTRIBUTED = cli.define_distributed_flags("extract the features alone, on its own devices")
flags.mark_flags_as_required(["out"])
flags.mark_flags_as_mutual_exclusive(["videos", "records"])
flags.register_multi_flags_validator(
    ["videos", "subset"], lambda values: not (values["videos"] and values["subset"]),
    message="--subset selects clips of records; with --videos, list the video files instead")
# Records hold clips that were decoded already: nothing of theirs is quarantined or stops a run.
flags.register_multi_flags_validator(
    ["videos", "quarantine", "strict"],
    lambda values: values["videos"] or not (values["quarantine"] or values["strict"]),
    message="--quarantine and --strict apply to --videos (records hold clips decoded already)")
# Each process would keep its own quarantine list (and --strict stop one process alone).
flags.register_multi_flags_validator(
    ["videos", "distributed"], lambda values: not (values["videos"] and values["distributed"]),
    message="--videos decodes its files in one process: leave out --distributed (records are "
    "read by every process of a multi-host run)")


def main(argv: list[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  _DISTRIBUTED.initialize()
  from cav_mae_jax.data import clips as data_clips  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.eval import clips, features  # pylint: disable=g-import-not-at-top
  config = _MODEL.config.value
  quarantine = None
  if _VIDEOS.value:
    quarantine = clips.Quarantine(_quarantine_path(), strict=_STRICT.value)
  subset = clips.read_id_list(_SUBSET.value) if _SUBSET.value else None
  batch_size, batch_size_what = cli.batch_size_source(_BATCH_SIZE, config)
  batches = features.clip_batches(config, batch_size, records_dir=_RECORDS.value or "",
                                  subset=subset, videos=_VIDEOS.value or "", on_error=quarantine)
  loaded = features.load(config, workdir=_MODEL.workdir.value, step=_MODEL.step.value,
                         params_path=_MODEL.params.value,
                         records_dir=None if _VIDEOS.value else _RECORDS.value or "",
                         also={"--batch_size": batch_size, "--subset": subset,
                               "--patches": _PATCHES.value})
  features.check_batch_size(batch_size, loaded.mesh, what=batch_size_what)
  try:
    ids, arrays = features.extract_embeddings(loaded, batches, patches=_PATCHES.value)
  except features.NoClipsError:
    if quarantine is None or not quarantine.count:
      raise
    reasons = data_clips.reason_counts(quarantine.by_reason)
    raise features.NoClipsError(f"no clip of --videos {_VIDEOS.value} could be read: all "
                                f"{quarantine.count} were quarantined ({reasons}); see "
                                f"{quarantine.path}") from None
  if jax.process_index():
    return
  features.write_npz(_OUT.value, ids, arrays, overwrite=_OVERWRITE.value)
  shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items())
  print(f"wrote {_OUT.value}: {len(ids)} clips ({shapes})")
  if quarantine is not None and quarantine.count:
    print(f"quarantined {quarantine.count} videos: see {quarantine.path}")
  left_out = clips.unlisted_entries(_VIDEOS.value) if _VIDEOS.value else ""
  if left_out:
    print(f"--videos {_VIDEOS.value}: {left_out}")


def _quarantine_path() -> str:
  return _QUARANTINE.value or _OUT.value + ".quarantine.jsonl"


def _check_outputs() -> None:
  """Before any work (`cli.run`: before TensorFlow's import): an existing --out or --quarantine
  list (which a run replaces: an earlier run's list was emptied) is refused now, not after the
  extraction, unless --overwrite; so is one that would replace an input, whatever it says."""
  from cav_mae_jax.convert import io  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.eval import features  # pylint: disable=g-import-not-at-top
  inputs = [*_input_paths(), *cli.config_input_paths()]
  features.check_output(_OUT.value, overwrite=_OVERWRITE.value, inputs=inputs)
  if _VIDEOS.value and not _STRICT.value:  # (--strict writes no list: it stops instead)
    io.check_output_path(_quarantine_path(), overwrite=_OVERWRITE.value, kind="file",
                         inputs=[*inputs, ("--out", _OUT.value)], flag="--quarantine")


def _input_paths() -> list[tuple[str, str | None]]:
  source = (("--videos", _VIDEOS.value) if _VIDEOS.value
            else cli.records_input_path(_RECORDS.value, _MODEL.config.value))
  return [source, ("--subset", _SUBSET.value), *cli.model_input_paths(_MODEL)]


if __name__ == "__main__":
  cli.run(main, input_paths=_input_paths, check_outputs=_check_outputs,
          interrupt_note="--out was not written")
