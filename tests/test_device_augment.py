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
