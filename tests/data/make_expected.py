"""Writes the stored expected values the fbank and decode tests compare against.

The tests compare against torchaudio / OpenCV when those are importable, and against these
files otherwise. Regenerate them (from the repository root) with the original's tools:

  python3 -m venv /work/venv-ta
  /work/venv-ta/bin/pip install torch==2.9.1 'torchaudio==2.9.*' torchvision==0.24.1 \
      opencv-python-headless av==18.1.0 numpy pillow soundfile
  apt-get install ffmpeg sox        # the original's audio path
  git -C <cav-mae clone> show HEAD:src/preprocess/sample_video/00W1lcxW-WU_40.000.mp4 \
      > tests/data/00W1lcxW-WU_40.000.mp4          # (and KlsG1EnBEjc_000361.mp4 to /tmp)
  /work/venv-ta/bin/python tests/data/make_expected.py --big-sample /tmp/KlsG1EnBEjc_000361.mp4

Files written to tests/data/:
  fbank_expected.npz     torchaudio `kaldi.fbank` (the original loader's options) of every
                         case in `fbank_cases()` and of the two sample videos' audio; every
                         ROW_STRIDE-th frame and the last one are stored (`<case>/rows`,
                         `<case>/values`, `<case>/num_frames`).
  sample_audio.npz       the sample videos' audio as the original extracts it: `ffmpeg -i F
                         -vn -ar 16000 x.wav; sox x.wav y.wav remix 1`, int16 at 16 kHz.
  numbered_*.mp4         clips whose frames show their own number (synthetic.numbered_frames).
  frames_expected.npz    for each numbered clip, the number OpenCV returns for each of the 10
                         frames when read the original's way (fps, frame count, seek to
                         index - 1), and the original's fps and frame count.
  sample_frames_orig_{i}.png  frames i = 0, 5, 9 of the small sample video as the original
                         stores them (OpenCV read, torchvision Resize(224) + CenterCrop(224)),
                         before JPEG.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
SMALL_SAMPLE = '00W1lcxW-WU_40.000'
BIG_SAMPLE = 'KlsG1EnBEjc_000361'
ROW_STRIDE = 8
EXPECTED_FRAME_PICKS = (0, 5, 9)
# (file name, frame count, frames per second as (num, den), variable frame rate). The VFR
# clip alternates 1/30 s and 1/15 s frame gaps (average 20 fps, r_frame_rate 30 fps).
NUMBERED_CLIPS = (
    ('numbered_25fps_10s.mp4', 250, (25, 1), False),
    ('numbered_ntsc_12s.mp4', 360, (30000, 1001), False),
    ('numbered_24fps_3.5s.mp4', 84, (24, 1), False),
    ('numbered_vfr_12s.mp4', 240, (20, 1), True),
)


def vfr_frame_times(count: int) -> np.ndarray:
  """Presentation times (s) alternating 1/30 s and 1/15 s gaps."""
  gaps = np.where(np.arange(count) % 2 == 0, 1 / 30, 1 / 15)
  return np.concatenate([[0.0], np.cumsum(gaps)[:-1]])


def fbank_cases() -> dict[str, tuple[np.ndarray, int]]:
  """Deterministic test signals: name -> (float32 waveform [S] or [C, S], sample rate)."""

  def times(seconds, rate):
    return np.arange(int(round(seconds * rate)), dtype=np.float64) / rate

  def hash_noise(n, stream):
    """White noise in [-1, 1) from splitmix64 of the sample index: no RNG stream to rely on."""
    z = np.arange(n, dtype=np.uint64) + np.uint64(stream) * np.uint64(1 << 40)
    with np.errstate(over='ignore'):
      z = z * np.uint64(0x9E3779B97F4A7C15)
      z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
      z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
      z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**52 - 1.0

  t10 = times(10.0, 16000)
  square = np.clip(1.4 * np.sign(np.sin(2 * np.pi * 220.0 * t10)) +
                   0.5 * np.sin(2 * np.pi * 3.0 * t10), -1.0, 1.0)
  t1 = times(1.0, 16000)
  # A voice-like 1-s clip: a gliding 120-180 Hz harmonic series with syllable-rate AM.
  pitch_cycles = 150.0 * t1 + 30.0 / (2 * np.pi * 2.0) * (1 - np.cos(2 * np.pi * 2.0 * t1))
  voice = sum(np.sin(2 * np.pi * k * pitch_cycles) / k for k in range(1, 40))
  voice_1s = (0.15 * voice * (0.55 + 0.45 * np.sin(2 * np.pi * 5.0 * t1)) +
              0.02 * hash_noise(t1.size, 1))
  t12 = times(12.0, 16000)
  tones = (0.3 * np.sin(2 * np.pi * 330.0 * t12) * (np.sin(2 * np.pi * 0.5 * t12) > 0) +
           0.1 * np.sin(2 * np.pi * 2500.0 * t12 + 4 * np.sin(2 * np.pi * 1.5 * t12)) +
           0.02 * hash_noise(t12.size, 2))
  cases = {
      'silence': (np.zeros_like(t10), 16000),
      'clipped_square': (square, 16000),
      'voice_1s': (voice_1s, 16000),
      'tones_12s': (tones, 16000),
  }
  for rate in (44100, 48000):
    t = times(2.5, rate)
    left = 0.4 * np.sin(2 * np.pi * 440.0 * t) + 0.05 * hash_noise(t.size, 3)
    right = 0.3 * np.sign(np.sin(2 * np.pi * 97.0 * t)) + 0.05 * hash_noise(t.size, 4)
    cases[f'stereo_{rate}'] = (np.stack([left, right]), rate)
  return {name: (wave.astype(np.float32), rate) for name, (wave, rate) in cases.items()}


def stored_rows(num_frames: int) -> np.ndarray:
  """Which fbank frames are stored: every ROW_STRIDE-th and the last."""
  return np.unique(np.append(np.arange(0, num_frames, ROW_STRIDE), num_frames - 1))


def _torchaudio_fbank(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  import torchaudio  # pylint: disable=g-import-not-at-top
  wave = torch.from_numpy(np.atleast_2d(waveform).astype(np.float32))
  return torchaudio.compliance.kaldi.fbank(
      wave, htk_compat=True, sample_frequency=sample_rate, use_energy=False,
      window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10).numpy()


def original_audio(video_path: str) -> np.ndarray:
  """The original's audio extraction: ffmpeg -ar 16000 to WAV, sox remix 1; int16 samples."""
  import soundfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    stereo, mono = os.path.join(tmp, 'x.wav'), os.path.join(tmp, 'y.wav')
    subprocess.run(['ffmpeg', '-v', 'error', '-i', video_path, '-vn', '-ar', '16000', stereo],
                   check=True)
    subprocess.run(['sox', stereo, mono, 'remix', '1'], check=True)
    samples, rate = soundfile.read(mono, dtype='int16')
  assert rate == 16000, rate
  return samples


def loader_waveform(samples: np.ndarray) -> np.ndarray:
  """The original loader's waveform: int16 / 32768 (torchaudio.load), minus its mean."""
  import torch  # pylint: disable=g-import-not-at-top
  wave = torch.from_numpy(samples.astype(np.float32) / 32768.0)
  return (wave - wave.mean()).numpy()


def original_frame_numbers(video_path: str, read_number) -> dict:
  """Reads a clip the original's way with OpenCV; returns the numbers shown and the frames."""
  import cv2  # pylint: disable=g-import-not-at-top
  capture = cv2.VideoCapture(video_path)
  fps = capture.get(cv2.CAP_PROP_FPS)
  frame_count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
  total = min(int(frame_count), int(fps * 10))
  numbers, frames = [], []
  for i in range(10):
    capture.set(cv2.CAP_PROP_POS_FRAMES, int(i * (total / 10)) - 1)
    ok, bgr = capture.read()
    assert ok, (video_path, i)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    frames.append(rgb)
    numbers.append(read_number(rgb) if read_number else -1)
  return {'fps': fps, 'frame_count': frame_count, 'numbers': np.array(numbers, np.int32),
          'frames': frames}


def original_stored_frame(rgb: np.ndarray) -> np.ndarray:
  """torchvision Resize(224) + CenterCrop(224) + ToTensor + save_image's uint8 conversion."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision.transforms as transforms  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  preprocess = transforms.Compose(
      [transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor()])
  tensor = preprocess(Image.fromarray(rgb))
  return tensor.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--big-sample', required=True,
                      help=f'path of the original repo sample video {BIG_SAMPLE}.mp4')
  args = parser.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(DATA_DIR)))
  from cav_mae_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  expected = {}

  def store(name, fbank):
    rows = stored_rows(fbank.shape[0])
    expected[f'{name}/rows'] = rows.astype(np.int32)
    expected[f'{name}/values'] = fbank[rows].astype(np.float32)
    expected[f'{name}/num_frames'] = np.int32(fbank.shape[0])

  for name, (waveform, rate) in fbank_cases().items():
    store(name, _torchaudio_fbank(waveform, rate))
  audio = {
      SMALL_SAMPLE: original_audio(os.path.join(DATA_DIR, f'{SMALL_SAMPLE}.mp4')),
      BIG_SAMPLE: original_audio(args.big_sample),
  }
  for name, samples in audio.items():
    store(name, _torchaudio_fbank(loader_waveform(samples), 16000))
  np.savez_compressed(os.path.join(DATA_DIR, 'fbank_expected.npz'), **expected)
  np.savez_compressed(os.path.join(DATA_DIR, 'sample_audio.npz'), **audio)

  frames_expected = {}
  for file_name, count, (num, den), variable in NUMBERED_CLIPS:
    path = os.path.join(DATA_DIR, file_name)
    synthetic.write_mp4(path, synthetic.numbered_frames(count), fps=num / den,
                        frame_times_s=vfr_frame_times(count) if variable else None)
    result = original_frame_numbers(path, synthetic.read_frame_number)
    for key in ('fps', 'frame_count', 'numbers'):
      frames_expected[f'{file_name}/{key}'] = result[key]
    print(file_name, result['fps'], result['frame_count'], result['numbers'].tolist())
  np.savez_compressed(os.path.join(DATA_DIR, 'frames_expected.npz'), **frames_expected)

  sample = original_frame_numbers(os.path.join(DATA_DIR, f'{SMALL_SAMPLE}.mp4'), None)
  for i in EXPECTED_FRAME_PICKS:
    Image.fromarray(original_stored_frame(sample['frames'][i])).save(
        os.path.join(DATA_DIR, f'sample_frames_orig_{i}.png'), optimize=True)


if __name__ == '__main__':
  main()
