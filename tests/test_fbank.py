"""Kaldi fbank (NumPy and TF) against torchaudio's kaldi.fbank, or its stored values."""

import importlib.util
import os

import numpy as np
import pytest

from cav_mae_jax.data import fbank

from expected_data import DATA_DIR
from expected_data import make_expected

TOLERANCE = 1e-3  # Max abs difference of log-mel values, before normalization.
SILENCE_LOG = -15.942385  # log(float32 eps)
CASES = make_expected.fbank_cases()
SAMPLE_AUDIO = dict(np.load(os.path.join(DATA_DIR, 'sample_audio.npz')))
STORED = dict(np.load(os.path.join(DATA_DIR, 'fbank_expected.npz')))
ALL_CASES = sorted(CASES) + sorted(SAMPLE_AUDIO)


def _input(name):
  """Returns (waveform as the test feeds it, sample rate, waveform for torchaudio)."""
  if name in SAMPLE_AUDIO:
    samples = SAMPLE_AUDIO[name]
    return samples, 16000, None  # clip_fbank of int16 = the original loader's path.
  waveform, rate = CASES[name]
  return waveform, rate, waveform


def _expected(name):
  """Returns (rows, expected fbank at those rows, total frames), from torchaudio if present."""
  if importlib.util.find_spec('torchaudio') is not None:
    if name in SAMPLE_AUDIO:
      reference = make_expected._torchaudio_fbank(
          make_expected.loader_waveform(SAMPLE_AUDIO[name]), 16000)
    else:
      waveform, rate = CASES[name]
      reference = make_expected._torchaudio_fbank(waveform, rate)
    return np.arange(reference.shape[0]), reference, reference.shape[0]
  return (STORED[f'{name}/rows'], STORED[f'{name}/values'],
          int(STORED[f'{name}/num_frames']))


def _numpy_fbank(name):
  waveform, rate, _ = _input(name)
  if name in SAMPLE_AUDIO:
    return fbank.clip_fbank(waveform, rate)
  # torchaudio keeps the first channel of a multi-channel input.
  return fbank.kaldi_fbank(waveform[0] if waveform.ndim == 2 else waveform, rate)


@pytest.mark.parametrize('name', ALL_CASES)
def test_numpy_fbank_matches_torchaudio(name):
  rows, expected, num_frames = _expected(name)
  ours = _numpy_fbank(name)
  assert ours.dtype == np.float32
  assert ours.shape == (num_frames, 128)
  np.testing.assert_allclose(ours[rows], expected, rtol=0, atol=TOLERANCE)


@pytest.fixture(scope='module')
def fbank_tf():
  pytest.importorskip('tensorflow', reason='the TF fbank needs TensorFlow')
  from cav_mae_jax.data import fbank_tf as module  # pylint: disable=g-import-not-at-top
  return module


@pytest.mark.parametrize('name', ALL_CASES)
def test_tf_fbank_matches_torchaudio(fbank_tf, name):
  rows, expected, num_frames = _expected(name)
  waveform, rate, _ = _input(name)
  if name in SAMPLE_AUDIO:
    ours = fbank_tf.clip_fbank_tf(waveform, rate).numpy()
  else:
    ours = fbank_tf.kaldi_fbank_tf(waveform[0] if waveform.ndim == 2 else waveform, rate).numpy()
  assert ours.shape == (num_frames, 128)
  np.testing.assert_allclose(ours[rows], expected, rtol=0, atol=TOLERANCE)


def test_silence_is_log_epsilon_in_every_bin():
  features = fbank.clip_fbank(np.zeros(160000, np.int16))
  assert features.shape == (998, 128)
  np.testing.assert_allclose(features, SILENCE_LOG, rtol=0, atol=1e-5)


def test_128_bin_bank_at_16k_has_exactly_one_empty_filter():
  filters = fbank.mel_filterbank(128, 512, 16000)
  assert filters.shape == (128, 257)
  empty = np.flatnonzero(filters.sum(axis=1) == 0)
  assert empty.tolist() == [3]
  assert np.all(filters[:, -1] == 0)  # The Nyquist bin has no weight.
  assert np.all(filters[:, 0] == 0)  # Nor DC: filters start at 20 Hz.
  assert filters.max() <= 1.0 and filters.min() >= 0.0
  assert not filters.flags.writeable  # Cached and shared: must not be modified.
  # A loud broadband signal still gives log(eps) in the empty bin and finite values elsewhere.
  noise = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
  features = fbank.kaldi_fbank(noise)
  np.testing.assert_allclose(features[:, 3], SILENCE_LOG, atol=1e-5)
  assert np.all(features[:, [0, 1, 2, 4, 127]] > SILENCE_LOG + 1)


def test_frame_counts_follow_snip_edges():
  assert fbank.frame_geometry(16000) == (400, 160, 512)
  assert fbank.frame_geometry(44100) == (1102, 441, 2048)
  assert fbank.frame_geometry(48000) == (1200, 480, 2048)
  assert fbank.num_frames(16000) == 98
  assert fbank.num_frames(160000) == 998
  assert fbank.num_frames(399) == 0
  assert fbank.kaldi_fbank(np.ones(16000, np.float32)).shape == (98, 128)
  assert fbank.kaldi_fbank(np.ones(400, np.float32)).shape == (1, 128)


def test_short_or_malformed_waveforms_raise():
  with pytest.raises(ValueError, match='fewer than one 400-sample frame'):
    fbank.kaldi_fbank(np.ones(399, np.float32))
  with pytest.raises(ValueError, match='1-D'):
    fbank.kaldi_fbank(np.ones((2, 16000), np.float32))
  with pytest.raises(ValueError, match='floating point'):
    fbank.kaldi_fbank(np.ones(16000, np.int32))
  with pytest.raises(ValueError, match='int16 or floating'):
    fbank.clip_fbank(np.ones(16000, np.int32))


def test_clip_fbank_scales_int16_and_removes_the_mean():
  samples = (CASES['voice_1s'][0] * 20000).astype(np.int16)
  as_float = samples.astype(np.float32) / 32768.0
  np.testing.assert_array_equal(fbank.clip_fbank(samples), fbank.clip_fbank(as_float))
  # A constant offset is removed by the clip mean (and by per-frame DC removal).
  np.testing.assert_allclose(fbank.clip_fbank(as_float + 0.25), fbank.clip_fbank(as_float),
                             atol=1e-3)


def test_pad_or_trim_and_normalize():
  features = np.arange(6 * 2, dtype=np.float32).reshape(6, 2) + 1
  padded = fbank.pad_or_trim(features, 8)
  assert padded.shape == (8, 2)
  np.testing.assert_array_equal(padded[:6], features)
  np.testing.assert_array_equal(padded[6:], 0)
  np.testing.assert_array_equal(fbank.pad_or_trim(features, 4), features[:4])
  np.testing.assert_array_equal(fbank.pad_or_trim(features, 6), features)
  with pytest.raises(ValueError, match='target_length'):
    fbank.pad_or_trim(features, 0)
  normalized = fbank.normalize_fbank(features, fbank.AUDIOSET_MEAN, fbank.AUDIOSET_STD)
  np.testing.assert_allclose(normalized, (features + 5.081) / 4.4849, rtol=1e-6)
  with pytest.raises(ValueError, match='std'):
    fbank.normalize_fbank(features, 0.0, 0.0)


def test_tf_pad_or_trim_matches_numpy_and_works_in_tf_data(fbank_tf):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  waves = [CASES['voice_1s'][0], CASES['tones_12s'][0]]
  dataset = tf.data.Dataset.from_generator(
      lambda: iter(waves), output_signature=tf.TensorSpec([None], tf.float32))
  dataset = dataset.map(lambda w: fbank_tf.pad_or_trim_tf(fbank_tf.clip_fbank_tf(w), 1024))
  assert dataset.element_spec.shape.as_list() == [1024, 128]
  for wave, features in zip(waves, dataset.as_numpy_iterator()):
    expected = fbank.pad_or_trim(fbank.clip_fbank(wave), 1024)
    np.testing.assert_allclose(features, expected, rtol=0, atol=TOLERANCE)
  assert np.all(features[:1024] != 0)  # The 12-s clip (1198 frames) was cut, not padded.
  short = fbank_tf.pad_or_trim_tf(tf.ones([98, 128]), 1024).numpy()
  assert short.shape == (1024, 128)
  assert np.all(short[:98] == 1) and np.all(short[98:] == 0)
  with pytest.raises(ValueError, match='floating point'):
    fbank_tf.kaldi_fbank_tf(tf.ones([16000], tf.int32))
