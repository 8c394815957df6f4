#!/usr/bin/env python3
"""Clips per second per core: our decode + fbank + JPEG against the original's preprocessing.

  python tools/benchmark_preprocess.py [--source VIDEO [--gop N] [--codec vp9|av1]] [--clips 8] \
      [--cpu 0] [--stages] [--original-python /path/to/python-with-cv2-torchaudio-torchvision]

Both sides process the same 10-s 360p clips on one pinned CPU core, and throughput is reported
per CPU-second (what each side runs: `cav_mae_jax/data/preprocess_benchmark.py`). The
original's steps run in a subprocess of `--original-python` (it needs cv2, torch, torchaudio,
torchvision, soundfile; ffmpeg and sox on PATH); wall-clock rates are printed too. `--stages`
adds the CPU milliseconds of each of our stages on the first clip (best of 5): the profile.

Clips: `--source` (e.g. the original repo's sample video KlsG1EnBEjc_000361.mp4) is
transcoded to 640x360 H.264 + AAC stereo 44.1 kHz, 10 s (with `--gop N`, an IDR picture every N
frames, as phones and streaming encoders write video; with `--codec vp9`, VP9 + Opus stereo
48 kHz in WebM, as YouTube serves clips, or `--codec av1`, SVT-AV1 + Opus), and copied
`--clips` times; without
it, synthetic 360p clips are generated (flat graphics decode faster than camera video).

Bad input is answered with one line `error: ...` and exit status 2 before anything is measured:
a `--source` our decoder cannot read (with its `decode.DecodeError` reason code, as
tools/preprocess.py quarantines clips), an `--original-python` that does not run or cannot
import the original's modules, ffmpeg or sox missing from PATH. A failure of the original's
steps in that interpreter is one such line too.
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
# What `preprocess_benchmark.run_original` imports, and the programs its steps run.
ORIGINAL_MODULES = ('cv2', 'numpy', 'soundfile', 'torch', 'torchaudio', 'torchvision', 'PIL')
ORIGINAL_PROGRAMS = ('ffmpeg', 'sox')
# Prints the modules of argv that the interpreter cannot find, without importing them (fast).
_FIND_MODULES = ('import importlib.util, sys; '
                 'print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))')


def _error(message: object) -> int:
  """Prints `error: <message>` as one line to stderr; returns the exit status 2.

  `cli.error_line`'s format; not imported from there because this file also runs under the
  original's Python (`--run-original`), which has no absl.
  """
  print('error: ' + ' '.join(str(message).split()), file=sys.stderr)
  return 2


def _last_line(text: str) -> str:
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else 'no output'


def _original_env() -> dict[str, str]:
  """The environment of the original's interpreter: it imports this checkout's package
  (standard library only at the top of preprocess_benchmark)."""
  return dict(os.environ, PYTHONPATH=os.pathsep.join(
      filter(None, [_REPO_ROOT, os.environ.get('PYTHONPATH')])))


def check_original_python(python: str) -> str:
  """The path of `python` if it can run the original's steps; raises ValueError otherwise.

  Checked before anything is measured: the interpreter exists and is executable, it runs, it
  finds every module of `ORIGINAL_MODULES` (looked up, not imported: fast), and ffmpeg and sox
  are on PATH.
  """
  flag = f'--original-python {python}'
  path = shutil.which(python)
  if path is None:
    if os.path.isdir(python):
      raise ValueError(f'{flag}: is a directory, not an interpreter')
    if os.path.exists(python):
      raise ValueError(f'{flag}: not executable')
    raise ValueError(f'{flag}: no such file' + ('' if os.sep in python else ' on PATH'))
  try:
    found = subprocess.run([path, '-c', _FIND_MODULES, *ORIGINAL_MODULES], capture_output=True,
                           text=True, env=_original_env(), timeout=120, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise ValueError(f'{flag}: does not run ({e})') from None
  if found.returncode != 0:
    raise ValueError(f'{flag}: is not a Python interpreter that runs (exit status '
                     f'{found.returncode}: {_last_line(found.stderr)})')
  missing = found.stdout.split()
  if missing:
    raise ValueError(f'{flag}: cannot import {", ".join(missing)} (the original\'s steps need '
                     f'{", ".join(ORIGINAL_MODULES)})')
  programs = [name for name in ORIGINAL_PROGRAMS if shutil.which(name) is None]
  if programs:
    raise ValueError(f'{flag}: the original\'s steps need {" and ".join(ORIGINAL_PROGRAMS)} on '
                     f'PATH; not found: {", ".join(programs)}')
  return path


def measure_original(python: str, cpu: int, clip_dir: str) -> dict:
  """Runs the original's steps on the clips of `clip_dir` under `python` (this file's worker
  mode); returns their timing. Raises RuntimeError with one line when the run fails."""
  try:
    completed = subprocess.run(
        [python, os.path.abspath(__file__), '--cpu', str(cpu), '--run-original', clip_dir],
        capture_output=True, text=True, env=_original_env(), check=False)
  except OSError as e:
    raise RuntimeError(f'--original-python {python}: does not run ({e})') from None
  if completed.returncode != 0:
    raise RuntimeError(f'--original-python {python}: the original\'s steps failed (exit status '
                       f'{completed.returncode}): {_last_line(completed.stderr)}')
  try:
    return json.loads(_last_line(completed.stdout))
  except ValueError:
    raise RuntimeError(f'--original-python {python}: the original\'s steps printed no timing '
                       f'(last line: {_last_line(completed.stdout)})') from None


def main(argv: list[str] | None = None) -> int:
  """Runs the benchmark; returns the exit status (2 on bad input, with one line on stderr)."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.error = lambda message: sys.exit(_error(message))
  parser.add_argument('--source', help='a real video to transcode to the 360p test clips')
  parser.add_argument('--clips', type=int, default=8)
  parser.add_argument('--gop', type=int,
                      help='with --source: an IDR picture every GOP frames in the transcoded '
                      'clips, none at scene cuts (phone and streaming encoders\' kind); '
                      'default: x264\'s own (every 250 frames, and at scene cuts)')
  parser.add_argument('--codec', choices=preprocess_benchmark.CODECS,
                      help='with --source: the transcoded clips\' codec, h264 (H.264 + AAC in '
                      'MP4, the default), vp9 or av1 (VP9 or AV1 + Opus in WebM, as YouTube '
                      'serves)')
  parser.add_argument('--cpu', type=int, default=0, help='the CPU core both sides run on')
  parser.add_argument('--original-python',
                      help='python with cv2, torch, torchaudio, torchvision, soundfile')
  parser.add_argument('--stages', action='store_true',
                      help='also print the CPU ms of each of our stages on the first clip')
  parser.add_argument('--run-original', metavar='CLIP_DIR', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.source == '':  # (as the other tools refuse an empty path; it meant "synthetic")
    return _error('argument --source: must not be empty (a path)')
  if args.source and not os.path.isfile(args.source):
    return _error(f'--source {args.source}: no such file')
  if args.clips < 1:
    return _error(f'--clips {args.clips}: must be >= 1')
  if args.gop is not None and (args.gop < 1 or not args.source):
    return _error(f'--gop {args.gop}: ' + ('must be >= 1' if args.gop < 1 else
                                           'needs --source (synthetic clips are not transcoded)'))
  if args.codec is not None and not args.source:
    return _error(f'--codec {args.codec}: needs --source (synthetic clips are not transcoded)')
  try:
    os.sched_setaffinity(0, {args.cpu})
  except (OSError, ValueError) as e:  # ValueError: a negative CPU number
    return _error(f'--cpu {args.cpu}: {getattr(e, "strerror", None) or e}')
  if args.run_original:  # Worker mode, under --original-python.
    paths = sorted(os.path.join(args.run_original, n) for n in os.listdir(args.run_original)
                   if n.endswith(preprocess_benchmark.CLIP_EXTENSIONS))
    with tempfile.TemporaryDirectory() as work_dir:
      print(json.dumps(preprocess_benchmark.run_original(paths, work_dir)))
    return 0

  # Every input is checked before anything is measured (the measurement takes a while).
  try:
    original_python = (check_original_python(args.original_python) if args.original_python
                       else None)
  except ValueError as e:
    return _error(e)
  if args.source:
    from cav_mae_jax.data import decode  # pylint: disable=g-import-not-at-top
    try:
      decode.decode_clip(args.source)  # the reason code of a clip our path cannot read
    except decode.DecodeError as e:
      return _error(f'--source {e.path}: cannot be decoded: {e.reason}' +
                    (f' ({e.detail})' if e.detail else ''))
  # The timed path imports TensorFlow (records); its start-up lines would bury the table.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  from cav_mae_jax import cli  # pylint: disable=g-import-not-at-top  (absl: not in worker mode)
  cli.import_tensorflow()

  with tempfile.TemporaryDirectory() as directory:
    clip_dir = os.path.join(directory, 'clips')
    os.makedirs(clip_dir)
    paths = preprocess_benchmark.prepare_clips(args.source, args.clips, clip_dir, args.gop,
                                               args.codec or 'h264')
    results = {'ours': preprocess_benchmark.run_ours(paths)}
    stages = preprocess_benchmark.stage_times(paths[0]) if args.stages else {}
    if original_python is None:
      print('original: not measured (no --original-python with cv2/torchaudio/torchvision)')
    else:
      try:
        results['original'] = measure_original(original_python, args.cpu, clip_dir)
      except RuntimeError as e:
        return _error(e)

  kind = ''  # H.264 + AAC in MP4, as the synthetic clips are, goes unsaid
  if args.codec in ('vp9', 'av1'):
    kind = f', {args.codec.upper()} + Opus (WebM)'
  if args.gop:
    keyframe = 'a keyframe' if kind else 'an IDR picture'
    kind += f', {keyframe} every {args.gop} frames'
  print(f'{args.clips} clips, 10 s, 640x360{kind}, source: {args.source or "synthetic"}, '
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
  if '--run-original' in sys.argv[1:]:  # under the original's Python (no absl): the parent
    sys.exit(main())                    # answers a Ctrl-C
  from cav_mae_jax import cli  # pylint: disable=g-import-not-at-top
  with cli.signals_end_with_one_line('nothing was measured'):
    sys.exit(main())
