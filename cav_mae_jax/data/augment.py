"""Preprocessing ops for the input pipeline: a registry of small named ops (big_vision style).

An op is built by a registered factory from its arguments and maps a dict of tensors to a dict
of tensors. Ops compose from a spec string, `"name(arg, key=value)|name2"`, or a list of such
strings (`get_preprocess_fn`), and run eagerly or inside `tf.data.Dataset.map`.

Two kinds of ops, named by what they read:
- example ops work on one clip (`frames` [N] JPEG strings, `labels` [L] class indices, ...);
- batch ops work on a batch with a leading axis B (`audio` [B, T, F], `image` [B, H, W, 3] or
  [B, F, H, W, 3], `label` [B, C]) and vectorize over it.

Randomness comes only from `data["_seed"]`, a stateless seed of shape [2] (one per example for
example ops, one per batch for batch ops). Every random op folds its own name into that seed,
so ops never share random numbers and a pipeline is deterministic for its seeds.

Augmentations follow the original CAV-MAE loader (`src/dataloader.py`) in this order: mixup
(on the waveform before fbank, or on the fbank), SpecAugment on the raw fbank, normalization
`(x - mean) / std`, then noise `x + U(0, 1)[T, F] * u / 10` with one `u ~ U(0, 1)` per clip and
a roll along time by a shift in [-T, T). Label smoothing follows the original too: see
`smooth_labels`.
"""

from __future__ import annotations

import ast
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from cav_mae_jax.data import fbank_tf
from cav_mae_jax.data.config import MIXUP_TARGETS

Data = dict[str, tf.Tensor]
PreprocessOp = Callable[[Data], Data]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIXUP_BETA = 10.0  # lambda ~ Beta(10, 10), as the original.
SEED_KEY = "_seed"
MIXED_KEY = "_mixed"
# A clip's mixup partner: `MIX_PREFIX + field` for each of MIX_FIELDS the clip has.
MIX_PREFIX = "mix_"
MIX_FIELDS = ("audio", "image", "label", "waveform", "waveform_length")

_REGISTRY: dict[str, Callable[..., PreprocessOp]] = {}


def register(name: str) -> Callable[[Callable[..., PreprocessOp]], Callable[..., PreprocessOp]]:
  """Registers an op factory under `name` (decorator)."""

  def decorator(factory: Callable[..., PreprocessOp]) -> Callable[..., PreprocessOp]:
    if name in _REGISTRY:
      raise ValueError(f"preprocessing op {name!r} is registered twice")
    _REGISTRY[name] = factory
    return factory

  return decorator


def registered_ops() -> list[str]:
  """Names of all registered ops."""
  return sorted(_REGISTRY)


def parse_op(spec: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
  """Parses `"name"` or `"name(1, key='x')"` into (name, args, kwargs); literals only."""
  try:
    node = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"cannot parse preprocessing op {spec!r}: {e.msg}") from None
  if isinstance(node, ast.Name):
    return node.id, (), {}
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise ValueError(f"preprocessing op {spec!r} must look like name or name(args)")
  try:
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  except ValueError:
    raise ValueError(f"preprocessing op {spec!r}: arguments must be Python literals") from None
  return node.func.id, args, kwargs


def get_op(spec: str) -> PreprocessOp:
  """Builds one op from its spec string; the op returns a new dict, leaving its input as is."""
  name, args, kwargs = parse_op(spec)
  if name not in _REGISTRY:
    raise ValueError(f"unknown preprocessing op {name!r}; known ops: {registered_ops()}")
  op = _REGISTRY[name](*args, **kwargs)

  def apply(data: Data) -> Data:
    return op(dict(data))

  return apply


def get_preprocess_fn(spec: str | Sequence[str]) -> PreprocessOp:
  """Composes ops from `"op1|op2(...)"` or a list of op specs into one dict -> dict function."""
  specs = spec.split("|") if isinstance(spec, str) else list(spec)
  ops = [get_op(s) for s in specs if s.strip()]

  def preprocess(data: Data) -> Data:
    for op in ops:
      data = op(data)
    return data

  return preprocess


def _op_seed(data: Data, op_name: str) -> tf.Tensor:
  """This op's own stateless seed [2]: the data's seed with the op name folded in."""
  if SEED_KEY not in data:
    raise KeyError(f"op {op_name!r} is random and needs a stateless seed in data[{SEED_KEY!r}]")
  salt = zlib.crc32(op_name.encode()) & 0x7FFFFFFF
  seed = tf.cast(data[SEED_KEY], tf.int64)
  return tf.random.experimental.stateless_fold_in(seed, salt)


def _split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  return list(tf.unstack(tf.random.experimental.stateless_split(seed, num=num)))


# ---------------------------------------------------------------------------------------------
# Example ops: frames and labels.


@register("choose_frame")
def choose_frame(index: int | None = None, num_frames: int = 10) -> PreprocessOp:
  """Picks frame `index` (uniformly random if None) of `frames` into `frame_jpeg`, `frame_index`."""
  if index is not None and not 0 <= index < num_frames:
    raise ValueError(f"choose_frame: index {index} outside [0, {num_frames})")

  def op(data: Data) -> Data:
    if index is None:
      frame = tf.random.stateless_uniform([], _op_seed(data, "choose_frame"), minval=0,
                                          maxval=num_frames, dtype=tf.int32)
    else:
      frame = tf.constant(index, tf.int32)
    data["frame_jpeg"] = tf.gather(data["frames"], frame)
    data["frame_index"] = frame
    return data

  return op


@register("all_frames")
def all_frames() -> PreprocessOp:
  """Keeps every frame: `frame_jpeg` [N] and `frame_index` -1 (meaning all frames)."""

  def op(data: Data) -> Data:
    data["frame_jpeg"] = data["frames"]
    data["frame_index"] = tf.constant(-1, tf.int32)
    return data

  return op


def decode_one_jpeg(jpeg: tf.Tensor) -> tf.Tensor:
  """One JPEG -> uint8 [H, W, 3], as the input pipeline decodes frames (records' writers check
  stored frames with it)."""
  # INTEGER_ACCURATE is libjpeg's ISLOW DCT, the one PIL uses: same pixels as the original.
  return tf.io.decode_jpeg(jpeg, channels=3, dct_method="INTEGER_ACCURATE")


@register("decode_jpeg")
def decode_jpeg() -> PreprocessOp:
  """Decodes `frame_jpeg` (scalar or [N]) into `image` uint8 [H, W, 3] (or [N, H, W, 3])."""

  def op(data: Data) -> Data:
    jpeg = data["frame_jpeg"]
    if jpeg.shape.rank == 0:
      data["image"] = decode_one_jpeg(jpeg)
    else:
      data["image"] = tf.map_fn(decode_one_jpeg, jpeg,
                                fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    return data

  return op


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bicubic resize of [..., H, W, C] so the shorter side is `size` (torchvision Resize(int))."""
  height, width = tf.shape(image)[-3], tf.shape(image)[-2]
  short, long = tf.minimum(height, width), tf.maximum(height, width)
  # torchvision: the long side becomes int(size * long / short) (truncated).
  new_long = tf.cast(tf.cast(size, tf.float64) * tf.cast(long, tf.float64)
                     / tf.cast(short, tf.float64), tf.int32)
  new_height = tf.where(height <= width, size, new_long)
  new_width = tf.where(height <= width, new_long, size)

  def resize() -> tf.Tensor:
    # PIL's bicubic (a = -0.5) widens the kernel when downscaling: TF's antialias does too.
    resized = tf.image.resize(image, tf.stack([new_height, new_width]), method="bicubic",
                              antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

  def keep() -> tf.Tensor:  # PIL returns an unchanged copy when the size already matches.
    return tf.cast(image, tf.uint8)

  return tf.cond(tf.logical_and(tf.equal(new_height, height), tf.equal(new_width, width)),
                 keep, resize)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """Center crop of [..., H, W, C] to size x size, offsets as torchvision's CenterCrop."""
  height, width = tf.shape(image)[-3], tf.shape(image)[-2]
  tf.debugging.assert_greater_equal(tf.minimum(height, width), size,
                                    message=f"image smaller than the {size}x{size} crop")
  top = tf.cast(tf.round(tf.cast(height - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(width - size, tf.float32) / 2.0), tf.int32)
  cropped = image[..., top:top + size, left:left + size, :]
  return tf.ensure_shape(cropped, image.shape[:-3].concatenate([size, size, image.shape[-1]]))


@register("resize_crop")
def resize_crop(size: int = 224) -> PreprocessOp:
  """Resizes `image` (shorter side, bicubic, uint8 result) and center-crops it to size x size."""

  def op(data: Data) -> Data:
    data["image"] = center_crop(resize_shorter_side(data["image"], size), size)
    return data

  return op


@register("normalize_image")
def normalize_image(mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> PreprocessOp:
  """Maps `image` from [0, 255] to float32 `(x / 255 - mean) / std` per channel."""
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ValueError(f"normalize_image: need 3 means and 3 positive stds, got {mean}, {std}")

  # (x / 255 - mean) / std as one multiply and one add (equal to within float32 rounding).
  scale = tf.constant([1.0 / (255.0 * s) for s in std], tf.float32)
  offset = tf.constant([-m / s for m, s in zip(mean, std)], tf.float32)

  def op(data: Data) -> Data:
    image = tf.cast(data["image"], tf.float32)
    shape = tf.shape(image)
    # Broadcasting a 3-vector over the last axis is slow on CPU: scale rows of W * 3 instead.
    rows = tf.reshape(image, [-1, shape[-2] * 3])
    rows = rows * tf.tile(scale, [shape[-2]]) + tf.tile(offset, [shape[-2]])
    data["image"] = tf.reshape(rows, shape)
    return data

  return op


@register("multi_hot")
def multi_hot(num_classes: int) -> PreprocessOp:
  """Turns `labels` (class indices [L]) into `label` float32 [num_classes] of 0/1."""

  def op(data: Data) -> Data:
    labels = tf.cast(data["labels"], tf.int32)
    tf.debugging.assert_less(labels, num_classes, message="label index >= num_classes")
    tf.debugging.assert_non_negative(labels, message="negative label index")
    counts = tf.reduce_sum(tf.one_hot(labels, num_classes, dtype=tf.float32), axis=0)
    data["label"] = tf.minimum(counts, 1.0)
    return data

  return op


# ---------------------------------------------------------------------------------------------
# Batch ops: audio, mixup, labels.


def _centered(waveforms: tf.Tensor, lengths: tf.Tensor) -> tf.Tensor:
  """Zero-padded waveforms [B, L] as float (int16 scaled as torchaudio reads 16-bit WAV), each
  mean-removed over its own length and zero beyond it."""
  if waveforms.shape.rank != 2:
    raise ValueError(f"waveforms must be [B, L], got shape {waveforms.shape}")
  if waveforms.dtype == tf.int16:
    waveforms = tf.cast(waveforms, tf.float32) / 32768.0
  waveforms = tf.cast(waveforms, tf.float32)
  lengths = tf.cast(lengths, tf.int32)
  valid = tf.sequence_mask(lengths, tf.shape(waveforms)[1], dtype=tf.float32)
  means = tf.reduce_sum(waveforms * valid, axis=1) / tf.cast(tf.maximum(lengths, 1), tf.float32)
  return (waveforms - means[:, None]) * valid


def mix_waveforms(waveforms: tf.Tensor, lengths: tf.Tensor, partners: tf.Tensor,
                  partner_lengths: tf.Tensor, lam: tf.Tensor) -> tf.Tensor:
  """Mixes zero-padded waveforms [B, L] with their partners [B, L'] as the original.

  Both are mean-removed over their own lengths, the partner is zero-padded or cut to the
  first clip's length, then `lam * first + (1 - lam) * partner`; the result is zero beyond the
  first clip's length. (The fbank step removes the mean of the mix again.)
  """
  centered = _centered(waveforms, lengths)
  other = _centered(partners, partner_lengths)
  size = tf.shape(centered)[1]
  other = tf.pad(other, [[0, 0], [0, tf.maximum(size - tf.shape(other)[1], 0)]])[:, :size]
  other *= tf.sequence_mask(tf.cast(lengths, tf.int32), size, dtype=tf.float32)
  lam = tf.cast(lam, tf.float32)[:, None]
  return lam * centered + (1.0 - lam) * other


def _clip_fbank_of_prefix(waveform: tf.Tensor, length: tf.Tensor, target_length: int) -> tf.Tensor:
  return fbank_tf.pad_or_trim_tf(fbank_tf.clip_fbank_tf(waveform[:length]), target_length)


@register("mixup")
def mixup(on: str = "fbank") -> PreprocessOp:
  """Mixes each clip marked in `_mixed` [B] with its partner, lambda ~ Beta(10, 10).

  The partner's fields are `mix_<field>` (MIX_PREFIX): the input pipeline draws the clips to
  mix and their partners, each uniformly from the whole (host's) training set and with its own
  random frame, as the original's loader does (`dataset.HostRecords.with_mixup_partners`).
  Mixes `image` and `label` (before smoothing), and the audio: on "waveform" (as the original)
  the int16 `waveform` [B, L] (zero-padded, true lengths in `waveform_length`) are mixed with
  `mix_waveform` and the fbank of the mix replaces `audio` for mixed clips; on "fbank" the raw
  fbanks are mixed. `smooth_labels` reads `_mixed`.
  """
  if on not in MIXUP_TARGETS:
    raise ValueError(f"mixup: on must be one of {MIXUP_TARGETS}, got {on!r}")

  def op(data: Data) -> Data:
    mixed = tf.cast(data[MIXED_KEY], tf.bool)
    batch = tf.shape(mixed)[0]
    gamma1_seed, gamma2_seed = _split_seed(_op_seed(data, "mixup"), 2)
    g1 = tf.random.stateless_gamma([batch], gamma1_seed, alpha=MIXUP_BETA)
    g2 = tf.random.stateless_gamma([batch], gamma2_seed, alpha=MIXUP_BETA)
    lam = tf.where(mixed, g1 / (g1 + g2), 1.0)

    def mix(key: str) -> tf.Tensor:
      x = tf.cast(data[key], tf.float32)
      other = tf.cast(data[MIX_PREFIX + key], tf.float32)
      shape = tf.concat([[batch], tf.ones([tf.rank(x) - 1], tf.int32)], axis=0)
      weight = tf.reshape(lam, shape)
      return weight * x + (1.0 - weight) * other

    data["image"] = mix("image")
    data["label"] = mix("label")
    if on == "fbank":
      data["audio"] = mix("audio")
    else:
      needed = ["waveform", "waveform_length", MIX_PREFIX + "waveform",
                MIX_PREFIX + "waveform_length"]
      if any(key not in data for key in needed):
        raise KeyError(f"mixup(on='waveform') needs {needed} in the batch")
      target_length = data["audio"].shape[1]
      mixed_waves = mix_waveforms(data["waveform"], data["waveform_length"],
                                  data[MIX_PREFIX + "waveform"],
                                  data[MIX_PREFIX + "waveform_length"], lam)
      lengths = tf.cast(data["waveform_length"], tf.int32)

      def audio_of(i: tf.Tensor) -> tf.Tensor:
        return tf.cond(mixed[i],
                       lambda: _clip_fbank_of_prefix(mixed_waves[i], lengths[i], target_length),
                       lambda: data["audio"][i])

      data["audio"] = tf.map_fn(audio_of, tf.range(batch),
                                fn_output_signature=tf.TensorSpec(data["audio"].shape[1:],
                                                                  tf.float32))
    data[MIXED_KEY] = mixed
    return data

  return op


def _axis_mask(seed: tf.Tensor, batch: tf.Tensor, mask_param: int, size: int) -> tf.Tensor:
  """torchaudio mask_along_axis: width int(U*param), start int(U*(size - U*param)); [B, size]."""
  width_seed, start_seed = _split_seed(seed, 2)
  value = tf.random.stateless_uniform([batch], width_seed) * float(mask_param)
  min_value = tf.random.stateless_uniform([batch], start_seed) * (float(size) - value)
  start = tf.cast(min_value, tf.int32)  # truncation toward zero, as torch's .long()
  end = start + tf.cast(value, tf.int32)
  positions = tf.range(size)[None, :]
  return (positions >= start[:, None]) & (positions < end[:, None])


@register("specaugment")
def specaugment(freq_mask: int, time_mask: int) -> PreprocessOp:
  """Zeroes one random band of mel bins and one of frames per clip of `audio` [B, T, F].

  As torchaudio's FrequencyMasking(freq_mask) then TimeMasking(time_mask) on one clip
  (iid_masks=False, p=1): each mask draws its width and start uniformly; 0 disables it.
  """
  if freq_mask < 0 or time_mask < 0:
    raise ValueError(f"specaugment: mask sizes must be >= 0, got {freq_mask}, {time_mask}")

  def op(data: Data) -> Data:
    audio = data["audio"]
    batch, frames, bins = tf.shape(audio)[0], audio.shape[1], audio.shape[2]
    freq_seed, time_seed = _split_seed(_op_seed(data, "specaugment"), 2)
    keep_bins = tf.ones([batch, bins], tf.bool)
    keep_frames = tf.ones([batch, frames], tf.bool)
    if freq_mask >= 1:
      keep_bins = ~_axis_mask(freq_seed, batch, freq_mask, bins)
    if time_mask >= 1:
      keep_frames = ~_axis_mask(time_seed, batch, time_mask, frames)
    keep = keep_frames[:, :, None] & keep_bins[:, None, :]
    data["audio"] = tf.where(keep, audio, tf.zeros_like(audio))
    return data

  return op


@register("normalize_fbank")
def normalize_fbank(mean: float, std: float) -> PreprocessOp:
  """Normalizes `audio` to `(x - mean) / std` (dataset fbank statistics)."""
  if not std > 0:
    raise ValueError(f"normalize_fbank: std must be positive, got {std}")

  def op(data: Data) -> Data:
    data["audio"] = (tf.cast(data["audio"], tf.float32) - mean) / std
    return data

  return op


def uniform_noise(shape: tf.Tensor, seed: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
  """`U(0, 1)[shape] * scale` with 16-bit uniforms: two per 32-bit draw, half the RNG cost.

  The values lie on the grid k / 65536 (k < 65536) times `scale`; at the noise scale used
  here (<= 0.1) that grid is finer than 2e-6, far below the noise itself.
  """
  half_shape = tf.concat([shape[:-1], [(shape[-1] + 1) // 2]], axis=0)
  bits = tf.random.stateless_uniform(half_shape, seed, minval=None, maxval=None,
                                     dtype=tf.uint32)
  halves = tf.reshape(tf.bitcast(bits, tf.uint16), tf.concat([shape[:-1], [-1]], axis=0))
  halves = halves[..., :shape[-1]]
  return tf.cast(halves, tf.float32) * (tf.cast(scale, tf.float32) / 65536.0)


def _add_noise(audio: tf.Tensor, seed: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
  """audio [B, T, F] + U(0, 1) * scale[b], as rows of T * F (fast per-row broadcast)."""
  shape = tf.shape(audio)
  rows = tf.reshape(audio, [shape[0], -1])
  noise = uniform_noise(tf.shape(rows), seed, scale[:, None])
  return tf.reshape(rows + noise, shape)


@register("noise_roll")
def noise_roll() -> PreprocessOp:
  """Adds `U(0,1)[T,F] * u / 10` (u ~ U(0,1) per clip) to `audio` [B, T, F], then rolls time.

  U is drawn with 16-bit resolution (`uniform_noise`).
  The roll is torch.roll by a shift drawn uniformly from [-T, T): out[t] = x[(t - shift) mod T].
  """

  def op(data: Data) -> Data:
    audio = tf.cast(data["audio"], tf.float32)
    batch, frames = tf.shape(audio)[0], tf.shape(audio)[1]
    noise_seed, scale_seed, shift_seed = _split_seed(_op_seed(data, "noise_roll"), 3)
    scale = tf.random.stateless_uniform([batch], scale_seed) / 10.0
    audio = _add_noise(audio, noise_seed, scale)
    shift = tf.random.stateless_uniform([batch], shift_seed, minval=-frames, maxval=frames,
                                        dtype=tf.int32)
    source = tf.math.floormod(tf.range(frames)[None, :] - shift[:, None], frames)
    data["audio"] = tf.gather(audio, source, axis=1, batch_dims=1)
    return data

  return op


@register("smooth_labels")
def smooth_labels(smoothing: float) -> PreprocessOp:
  """Label smoothing as the original: every class starts at s / C.

  Unmixed clips: true labels become 1 - s (set, not added). Mixed clips (`_mixed`): each true
  label of the first clip adds lambda * (1 - s), of the partner (1 - lambda) * (1 - s); here
  `label` holds lambda * y1 + (1 - lambda) * y2, so the target is s / C + (1 - s) * label.
  """
  if not 0.0 <= smoothing < 1.0:
    raise ValueError(f"smooth_labels: smoothing must be in [0, 1), got {smoothing}")

  def op(data: Data) -> Data:
    label = tf.cast(data["label"], tf.float32)
    floor = smoothing / tf.cast(tf.shape(label)[-1], tf.float32)
    unmixed = tf.where(label > 0, 1.0 - smoothing, floor)
    mixed_target = floor + (1.0 - smoothing) * label
    if MIXED_KEY in data:
      data["label"] = tf.where(data[MIXED_KEY][:, None], mixed_target, unmixed)
    else:
      data["label"] = unmixed
    return data

  return op
