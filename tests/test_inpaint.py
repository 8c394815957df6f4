"""Inpainting pictures (eval/inpaint.py): masks, pasted reconstructions, un-normalization."""

import dataclasses
import re

import jax
import numpy as np
import pytest

from cav_mae_jax import models
from cav_mae_jax.eval import inpaint
from cav_mae_jax.models import losses
from test_features import (  # pylint: disable=unused-import
    RECORD_ORDER, fixture_records_dir, tiny_config)


pytestmark = pytest.mark.usefixtures("fast_compilation")  # conftest.py


def small_config(norm_pix_loss):
  return models.ModelConfig.from_config(models.model_config(
      "tiny", embed_dim=32, num_heads=2, encoder_depth=2, modality_specific_depth=1,
      decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, audio_length=64,
      image_size=32, norm_pix_loss=norm_pix_loss))


@pytest.fixture(scope="module", name="clip")
def fixture_clip():
  rng = np.random.default_rng(0)
  return (rng.standard_normal((64, 128)).astype(np.float32),
          rng.standard_normal((32, 32, 3)).astype(np.float32))


def _params(config):
  return jax.jit(lambda k: models.init_params(config, k))(jax.random.key(0))


def test_perfect_normalized_prediction_rebuilds_the_target():
  rng = np.random.default_rng(1)
  target = rng.normal(3.0, 2.0, (6, 16)).astype(np.float32)
  mean, std = target.mean(-1, keepdims=True), np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
  mask = np.array([1, 0, 1, 0, 0, 1])
  rebuilt = inpaint.reconstruct(target, (target - mean) / std, mask, norm_pix_loss=True)
  np.testing.assert_allclose(rebuilt, target, atol=1e-5)
  raw = inpaint.reconstruct(target, np.zeros_like(target), mask, norm_pix_loss=False)
  np.testing.assert_array_equal(raw[mask == 0], target[mask == 0])
  assert not raw[mask == 1].any()


@pytest.fixture(scope="module", name="inpainted", params=[True, False],
                ids=["norm_pix_loss", "raw_pixels"])
def fixture_inpainted(request, clip):
  config = small_config(request.param)
  params = _params(config)
  result = inpaint.inpaint(config, params, *clip, video_id="clip_42", mask_ratio_a=0.5,
                           mask_ratio_v=0.75, seed=3)
  return config, params, result


def test_inpaint_masks_and_pastes(clip, inpainted):
  config, params, result = inpainted
  audio, image = clip
  assert result.audio_mask.shape == audio.shape and result.image_mask.shape == (32, 32)
  assert result.audio_mask.mean() == pytest.approx(0.5)  # 16 of 32 patches
  assert result.image_mask.mean() == 0.75  # 3 of 4 patches
  np.testing.assert_array_equal(result.audio_reconstruction[~result.audio_mask],
                                audio[~result.audio_mask])
  np.testing.assert_array_equal(result.image_reconstruction[~result.image_mask],
                                image[~result.image_mask])
  assert not np.allclose(result.audio_reconstruction, audio)
  # The removed patches are the decoder's predictions (un-normalized with norm_pix_loss).
  model = models.CAVMAE(dataclasses.replace(config, mask_ratio_a=0.5))
  out = jax.jit(lambda p, a, v: model.apply({"params": p}, a, v, rngs={"mask": jax.random.key(3)},
                                            method="inpaint"))(params, audio[None], image[None])
  target = np.asarray(losses.patchify(losses.audio_as_image(audio[None]), 16))[0]
  expected = inpaint.reconstruct(target, np.asarray(out["pred_a"])[0],
                                 np.asarray(out["mask_a"])[0], config.norm_pix_loss)
  np.testing.assert_allclose(
      result.audio_reconstruction,
      np.asarray(losses.unpatchify(expected[None], config.audio_grid, 16))[0, ..., 0].T, atol=1e-6)
  assert result.loss_a == pytest.approx(float(out["loss_mae_a"]), rel=1e-5)
  again = inpaint.inpaint(config, params, audio, image, mask_ratio_a=0.5, seed=3)
  np.testing.assert_array_equal(again.audio_mask, result.audio_mask)
  other = inpaint.inpaint(config, params, audio, image, mask_ratio_a=0.5, seed=4)
  assert (other.audio_mask != result.audio_mask).any()


def test_picture_says_what_it_shows(inpainted, tmp_path):
  _, _, result = inpainted
  fig = inpaint.figure(result)
  titles = [axes.get_title() for axes in fig.axes if axes.get_title()]
  assert len(titles) == 6 and titles[0] == "spectrogram: original"
  assert ("un-normalized with the target patches' mean/var" in titles[2]) == result.norm_pix_loss
  assert "clip_42" in fig._suptitle.get_text()  # pylint: disable=protected-access
  inpaint.save_figure(result, str(tmp_path / "x.png"))
  assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_picture_the_disk_refuses_is_named_and_not_left_half_written(inpainted, tmp_path,
                                                                       monkeypatch):
  import errno  # pylint: disable=import-outside-toplevel
  import matplotlib.figure  # pylint: disable=import-outside-toplevel
  from cav_mae_jax import files  # pylint: disable=import-outside-toplevel
  _, _, result = inpainted

  def full_disk(self, fname, **kwargs):  # pylint: disable=unused-argument
    with open(fname, "wb") as f:
      f.write(b"\x89PNG\r\n\x1a\n")
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
  out = tmp_path / "x.png"
  with pytest.raises(files.WriteRefusedError,
                     match=f"^{out}: cannot be written: No space left on device"):
    inpaint.save_figure(result, str(out))
  assert not list(tmp_path.iterdir())


def test_picture_says_what_was_removed(clip):
  # The titles gave the ratio asked for; int(L * (1 - ratio)) patches are kept, so 0.8 of the
  # tiny image's 4 patches removes all 4 (the title said 80%). A structured audio mask says so.
  config = dataclasses.replace(small_config(False), mask_mode_a="time")
  result = inpaint.inpaint(config, _params(config), *clip, mask_ratio_a=0.5, mask_ratio_v=0.8)
  assert result.image_mask.all()
  titles = [axes.get_title() for axes in inpaint.figure(result).axes if axes.get_title()]
  assert titles[1] == "spectrogram: masked (50% of patches removed, time masking)"
  assert titles[4] == "frame: masked (100% of patches removed)"


def test_a_modality_with_no_patch_removed_has_no_loss(clip):
  """Its MSE on removed patches is 0 / 0: it was printed as 'video nan'."""
  config = small_config(False)
  result = inpaint.inpaint(config, _params(config), *clip, mask_ratio_a=0.5, mask_ratio_v=0.0)
  assert not result.image_mask.any() and result.loss_v is None
  assert np.isfinite(result.loss_a)
  assert re.fullmatch(r"MSE on removed patches: audio \d+\.\d{4}, video: no patch removed",
                      inpaint.losses_text(result))
  assert inpaint.figure(result)._suptitle.get_text().endswith(inpaint.losses_text(result))


def test_record_clip_by_index_or_id(records_dir):
  config = tiny_config(records_dir)
  by_index = inpaint.record_clip(config, index=3)
  by_id = inpaint.record_clip(config, video_id=RECORD_ORDER[3])
  assert by_index[0] == by_id[0] == RECORD_ORDER[3]
  np.testing.assert_array_equal(by_index[1], by_id[1])
  with pytest.raises(ValueError, match="hold only 7 clips"):
    inpaint.record_clip(config, index=7)
  # It said "1 of the 1 subset clips are not in ...", a subset inpainting has no flag for.
  with pytest.raises(ValueError, match=r"^no clip of records directory .* has the id 'nope'$"):
    inpaint.record_clip(config, video_id="nope")
