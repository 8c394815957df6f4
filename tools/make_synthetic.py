#!/usr/bin/env python3
"""Writes the synthetic audio-visual dataset (MP4 clips, JSON datafiles, class labels CSV).

  python tools/make_synthetic.py --out DIR [--train 256] [--eval 64] [--classes 8] \
      [--seed 0] [--duration 10] [--fps 10] [--width 160] [--height 120] [--workers N]

Writes DIR/train.json, DIR/eval.json (the original CAV-MAE datafile format), DIR/video/<split>/
*.mp4 and DIR/class_labels_indices.csv. Train and eval clips are drawn independently. Bad values
print one line `error: ...` on stderr and exit with status 2, and so does a write that fails (a
full disk): each file is written under a temporary name and renamed when complete, so the folder
never holds a truncated clip under a final name (tools that read it would take it for a clip).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from cav_mae_jax import cli
from cav_mae_jax.data import fbank
from cav_mae_jax.data import synthetic


def main(argv: list[str] | None = None) -> int:
  """Runs the tool; returns the exit status."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.error = lambda message: sys.exit(cli.error_line(message))
  parser.add_argument('--out', type=cli.path_type, required=True, help='output directory')
  parser.add_argument('--train', type=cli.number_type(int, 1), default=256,
                      help='number of training clips')
  parser.add_argument('--eval', type=cli.number_type(int, 0), default=64,
                      help='number of evaluation clips (0: none)')
  parser.add_argument('--classes', type=cli.number_type(int, 1), default=8,
                      help='number of classes')
  parser.add_argument('--seed', type=cli.number_type(int, 0), default=0)
  # Shorter clips have no fbank frame: every one would be quarantined as audio_too_short.
  parser.add_argument('--duration', type=cli.number_type(float, fbank.FRAME_LENGTH_MS / 1000),
                      default=10.0, help='clip length in seconds (at least one 25 ms fbank '
                      'frame)')
  parser.add_argument('--fps', type=cli.number_type(int, 1), default=10)
  parser.add_argument('--width', type=cli.number_type(int, 2), default=160)
  parser.add_argument('--height', type=cli.number_type(int, 2), default=120)
  parser.add_argument('--workers', type=cli.number_type(int, 1), default=os.cpu_count() or 1)
  args = parser.parse_args(argv)
  splits = [('train', args.train)] + ([('eval', args.eval)] if args.eval > 0 else [])
  for split_name, num_clips in splits:
    start = time.time()
    try:
      result = synthetic.generate_dataset(
          args.out, num_clips, num_classes=args.classes, seed=args.seed,
          duration_s=args.duration, fps=args.fps, width=args.width, height=args.height,
          split_name=split_name, num_workers=args.workers)
    except ValueError as e:
      return cli.error_line(e)
    except OSError as e:
      return cli.error_line(f'--out {e.filename or args.out}: {e.strerror or e}')
    print(f'{split_name}: {num_clips} clips in {time.time() - start:.1f} s -> '
          f'{result["datafile"]}')
  print(f'labels: {os.path.join(args.out, "class_labels_indices.csv")}')
  return 0


if __name__ == '__main__':
  # Each clip is renamed when whole, and the workers' temporaries are removed.
  with cli.signals_end_with_one_line('no clip was left half-written'):
    sys.exit(main())
