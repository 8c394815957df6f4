"""A synthetic audio-visual dataset written as real MP4 files, for the demo and the tests.

Each of K classes has a sound and a picture that co-vary:
  sound:   pitch (log-spaced over 2.5 octaves), timbre (sine, odd harmonics, all harmonics,
           inharmonic bell) and rhythm (notes per second);
  picture: shape (circle, square, triangle, diamond, ring, cross, bar, X), colour (hue) and
           motion (horizontal, vertical, circular, diagonal);
and the object's size pulses with the notes, so sound and picture are also in sync. Every
clip draws its own pitch/tempo/phase jitter, loudness, stereo balance, noise, background,
start position, speed, size and hue jitter, plus (sometimes) a quieter distractor tone and a
faint distractor shape of another class, so audio->visual retrieval is learnable but not
trivial.

Clips are H.264 (yuv420p) video with AAC stereo 44.1 kHz audio, written with PyAV. The dataset
comes with the original CAV-MAE JSON datafile (`{"data": [{"video_id", "wav", "video_path",
"labels"}]}`, where both `wav` and `video_path` name the MP4) and an AudioSet-format
`class_labels_indices.csv` (`index,mid,display_name`, mids `/m/syn00`, ...). Output is
deterministic for a seed.

`write_mp4` and the frame-number pattern helpers are also used by the tests to build media
with specific properties (VFR, 6 channels, audio-only, ...); `write_extracted_layout` turns a
video into what the original's preprocessing leaves (a 16 kHz WAV and frame folders).
"""

from __future__ import annotations

import colorsys
import contextlib
import csv
import fractions
import json
import multiprocessing
import multiprocessing.pool
import os
import secrets
import signal
import threading
import zlib

import av
import numpy as np

from cav_mae_jax import files

SAMPLE_RATE = 44100
SHAPES = ('circle', 'square', 'triangle', 'diamond', 'ring', 'cross', 'bar', 'x')
TIMBRES = ('sine', 'odd harmonics', 'all harmonics', 'bell')
MOTIONS = ('horizontal', 'vertical', 'circular', 'diagonal')
NOTE_RATES_HZ = (1.0, 1.5, 2.0, 3.0, 4.0)
_AUDIO_FRAME_SAMPLES = 1024
_DEFAULT_LAYOUTS = {1: 'mono', 2: 'stereo', 6: '5.1'}


# ----------------------------------------------------------------------------------------
# Writing media.


def write_mp4(path: str | os.PathLike,
              frames: np.ndarray | None = None,
              fps: float | fractions.Fraction = 10,
              audio: np.ndarray | None = None,
              sample_rate: int = SAMPLE_RATE,
              *,
              audio_layout: str | None = None,
              frame_times_s: np.ndarray | None = None,
              crf: int = 23,
              preset: str = 'ultrafast',
              faststart: bool = False,
              display_rotation: int = 0,
              display_hflip: bool = False) -> None:
  """Writes uint8 RGB frames [T, H, W, 3] as H.264 and float audio [C, S] as AAC into an MP4.

  Either part may be None (audio-only or video-only files). `frame_times_s` gives each frame's
  presentation time for variable-frame-rate files (default: frame i at i / fps). `preset` is
  x264's (the default 'ultrafast' has no B-frames; 'medium' reorders frames). `faststart`
  puts the index (moov) before the media data, as streaming-friendly files have it.
  `display_rotation` tags the video with a display matrix turning it counterclockwise by that
  many degrees (what ffprobe prints as "rotation of N degrees"; phone footage tagged
  `rotate=90` is -90); `display_hflip` adds a mirror to it.
  """
  if frames is None and audio is None:
    raise ValueError('write_mp4 needs frames, audio or both')
  options = {'movflags': 'faststart'} if faststart else {}
  with av.open(os.fspath(path), mode='w', format='mp4', options=options) as container:
    video_stream = audio_stream = None
    if frames is not None:
      if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f'frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}')
      rate = fractions.Fraction(fps).limit_denominator(1001)
      video_stream = container.add_stream('libx264', rate=rate)
      video_stream.width, video_stream.height = frames.shape[2], frames.shape[1]
      video_stream.pix_fmt = 'yuv420p'
      video_stream.codec_context.thread_count = 1  # Deterministic output.
      video_stream.options = {'preset': preset, 'crf': str(crf)}
      if display_rotation or display_hflip:
        video_stream.set_display_rotation(display_rotation, hflip=display_hflip)
      if frame_times_s is not None:
        video_stream.codec_context.time_base = fractions.Fraction(1, 1000)
    if audio is not None:
      audio = np.asarray(audio, np.float32)
      if audio.ndim != 2:
        raise ValueError(f'audio must be [channels, samples], got shape {audio.shape}')
      layout = audio_layout or _DEFAULT_LAYOUTS.get(audio.shape[0])
      if layout is None:
        raise ValueError(f'no default layout for {audio.shape[0]} channels; pass audio_layout')
      # The fast coder without the optional coding tools is about 4x quicker than ffmpeg's
      # default; synthetic sound does not need the quality.
      audio_stream = container.add_stream(
          'aac', rate=sample_rate, layout=layout,
          options={'aac_coder': 'fast', 'aac_pns': '0', 'aac_tns': '0', 'aac_is': '0',
                   'aac_ms': '0'})
      audio_stream.bit_rate = 32000 * audio.shape[0]
    if audio_stream is not None:
      for start in range(0, audio.shape[1], _AUDIO_FRAME_SAMPLES):
        chunk = np.ascontiguousarray(audio[:, start:start + _AUDIO_FRAME_SAMPLES])
        frame = av.AudioFrame.from_ndarray(chunk, format='fltp', layout=audio_stream.layout.name)
        frame.sample_rate = sample_rate
        frame.pts = start
        frame.time_base = fractions.Fraction(1, sample_rate)
        container.mux(audio_stream.encode(frame))
      container.mux(audio_stream.encode(None))
    if video_stream is not None:
      for i, pixels in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(pixels, format='rgb24')
        if frame_times_s is not None:
          frame.pts = int(round(frame_times_s[i] * 1000))
          frame.time_base = fractions.Fraction(1, 1000)
        else:
          frame.pts = i
        container.mux(video_stream.encode(frame))
      container.mux(video_stream.encode(None))


# ----------------------------------------------------------------------------------------
# Frames that show their own number (for checking which frame a decoder returns).

_NUMBER_GRID = 4  # 4 x 4 blocks = 16 bits.


def numbered_frames(count: int, height: int = 64, width: int = 96) -> np.ndarray:
  """Returns uint8 frames [count, H, W, 3] whose central square shows the frame number in bits.

  The number is drawn as a 4 x 4 grid of black/white blocks in the centered H x H square, so
  it survives H.264 and a shorter-side resize followed by a center crop.
  """
  if count >= 2**(_NUMBER_GRID**2):
    raise ValueError(f'at most {2**(_NUMBER_GRID**2) - 1} frames can be numbered, got {count}')
  if width < height or height % _NUMBER_GRID:
    raise ValueError(f'need width >= height and height divisible by 4, got {height}x{width}')
  block = height // _NUMBER_GRID
  bits = (np.arange(count)[:, None] >> np.arange(_NUMBER_GRID**2)[None, :]) & 1
  grid = bits.reshape(count, _NUMBER_GRID, _NUMBER_GRID).astype(np.uint8) * 220 + 16
  square = np.repeat(np.repeat(grid, block, axis=1), block, axis=2)
  frames = np.full((count, height, width, 3), 128, np.uint8)
  left = (width - height) // 2
  frames[:, :, left:left + height, :] = square[..., None]
  return frames


def read_frame_number(frame: np.ndarray) -> int:
  """Reads the number `numbered_frames` drew, from any frame whose center square it fills."""
  height, width = frame.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  block = side / _NUMBER_GRID
  gray = frame.astype(np.float32).mean(axis=-1)
  number = 0
  for k in range(_NUMBER_GRID**2):
    row, col = divmod(k, _NUMBER_GRID)
    y0, x0 = int(top + (row + 0.25) * block), int(left + (col + 0.25) * block)
    y1, x1 = int(top + (row + 0.75) * block), int(left + (col + 0.75) * block)
    if gray[y0:y1, x0:x1].mean() > 128:
      number |= 1 << k
  return number


# ----------------------------------------------------------------------------------------
# The class-conditional generator.


def class_display_name(class_index: int, num_classes: int) -> str:
  """Returns a readable name for a synthetic class (its shape, timbre and pitch)."""
  return (f'{SHAPES[class_index % len(SHAPES)]} / {TIMBRES[class_index % len(TIMBRES)]} '
          f'{_class_pitch_hz(class_index, num_classes):.0f} Hz')


def class_mid(class_index: int) -> str:
  """Returns the AudioSet-style label id of a synthetic class."""
  return f'/m/syn{class_index:02d}'


def _class_pitch_hz(class_index: int, num_classes: int) -> float:
  return 160.0 * 2.0**(2.5 * class_index / max(num_classes - 1, 1))


def _tone(t: np.ndarray, pitch_hz: float, timbre: str) -> np.ndarray:
  """A periodic (or bell-like) tone of the given timbre, peak amplitude about 1."""
  if timbre == 'sine':
    partials = [(1.0, 1.0)]
  elif timbre == 'odd harmonics':
    partials = [(k, 1.0 / k) for k in (1, 3, 5, 7, 9)]
  elif timbre == 'all harmonics':
    partials = [(k, 1.0 / k) for k in range(1, 7)]
  else:  # bell
    partials = [(1.0, 1.0), (2.76, 0.6), (5.40, 0.4), (8.93, 0.25)]
  nyquist = SAMPLE_RATE / 2
  signal = sum(a * np.sin(2 * np.pi * m * pitch_hz * t) for m, a in partials
               if m * pitch_hz < nyquist)
  return signal / sum(a for _, a in partials)


def _note_envelope(t: np.ndarray, rate_hz: float, phase: float) -> np.ndarray:
  """Decaying notes at `rate_hz`: 1 at each onset, decaying within the note, silent after."""
  position = np.mod(t * rate_hz + phase, 1.0)
  return np.exp(-6.0 * position) * (position < 0.6)


def _clip_audio(rng: np.random.Generator, class_index: int, num_classes: int,
                duration_s: float) -> tuple[np.ndarray, float, float]:
  """Returns (stereo float32 audio [2, S], note rate, note phase) for one clip."""
  t = np.arange(int(round(duration_s * SAMPLE_RATE)), dtype=np.float64) / SAMPLE_RATE
  pitch = _class_pitch_hz(class_index, num_classes) * (1 + rng.uniform(-0.04, 0.04))
  rate = NOTE_RATES_HZ[class_index % len(NOTE_RATES_HZ)] * (1 + rng.uniform(-0.1, 0.1))
  phase = rng.uniform(0.0, 1.0)
  timbre = TIMBRES[class_index % len(TIMBRES)]
  signal = _tone(t, pitch, timbre) * _note_envelope(t, rate, phase) * rng.uniform(0.2, 0.5)
  if rng.uniform() < 0.3:  # A quieter, steady distractor tone of random pitch.
    signal += 0.05 * np.sin(2 * np.pi * rng.uniform(80.0, 2000.0) * t)
  balance = rng.uniform(0.6, 1.0)
  noise = rng.standard_normal((2, t.shape[0])) * rng.uniform(0.002, 0.03)
  stereo = np.stack([signal, balance * signal]) + noise
  return np.clip(stereo, -1.0, 1.0).astype(np.float32), rate, phase


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
  """Inside-test of a unit-radius shape at offsets (dx, dy) in radius units (y down)."""
  ax, ay = np.abs(dx), np.abs(dy)
  if shape == 'circle':
    return dx * dx + dy * dy <= 1.0
  if shape == 'square':
    return np.maximum(ax, ay) <= 0.85
  if shape == 'triangle':
    return (dy <= 0.8) & (ax <= (dy + 1.0) * 0.55)
  if shape == 'diamond':
    return ax + ay <= 1.0
  if shape == 'ring':
    r2 = dx * dx + dy * dy
    return (r2 <= 1.0) & (r2 >= 0.36)
  if shape == 'cross':
    return ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0))
  if shape == 'bar':
    return (ax <= 1.0) & (ay <= 0.35)
  return (np.abs(ax - ay) <= 0.3) & (np.maximum(ax, ay) <= 1.0)  # 'x'


def _trajectory(motion: str, progress: np.ndarray, start: np.ndarray,
                speed: float) -> tuple[np.ndarray, np.ndarray]:
  """Positions in [0, 1]^2 over time for a motion pattern (bouncing or orbiting)."""
  def bounce(x):
    return 1.0 - np.abs(np.mod(x, 2.0) - 1.0)
  travel = speed * progress
  if motion == 'horizontal':
    return bounce(start[0] + travel), np.full_like(progress, start[1])
  if motion == 'vertical':
    return np.full_like(progress, start[0]), bounce(start[1] + travel)
  if motion == 'circular':
    angle = 2 * np.pi * (start[0] + 0.5 * travel)
    return 0.5 + 0.3 * np.cos(angle), 0.5 + 0.3 * np.sin(angle)
  return bounce(start[0] + travel), bounce(start[1] + 0.7 * travel)  # 'diagonal'


def _clip_frames(rng: np.random.Generator, class_index: int, num_classes: int,
                 duration_s: float, fps: int, width: int, height: int, note_rate: float,
                 note_phase: float) -> np.ndarray:
  """Returns uint8 RGB frames [T, H, W, 3] of one clip."""
  count = max(int(round(duration_s * fps)), 1)
  times = np.arange(count) / fps
  background = rng.uniform(0.05, 0.35, size=3)
  texture = rng.uniform(-0.04, 0.04, size=(height, width, 1))
  canvas = np.clip(background + texture, 0.0, 1.0)
  hue = (class_index / num_classes + rng.uniform(-0.03, 0.03)) % 1.0
  colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0)))
  shape = SHAPES[class_index % len(SHAPES)]
  motion = MOTIONS[class_index % len(MOTIONS)]
  radius = min(width, height) * rng.uniform(0.13, 0.2)
  margin = 1.3 * radius / np.array([width, height])
  start = rng.uniform(0.0, 1.0, size=2)
  xs, ys = _trajectory(motion, times / max(duration_s, 1e-6), start, rng.uniform(1.5, 3.0))
  centers_x = margin[0] + xs * (1 - 2 * margin[0]) * width
  centers_y = margin[1] + ys * (1 - 2 * margin[1]) * height
  pulse = 1.0 + 0.3 * _note_envelope(times, note_rate, note_phase)
  distractor = None
  if rng.uniform() < 0.5:  # A faint, static shape of another class.
    other = (class_index + rng.integers(1, max(num_classes, 2))) % max(num_classes, 1)
    distractor = (SHAPES[other % len(SHAPES)], rng.uniform(0.2, 0.8, size=2) * [width, height],
                  radius * rng.uniform(0.5, 0.8), rng.uniform(0.3, 0.6, size=3))
  grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
  frames = np.empty((count, height, width, 3), np.uint8)
  for i in range(count):
    image = canvas.copy()
    if distractor is not None:
      d_shape, d_center, d_radius, d_colour = distractor
      mask = _shape_mask(d_shape, (grid_x - d_center[0]) / d_radius,
                         (grid_y - d_center[1]) / d_radius)
      image[mask] = 0.6 * image[mask] + 0.4 * d_colour
    r = radius * pulse[i]
    mask = _shape_mask(shape, (grid_x - centers_x[i]) / r, (grid_y - centers_y[i]) / r)
    image[mask] = colour
    frames[i] = (image * 255.0 + 0.5).astype(np.uint8)
  return frames


def _clip_seed(seed: int, split_name: str, index: int) -> np.random.SeedSequence:
  return np.random.SeedSequence([seed, zlib.crc32(split_name.encode()), 0, index])


def _order_seed(seed: int, split_name: str) -> np.random.SeedSequence:
  return np.random.SeedSequence([seed, zlib.crc32(split_name.encode()), 1, 0])


def _write_clip(job: tuple) -> None:
  """Generates and writes one clip (a worker job: picklable arguments)."""
  (path, token, seed, split_name, index, class_index, num_classes, duration_s, fps, width,
   height) = job
  rng = np.random.default_rng(_clip_seed(seed, split_name, index))
  audio, note_rate, note_phase = _clip_audio(rng, class_index, num_classes, duration_s)
  frames = _clip_frames(rng, class_index, num_classes, duration_s, fps, width, height,
                        note_rate, note_phase)
  # Only a complete clip carries a final name: a full disk left truncated MP4s, which a tool
  # reading the folder (extract_features --videos DIR) took for clips.
  with files.staged_output(path, token) as staged:
    write_mp4(staged, frames, fps, audio, SAMPLE_RATE)


def write_class_labels(path: str | os.PathLike, num_classes: int) -> None:
  """Writes an AudioSet-format class_labels_indices.csv for the synthetic classes."""
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
    writer.writerow(['index', 'mid', 'display_name'])
    for c in range(num_classes):
      writer.writerow([c, class_mid(c), class_display_name(c, num_classes)])


def _pool_ignoring_ctrl_c(num_workers: int) -> multiprocessing.pool.Pool:
  """A pool of spawned workers that ignore SIGINT from their first instruction on.

  A terminal's Ctrl-C reaches the whole process group; the parent alone handles it (it ends the
  pool and removes the workers' temporaries). A worker started with Python's handler printed
  "Process SpawnPoolWorker-1:" and a traceback into the tool's stderr before its one line. The
  workers start while SIGINT is ignored here (an ignored signal stays ignored across exec, and
  Python keeps it so), a few milliseconds in which a Ctrl-C is dropped; the initializer covers
  a worker the pool starts later in place of one that died.
  """
  if threading.current_thread() is not threading.main_thread():  # signal.signal's restriction
    return multiprocessing.get_context('spawn').Pool(num_workers, _ignore_sigint)
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    return multiprocessing.get_context('spawn').Pool(num_workers, _ignore_sigint)
  finally:
    signal.signal(signal.SIGINT, previous)


def _ignore_sigint() -> None:
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def generate_dataset(out_dir: str | os.PathLike,
                     num_clips: int,
                     num_classes: int = 8,
                     seed: int = 0,
                     duration_s: float = 10.0,
                     fps: int = 10,
                     width: int = 160,
                     height: int = 120,
                     split_name: str = 'train',
                     num_workers: int = 1) -> dict:
  """Writes `num_clips` synthetic MP4 clips, a JSON datafile and class_labels_indices.csv.

  Returns {'datafile', 'labels_csv', 'video_dir', 'num_clips', 'num_classes'} (paths as str).
  Classes are balanced (clip i has class i mod K, in a seeded random order).
  """
  if num_clips <= 0 or num_classes <= 0:
    raise ValueError(f'num_clips and num_classes must be positive, got {num_clips}, {num_classes}')
  if width % 2 or height % 2:
    raise ValueError(f'width and height must be even for yuv420p, got {width}x{height}')
  if duration_s <= 0 or fps <= 0:
    raise ValueError(f'duration_s and fps must be positive, got {duration_s}, {fps}')
  out_dir = os.fspath(out_dir)
  video_dir = os.path.join(out_dir, 'video', split_name)
  os.makedirs(video_dir, exist_ok=True)
  order_rng = np.random.default_rng(_order_seed(seed, split_name))
  classes = order_rng.permutation(np.arange(num_clips) % num_classes)
  # This run's temporaries end in this token: another run writing the same folder has its own.
  token = f'{os.getpid()}-{secrets.token_hex(4)}'
  jobs, entries = [], []
  for i in range(num_clips):
    video_id = f'syn_{split_name}_{i:05d}'
    path = os.path.abspath(os.path.join(video_dir, f'{video_id}.mp4'))
    jobs.append((path, token, seed, split_name, i, int(classes[i]), num_classes, duration_s,
                 fps, width, height))
    entries.append({'video_id': video_id, 'wav': path, 'video_path': path,
                    'labels': class_mid(int(classes[i]))})
  num_workers = min(num_workers, num_clips)  # (64 spawned processes wrote 2 clips)
  if num_workers > 1:
    try:
      with _pool_ignoring_ctrl_c(num_workers) as pool:
        pool.map(_write_clip, jobs, chunksize=max(1, len(jobs) // (4 * num_workers)))
    except BaseException:
      # The first failed clip ends the pool, which kills the other workers midway through their
      # clips (SIGTERM: no cleanup of their own); their temporaries are removed here, after the
      # pool has joined them.
      for job in jobs:
        with contextlib.suppress(OSError):
          os.remove(files.staged_name(job[0], token))
      raise
  else:
    for job in jobs:
      _write_clip(job)
  datafile = os.path.join(out_dir, f'{split_name}.json')
  with files.staged_output(datafile, token) as staged, open(staged, 'w') as f:
    json.dump({'data': entries}, f, indent=1)
  labels_csv = os.path.join(out_dir, 'class_labels_indices.csv')
  with files.staged_output(labels_csv, token) as staged:
    write_class_labels(staged, num_classes)
  return {'datafile': datafile, 'labels_csv': labels_csv, 'video_dir': video_dir,
          'num_clips': num_clips, 'num_classes': num_classes}


def write_extracted_layout(video: str, out_dir: str, video_id: str) -> tuple[str, str]:
  """Writes a video as the original's preprocessing leaves it: (audio path, frames folder).

  The audio is `{out_dir}/{video_id}.wav`, 16 kHz mono 16-bit (its `ffmpeg -ar 16000` and
  `sox ... remix 1`), and the frames `{out_dir}/frames/frame_{i}/{video_id}.jpg` (its
  extract_video_frame.py: the 10 frames resized, center-cropped and saved as JPEG 75), both
  made with this package's decoder, so records of either form must be equal.
  """
  import wave  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.data import decode  # pylint: disable=g-import-not-at-top
  waveform, _ = decode.decode_audio(video, 16000, max_seconds=None)
  audio = os.path.join(out_dir, f"{video_id}.wav")
  with wave.open(audio, "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(16000)
    f.writeframes(waveform.astype("<i2").tobytes())
  frames_dir = os.path.join(out_dir, "frames")
  for i, frame in enumerate(decode.decode_clip(video).frames):
    os.makedirs(os.path.join(frames_dir, f"frame_{i}"), exist_ok=True)
    with open(decode.extracted_frame_path(frames_dir, video_id, i), "wb") as f:
      f.write(decode.encode_jpeg(frame))
  return audio, frames_dir
