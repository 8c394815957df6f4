r"""Audio <-> visual retrieval of a records split or a subset of it: R@1/5/10 and median rank.

  python tools/retrieval.py --config configs/pretrain.py:base --params ckpt/scale_pp \
      --records /data/audioset_eval [--subset as_retrieval_subset.json] [--batch_size 96]
  python tools/retrieval.py --workdir /runs/tiny   # --config: the run's (configs/workdir.py)

Features are the task's retrieval features (mean-pooled audio-only and video-only streams, frame
config.data.eval_frame) of every clip once; the cosine-similarity ranks are computed on the
device (cav_mae_jax/eval/ranking.py). --records defaults to config.data.eval_dir. --subset: a
text file of clip ids (one a line) or JSON (a list of ids, or a datafile with video_id entries),
e.g. the paper's 5-per-class subsets; an id missing from the records is an error. Multi-host:
the same command on every host with --distributed (as tools/train.py); process 0 prints.
"""

from __future__ import annotations

from absl import flags

from cav_mae_jax import cli

_MODEL = cli.define_model_flags()
_RECORDS = flags.DEFINE_string("records", None, "Records directory (default config.data.eval_dir).")
_SUBSET = flags.DEFINE_string("subset", None, "File of clip ids to keep (text or JSON).")
_BATCH_SIZE = cli.define_batch_size_flag()
_DISTRIBUTED = cli.define_distributed_flags("rank the clips alone, on its own devices")


def main(argv: list[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  _DISTRIBUTED.initialize()
  from cav_mae_jax.eval import clips, features  # pylint: disable=g-import-not-at-top
  config = _MODEL.config.value
  records = features.records_directory(config, _RECORDS.value or "")
  subset = clips.read_id_list(_SUBSET.value) if _SUBSET.value else None
  batch_size, what = cli.batch_size_source(_BATCH_SIZE, config)
  loaded = features.load(config, workdir=_MODEL.workdir.value, step=_MODEL.step.value,
                         params_path=_MODEL.params.value, records_dir=records,
                         also={"--batch_size": batch_size, "--subset": subset})
  features.check_batch_size(batch_size, loaded.mesh, what=what)
  result = features.retrieval(loaded, clips.record_batches(config, batch_size, directory=records,
                                                           video_ids=subset))
  if jax.process_index():
    return
  print(f"step {loaded.step}: {len(result.ids)} clips of {records} (features "
        f"{result.feature_seconds:.1f} s, ranking {result.ranking_seconds:.2f} s)")
  print(f"{'direction':14s} {'R@1':>7s} {'R@5':>7s} {'R@10':>7s} {'median rank':>12s}")
  for direction, name in (("a2v", "audio->video"), ("v2a", "video->audio")):
    m = {k.split("/")[1]: v for k, v in result.metrics.items() if k.startswith(direction)}
    print(f"{name:14s} {m['r@1']:7.2f} {m['r@5']:7.2f} {m['r@10']:7.2f} "
          f"{m['median_rank']:12.1f}")


def _input_paths() -> list[tuple[str, str | None]]:
  records = cli.records_input_path(_RECORDS.value, _MODEL.config.value)
  return [records, ("--subset", _SUBSET.value), *cli.model_input_paths(_MODEL)]


if __name__ == "__main__":
  cli.run(main, input_paths=_input_paths)
