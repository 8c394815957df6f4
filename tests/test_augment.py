"""Tests of the preprocessing ops, one by one, against the original loader's semantics."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cav_mae_jax.data import augment
from cav_mae_jax.data import fbank as fbank_np

SEED = tf.constant([3, 4], tf.int64)


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
  """A natural-looking (smooth) RGB uint8 image."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (height // 6 + 2, width // 6 + 2, 3)).astype(np.uint8)
  image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
  return np.asarray(image)


def jpeg_bytes(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG")  # PIL default quality 75
  return buffer.getvalue()


def test_parse_and_compose_ops():
  assert augment.parse_op("resize_crop(224)") == ("resize_crop", (224,), {})
  assert augment.parse_op(" mixup(0.5, on='fbank') ") == ("mixup", (0.5,), {"on": "fbank"})
  assert augment.parse_op("noise_roll") == ("noise_roll", (), {})
  for bad in ("resize_crop(", "resize_crop(size)", "a.b(1)"):
    with pytest.raises(ValueError, match="preprocessing op"):
      augment.parse_op(bad)
  with pytest.raises(ValueError, match="unknown preprocessing op 'flip'"):
    augment.get_preprocess_fn("normalize_fbank(0., 1.)|flip")
  data = {"audio": tf.fill([1, 2, 3], 5.0)}
  out = augment.get_preprocess_fn("normalize_fbank(1.0, 2.0)|normalize_fbank(0.0, 0.5)")(data)
  np.testing.assert_allclose(out["audio"], 4.0)  # ((5 - 1) / 2) / 0.5, applied in order
  np.testing.assert_allclose(data["audio"], 5.0)  # the input dict is not modified
  as_list = augment.get_preprocess_fn(["normalize_fbank(1.0, 2.0)", "normalize_fbank(0.0, 0.5)"])
  np.testing.assert_allclose(as_list(data)["audio"], 4.0)
  assert {"choose_frame", "decode_jpeg", "resize_crop", "normalize_image", "multi_hot", "mixup",
          "specaugment", "normalize_fbank", "noise_roll", "smooth_labels"} <= set(
              augment.registered_ops())


def test_random_ops_need_a_seed():
  with pytest.raises(KeyError, match="_seed"):
    augment.get_op("noise_roll")({"audio": tf.zeros([1, 4, 2])})


def test_choose_frame_is_seeded_and_uniform():
  frames = tf.constant([f"f{i}".encode() for i in range(10)])
  op = augment.get_op("choose_frame")
  picked = []
  for s in range(200):
    out = op({"frames": frames, "_seed": tf.constant([s, 0], tf.int64)})
    assert out["frame_jpeg"].numpy() == f"f{int(out['frame_index'])}".encode()
    picked.append(int(out["frame_index"]))
  assert set(picked) == set(range(10))
  again = op({"frames": frames, "_seed": tf.constant([5, 0], tf.int64)})
  assert int(again["frame_index"]) == picked[5]
  fixed = augment.get_op("choose_frame(5)")({"frames": frames})
  assert fixed["frame_jpeg"].numpy() == b"f5" and int(fixed["frame_index"]) == 5
  with pytest.raises(ValueError, match="index 10"):
    augment.get_op("choose_frame(10)")


def test_decode_jpeg_matches_pil_exactly():
  pixels = smooth_image(48, 64)
  data = jpeg_bytes(pixels)
  expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  out = augment.get_op("decode_jpeg")({"frame_jpeg": tf.constant(data)})
  np.testing.assert_array_equal(out["image"].numpy(), expected)
  stacked = augment.get_op("decode_jpeg")({"frame_jpeg": tf.constant([data, data])})
  assert stacked["image"].shape == (2, 48, 64, 3)


def test_resize_crop_matches_torchvision_pil_pipeline():
  for height, width in ((60, 80), (90, 50)):
    pixels = smooth_image(height, width, seed=height)
    # torchvision Resize(32, BICUBIC) on a PIL image, then CenterCrop(32).
    short, long = min(height, width), max(height, width)
    new_long = int(32 * long / short)
    size = (new_long, 32) if width > height else (32, new_long)
    resized = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC))
    top = int(round((resized.shape[0] - 32) / 2.0))
    left = int(round((resized.shape[1] - 32) / 2.0))
    expected = resized[top:top + 32, left:left + 32].astype(np.float32)
    out = augment.get_op("resize_crop(32)")({"image": tf.constant(pixels)})["image"].numpy()
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    diff = np.abs(out.astype(np.float32) - expected)
    assert diff.mean() < 1.0 and diff.max() <= 8, (diff.mean(), diff.max())
  # An image already at the size is unchanged (PIL returns a copy).
  pixels = smooth_image(32, 32)
  out = augment.get_op("resize_crop(32)")({"image": tf.constant(pixels)})["image"]
  np.testing.assert_array_equal(out, pixels)


def test_normalize_image_uses_imagenet_statistics():
  image = tf.constant([[[0, 128, 255]]], tf.uint8)
  out = augment.get_op("normalize_image")({"image": image})["image"].numpy()
  # The original's transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
  # written out: the module's own constants would agree with whatever they were.
  expected = (np.array([0, 128, 255]) / 255 - np.array([0.485, 0.456, 0.406])) / np.array(
      [0.229, 0.224, 0.225])
  np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)
  assert out.dtype == np.float32


def test_multi_hot():
  op = augment.get_op("multi_hot(4)")
  np.testing.assert_array_equal(op({"labels": tf.constant([2, 0, 2], tf.int64)})["label"],
                                [1, 0, 1, 0])
  np.testing.assert_array_equal(op({"labels": tf.zeros([0], tf.int64)})["label"], [0, 0, 0, 0])
  with pytest.raises(tf.errors.InvalidArgumentError, match="num_classes"):
    op({"labels": tf.constant([4], tf.int64)})


def test_normalize_fbank():
  out = augment.get_op("normalize_fbank(-5.081, 4.4849)")({"audio": tf.fill([1, 3, 2], -1.0)})
  np.testing.assert_allclose(out["audio"], (-1.0 + 5.081) / 4.4849, rtol=1e-6)
  with pytest.raises(ValueError, match="std"):
    augment.get_op("normalize_fbank(0.0, 0.0)")


def _torchaudio_band(uniform_width: np.ndarray, uniform_start: np.ndarray, mask_param: int,
                     size: int) -> np.ndarray:
  """torchaudio mask_along_axis from its two uniform draws (float32, as torch.rand)."""
  value = uniform_width.astype(np.float32) * np.float32(mask_param)
  min_value = uniform_start.astype(np.float32) * (np.float32(size) - value)
  start = np.trunc(min_value).astype(np.int64)
  end = start + np.trunc(value).astype(np.int64)
  positions = np.arange(size)[None, :]
  return (positions >= start[:, None]) & (positions < end[:, None])


def test_specaugment_follows_torchaudio_masking():
  batch, frames, bins = 256, 64, 32
  data = {"audio": tf.ones([batch, frames, bins]), "_seed": SEED}
  out = augment.get_op("specaugment(12, 100)")(data)["audio"].numpy()
  # The op's own uniforms (width, start) per mask, reproduced from its seed.
  freq_seed, time_seed = augment._split_seed(augment._op_seed(data, "specaugment"), 2)
  draws = []
  for seed in (freq_seed, time_seed):
    width_seed, start_seed = augment._split_seed(seed, 2)
    draws.append((tf.random.stateless_uniform([batch], width_seed).numpy(),
                  tf.random.stateless_uniform([batch], start_seed).numpy()))
  freq_band = _torchaudio_band(*draws[0], 12, bins)
  time_band = _torchaudio_band(*draws[1], 100, frames)  # mask larger than the axis
  expected = ~(freq_band[:, None, :] | time_band[:, :, None])
  np.testing.assert_array_equal(out, expected.astype(np.float32))
  widths = freq_band.sum(axis=1)
  assert widths.max() <= 11 and abs(widths.mean() - 5.5) < 1.0  # E[int(U * 12)] = 5.5
  assert time_band.any(axis=1).mean() > 0.5
  untouched = augment.get_op("specaugment(0, 0)")(data)["audio"]
  np.testing.assert_array_equal(untouched, 1.0)


def test_noise_roll_adds_scaled_uniform_noise_then_rolls_time():
  batch, frames, bins = 64, 50, 8
  ramp = np.broadcast_to(np.arange(frames, dtype=np.float32)[None, :, None], (batch, frames, bins))
  data = {"audio": tf.constant(ramp), "_seed": SEED}
  out = augment.get_op("noise_roll")(data)["audio"].numpy()
  source = np.floor(out)  # noise < 0.1, so the integer part is the source frame
  shifts = (np.arange(frames)[None, :] - source[:, :, 0]) % frames
  assert (shifts == shifts[:, :1]).all()  # one shift per clip: torch.roll along time
  assert len(np.unique(shifts[:, 0])) > 20
  noise = out - source
  assert noise.min() >= 0 and noise.max() < 0.1
  per_clip_max = noise.reshape(batch, -1).max(axis=1)
  assert per_clip_max.std() > 0.01  # u / 10 differs between clips
  again = augment.get_op("noise_roll")(data)["audio"].numpy()
  np.testing.assert_array_equal(out, again)


def _mix_batch(batch: int, num_classes: int, mixed: np.ndarray, on: str = "fbank"):
  """A batch whose clip b has partner clip (b + 1) % batch (the pipeline draws partners
  uniformly from the data set; here they are given), mixed where `mixed`."""
  rng = np.random.default_rng(0)
  data = {
      "audio": tf.constant(rng.normal(size=(batch, 6, 4)).astype(np.float32)),
      "image": tf.constant(rng.integers(0, 255, (batch, 2, 2, 3)).astype(np.uint8)),
      "label": tf.constant(np.eye(num_classes, dtype=np.float32)[:batch]),
      "_seed": SEED,
  }
  partner = (np.arange(batch) + 1) % batch
  for key in ("audio", "image", "label"):
    data[augment.MIX_PREFIX + key] = tf.gather(data[key], partner)
  data[augment.MIXED_KEY] = tf.constant(mixed)
  return data, augment.get_op(f"mixup(on={on!r})")(dict(data))


def test_mixup_on_fbank_mixes_audio_image_and_labels_with_one_lambda():
  batch = 256
  data, out = _mix_batch(batch, batch, np.ones(batch, bool))
  lam = np.diag(out["label"].numpy())
  partner = (np.arange(batch) + 1) % batch
  np.testing.assert_allclose(out["label"].numpy()[np.arange(batch), partner], 1 - lam, rtol=1e-6)
  for key in ("audio", "image"):
    x = data[key].numpy().astype(np.float32)
    weight = lam.reshape((batch,) + (1,) * (x.ndim - 1))
    np.testing.assert_allclose(out[key], weight * x + (1 - weight) * x[partner], atol=1e-4)
  # Beta(10, 10): mean 0.5, std sqrt(1 / 84).
  assert abs(lam.mean() - 0.5) < 0.03 and abs(lam.std() - (1 / 84) ** 0.5) < 0.03
  assert out["_mixed"].numpy().all()
  mixed = np.arange(batch) % 3 == 0
  data, some = _mix_batch(batch, batch, mixed)
  np.testing.assert_array_equal(some["_mixed"].numpy(), mixed)
  np.testing.assert_array_equal(some["audio"].numpy()[~mixed], data["audio"].numpy()[~mixed])
  np.testing.assert_array_equal(some["label"].numpy()[~mixed], data["label"].numpy()[~mixed])
  assert np.all(np.abs(some["audio"].numpy()[mixed] - data["audio"].numpy()[mixed]) > 0)


def _original_waveform_mix_fbank(first: np.ndarray, second: np.ndarray, lam: float,
                                 target_length: int) -> np.ndarray:
  """The original loader's `_wav2fbank(filename, filename2, lambda)` on int16 waveforms."""
  first = first.astype(np.float32) / 32768.0
  second = second.astype(np.float32) / 32768.0
  first, second = first - first.mean(), second - second.mean()
  if len(second) < len(first):
    second = np.pad(second, (0, len(first) - len(second)))
  second = second[:len(first)]
  mixed = lam * first + (1 - lam) * second
  return fbank_np.pad_or_trim(fbank_np.clip_fbank(mixed), target_length)


def test_mixup_on_waveform_matches_the_original_mix_then_fbank():
  rng = np.random.default_rng(1)
  lengths = [8000, 5600, 8000, 3000]
  waves = [(rng.standard_normal(n) * 2000 + 300).astype(np.int16) for n in lengths]
  padded = np.zeros((4, max(lengths)), np.int16)
  for i, wave in enumerate(waves):
    padded[i, :len(wave)] = wave
  stored = np.stack([fbank_np.pad_or_trim(fbank_np.clip_fbank(w), 64) for w in waves])
  # Partners: clip (i + 1) % 4, padded to another batch length than the first clips'.
  partner = [(i + 1) % 4 for i in range(4)]
  partners = np.zeros((4, max(lengths) + 100), np.int16)
  for i, j in enumerate(partner):
    partners[i, :lengths[j]] = waves[j]
  data = {"audio": tf.constant(stored), "image": tf.zeros([4, 2, 2, 3]),
          "label": tf.eye(4), "waveform": tf.constant(padded),
          "waveform_length": tf.constant(lengths), "_seed": SEED,
          "mix_image": tf.zeros([4, 2, 2, 3]), "mix_label": tf.gather(tf.eye(4), partner),
          "mix_audio": tf.gather(stored, partner), "mix_waveform": tf.constant(partners),
          "mix_waveform_length": tf.gather(lengths, partner),
          augment.MIXED_KEY: tf.ones([4], tf.bool)}
  out = augment.get_op("mixup(on='waveform')")(dict(data))
  lam = np.diag(out["label"].numpy())
  for i in range(4):
    expected = _original_waveform_mix_fbank(waves[i], waves[partner[i]], lam[i], 64)
    np.testing.assert_allclose(out["audio"][i], expected, atol=2e-3, err_msg=f"clip {i}")
  # Unmixed clips keep their stored fbank.
  kept = augment.get_op("mixup(on='waveform')")({**data, augment.MIXED_KEY: tf.zeros([4], bool)})
  np.testing.assert_array_equal(kept["audio"], stored)


def _original_smoothed_labels(first: list[int], second: list[int] | None, lam: float,
                              num_classes: int, smoothing: float) -> np.ndarray:
  """The original's label loop, with and without mixup."""
  label = np.zeros(num_classes) + smoothing / num_classes
  if second is None:
    for c in first:
      label[c] = 1.0 - smoothing
    return label
  for c in first:
    label[c] += lam * (1.0 - smoothing)
  for c in second:
    label[c] += (1.0 - lam) * (1.0 - smoothing)
  return label


def test_smooth_labels_as_the_original_with_and_without_mixup():
  num_classes, smoothing = 5, 0.1
  cases = [([0, 2], None, 1.0), ([1], [1, 3], 0.7), ([4], [0], 0.45), ([], [2], 0.6)]
  labels, mixed, expected = [], [], []
  for first, second, lam in cases:
    y1 = np.zeros(num_classes)
    y1[first] = 1
    if second is None:
      labels.append(y1)
      mixed.append(False)
    else:
      y2 = np.zeros(num_classes)
      y2[second] = 1
      labels.append(lam * y1 + (1 - lam) * y2)  # what mixup leaves in `label`
      mixed.append(True)
    expected.append(_original_smoothed_labels(first, second, lam, num_classes, smoothing))
  data = {"label": tf.constant(np.array(labels, np.float32)), "_mixed": tf.constant(mixed)}
  out = augment.get_op(f"smooth_labels({smoothing})")(data)["label"].numpy()
  np.testing.assert_allclose(out, np.array(expected), rtol=1e-6)
  plain = augment.get_op("smooth_labels(0.2)")({"label": tf.constant([[1.0, 0.0]])})["label"]
  np.testing.assert_allclose(plain, [[0.8, 0.1]])


def test_ops_run_inside_tf_data_as_eagerly():
  pixels = smooth_image(40, 48)
  jpeg = jpeg_bytes(pixels)
  example = {"frames": tf.constant([jpeg] * 10), "labels": tf.constant([1], tf.int64),
             "_seed": SEED}
  spec = "choose_frame|decode_jpeg|resize_crop(32)|normalize_image|multi_hot(3)"
  eager = augment.get_preprocess_fn(spec)(example)
  dataset = tf.data.Dataset.from_tensors(example).map(augment.get_preprocess_fn(spec))
  graph = next(iter(dataset))
  for key in ("image", "label", "frame_index"):
    np.testing.assert_array_equal(eager[key], graph[key])
