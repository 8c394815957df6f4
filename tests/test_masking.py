"""Masking: exact kept counts, structured modes, per-sample/per-key randomness, explicit noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cav_mae_jax.models import masking

import xla_flags

GRID = (8, 64)  # audio grid of the paper's model: 8 frequency rows x 64 time columns
L = GRID[0] * GRID[1]


def _mask(key, mode, ratio, batch=6):
  noise = masking.mask_noise(key, batch, GRID, ratio, mode)
  x = jnp.arange(batch * L, dtype=jnp.float32).reshape(batch, L, 1)
  kept, mask, ids_restore = masking.random_masking(x, noise, masking.num_kept(L, ratio))
  return noise, np.asarray(kept), np.asarray(mask), np.asarray(ids_restore)


@pytest.mark.parametrize("mode", masking.MASK_MODES)
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75, 0.9])
def test_kept_count_is_exact_in_every_mode(mode, ratio):
  _, kept, mask, _ = _mask(jax.random.key(0), mode, ratio)
  keep = int(L * (1 - ratio))
  assert kept.shape[1] == keep
  np.testing.assert_array_equal(mask.sum(axis=1), L - keep)


@pytest.mark.parametrize("tokens,ratio,kept", [
    (512, 0.75, 128), (196, 0.75, 49), (196, 0.65, 68), (512, 0.85, 76), (196, 0.9, 19),
    (256, 0.5, 128)])
def test_kept_count_truncates_as_the_original(tokens, ratio, kept):
  # The original: len_keep = int(L * (1 - mask_ratio)); a rounding would keep 69 of 196 at 0.65.
  assert masking.num_kept(tokens, ratio) == kept


def test_kept_tokens_are_the_unmasked_ones_and_restore_inverts():
  _, kept, mask, ids_restore = _mask(jax.random.key(1), "unstructured", 0.75)
  for b in range(kept.shape[0]):
    kept_positions = kept[b, :, 0] - b * L
    np.testing.assert_array_equal(np.sort(kept_positions), np.flatnonzero(mask[b] == 0))
  x = jnp.arange(L, dtype=jnp.float32)[None, :, None].repeat(2, 0)
  noise = masking.mask_noise(jax.random.key(2), 2, GRID, 0.75, "unstructured")
  kept2, _, restore = masking.random_masking(x, noise, 128)
  full = masking.restore_with_mask_tokens(kept2, jnp.full((1, 1, 1), -1.0), restore)
  visible = np.asarray(full[..., 0]) >= 0
  np.testing.assert_array_equal(np.asarray(full[..., 0])[visible], np.nonzero(visible)[1])


def test_time_mode_removes_whole_columns():
  _, _, mask, _ = _mask(jax.random.key(3), "time", 0.75)
  grid = mask.reshape(-1, *GRID)
  column_removed = grid.min(axis=1) == 1
  assert (column_removed.sum(axis=1) == int(64 * 0.75)).all()
  # Every removed token lies in a fully removed column.
  assert (grid == column_removed[:, None, :]).all()


def test_freq_mode_removes_whole_rows():
  _, _, mask, _ = _mask(jax.random.key(4), "freq", 0.75)
  grid = mask.reshape(-1, *GRID)
  row_removed = grid.min(axis=2) == 1
  assert (row_removed.sum(axis=1) == int(8 * 0.75)).all()
  assert (grid == row_removed[:, :, None]).all()


def test_tf_mode_lifts_rows_and_columns():
  noise, _, mask, _ = _mask(jax.random.key(5), "tf", 0.75)
  lifted = np.asarray(noise).reshape(-1, *GRID) >= masking.STRUCTURED_OFFSET
  assert ((lifted.min(axis=1)).sum(axis=1) == int(64 * 0.75 * 0.7)).all()
  assert ((lifted.min(axis=2)).sum(axis=1) == int(8 * 0.75 * 0.7)).all()
  # Every token not in a lifted row/column is kept (there are fewer of them than keep slots).
  assert (mask.reshape(-1, *GRID)[~lifted] == 0).all()


@pytest.mark.parametrize("mode", masking.MASK_MODES)
def test_masks_differ_across_samples_and_keys(mode):
  _, _, mask_a, _ = _mask(jax.random.key(6), mode, 0.75)
  _, _, mask_b, _ = _mask(jax.random.key(7), mode, 0.75)
  distinct = len({row.tobytes() for row in mask_a})
  # `freq` has only C(8, 6) = 28 possible masks, so repeats within a batch are expected there.
  assert distinct == mask_a.shape[0] if mode != "freq" else distinct >= 3
  assert not np.array_equal(mask_a, mask_b)
  _, _, mask_c, _ = _mask(jax.random.key(6), mode, 0.75)
  np.testing.assert_array_equal(mask_a, mask_c)


def test_explicit_noise_reproduces_a_given_mask():
  wanted = np.zeros((1, L), np.float32)
  wanted[0, 100:484] = 1  # remove exactly these 384 tokens
  noise = jnp.asarray(wanted + np.linspace(0, 0.5, L, dtype=np.float32)[None])
  _, mask, _ = masking.random_masking(jnp.zeros((1, L, 2)), noise, masking.num_kept(L, 0.75))
  np.testing.assert_array_equal(np.asarray(mask), wanted)


def test_masking_is_jittable_and_vectorized():
  fn = jax.jit(lambda key: masking.mask_noise(key, 32, GRID, 0.75, "tf"))
  assert fn(jax.random.key(0)).shape == (32, L)
  with pytest.raises(ValueError, match="mask mode"):
    masking.mask_noise(jax.random.key(0), 2, GRID, 0.75, "checkerboard")


def _plain_masking_and_restore(x, noise, keep, mask_token):
  """The same masking and restore with autodiff's own gradient (a scatter-add)."""
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  kept = jnp.take_along_axis(x, ids_shuffle[:, :keep, None], axis=1)
  filler = jnp.broadcast_to(mask_token, (x.shape[0], x.shape[1] - keep, x.shape[2])).astype(x.dtype)
  full = jnp.concatenate([kept * 3.0, filler], axis=1)
  return kept, jnp.take_along_axis(full, ids_restore[:, :, None], axis=1)


def _ours(x, noise, keep, mask_token):
  kept, _, ids_restore = masking.random_masking(x, noise, keep)
  return kept, masking.restore_with_mask_tokens(kept * 3.0, mask_token, ids_restore)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("ratio", [0.0, 0.75, 0.9])
def test_token_gradients_equal_autodiff_of_the_gathers_bit_for_bit(dtype, ratio):
  keys = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(keys[0], (3, L, 5)).astype(dtype)
  token = jax.random.normal(keys[1], (1, 1, 5))
  noise = masking.mask_noise(keys[2], 3, GRID, ratio, "unstructured")
  keep = masking.num_kept(L, ratio)
  weights = jax.random.normal(keys[3], (3, L, 5))

  def loss(fn, x, token):
    kept, full = fn(x, noise, keep, token)
    return (jnp.sum(kept.astype(jnp.float32) * weights[:, :keep])
            + jnp.sum(full.astype(jnp.float32) * weights))

  ours = jax.jit(jax.grad(lambda x, t: loss(_ours, x, t), argnums=(0, 1)))(x, token)
  plain = jax.jit(jax.grad(lambda x, t: loss(_plain_masking_and_restore, x, t),
                           argnums=(0, 1)))(x, token)
  for a, b in zip(ours, plain):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  for a, b in zip(_ours(x, noise, keep, token), _plain_masking_and_restore(x, noise, keep, token)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_token_gradients_compile_without_scatter():
  noise = masking.mask_noise(jax.random.key(4), 2, GRID, 0.75, "unstructured")
  x = jnp.ones((2, L, 4))
  grad = jax.jit(jax.grad(lambda x, t: jnp.sum(_ours(x, noise, 128, t)[1] ** 2), argnums=(0, 1)))
  hlo = grad.lower(x, jnp.ones((1, 1, 4))).compile(xla_flags.native_compile_options()).as_text()
  assert " gather(" in hlo
  assert " scatter(" not in hlo
