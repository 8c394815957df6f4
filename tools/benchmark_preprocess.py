#!/usr/bin/env python3
"""Clips per second per core: our decode + fbank + JPEG against the original's preprocessing.

  python tools/benchmark_preprocess.py [--source VIDEO] [--clips 8] [--cpu 0] [--stages] \
      [--original-python /path/to/python-with-cv2-torchaudio-torchvision]

Both sides process the same 10-s 360p clips on one pinned CPU core:
  ours:      decode.decode_clip (PyAV: audio to 16 kHz s16 first channel, the 10 frames,
             resize + crop), fbank.clip_fbank + pad_or_trim, 10 x decode.encode_jpeg.
  original:  `ffmpeg -i F -vn -ar 16000 x.wav`, `sox x.wav y.wav remix 1` (extract_audio.py),
             OpenCV seek + read + torchvision Resize/CenterCrop/ToTensor + save_image JPEG for
             10 frames (extract_video_frame.py), and one torchaudio kaldi.fbank of the WAV as the
             loader computes it (read with soundfile: torchaudio 2.9's load needs torchcodec).
The original's steps run in a subprocess of `--original-python` (it needs cv2, torch,
torchaudio, torchvision, soundfile; ffmpeg and sox on PATH). Throughput is reported per
CPU-second (user + system time of the process and its children), which is what "per core"
means and is robust to other load on the machine; wall-clock rates are printed too.

Clips: `--source` (e.g. the original repo's sample video KlsG1EnBEjc_000361.mp4) is
transcoded to 640x360 H.264 + AAC stereo 44.1 kHz, 10 s, and copied `--clips` times; without
it, synthetic 360p clips are generated (flat graphics decode faster than camera video).
"""

from __future__ import annotations

import argparse
import fractions
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

# pylint: disable=g-import-not-at-top,import-outside-toplevel


def _cpu_seconds() -> float:
  """User + system CPU seconds of this process and its finished children."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def transcode_360p(source: str, destination: str, seconds: float = 10.0) -> None:
  """Re-encodes the first `seconds` of a video at 640x360 (H.264 + AAC stereo 44.1 kHz)."""
  import av
  with av.open(source) as inp, av.open(destination, 'w') as out:
    video_in, audio_in = inp.streams.video[0], inp.streams.audio[0]
    rate = video_in.average_rate or fractions.Fraction(25)
    video_out = out.add_stream('libx264', rate=rate, options={'preset': 'medium', 'crf': '23'})
    video_out.width, video_out.height, video_out.pix_fmt = 640, 360, 'yuv420p'
    audio_out = out.add_stream('aac', rate=44100, layout='stereo')
    resampler = av.AudioResampler(format='fltp', layout='stereo', rate=44100)
    frames_written = 0
    for frame in inp.decode(video_in, audio_in):
      if frame.time is not None and frame.time >= seconds:
        continue
      if isinstance(frame, av.VideoFrame):
        scaled = frame.reformat(width=640, height=360, format='yuv420p')
        scaled.pts = frames_written
        scaled.time_base = 1 / rate
        frames_written += 1
        out.mux(video_out.encode(scaled))
      else:
        frame.pts = None
        for chunk in resampler.resample(frame):
          out.mux(audio_out.encode(chunk))
    out.mux(video_out.encode(None))
    out.mux(audio_out.encode(None))


def prepare_clips(source: str | None, count: int, directory: str) -> list[str]:
  """Writes `count` 10-s 360p clips into `directory` and returns their paths."""
  if source:
    first = os.path.join(directory, 'clip_000.mp4')
    transcode_360p(source, first)
    paths = [first]
    for i in range(1, count):
      paths.append(os.path.join(directory, f'clip_{i:03d}.mp4'))
      shutil.copyfile(first, paths[-1])
    return paths
  from cav_mae_jax.data import synthetic
  result = synthetic.generate_dataset(directory, count, duration_s=10.0, fps=25, width=640,
                                      height=360)
  return sorted(os.path.join(result['video_dir'], name)
                for name in os.listdir(result['video_dir']))


def run_ours(paths: list[str]) -> dict:
  """Times our path on every clip; returns clip count, CPU and wall seconds."""
  from cav_mae_jax.data import decode
  from cav_mae_jax.data import fbank
  decode.decode_clip(paths[0])  # Warm-up: imports, codec initialization.
  cpu, wall = _cpu_seconds(), time.perf_counter()
  for path in paths:
    clip = decode.decode_clip(path)
    features = fbank.pad_or_trim(fbank.clip_fbank(clip.waveform))
    jpegs = [decode.encode_jpeg(frame) for frame in clip.frames]
    assert features.shape == (1024, 128) and len(jpegs) == 10
  return {'clips': len(paths), 'cpu_s': _cpu_seconds() - cpu,
          'wall_s': time.perf_counter() - wall}


def stage_times(path: str, repeats: int = 5) -> dict[str, float]:
  """Best-of-`repeats` CPU milliseconds of each stage of our path on one clip (the profile)."""
  import av
  from cav_mae_jax.data import decode
  from cav_mae_jax.data import fbank
  clip = decode.decode_clip(path)

  def h264_only():  # The decoder alone, non-reference frames skipped, to the last wanted frame.
    with av.open(path) as container:
      stream = container.streams.video[0]
      stream.codec_context.skip_frame = 'NONREF'
      for frame in container.decode(stream):
        if frame.pts is not None and frame.time >= clip.frame_indices[-1] / clip.fps:
          break

  stages = {'decode_clip (all of decoding)': lambda: decode.decode_clip(path),
            '  video: decode_frames': lambda: decode.decode_frames(path),
            '    the video decoder alone': h264_only,
            '  audio: decode_audio': lambda: decode.decode_audio(path),
            'fbank + pad': lambda: fbank.pad_or_trim(fbank.clip_fbank(clip.waveform)),
            '10 x JPEG': lambda: [decode.encode_jpeg(f) for f in clip.frames]}
  result = {}
  for name, stage in stages.items():
    times = []
    for _ in range(repeats):
      start = _cpu_seconds()
      stage()
      times.append(_cpu_seconds() - start)
    result[name] = 1000 * min(times)
  return result


def run_original(paths: list[str], work_dir: str) -> dict:
  """Times the original's preprocessing steps (run under a Python with cv2 and torchaudio)."""
  import cv2
  import numpy as np
  import soundfile
  import torch
  import torchaudio
  import torchvision.transforms as transforms
  from PIL import Image
  from torchvision.utils import save_image
  torch.set_num_threads(1)
  cv2.setNumThreads(1)
  preprocess = transforms.Compose(
      [transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor()])

  def one_clip(path, index):
    intermediate = os.path.join(work_dir, f'{index}_intermediate.wav')
    wav = os.path.join(work_dir, f'{index}.wav')
    subprocess.run(['ffmpeg', '-nostdin', '-v', 'error', '-y', '-i', path, '-vn', '-ar',
                    '16000', intermediate], check=True)
    subprocess.run(['sox', intermediate, wav, 'remix', '1'], check=True)
    os.remove(intermediate)
    capture = cv2.VideoCapture(path)
    fps = capture.get(cv2.CAP_PROP_FPS)
    total = min(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), int(fps * 10))
    for i in range(10):
      capture.set(cv2.CAP_PROP_POS_FRAMES, int(i * (total / 10)) - 1)
      _, frame = capture.read()
      image = Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
      save_image(preprocess(image), os.path.join(work_dir, f'{index}_frame_{i}.jpg'))
    capture.release()
    samples, rate = soundfile.read(wav, dtype='int16')
    waveform = torch.from_numpy(samples.astype(np.float32) / 32768.0)[None]
    waveform = waveform - waveform.mean()
    features = torchaudio.compliance.kaldi.fbank(
        waveform, htk_compat=True, sample_frequency=rate, use_energy=False,
        window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)
    assert features.shape[1] == 128

  one_clip(paths[0], 'warmup')
  cpu, wall = _cpu_seconds(), time.perf_counter()
  for index, path in enumerate(paths):
    one_clip(path, index)
  return {'clips': len(paths), 'cpu_s': _cpu_seconds() - cpu,
          'wall_s': time.perf_counter() - wall}


def _error(message: object) -> int:
  """Prints `error: <message>` as one line to stderr; returns the exit status 2."""
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
      print(json.dumps(run_original(paths, work_dir)))
    return 0

  with tempfile.TemporaryDirectory() as directory:
    clip_dir = os.path.join(directory, 'clips')
    os.makedirs(clip_dir)
    paths = prepare_clips(args.source, args.clips, clip_dir)
    if not args.source:  # generate_dataset writes into clip_dir/video/train.
      for path in paths:
        shutil.move(path, clip_dir)
      paths = sorted(os.path.join(clip_dir, os.path.basename(p)) for p in paths)
    results = {'ours': run_ours(paths)}
    stages = stage_times(paths[0]) if args.stages else {}
    missing = [tool for tool in ('ffmpeg', 'sox') if shutil.which(tool) is None]
    if not args.original_python:
      print('original: not measured (no --original-python with cv2/torchaudio/torchvision)')
    elif missing:
      print(f'original: not measured ({", ".join(missing)} not on PATH)')
    else:
      completed = subprocess.run(
          [args.original_python, os.path.abspath(__file__), '--cpu', str(args.cpu),
           '--run-original', clip_dir], check=True, capture_output=True, text=True)
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
