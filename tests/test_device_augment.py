"""Device-side noise + time roll: the original's augmentation, and the pipeline leaves it out."""

import jax
import jax.numpy as jnp
import numpy as np

from cav_mae_jax.data import input as input_lib
from cav_mae_jax.train import device_augment


def test_noise_is_bounded_per_clip_and_roll_follows_torch_convention():
  batch, frames, bins = 6, 64, 8
  ramp = jnp.broadcast_to(jnp.arange(frames, dtype=jnp.float32)[None, :, None] * 10.0,
                          (batch, frames, bins))
  out = np.asarray(device_augment.noise_and_roll(ramp, jax.random.key(0)))
  # Each row's value is 10 * source_frame + noise with noise in [0, 0.1): recover the source.
  source = np.floor(out / 10.0).astype(int)
  noise = out - 10.0 * source
  assert (noise >= 0).all() and (noise < 0.1).all()
  for b in range(batch):
    shift = (np.arange(frames) - source[b, :, 0]) % frames  # out[t] = x[(t - shift) mod T]
    assert len(set(shift)) == 1
    assert (source[b] == source[b, :, :1]).all()  # the same roll for every mel bin
    assert noise[b].std() > 0
  shifts = {int((0 - source[b, 0, 0]) % frames) for b in range(batch)}
  assert len(shifts) > 1  # per-clip shifts
  per_clip_max = noise.reshape(batch, -1).max(axis=1)
  assert per_clip_max.std() > 0  # per-clip noise scale u / 10


def test_noise_is_deterministic_per_key_and_differs_across_keys():
  audio = jnp.zeros((2, 32, 4))
  a = device_augment.noise_and_roll(audio, jax.random.key(1))
  b = device_augment.noise_and_roll(audio, jax.random.key(1))
  c = device_augment.noise_and_roll(audio, jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_pipeline_leaves_noise_to_the_device_when_asked():
  base = dict(batch_size=8, noise=True)
  on_host = input_lib.DataConfig(**base)
  on_device = input_lib.DataConfig(**base, noise_on_device=True)
  assert "noise_roll" in input_lib.batch_preprocess_spec(on_host, True, 0.0, 1.0)
  assert "noise_roll" not in input_lib.batch_preprocess_spec(on_device, True, 0.0, 1.0)


def _noise_scale_and_shift(out: np.ndarray, frames: int):
  """(per-clip largest noise, per-clip roll shift) of a noisy, rolled ramp (10 * frame index)."""
  source = np.floor(out / 10.0)
  noise = out - 10.0 * source
  shift = (0 - source[:, 0, 0].astype(int)) % frames  # out[t] = x[(t - shift) mod T]
  return noise.reshape(len(out), -1).max(axis=1), shift


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
  """Two-sample Kolmogorov-Smirnov statistic: max distance between the empirical CDFs."""
  grid = np.sort(np.concatenate([a, b]))
  cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
  return float(np.max(np.abs(cdf(a) - cdf(b))))


def test_device_noise_draws_what_the_tfdata_op_draws():
  """Both placements: the same per-clip noise-scale and roll-shift distributions (issue 11, 4)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.data import augment  # pylint: disable=g-import-not-at-top
  batch, frames, bins = 1024, 32, 4
  ramp = np.broadcast_to(np.arange(frames, dtype=np.float32)[None, :, None] * 10.0,
                         (batch, frames, bins)).copy()
  on_device = np.asarray(device_augment.noise_and_roll(jnp.asarray(ramp), jax.random.key(3)))
  in_tfdata = augment.get_op("noise_roll")(
      {"audio": tf.constant(ramp), augment.SEED_KEY: tf.constant([3, 4], tf.int64)})["audio"].numpy()
  (device_scale, device_shift), (tf_scale, tf_shift) = (
      _noise_scale_and_shift(out, frames) for out in (on_device, in_tfdata))
  # Noise U(0,1) * u/10 with u ~ U(0,1) per clip: the largest of a clip's 128 values is about
  # u/10, uniform on [0, 0.1); the shift is uniform on [-T, T), i.e. on the T residues mod T.
  for scale in (device_scale, tf_scale):
    assert 0.0 <= scale.min() and scale.max() < 0.1
    assert abs(scale.mean() - 0.05) < 0.004
  for shift in (device_shift, tf_shift):
    counts = np.bincount(shift, minlength=frames)
    assert counts.min() > batch / frames / 3  # every shift occurs, none dominates
  critical = 1.95 * np.sqrt(2 / batch)  # 2-sample KS at alpha = 0.001
  assert _ks_statistic(device_scale, tf_scale) < critical
  assert _ks_statistic(device_shift.astype(float), tf_shift.astype(float)) < critical
