"""Kaldi-compatible log-mel filterbank features in NumPy, as CAV-MAE computes them.

`kaldi_fbank` equals `torchaudio.compliance.kaldi.fbank` called the way the original
CAV-MAE loader calls it: `htk_compat=True, use_energy=False, window_type='hanning',
num_mel_bins=128, dither=0.0, frame_shift=10`, with the remaining Kaldi defaults
(25 ms frames, `snip_edges=True`, DC offset removal, pre-emphasis 0.97, FFT size rounded up
to a power of two, power spectrum, mel filters from 20 Hz to Nyquist, log floored at float32
epsilon). The 128-filter bank at 16 kHz with a 512-point FFT has one filter (index 3) that
covers no FFT bin; it is kept, so that bin is log(eps) = -15.9424 for every frame, as in the
original.

`mel_filterbank` is the single definition of the filterbank matrix; the TensorFlow version
(`fbank_tf.py`) reuses it.
"""

from __future__ import annotations

import functools
import math

import numpy as np

AUDIOSET_MEAN = -5.081
AUDIOSET_STD = 4.4849

FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ_HZ = 20.0
LOG_FLOOR = float(np.finfo(np.float32).eps)


def frame_geometry(sample_rate: int) -> tuple[int, int, int]:
  """Returns (window_length, window_shift, fft_length) in samples, as Kaldi rounds them."""
  # Same float arithmetic as torchaudio: int(sr * ms * 0.001), then the next power of two.
  window_length = int(sample_rate * FRAME_LENGTH_MS * 0.001)
  window_shift = int(sample_rate * FRAME_SHIFT_MS * 0.001)
  fft_length = 1 << (window_length - 1).bit_length()
  return window_length, window_shift, fft_length


def num_frames(num_samples: int, sample_rate: int = 16000) -> int:
  """Returns the number of fbank frames Kaldi's snip_edges framing gives for a waveform."""
  window_length, window_shift, _ = frame_geometry(sample_rate)
  if num_samples < window_length:
    return 0
  return 1 + (num_samples - window_length) // window_shift


def _mel(freq_hz):
  """HTK mel scale: 1127 ln(1 + f / 700)."""
  return 1127.0 * np.log1p(np.asarray(freq_hz, np.float64) / 700.0)


@functools.lru_cache(maxsize=16)
def mel_filterbank(num_mel_bins: int, fft_length: int, sample_rate: int) -> np.ndarray:
  """Returns Kaldi's triangular mel filters as a float32 [num_mel_bins, fft_length // 2 + 1] matrix.

  The last column (the Nyquist FFT bin) is zero, as in Kaldi. Filters that cover no FFT bin
  stay all-zero rather than being widened. The result is cached and read-only.
  """
  if num_mel_bins <= 3:
    raise ValueError(f'num_mel_bins must be > 3, got {num_mel_bins}')
  if fft_length % 2:
    raise ValueError(f'fft_length must be even, got {fft_length}')
  nyquist = 0.5 * sample_rate
  mel_low = 1127.0 * math.log(1.0 + LOW_FREQ_HZ / 700.0)
  mel_high = 1127.0 * math.log(1.0 + nyquist / 700.0)
  mel_delta = (mel_high - mel_low) / (num_mel_bins + 1)
  bins = np.arange(num_mel_bins, dtype=np.float64)[:, None]
  left = mel_low + bins * mel_delta
  center = mel_low + (bins + 1.0) * mel_delta
  right = mel_low + (bins + 2.0) * mel_delta
  fft_bin_width = sample_rate / fft_length
  fft_mel = _mel(fft_bin_width * np.arange(fft_length // 2, dtype=np.float64))[None, :]
  up_slope = (fft_mel - left) / (center - left)
  down_slope = (right - fft_mel) / (right - center)
  weights = np.maximum(0.0, np.minimum(up_slope, down_slope))
  weights = np.pad(weights, ((0, 0), (0, 1))).astype(np.float32)  # Nyquist bin: no weight.
  weights.flags.writeable = False
  return weights


def hanning_window(window_length: int) -> np.ndarray:
  """Returns the symmetric Hann window Kaldi calls 'hanning' (float32; Kaldi's default
  'povey' window is this raised to 0.85, which the original does not use)."""
  n = np.arange(window_length, dtype=np.float64)
  window = 0.5 - 0.5 * np.cos(2.0 * math.pi * n / (window_length - 1))
  return window.astype(np.float32)


def _frames(waveform: np.ndarray, window_length: int, window_shift: int) -> np.ndarray:
  """Cuts a 1-D waveform into overlapping frames [num_frames, window_length] (snip_edges)."""
  count = 1 + (waveform.shape[0] - window_length) // window_shift
  return np.lib.stride_tricks.as_strided(
      waveform,
      shape=(count, window_length),
      strides=(waveform.strides[0] * window_shift, waveform.strides[0]),
      writeable=False)


def kaldi_fbank(waveform: np.ndarray,
                sample_rate: int = 16000,
                num_mel_bins: int = 128) -> np.ndarray:
  """Returns Kaldi log-mel fbank features [num_frames, num_mel_bins] (float32) of a 1-D waveform."""
  waveform = np.asarray(waveform)
  if waveform.ndim != 1:
    raise ValueError(f'waveform must be 1-D, got shape {waveform.shape}')
  if not np.issubdtype(waveform.dtype, np.floating):
    raise ValueError(f'waveform must be floating point, got {waveform.dtype}')
  window_length, window_shift, fft_length = frame_geometry(sample_rate)
  if waveform.shape[0] < window_length:
    raise ValueError(
        f'waveform has {waveform.shape[0]} samples, fewer than one {window_length}-sample '
        f'frame at {sample_rate} Hz')
  # float64 inside: closer to the exact Kaldi values than float32, and the result is float32.
  frames = _frames(np.ascontiguousarray(waveform, np.float64), window_length, window_shift)
  frames = frames - frames.mean(axis=1, keepdims=True)
  previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
  frames = (frames - PREEMPHASIS * previous) * hanning_window(window_length).astype(np.float64)
  spectrum = np.fft.rfft(frames, n=fft_length, axis=1)
  power = spectrum.real**2 + spectrum.imag**2
  filters = mel_filterbank(num_mel_bins, fft_length, sample_rate).astype(np.float64)
  mel_energies = power @ filters.T
  return np.log(np.maximum(mel_energies, LOG_FLOOR)).astype(np.float32)


def clip_fbank(waveform: np.ndarray,
               sample_rate: int = 16000,
               num_mel_bins: int = 128) -> np.ndarray:
  """Returns the fbank of a clip as the original loader makes it: mean removed, then Kaldi fbank.

  Integer waveforms (e.g. int16 from `decode.decode_audio`) are scaled by 1 / 32768 first,
  as torchaudio does when it loads a 16-bit WAV.
  """
  waveform = np.asarray(waveform)
  if waveform.dtype == np.int16:
    waveform = waveform.astype(np.float32) / 32768.0
  elif not np.issubdtype(waveform.dtype, np.floating):
    raise ValueError(f'waveform must be int16 or floating point, got {waveform.dtype}')
  waveform = waveform.astype(np.float32)
  # The original subtracts a float32 mean from a float32 waveform.
  waveform = waveform - waveform.mean(dtype=np.float64).astype(np.float32)
  return kaldi_fbank(waveform, sample_rate, num_mel_bins)


def pad_or_trim(fbank: np.ndarray, target_length: int = 1024) -> np.ndarray:
  """Zero-pads the fbank at the end or cuts it to `target_length` frames."""
  if target_length <= 0:
    raise ValueError(f'target_length must be positive, got {target_length}')
  length = fbank.shape[0]
  if length >= target_length:
    return fbank[:target_length]
  padding = [(0, target_length - length)] + [(0, 0)] * (fbank.ndim - 1)
  return np.pad(fbank, padding)


def normalize_fbank(fbank: np.ndarray,
                    mean: float = AUDIOSET_MEAN,
                    std: float = AUDIOSET_STD) -> np.ndarray:
  """Normalizes fbank features with dataset statistics: (fbank - mean) / std."""
  if std <= 0:
    raise ValueError(f'std must be positive, got {std}')
  return ((fbank - mean) / std).astype(np.float32)
