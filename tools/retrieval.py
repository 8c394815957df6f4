r"""Audio <-> visual retrieval of a records split or a subset of it: R@1/5/10 and median rank.

  python tools/retrieval.py --config configs/pretrain.py:base --params ckpt/scale_pp \
      --records /data/audioset_eval [--subset as_retrieval_subset.json] [--batch_size 96]
  python tools/retrieval.py --config configs/pretrain.py:tiny --workdir /runs/tiny

Features are the task's retrieval features (mean-pooled audio-only and video-only streams, frame
config.data.eval_frame) of every clip once; the cosine-similarity ranks are computed on the
device (cav_mae_jax/eval/ranking.py). --records defaults to config.data.eval_dir. --subset: a
text file of clip ids (one a line) or JSON (a list of ids, or a datafile with video_id entries),
e.g. the paper's 5-per-class subsets; an id missing from the records is an error.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from cav_mae_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and arg.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (its checkpoint --step).")
_STEP = flags.DEFINE_integer("step", 0, "Checkpoint step of --workdir (0: the latest).")
_PARAMS = flags.DEFINE_string("params", None, "Params checkpoint (tools/convert.py output).")
_RECORDS = flags.DEFINE_string("records", None, "Records directory (default config.data.eval_dir).")
_SUBSET = flags.DEFINE_string("subset", None, "File of clip ids to keep (text or JSON).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Global batch (0: config.data.batch_size).")
flags.mark_flags_as_required(["config"])
flags.mark_flags_as_mutual_exclusive(["workdir", "params"], required=True)


def main(argv: list[str]) -> None:
  del argv
  from cav_mae_jax.eval import clips, features  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  records = features.records_directory(config, _RECORDS.value or "")
  subset = clips.read_id_list(_SUBSET.value) if _SUBSET.value else None
  loaded = features.load(config, workdir=_WORKDIR.value, step=_STEP.value,
                         params_path=_PARAMS.value)
  batch_size = features.check_batch_size(_BATCH_SIZE.value or config.data.batch_size,
                                         loaded.mesh)
  result = features.retrieval(loaded, clips.record_batches(config, batch_size, directory=records,
                                                           video_ids=subset))
  print(f"step {loaded.step}: {len(result.ids)} clips of {records} (features "
        f"{result.feature_seconds:.1f} s, ranking {result.ranking_seconds:.2f} s)")
  print(f"{'direction':14s} {'R@1':>7s} {'R@5':>7s} {'R@10':>7s} {'median rank':>12s}")
  for direction, name in (("a2v", "audio->video"), ("v2a", "video->audio")):
    m = {k.split("/")[1]: v for k, v in result.metrics.items() if k.startswith(direction)}
    print(f"{name:14s} {m['r@1']:7.2f} {m['r@5']:7.2f} {m['r@10']:7.2f} "
          f"{m['median_rank']:12.1f}")


if __name__ == "__main__":
  cli.run(main)
