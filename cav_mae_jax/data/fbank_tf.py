"""Kaldi-compatible log-mel fbank as TensorFlow ops, for use inside tf.data.

Same definition as `fbank.kaldi_fbank` (see that module for the Kaldi options), computed in
float32 with TF ops so waveform mixup and fbank can run in the input pipeline. The mel
filterbank matrix is `fbank.mel_filterbank`, shared with the NumPy version.
"""

from __future__ import annotations

import tensorflow as tf

from cav_mae_jax.data import fbank as fbank_np


def kaldi_fbank_tf(waveform: tf.Tensor,
                   sample_rate: int = 16000,
                   num_mel_bins: int = 128) -> tf.Tensor:
  """Returns Kaldi log-mel fbank features [num_frames, num_mel_bins] (float32) of a 1-D waveform."""
  waveform = tf.convert_to_tensor(waveform)
  if not waveform.dtype.is_floating:
    raise ValueError(f'waveform must be floating point, got {waveform.dtype.name}')
  waveform = tf.cast(waveform, tf.float32)
  waveform.shape.assert_has_rank(1)
  window_length, window_shift, fft_length = fbank_np.frame_geometry(sample_rate)
  tf.debugging.assert_greater_equal(
      tf.shape(waveform)[0], window_length,
      message=f'waveform is shorter than one {window_length}-sample frame at {sample_rate} Hz')
  frames = tf.signal.frame(waveform, window_length, window_shift, pad_end=False)
  frames = frames - tf.reduce_mean(frames, axis=1, keepdims=True)
  previous = tf.concat([frames[:, :1], frames[:, :-1]], axis=1)
  window = tf.constant(fbank_np.hanning_window(window_length))
  frames = (frames - fbank_np.PREEMPHASIS * previous) * window
  spectrum = tf.signal.rfft(frames, fft_length=[fft_length])
  power = tf.math.square(tf.math.real(spectrum)) + tf.math.square(tf.math.imag(spectrum))
  filters = tf.constant(fbank_np.mel_filterbank(num_mel_bins, fft_length, sample_rate))
  mel_energies = tf.linalg.matmul(power, filters, transpose_b=True)
  return tf.math.log(tf.math.maximum(mel_energies, fbank_np.LOG_FLOOR))


def clip_fbank_tf(waveform: tf.Tensor,
                  sample_rate: int = 16000,
                  num_mel_bins: int = 128) -> tf.Tensor:
  """Returns the clip fbank as the original loader makes it: mean removed, then Kaldi fbank.

  int16 waveforms are scaled by 1 / 32768 first, as torchaudio does for 16-bit WAV files.
  """
  waveform = tf.convert_to_tensor(waveform)
  if waveform.dtype == tf.int16:
    waveform = tf.cast(waveform, tf.float32) / 32768.0
  elif not waveform.dtype.is_floating:
    raise ValueError(f'waveform must be int16 or floating point, got {waveform.dtype.name}')
  waveform = tf.cast(waveform, tf.float32)
  waveform = waveform - tf.reduce_mean(waveform)
  return kaldi_fbank_tf(waveform, sample_rate, num_mel_bins)


def pad_or_trim_tf(fbank: tf.Tensor, target_length: int = 1024) -> tf.Tensor:
  """Zero-pads the fbank [frames, bins] at the end or cuts it to `target_length` frames."""
  if target_length <= 0:
    raise ValueError(f'target_length must be positive, got {target_length}')
  fbank = fbank[:target_length]
  padding = tf.maximum(target_length - tf.shape(fbank)[0], 0)
  fbank = tf.pad(fbank, [[0, padding], [0, 0]])
  return tf.ensure_shape(fbank, [target_length, fbank.shape[1]])
