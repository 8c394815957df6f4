"""Audio augmentation done inside the jit train step (on the accelerator) instead of in tf.data.

`noise_and_roll` is the original's pretraining/fine-tuning noise augmentation, applied after
fbank normalization as the original does: `fbank + U(0,1)[T,F] * u / 10` with one `u ~ U(0,1)`
per clip, then a roll along time by a shift drawn uniformly from [-T, T)
(out[t] = x[(t - shift) mod T], torch.roll's convention). It is the same augmentation as the
tf.data op `noise_roll` (cav_mae_jax/data/augment.py); running it here frees about a quarter of
the host's per-clip input work (drawing 131k random numbers per clip on a CPU core) for a few
elementwise operations on the device. Select it with `config.data.noise_on_device`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def noise_and_roll(audio: jax.Array, rng: jax.Array) -> jax.Array:
  """[B, T, F] normalized fbank -> noisy, time-rolled fbank (float32)."""
  batch, frames, _ = audio.shape
  noise_rng, scale_rng, shift_rng = jax.random.split(rng, 3)
  scale = jax.random.uniform(scale_rng, (batch, 1, 1)) / 10.0
  audio = audio.astype(jnp.float32) + jax.random.uniform(noise_rng, audio.shape) * scale
  shift = jax.random.randint(shift_rng, (batch,), -frames, frames)
  source = jnp.mod(jnp.arange(frames)[None, :] - shift[:, None], frames)
  return jnp.take_along_axis(audio, source[:, :, None], axis=1)


def make_device_augment(data_config: Any) -> Callable[
    [dict[str, jax.Array], jax.Array], tuple[dict[str, jax.Array], jax.Array]] | None:
  """The train step's on-device augmentation for `config.data`, or None when there is none.

  Returns `(batch, rng) -> (batch, rng)`: the noise takes the second half of a split of the
  step's key, the task gets the first.
  """
  if not (data_config.noise and data_config.noise_on_device):
    return None

  def augment(batch: dict[str, jax.Array], rng: jax.Array):
    rng, noise_rng = jax.random.split(rng)
    return {**batch, "audio": noise_and_roll(batch["audio"], noise_rng)}, rng

  return augment
