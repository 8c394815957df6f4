#!/usr/bin/env python3
"""Raw videos -> sharded clip TFRecords + their index, without Beam.

  python tools/preprocess.py --datafile train.json --labels class_labels_indices.csv \
      --out DIR [--workers N] [--shard-index i --num-shards n] [--examples-per-shard K] \
      [--store-waveform] [--strict] [--allow-unlabeled]
  python tools/preprocess.py --merge-index --out DIR

`--shard-index i --num-shards n` splits the work across n machines: machine i writes the
output shards s with s % n == i. When all of them are in DIR (e.g. copied from the machines),
`--merge-index` writes index.json, quarantine.jsonl and summary.json. Rerunning the same
command resumes: finished shards are skipped; while one run of a task writes into DIR, a second
of the same task is refused (DIR/.lock-task-i-of-n names the first's host and pid). The
datafile, the labels CSV and the videos may be on any file system TensorFlow reads (gs://,
ram://, ...); DIR is local.

A clip that cannot be made into a correct record is quarantined (DIR/quarantine.jsonl: path,
video_id, reason code, message) and counted in DIR/summary.json; the run goes on (`--strict`
stops at the first). Reason codes: missing_file, empty_file, unreadable_container,
no_audio_stream, no_video_stream, audio_decode_error, audio_too_short, video_decode_error,
too_few_frames, unsupported_rotation, missing_frame, bad_frame (the media), unknown_label (a
label not in the labels CSV), no_labels (an entry with no label: "labels": "" or []; the
original stops on it; `--allow-unlabeled` writes such clips for a pretraining-only list and
counts them), duplicate_id (a video id already listed: the first is written), worker_crashed.

Exit status: 0 on
success, 1 when a clip stops a `--strict` run or shards fail, 2 on bad input (one line
`error: ...` on stderr: missing or unreadable lists, bad flags, a DIR started with other inputs).
"""

from __future__ import annotations

import argparse
import os
import sys

from cav_mae_jax import cli


def _parser() -> argparse.ArgumentParser:
  paragraphs = __doc__.split("\n\n")
  parser = argparse.ArgumentParser(  # the reason codes after the flags
      description=paragraphs[0],
      epilog=next(p for p in paragraphs if p.startswith("A clip that cannot be made")))
  parser.error = lambda message: sys.exit(cli.error_line(message))
  parser.add_argument("--datafile", type=cli.path_type,
                      help="JSON datafile {'data': [{video_id, wav, video_path, labels}]}; "
                      "when video_path names a video, its own audio is used and wav is not "
                      "read (the original's wav is extracted from that video); when video_path "
                      "is the original's folder of extracted frames, the audio is wav")
  parser.add_argument("--labels", type=cli.path_type,
                      help="class_labels_indices.csv (index,mid,display_name)")
  parser.add_argument("--out", type=cli.path_type, required=True, help="output directory")
  parser.add_argument("--workers", type=cli.number_type(int, 0), default=os.cpu_count() or 1,
                      help="worker processes (0: in this process)")
  parser.add_argument("--shard-index", type=cli.number_type(int, 0), default=0,
                      help="this machine's index")
  parser.add_argument("--num-shards", type=cli.number_type(int, 1), default=1,
                      help="number of machines")
  parser.add_argument("--examples-per-shard", type=cli.number_type(int, 1), default=1024)
  parser.add_argument("--store-waveform", action="store_true",
                      help="also store the 16 kHz int16 waveform (for waveform mixup)")
  parser.add_argument("--strict", action="store_true",
                      help="stop at the first clip that cannot be written")
  parser.add_argument("--allow-unlabeled", action="store_true",
                      help="write list entries with no labels (a list for pretraining only) "
                      "and count them, instead of quarantining them as no_labels")
  parser.add_argument("--merge-index", action="store_true",
                      help="only merge finished shards' sidecars into index.json")
  parser.add_argument("--no-progress", action="store_true")
  return parser


# The flags --merge-index takes (argparse's dest names): what it reads, and --workers, a resource
# setting that job scripts pass to every command (its default is the machine's core count).
_MERGE_FLAGS = ("merge_index", "out", "no_progress", "help", "workers")


def _parse(argv: list[str] | None) -> argparse.Namespace:
  parser = _parser()
  args = parser.parse_args(argv)
  if not args.merge_index and (not args.datafile or not args.labels):
    parser.error("--datafile and --labels are required (unless --merge-index)")
  if args.merge_index:  # the merge reads the shards' sidecars and the manifest, nothing else
    for action in parser._actions:  # pylint: disable=protected-access
      if (action.option_strings and action.dest not in _MERGE_FLAGS
          and getattr(args, action.dest) != action.default):
        parser.error(f"{action.option_strings[0]} applies to writing records, not to "
                     "--merge-index (which takes the rest from the shards' sidecars)")
  if "://" in args.out:
    parser.error(f"--out {args.out}: must be a local directory (the datafile, labels and "
                 "videos may be on any file system TensorFlow reads; copy the records after)")
  if args.shard_index >= args.num_shards:
    parser.error(f"--shard-index {args.shard_index}: must be < --num-shards {args.num_shards}")
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    parser.error(f"--out {args.out}: is a file, not a directory for the records")
  return args


if __name__ == "__main__":
  # TensorFlow's start-up notices would bury the one-line errors (set before it is imported);
  # this tool does no TensorFlow arithmetic (it only reads and writes files with it), so
  # oneDNN's kernels are not needed.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  with cli.signals_end_with_one_line():  # a Ctrl-C in TensorFlow's import (seconds) too
    _parse(None)  # A bad flag is answered now, not after TensorFlow's import.
    cli.import_tensorflow()  # as the other tools: without Keras, its GPUs hidden

# pylint: disable=g-import-not-at-top,wrong-import-position
from cav_mae_jax import dir_lock
from cav_mae_jax.data import clips
from cav_mae_jax.data import prepare
# pylint: enable=g-import-not-at-top,wrong-import-position


def main(argv: list[str] | None = None) -> int:
  """Runs the tool; returns the exit status."""
  args = _parse(argv)
  # SIGTERM stops the run as Ctrl-C does, and either one that lands in a gc callback (JAX's,
  # which TensorFlow's import brings) is delivered again, not lost (the run went on to its end
  # and exited 0), as in the tools of `cli.run`.
  cli.handle_stop_signals()
  try:
    if args.merge_index:
      summary = prepare.finalize(args.out)
    else:
      if args.workers == 0 and argv is None:
        # The tool's own process decodes the clips: it keeps memory as a worker does (not when
        # main is called with arguments from a program, whose malloc is its own).
        clips.keep_freed_memory()
      summary = prepare.prepare_records(
          args.datafile, args.labels, args.out, num_workers=args.workers,
          task_index=args.shard_index, num_tasks=args.num_shards,
          examples_per_shard=args.examples_per_shard, store_waveform=args.store_waveform,
          strict=args.strict, progress=not args.no_progress,
          allow_unlabeled=args.allow_unlabeled)
  except clips.StrictModeError as e:
    print(f"error: --strict: {e}", file=sys.stderr)
    return 1
  except RuntimeError as e:  # Shards failed or a worker crashed: finished shards are kept.
    print(f"error: {e}", file=sys.stderr)
    return 1
  except dir_lock.DirectoryInUseError as e:  # its message names the directory
    return cli.error_line(e)
  except OSError as e:
    return cli.error_line(f"{e.filename or args.out}: {e.strerror or e}")
  except ValueError as e:
    return cli.error_line(e)
  except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the workers are ended, temp files removed
    return cli.interrupted_line(e, "finished shards are kept; the same command resumes")
  print(prepare.format_summary(summary))
  if summary.shards_finished == summary.num_shards and not summary.written:
    reasons = clips.reason_counts(summary.quarantined_by_reason)
    return cli.error_line(f"{args.out}: no clip was written: all {summary.quarantined} were "
                          f"quarantined ({reasons}; see {prepare.QUARANTINE})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
