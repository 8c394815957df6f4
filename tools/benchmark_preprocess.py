#!/usr/bin/env python3
"""Clips per second per core: our decode + fbank + JPEG against the original's preprocessing.

  python tools/benchmark_preprocess.py [--source VIDEO] [--clips 8] [--cpu 0] [--stages] \
      [--original-python /path/to/python-with-cv2-torchaudio-torchvision]

Both sides process the same 10-s 360p clips on one pinned CPU core, and throughput is reported
per CPU-second (what each side runs: `cav_mae_jax/data/preprocess_benchmark.py`). The
original's steps run in a subprocess of `--original-python` (it needs cv2, torch, torchaudio,
torchvision, soundfile; ffmpeg and sox on PATH); wall-clock rates are printed too. `--stages`
adds the CPU milliseconds of each of our stages on the first clip (best of 5): the profile.

Clips: `--source` (e.g. the original repo's sample video KlsG1EnBEjc_000361.mp4) is
transcoded to 640x360 H.264 + AAC stereo 44.1 kHz, 10 s, and copied `--clips` times; without
it, synthetic 360p clips are generated (flat graphics decode faster than camera video).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from cav_mae_jax.data import preprocess_benchmark

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _error(message: object) -> int:
  """Prints `error: <message>` as one line to stderr; returns the exit status 2.

  `cli.error_line`'s format; not imported from there because this file also runs under the
  original's Python (`--run-original`), which has no absl.
  """
  print('error: ' + ' '.join(str(message).split()), file=sys.stderr)
  return 2


def main(argv: list[str] | None = None) -> int:
  """Runs the benchmark; returns the exit status (2 on bad input, with one line on stderr)."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.error = lambda message: sys.exit(_error(message))
  parser.add_argument('--source', help='a real video to transcode to the 360p test clips')
  parser.add_argument('--clips', type=int, default=8)
  parser.add_argument('--cpu', type=int, default=0, help='the CPU core both sides run on')
  parser.add_argument('--original-python',
                      help='python with cv2, torch, torchaudio, torchvision, soundfile')
  parser.add_argument('--stages', action='store_true',
                      help='also print the CPU ms of each of our stages on the first clip')
  parser.add_argument('--run-original', metavar='CLIP_DIR', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.source and not os.path.isfile(args.source):
    return _error(f'--source {args.source}: no such file')
  if args.clips < 1:
    return _error(f'--clips {args.clips}: must be >= 1')
  try:
    os.sched_setaffinity(0, {args.cpu})
  except OSError as e:
    return _error(f'--cpu {args.cpu}: {e.strerror or e}')
  if args.run_original:  # Worker mode, under --original-python.
    paths = sorted(os.path.join(args.run_original, n) for n in os.listdir(args.run_original)
                   if n.endswith('.mp4'))
    with tempfile.TemporaryDirectory() as work_dir:
      print(json.dumps(preprocess_benchmark.run_original(paths, work_dir)))
    return 0

  with tempfile.TemporaryDirectory() as directory:
    clip_dir = os.path.join(directory, 'clips')
    os.makedirs(clip_dir)
    paths = preprocess_benchmark.prepare_clips(args.source, args.clips, clip_dir)
    results = {'ours': preprocess_benchmark.run_ours(paths)}
    stages = preprocess_benchmark.stage_times(paths[0]) if args.stages else {}
    missing = [tool for tool in ('ffmpeg', 'sox') if shutil.which(tool) is None]
    if not args.original_python:
      print('original: not measured (no --original-python with cv2/torchaudio/torchvision)')
    elif missing:
      print(f'original: not measured ({", ".join(missing)} not on PATH)')
    else:
      # The other Python imports this checkout's package (standard library only at the top).
      env = dict(os.environ, PYTHONPATH=os.pathsep.join(
          filter(None, [_REPO_ROOT, os.environ.get('PYTHONPATH')])))
      completed = subprocess.run(
          [args.original_python, os.path.abspath(__file__), '--cpu', str(args.cpu),
           '--run-original', clip_dir], check=True, capture_output=True, text=True, env=env)
      results['original'] = json.loads(completed.stdout.strip().splitlines()[-1])

  print(f'{args.clips} clips, 10 s, 640x360, source: {args.source or "synthetic"}, '
        f'one core (cpu {args.cpu})')
  print(f'{"path":10s} {"clips/CPU-s":>12s} {"clips/wall-s":>13s} {"CPU ms/clip":>12s}')
  for name, result in results.items():
    print(f'{name:10s} {result["clips"] / result["cpu_s"]:12.2f} '
          f'{result["clips"] / result["wall_s"]:13.2f} '
          f'{1000 * result["cpu_s"] / result["clips"]:12.0f}')
  if 'original' in results:
    speedup = (results['ours']['clips'] / results['ours']['cpu_s']) / (
        results['original']['clips'] / results['original']['cpu_s'])
    print(f'speedup per core (CPU time): {speedup:.2f}x')
  if stages:
    print('our stages on one clip, best of 5, CPU ms:')
    for name, milliseconds in stages.items():
      print(f'  {name:34s} {milliseconds:7.1f}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
