"""Resizing the 8 x T/16 audio position grid (frequency-major patch order)."""

import numpy as np
import pytest

from cav_mae_jax.convert.pos_embed import resize_audio_pos_embed


def _sincos_2d(dim, rows, cols):
  """MAE sin-cos embedding: first half encodes the column, second the row (docs/original.md)."""
  def one_d(d, positions):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    angles = positions.reshape(-1, 1).astype(np.float64) * omega
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  col, row = np.meshgrid(np.arange(cols), np.arange(rows))
  return np.concatenate([one_d(dim // 2, col), one_d(dim // 2, row)], axis=1).astype(np.float32)[None]


def test_trim_keeps_the_first_time_columns_of_every_frequency_row():
  source = np.random.default_rng(0).standard_normal((1, 8 * 64, 6)).astype(np.float32)
  trimmed = resize_audio_pos_embed(source, freq_patches=8, time_patches=32, method="trim")
  assert trimmed.shape == (1, 256, 6)
  grid = source.reshape(8, 64, 6)
  for f in range(8):
    for t in range(32):
      np.testing.assert_array_equal(trimmed[0, f * 32 + t], source[0, f * 64 + t])
  np.testing.assert_array_equal(trimmed.reshape(8, 32, 6), grid[:, :32])


def test_trim_of_sincos_equals_sincos_of_the_smaller_grid():
  source = _sincos_2d(16, 8, 64)
  trimmed = resize_audio_pos_embed(source, freq_patches=8, time_patches=32, method="trim")
  np.testing.assert_array_equal(trimmed, _sincos_2d(16, 8, 32))


@pytest.mark.parametrize("time_patches", [32, 64, 100])
def test_sincos_gives_the_sincos_table_of_the_new_grid(time_patches):
  resized = resize_audio_pos_embed(_sincos_2d(16, 8, 64), freq_patches=8,
                                   time_patches=time_patches, method="sincos")
  np.testing.assert_array_equal(resized, _sincos_2d(16, 8, time_patches))


def test_interpolate_matches_torch_bilinear_along_time():
  torch = pytest.importorskip("torch", reason="compares against torch.nn.functional.interpolate")
  source = np.random.default_rng(1).standard_normal((1, 8 * 64, 4)).astype(np.float32)
  for time_patches in (32, 100):
    ours = resize_audio_pos_embed(source, freq_patches=8, time_patches=time_patches,
                                  method="interpolate")
    image = torch.from_numpy(source.reshape(8, 64, 4).transpose(2, 0, 1))[None]  # [1, D, F, T]
    theirs = torch.nn.functional.interpolate(image, size=(8, time_patches), mode="bilinear",
                                             align_corners=False)
    theirs = theirs[0].numpy().transpose(1, 2, 0).reshape(1, 8 * time_patches, 4)
    np.testing.assert_allclose(ours, theirs, atol=5e-5)  # torch: float32 coordinates


def test_same_length_interpolation_is_identity():
  source = np.random.default_rng(2).standard_normal((1, 8 * 4, 3)).astype(np.float32)
  np.testing.assert_array_equal(
      resize_audio_pos_embed(source, freq_patches=8, time_patches=4, method="interpolate"), source)


@pytest.mark.parametrize("kwargs,message", [
    (dict(time_patches=128, method="trim"), "cannot trim 64 time patches to 128"),
    (dict(time_patches=32, method="nearest"), "unknown resize method"),
    (dict(time_patches=0, method="trim"), "must be positive"),
    (dict(time_patches=128, method="sincos"), "not the fixed sin-cos embedding of its 8 x 64"),
])
def test_bad_requests_are_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    resize_audio_pos_embed(np.zeros((1, 512, 4), np.float32), freq_patches=8, **kwargs)


def test_lengthening_by_trim_points_to_the_method_for_the_table():
  # It said "use method='interpolate'" for every table: on a pretraining checkpoint's fixed
  # sin-cos table that stretches it, 1.8 off in features from the original built at that length.
  with pytest.raises(ValueError, match=r"to lengthen use method='sincos' \(the table is the "
                     "fixed sin-cos"):
    resize_audio_pos_embed(_sincos_2d(16, 8, 4), freq_patches=8, time_patches=6, method="trim")
  trained = _sincos_2d(16, 8, 4) + 0.01
  with pytest.raises(ValueError, match=r"to lengthen use method='interpolate' \(a trained"):
    resize_audio_pos_embed(trained, freq_patches=8, time_patches=6, method="trim")


def test_grid_that_is_not_eight_rows_is_an_error():
  with pytest.raises(ValueError, match="do not form 8 frequency rows"):
    resize_audio_pos_embed(np.zeros((1, 100, 2), np.float32), freq_patches=8, time_patches=4,
                           method="trim")


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_a_half_precision_copy_of_the_sincos_table_is_that_table(dtype):
  # A checkpoint saved in float16 or bfloat16 was "not the fixed sin-cos embedding (max
  # difference 0.000244; a trained table)", and 'trim' pointed a lengthening to 'interpolate'.
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
  half = _sincos_2d(768, 8, 64).astype(dtype)
  resized = resize_audio_pos_embed(half, freq_patches=8, time_patches=32, method="sincos")
  assert resized.dtype == dtype
  np.testing.assert_array_equal(resized, _sincos_2d(768, 8, 32).astype(dtype))
  with pytest.raises(ValueError, match=r"to lengthen use method='sincos'"):
    resize_audio_pos_embed(half, freq_patches=8, time_patches=128, method="trim")
  trained = (_sincos_2d(768, 8, 64) + 0.01).astype(dtype)
  with pytest.raises(ValueError, match="not the fixed sin-cos embedding"):
    resize_audio_pos_embed(trained, freq_patches=8, time_patches=32, method="sincos")
