"""Raw clips -> a records directory: the library behind tools/preprocess.py.

`prepare_records` reads the source lists (`sources.py`), plans the output shards and writes
this task's unfinished ones (`shards.py`, one clip at a time through `clips.py`) on one machine
with a pool of worker processes, then `finalize`s the directory:
- clips go to shards round-robin over the datafile order, so every machine of a split run
  (`task_index` of `num_tasks`, taking shards `s % num_tasks == task_index`) agrees;
- a shard whose sidecar exists is finished and skipped on the next run (resume);
  `manifest.json` pins the inputs and settings, so a rerun with others is refused;
- a clip that cannot be made into a correct record is quarantined with a reason code
  (`decode.DecodeError` reasons, `unknown_label`, `no_labels`, `duplicate_id`,
  `audio_too_short`, `worker_crashed`), or, with `strict`, the run stops naming it; clips
  without labels are written and counted instead with `allow_unlabeled` (pretraining lists);
- `finalize` makes the index (`records.write_index`), `quarantine.jsonl` and `summary.json`
  from the sidecars, so the shards of a split run can be copied into one directory and merged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any

import tensorflow as tf

from cav_mae_jax import dir_lock
from cav_mae_jax import files
from cav_mae_jax.data import clips
from cav_mae_jax.data import records
from cav_mae_jax.data import shards
from cav_mae_jax.data import sources

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
SUMMARY = "summary.json"
_FAILURES_SHOWN = 3  # failed shards named in the error line (a full disk fails them all)


@dataclasses.dataclass(frozen=True)
class Summary:
  """What summary.json says."""

  num_shards: int
  shards_finished: int
  written: int
  quarantined: int
  quarantined_by_reason: dict[str, int]
  unlabeled: int  # of the clips written, those with no labels (`allow_unlabeled`)
  seconds: float
  shard_seconds: float
  index_written: bool


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


# Manifest keys added later, as a directory started before them has them.
_MANIFEST_DEFAULTS = {"allow_unlabeled": False}


# What the user set behind each manifest key, for the refusal of a changed one.
_MANIFEST_SETTINGS = {
    "format_version": "the record format version",
    "num_entries": "the datafile's entry count",
    "num_shards": "the shard count (the datafile's entries over --examples-per-shard)",
    "store_waveform": "--store-waveform",
    "allow_unlabeled": "--allow-unlabeled",
}
_MANIFEST_FILES = {"datafile_sha256": "--datafile", "labels_sha256": "--labels"}


def _check_manifest(out_dir: str, manifest: dict[str, Any]) -> None:
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.exists(path):
    shards.write_json_atomic(path, manifest)
    return
  with open(path) as f:
    existing = {**_MANIFEST_DEFAULTS, **json.load(f)}
  for key, value in manifest.items():
    if existing.get(key) == value:
      continue
    if key in _MANIFEST_FILES:  # named by its contents' SHA-256
      change = (f"{_MANIFEST_FILES[key]}'s contents differ from those of the file this "
                "directory was started with")
    else:
      change = (f"{_MANIFEST_SETTINGS.get(key, key)} was {existing.get(key)!r} when this "
                f"directory was started, now {value!r}")
    raise ValueError(f"{path}: {change}; use a new output directory, or the run's settings")


def prepare_records(datafile: str, labels_csv: str, out_dir: str, *, num_workers: int = 1,
                    task_index: int = 0, num_tasks: int = 1, examples_per_shard: int = 1024,
                    store_waveform: bool = False, strict: bool = False,
                    clip_fn: clips.ClipFn = clips.clip_example, progress: bool = True,
                    allow_unlabeled: bool = False) -> Summary:
  """Writes this task's unfinished shards, then `finalize`s the directory.

  A list entry without labels is quarantined (`clips.NO_LABELS`) unless `allow_unlabeled`
  (a list for pretraining only); then it is written and counted (`Summary.unlabeled`).

  `num_workers=0` runs in this process (no crash isolation). Raises clips.StrictModeError with
  `strict`, and RuntimeError naming the shards that failed for other reasons.
  `store_waveform`, `strict` and `allow_unlabeled` are those of `clips.WriteOptions`; they
  travel on as one.
  """
  if not 0 <= task_index < num_tasks:
    raise ValueError(f"task_index must be in [0, num_tasks={num_tasks}), got {task_index}")
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}")
  start = time.time()
  options = clips.WriteOptions(store_waveform=store_waveform, strict=strict,
                               allow_unlabeled=allow_unlabeled)
  entries = sources.read_datafile(datafile)
  labels = sources.read_class_labels(labels_csv)
  sources.check_labels_known(entries, labels, datafile)
  num_shards = shards.num_shards_for(len(entries), examples_per_shard)
  os.makedirs(out_dir, exist_ok=True)
  # One run per task: the tasks of a split run may share the directory, a second run of the
  # same task (or a second unsplit run) would write the same shards.
  with dir_lock.DirLock(out_dir, f".lock-task-{task_index}-of-{num_tasks}",
                        what=f"preprocessing run of task {task_index} of {num_tasks}") as lock:
    note = dir_lock.describe_previous(lock.previous_holder)
    if note and progress:
      print(note)
    return _prepare_locked(entries, labels, datafile, labels_csv, out_dir, start,
                           num_shards=num_shards, num_workers=num_workers,
                           task_index=task_index, num_tasks=num_tasks, options=options,
                           clip_fn=clip_fn, progress=progress)


def _prepare_locked(entries: list[sources.ClipEntry], labels: sources.ClassLabels,
                    datafile: str, labels_csv: str, out_dir: str, start: float, *,
                    num_shards: int, num_workers: int, task_index: int, num_tasks: int,
                    options: clips.WriteOptions, clip_fn: clips.ClipFn,
                    progress: bool) -> Summary:
  """prepare_records with the directory made and this task's lock held."""
  _check_manifest(out_dir, {
      "format_version": records.FORMAT_VERSION,
      "datafile_sha256": _sha256(datafile),
      "labels_sha256": _sha256(labels_csv),
      "num_entries": len(entries),
      "num_shards": num_shards,
      "store_waveform": options.store_waveform,
      "allow_unlabeled": options.allow_unlabeled,
  })
  todo = []
  for plan in shards.plan_shards(entries, num_shards):
    if plan.shard_index % num_tasks != task_index:
      continue
    sidecar = shards.read_sidecar(out_dir, plan.shard_index, num_shards)
    if sidecar is None:
      todo.append(plan)
    elif options.strict and sidecar["quarantined"]:  # a rerun with --strict: these count too
      item = sidecar["quarantined"][0]
      raise clips.StrictModeError(clips.Quarantined(
          **{k: item[k] for k in ("path", "video_id", "reason", "message")}))
  task_shards = len(range(task_index, num_shards, num_tasks))
  if len(todo) < task_shards and progress:  # resumed: the summary's counts are the directory's
    print(f"note: {task_shards - len(todo)} of {task_shards} shards"
          f"{' of this task' if num_tasks > 1 else ''} were finished by an earlier run and are "
          "kept (their clips count in the totals below)")
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=sum(len(p.entries) for p in todo), unit="clip", disable=not progress,
             desc=f"task {task_index}/{num_tasks}: {len(todo)} shards")
  errors = []
  try:
    if num_workers == 0:  # a shard's failure is said as a worker's is, and the others go on
      for plan in todo:
        started = []
        try:
          shards.write_shard(plan, out_dir, labels, options=options, clip_fn=clip_fn,
                             on_clip=lambda *_: bar.update(), on_start=started.append)
        except clips.StrictModeError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          errors.append(shards.failure_line(plan, shards.failure_text(e),
                                            started[-1] if started else None))
    elif todo:
      errors = shards.run_pool(todo, out_dir, labels, num_workers=num_workers,
                               options=options, clip_fn=clip_fn, on_clip=bar.update)
  except (clips.StrictModeError, shards.WorkerCrashError):
    bar.close()
    finalize(out_dir, seconds=time.time() - start)  # What finished is kept and counted.
    raise
  bar.close()
  summary = finalize(out_dir, seconds=time.time() - start)
  if errors:  # one line: the first few, each naming its shard and clip
    shown = "; ".join(errors[:_FAILURES_SHOWN])
    more = len(errors) - _FAILURES_SHOWN
    raise RuntimeError(
        f"{len(errors)} of {len(todo)} shards failed (finished shards are kept; rerun to "
        f"resume): {shown}{f'; and {more} more' if more > 0 else ''}")
  return summary


def _manifest(out_dir: str) -> dict[str, Any]:
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.isfile(path):
    raise ValueError(f"{out_dir}: no {MANIFEST}: not an output directory of "
                     "tools/preprocess.py")
  with open(path) as f:
    return json.load(f)


def finalize(out_dir: str, seconds: float = 0.0) -> Summary:
  """Writes quarantine.jsonl, summary.json and (once every shard is finished) the index.

  The index (`records.write_index`) is written only when every shard's sidecar is there; this
  is also the merge step of a split run (`--merge-index`). Sidecars are read one at a time
  (a list of 2M missing files has 2M quarantined clips in them, a GB held at once).
  """
  manifest = _manifest(out_dir)
  num_shards = manifest["num_shards"]
  # What an earlier finalize on this host left when it was killed (kill -9) while writing.
  shards.remove_dead_temporaries(out_dir, (QUARANTINE, SUMMARY, records.INDEX_FILE))
  by_reason: dict[str, int] = {}
  merged: records.ShardStats | None = None  # the finished shards' statistics, in shard order
  infos: list[records.ShardInfo] = []
  shard_seconds = 0  # summed as sum() did (an int 0 when no shard is finished)
  lines = []
  for shard_index in range(num_shards):
    sidecar = shards.read_sidecar(out_dir, shard_index, num_shards)
    if sidecar is None:
      continue
    for item in sidecar["quarantined"]:
      by_reason[item["reason"]] = by_reason.get(item["reason"], 0) + 1
      line = {k: item[k] for k in ("path", "video_id", "reason", "message")}
      lines.append(json.dumps({**line, "shard": sidecar["file"]}) + "\n")
    stats = records.ShardStats.from_json(sidecar["stats"])
    merged = stats if merged is None else merged.merge(stats)
    infos.append(records.ShardInfo(sidecar["file"], sidecar["stats"]["num_examples"]))
    shard_seconds += sidecar["seconds"]
  # Under this process's temporary name (`remove_dead_temporaries` above reads it back).
  with files.staged_output(os.path.join(out_dir, QUARANTINE), files.process_tag()) as tmp, \
      open(tmp, "w") as f:
    f.writelines(lines)
  index_written = False
  if len(infos) == num_shards and merged.num_examples > 0:
    records.write_index(records.index_path(out_dir),
                        records.index_from_stats(infos, merged, manifest["store_waveform"]))
    index_written = True
  summary = Summary(
      num_shards=num_shards,
      shards_finished=len(infos),
      written=merged.num_examples if merged is not None else 0,
      quarantined=sum(by_reason.values()),
      quarantined_by_reason=dict(sorted(by_reason.items())),
      unlabeled=merged.num_unlabeled if merged is not None else 0,
      seconds=seconds,
      shard_seconds=shard_seconds,
      index_written=index_written,
  )
  shards.write_json_atomic(os.path.join(out_dir, SUMMARY), dataclasses.asdict(summary))
  return summary


def format_summary(summary: Summary) -> str:
  """A few human-readable lines about a run."""
  unlabeled = (f" ({summary.unlabeled} of them with no labels, --allow-unlabeled)"
               if summary.unlabeled else "")
  lines = [f"written {summary.written} clips{unlabeled}, quarantined {summary.quarantined} "
           f"({summary.shards_finished}/{summary.num_shards} shards finished) "
           f"in {summary.seconds:.1f} s"]
  for reason, count in summary.quarantined_by_reason.items():
    lines.append(f"  quarantined {reason}: {count}")
  if not summary.index_written:
    lines.append(f"{records.INDEX_FILE} not written yet: "
                 + ("no examples" if summary.shards_finished == summary.num_shards
                    else "some shards are not finished (run the other tasks, then --merge-index)"))
  return "\n".join(lines)
