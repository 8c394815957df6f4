"""Tests of the tf.data input pipeline over tiny generated records."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cav_mae_jax.data import dataset
from cav_mae_jax.data import input as input_lib
from cav_mae_jax.data import records

NUM_CLASSES = 4
IMAGE_SIZE = 32


def _jpeg(red: int, green: int, height: int = 36, width: int = 40) -> bytes:
  pixels = np.zeros((height, width, 3), np.uint8)
  pixels[..., 0], pixels[..., 1], pixels[..., 2] = red, green, 128
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG")
  return buffer.getvalue()


def clip_values(clip: int, labels: list[int], waveform_length: int | None = None) -> dict:
  """A clip whose fbank is the constant `clip` and whose frame j has red = 20 * j + 10."""
  waveform = None
  if waveform_length is not None:
    rng = np.random.default_rng(clip)
    waveform = (rng.standard_normal(waveform_length) * 3000).astype(np.int16)
  return records.make_example_values(
      video_id=f"clip{clip}", labels=labels, label_ids=[f"/m/{x}" for x in labels],
      fbank=np.full((records.TARGET_FBANK_FRAMES, records.NUM_MEL_BINS), clip, np.float32),
      fbank_num_frames=records.TARGET_FBANK_FRAMES,
      jpeg_frames=[_jpeg(20 * j + 10, clip) for j in range(records.NUM_VIDEO_FRAMES)],
      frame_indices=list(range(records.NUM_VIDEO_FRAMES)), duration_s=10.0,
      source_sample_rate=16000, fps=25.0, frame_count=250, waveform=waveform)


def write_records(directory: str, labels: list[list[int]], num_shards: int,
                  waveform_lengths: list[int] | None = None) -> str:
  """Writes clips 0..N-1 round-robin into `num_shards` shards plus index.json."""
  os.makedirs(directory, exist_ok=True)
  shards = []
  stats = records.ShardStats(num_classes=NUM_CLASSES)
  clips = list(range(len(labels)))
  for shard in range(num_shards):
    name = f"clips-{shard:05d}-of-{num_shards:05d}.tfrecord"
    mine = clips[shard::num_shards]
    with tf.io.TFRecordWriter(os.path.join(directory, name)) as writer:
      for clip in mine:
        length = None if waveform_lengths is None else waveform_lengths[clip]
        values = clip_values(clip, labels[clip], length)
        stats.add(values)
        writer.write(records.serialize_example(values))
    shards.append(records.ShardInfo(file=name, num_examples=len(mine)))
  index = records.index_from_stats(shards, stats, store_waveform=waveform_lengths is not None)
  records.write_index(records.index_path(directory), index)
  return directory


@pytest.fixture(scope="module")
def record_dirs(tmp_path_factory) -> dict[str, str]:
  root = tmp_path_factory.mktemp("records")
  train_labels = [[i % 3] for i in range(10)]
  eval_labels = [[i % NUM_CLASSES] for i in range(7)]
  rare_labels = [[0]] * 19 + [[1]]
  return {
      "train": write_records(str(root / "train"), train_labels, num_shards=3),
      "eval": write_records(str(root / "eval"), eval_labels, num_shards=3),
      "rare": write_records(str(root / "rare"), rare_labels, num_shards=2),
      "wave": write_records(str(root / "wave"), [[i % NUM_CLASSES] for i in range(4)], 1,
                            waveform_lengths=[16000, 12000, 16000, 9000]),
  }


def make_config(record_dirs: dict[str, str], **data_overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(
      dict(audio_length=1024, num_mel_bins=128, image_size=IMAGE_SIZE))
  data = dict(train_dir=record_dirs["train"], eval_dir=record_dirs["eval"], batch_size=4,
              shuffle_buffer=8, fbank_mean=0.0, fbank_std=1.0, prefetch=1)
  data.update(data_overrides)
  config.data = ml_collections.ConfigDict(data)
  return config


def clip_ids(batch: dict[str, np.ndarray]) -> list[int]:
  """Clip ids of a batch without noise: the constant fbank value."""
  return [int(round(float(x))) for x in batch["audio"][:, 0, 0]]


def take(pipeline, n: int) -> list[dict[str, np.ndarray]]:
  return [next(pipeline) for _ in range(n)]


def test_host_file_indices_are_disjoint_and_cover_all():
  for num_files in (1, 5, 8, 13):
    for count in (1, 2, 3, 8):
      parts = [dataset.host_file_indices(num_files, p, count) for p in range(count)]
      flat = sorted(i for part in parts for i in part)
      assert flat == list(range(num_files))
      assert parts == [dataset.host_file_indices(num_files, p, count) for p in range(count)]
  with pytest.raises(ValueError, match="process_index"):
    dataset.host_file_indices(4, 2, 2)


def test_eval_keeps_every_clip_once_across_processes(record_dirs):
  config = make_config(record_dirs)
  seen, batch_counts = [], []
  for process in range(4):  # 3 shard files: process 3 has none and yields only padding
    pipeline = input_lib.InputPipeline(config, "eval", process_index=process, process_count=4,
                                       batch_size=4)
    batches = list(pipeline)
    batch_counts.append(len(batches))
    assert len(batches) == pipeline.num_batches
    for batch in batches:
      assert batch["audio"].shape == (1, 1024, 128) and batch["image"].shape == (1, 32, 32, 3)
      assert batch["label"].shape == (1, NUM_CLASSES) and batch["valid"].dtype == bool
      ids = np.asarray(clip_ids(batch))
      seen += list(ids[batch["valid"]])
      np.testing.assert_array_equal(batch["audio"][~batch["valid"]], 0.0)
      np.testing.assert_array_equal(batch["label"][~batch["valid"]], 0.0)
      np.testing.assert_array_equal(batch["frame_index"][batch["valid"]], 5)
  assert sorted(seen) == list(range(7))
  # Shards hold 3, 2, 2 clips: every process yields 3 batches of 1, padding the short ones.
  assert batch_counts == [3, 3, 3, 3]


def test_eval_pads_the_last_batch_and_labels_are_multi_hot(record_dirs):
  config = make_config(record_dirs)
  batches = list(input_lib.InputPipeline(config, "eval", process_index=0, process_count=1))
  assert [b["valid"].tolist() for b in batches] == [[True] * 4, [True] * 3 + [False]]
  np.testing.assert_array_equal(batches[1]["image"][3], 0.0)  # padding is zero, not -mean/std
  labels = np.concatenate([b["label"] for b in batches])[:7]
  ids = sum((clip_ids(b) for b in batches), [])[:7]
  for clip, label in zip(ids, labels):
    np.testing.assert_array_equal(label, np.eye(NUM_CLASSES)[clip % NUM_CLASSES])
  # Frame 5 has red 110: after normalization (x / 255 - 0.485) / 0.229.
  red = batches[0]["image"][0, ..., 0] * 0.229 + 0.485
  np.testing.assert_allclose(red, 110 / 255, atol=3 / 255)


def test_eval_all_frames_adds_a_frame_axis(record_dirs):
  config = make_config(record_dirs, eval_all_frames=True)
  batch = next(input_lib.InputPipeline(config, "eval", process_index=0, process_count=1))
  assert batch["image"].shape == (4, 10, 32, 32, 3)
  np.testing.assert_array_equal(batch["frame_index"], -1)
  red = batch["image"][0, :, 0, 0, 0] * 0.229 + 0.485
  np.testing.assert_allclose(red, (20 * np.arange(10) + 10) / 255, atol=3 / 255)


def test_train_is_deterministic_for_a_seed_and_covers_each_epoch(record_dirs):
  config = make_config(record_dirs)
  first = take(input_lib.InputPipeline(config, "train", process_index=0, process_count=1,
                                       seed=3), 5)
  again = take(input_lib.InputPipeline(config, "train", process_index=0, process_count=1,
                                       seed=3), 5)
  other = take(input_lib.InputPipeline(config, "train", process_index=0, process_count=1,
                                       seed=4), 5)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  order = sum((clip_ids(b) for b in first), [])
  assert order != sum((clip_ids(b) for b in other), [])
  assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
  assert order[:10] != order[10:20]  # each epoch is shuffled anew
  frames = np.concatenate([b["frame_index"] for b in first])
  assert frames.min() >= 0 and frames.max() < 10 and len(set(frames.tolist())) > 3
  # The image is the chosen frame (red = 20 * frame + 10).
  red = np.concatenate([b["image"][:, 0, 0, 0] for b in first]) * 0.229 + 0.485
  np.testing.assert_allclose(red, (20 * frames + 10) / 255, atol=3 / 255)
  assert all(b["valid"].all() for b in first)


def test_resume_from_state_gives_the_same_remaining_batches(record_dirs):
  for overrides in ({"noise": True}, {"balanced_sampling": True}):
    config = make_config(record_dirs, **overrides)
    straight = input_lib.InputPipeline(config, "train", process_index=0, process_count=1,
                                       seed=7)
    take(straight, 3)  # crosses the first epoch boundary (10 clips, batches of 4)
    state = json.loads(json.dumps(straight.get_state()))
    expected = take(straight, 3)
    resumed = input_lib.InputPipeline(config, "train", process_index=0, process_count=1, seed=7)
    resumed.set_state(state)
    for want, got in zip(expected, take(resumed, 3)):
      for key in want:
        np.testing.assert_array_equal(want[key], got[key], err_msg=f"{overrides} {key}")
  with pytest.raises(ValueError, match="seed"):
    resumed.set_state({**state, "seed": 8})


def test_a_state_of_another_process_count_says_why_it_cannot_resume(record_dirs):
  config = make_config(record_dirs)
  two = input_lib.InputPipeline(config, "train", process_index=0, process_count=2, seed=1)
  one = input_lib.InputPipeline(config, "train", process_index=0, process_count=1, seed=1)
  with pytest.raises(ValueError, match=r"saved by a run of 2 process\(es\), this run has 1: "
                     r"each process reads its own shard files.*init\.source=workdir"):
    one.set_state(two.get_state())


@pytest.mark.parametrize("balanced", [False, True])
def test_train_hosts_read_disjoint_clips_and_share_resume_state(record_dirs, balanced):
  config = make_config(record_dirs, balanced_sampling=balanced)
  pipelines = [input_lib.InputPipeline(config, "train", process_index=p, process_count=2,
                                       seed=1) for p in range(2)]
  batches = [take(p, 4) for p in pipelines]  # host batch 2, 5 clips per host and epoch
  ids = [set(sum((clip_ids(b) for b in host), [])) for host in batches]
  assert ids[0].isdisjoint(ids[1]) and ids[0] | ids[1] <= set(range(10))
  if not balanced:
    assert ids[0] | ids[1] == set(range(10))
  # Every epoch has as many clips as the host's files (balanced draws too), so the state is a
  # batch count: process 0's restores process 1.
  resumed = input_lib.InputPipeline(config, "train", process_index=1, process_count=2, seed=1)
  state = pipelines[0].get_state()
  resumed.set_state({**state, "batches": 2})
  for want, got in zip(batches[1][2:], take(resumed, 2)):
    np.testing.assert_array_equal(want["audio"], got["audio"])
    np.testing.assert_array_equal(want["image"], got["image"])


def test_each_process_draws_its_own_augmentations(record_dirs):
  """Hosts read different clips, and each draws its own noise (and frames, masks, mixup): with
  the seed alone every host drew the same, row for row (B / processes draws per step)."""
  config = make_config(record_dirs, noise=True, noise_on_device=False)
  noise = []
  for process in range(2):
    batch = next(input_lib.InputPipeline(config, "train", process_index=process,
                                         process_count=2, seed=0))
    audio = batch["audio"]  # clip k's fbank is the constant k; the noise is in [0, 0.1)
    noise.append(audio - np.floor(audio.min(axis=(1, 2), keepdims=True)))
  assert np.all((noise[0] >= 0) & (noise[0] < 0.1))
  assert np.abs(noise[0] - noise[1]).max(axis=(1, 2)).min() > 0.01  # every row


def test_balanced_sampling_oversamples_the_rare_class(record_dirs):
  config = make_config(record_dirs, train_dir=record_dirs["rare"], balanced_sampling=True)
  ids = sum((clip_ids(b) for b in take(
      input_lib.InputPipeline(config, "train", process_index=0, process_count=1), 10)), [])
  # Weights: 1000 / 19.01 for class 0 (19 clips), 1000 / 1.01 for the class-1 clip: that clip
  # is drawn about half the time, against 1 / 20 without balancing.
  assert 0.3 < ids.count(19) / len(ids) < 0.7
  plain = sum((clip_ids(b) for b in take(input_lib.InputPipeline(
      make_config(record_dirs, train_dir=record_dirs["rare"]), "train", process_index=0,
      process_count=1), 10)), [])
  assert plain.count(19) == 2


def _label_only_records(directory, labels: list[list[int]], num_shards: int) -> tuple[str, ...]:
  """Records holding only their labels (all that balanced sampling reads of a record) and
  their clip's index i (as video_id), clip i in shard i % num_shards."""
  os.makedirs(directory, exist_ok=True)
  paths = []
  for shard in range(num_shards):
    paths.append(os.path.join(directory, f"labels-{shard}.tfrecord"))
    with tf.io.TFRecordWriter(paths[-1]) as writer:
      for clip in range(shard, len(labels), num_shards):
        feature = {records.LABELS: tf.train.Feature(
            int64_list=tf.train.Int64List(value=labels[clip])),
                   records.VIDEO_ID: tf.train.Feature(
                       bytes_list=tf.train.BytesList(value=[str(clip).encode()]))}
        writer.write(tf.train.Example(
            features=tf.train.Features(feature=feature)).SerializeToString())
  return tuple(paths)


# Skewed (label counts 320, 84, 10), with multi-label clips whose weights add up.
SKEWED_LABELS = [[0]] * 300 + [[1]] * 60 + [[2]] * 6 + [[0, 1]] * 20 + [[1, 2]] * 4


def _label_only_sampler(directory, labels: list[list[int]], num_shards: int):
  """(files, HostRecords, weights, multi-hot labels) of `_label_only_records`' records of
  `labels`, the last two in the sampler's clip order (shard by shard): a clip's weight is the
  original's, the sum over its labels of 1000 / (label count + 0.01)."""
  files = _label_only_records(directory, labels, num_shards)
  counts = np.bincount(sum(labels, []))
  sampler = dataset.HostRecords.scan(
      files, [len(labels[i::num_shards]) for i in range(num_shards)], counts,
      records.parse_labels)
  order = sorted(range(len(labels)), key=lambda i: (i % num_shards, i))
  weights = np.array([sum(1000 / (counts[k] + 0.01) for k in labels[i]) for i in order])
  multi_hot = np.zeros((len(labels), len(counts)))
  for row, i in enumerate(order):
    multi_hot[row, labels[i]] = 1
  return files, sampler, weights, multi_hot


def test_balanced_sampling_class_frequencies_follow_the_weights(tmp_path):
  labels = SKEWED_LABELS
  files, sampler, clip_weights, multi_hot = _label_only_sampler(str(tmp_path), labels, 3)
  classes = multi_hot.shape[1]
  # The original draws clips with probability proportional to their weights.
  expected = clip_weights @ multi_hot / clip_weights.sum()  # P(a draw carries class k)
  plain = multi_hot.sum(0) / len(labels)
  assert np.max(np.abs(plain / expected - 1)) > 0.5  # without balancing this test fails

  config = dataset.DataConfig(batch_size=4, shuffle_buffer=16, balanced_sampling=True)
  # 25,000 draws: each class count has a relative spread 1 / sqrt(draws * p) <= 1.1% (the
  # tolerance below is 3.6 of it; without balancing, class 2 is off by more than 50%).
  draws = 25_000
  spec = {records.LABELS: records.feature_spec()[records.LABELS]}

  def count(state, batch):  # (last epoch seen, draws carrying each class)
    epochs, _, serialized = batch
    carried = tf.sparse.to_indicator(tf.io.parse_example(serialized, spec)[records.LABELS], classes)
    return (tf.maximum(state[0], tf.reduce_max(epochs)),
            state[1] + tf.reduce_sum(tf.cast(carried, tf.int64), axis=0))

  stream = dataset.training_records(files, 0, config, sampler).take(draws).batch(10_000)
  epochs, totals = stream.reduce((tf.constant(-1, tf.int64), tf.zeros([classes], tf.int64)), count)
  observed = totals.numpy() / draws
  # As many draws per epoch as clips (the original's num_samples = len(dataset)).
  assert int(epochs) + 1 == math.ceil(draws / len(labels))
  np.testing.assert_allclose(observed, expected, rtol=0.04)
  print("relative error of the class frequencies:", np.round(observed / expected - 1, 4))


def test_balanced_draws_pick_each_clip_in_proportion_to_its_weight(tmp_path):
  # The draws alone (no records read), 1,000,740 of them in 2,566 epochs: each clip's count
  # against its weight's share (chi-square over the 390 clips), and each class's frequency to
  # 0.7% (3.8 times its spread; the end-to-end test above reads 25,000 records at 4%).
  labels = SKEWED_LABELS
  _, sampler, weights, multi_hot = _label_only_sampler(str(tmp_path), labels, 3)
  epochs = 2_566
  seed = tf.constant([0, 7], tf.int64)
  drawn = tf.data.Dataset.range(epochs).map(lambda e: sampler.balanced_draws(e, seed)).reduce(
      tf.zeros([len(labels)], tf.int64),
      lambda total, clips: total + tf.math.bincount(clips, minlength=len(labels),
                                                    dtype=tf.int64)).numpy()
  draws = epochs * len(labels)
  assert drawn.sum() == draws
  expected = weights / weights.sum() * draws
  chi_square = np.sum((drawn - expected) ** 2 / expected)  # 389 degrees of freedom
  assert chi_square < 389 + 5 * np.sqrt(2 * 389), chi_square
  np.testing.assert_allclose(drawn @ multi_hot / draws,
                             weights @ multi_hot / weights.sum(), rtol=0.007)
  # Draws landing one interval off (each clip with its neighbour's share) would be caught.
  shifted = np.roll(expected, 1)
  assert np.sum((drawn - shifted) ** 2 / shifted) > 10 * chi_square


def test_balanced_sampling_spreads_a_clip_over_the_epoch(tmp_path):
  """Draws are independent, as the original's WeightedRandomSampler's: a clip drawn about 10
  times in an epoch of 200 shows up all over it (expected span of its positions ~ 9/11 of the
  epoch). Before, a clip's copies were emitted together into the shuffle buffer (16 here), so
  they came within a few dozen positions of each other."""
  labels = [[0]] * 190 + [[1]] * 10  # each class-1 clip: weight 1000 / 10.01, p ~ 0.05
  files, sampler, weights, _ = _label_only_sampler(str(tmp_path), labels, 4)
  np.testing.assert_allclose(np.diff(sampler.cumulative_weight, prepend=0), weights)
  config = dataset.DataConfig(batch_size=4, shuffle_buffer=16, balanced_sampling=True)
  epochs = 5
  stream = dataset.training_records(files, 0, config, sampler).take(epochs * 200)
  spec = {records.VIDEO_ID: tf.io.FixedLenFeature([], tf.string)}
  positions: dict[tuple[int, int], list[int]] = {}  # (epoch, clip): where it was drawn
  for epoch, position, serialized in stream.as_numpy_iterator():
    clip = int(tf.io.parse_single_example(serialized, spec)[records.VIDEO_ID].numpy())
    positions.setdefault((int(epoch), clip), []).append(int(position))
  rare = {key: where for key, where in positions.items() if key[1] >= 190}
  assert sum(map(len, rare.values())) == pytest.approx(epochs * 100, rel=0.2)  # half of all
  spans = [(max(where) - min(where)) / 200 for where in rare.values() if len(where) >= 5]
  assert len(spans) >= 30 and np.mean(spans) > 0.6, spans


def test_exact_shuffle_reads_every_clip_once_per_epoch_in_a_fresh_order(record_dirs):
  config = make_config(record_dirs, exact_shuffle=True)  # 10 clips in 3 shards, batches of 4
  pipeline = input_lib.InputPipeline(config, "train", process_index=0, process_count=1, seed=3)
  ids = sum((clip_ids(b) for b in take(pipeline, 10)), [])  # 4 epochs
  epochs = [ids[i:i + 10] for i in range(0, 40, 10)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(10))
  assert len({tuple(epoch) for epoch in epochs}) == 4
  # The order is the permutation's, whatever the shuffle buffer: with a buffer of 1 the
  # streamed shards come in file order, the permutation does not.
  def first_epoch(**overrides):
    return sum((clip_ids(b) for b in take(input_lib.InputPipeline(
        make_config(record_dirs, **overrides), "train", process_index=0, process_count=1,
        seed=3), 5)), [])[:10]
  assert first_epoch(exact_shuffle=True, shuffle_buffer=1) == epochs[0]
  assert first_epoch(shuffle_buffer=1) != epochs[0]
  state = pipeline.get_state()
  expected = take(pipeline, 3)
  resumed = input_lib.InputPipeline(config, "train", process_index=0, process_count=1, seed=3)
  resumed.set_state(json.loads(json.dumps(state)))
  for want, got in zip(expected, take(resumed, 3)):
    np.testing.assert_array_equal(want["audio"], got["audio"])
    np.testing.assert_array_equal(want["image"], got["image"])
  with pytest.raises(ValueError, match="config.data.exact_shuffle=True: balanced_sampling"):
    input_lib.InputPipeline(make_config(record_dirs, exact_shuffle=True,
                                        balanced_sampling=True), "train",
                            process_index=0, process_count=1)


def _copy_records(source: str, destination) -> str:
  destination.mkdir()
  for name in os.listdir(source):
    (destination / name).write_bytes(open(os.path.join(source, name), "rb").read())
  return str(destination)


def test_reads_at_offsets_fail_on_a_shard_cut_after_its_records_were_found(record_dirs,
                                                                          tmp_path):
  """A shard that loses its last record while a run reads it at offsets: the read finds no
  record there and the run stops naming the shard (it dropped the clip silently, and the
  epoch came out one clip short)."""
  train = _copy_records(record_dirs["train"], tmp_path / "train")
  pipeline = input_lib.InputPipeline(make_config(record_dirs, train_dir=train,
                                                 exact_shuffle=True),
                                     "train", process_index=0, process_count=1)
  next(pipeline)
  shard = os.path.join(train, "clips-00001-of-00003.tfrecord")
  last = list(tf.data.TFRecordDataset(shard).as_numpy_iterator())[-1]
  data = open(shard, "rb").read()
  open(shard, "wb").write(data[:len(data) - len(last) - records.TFRECORD_FRAMING_BYTES])
  with pytest.raises(input_lib.RecordReadError,
                     match=r"clips-00001-of-00003\.tfrecord is damaged: holds 2 records"):
    take(pipeline, 10)


def test_a_sidecar_that_does_not_describe_its_shard_is_named(record_dirs, tmp_path):
  train = _copy_records(record_dirs["train"], tmp_path / "train")
  shard = os.path.join(train, "clips-00001-of-00003.tfrecord")
  stored = list(tf.data.TFRecordDataset(shard).as_numpy_iterator())
  sizes = [len(serialized) for serialized in stored]
  labels = [records.parse_labels(serialized).numpy().tolist() for serialized in stored]
  config = make_config(record_dirs, train_dir=train, exact_shuffle=True)

  def with_sidecar(record_bytes, record_labels):
    with open(shard + records.SIDECAR_SUFFIX, "w") as f:
      json.dump({records.RECORD_BYTES: record_bytes, records.RECORD_LABELS: record_labels}, f)
    return input_lib.InputPipeline(config, "train", process_index=0, process_count=1)

  # A class the split does not have: the sidecar is not used, the shard is read.
  take(with_sidecar(sizes, [[99]] + labels[1:]), 5)
  # Sizes that add up to the file's size but are wrong: the run names the sidecar.
  wrong = [sizes[0] + 100, sizes[1] - 100] + sizes[2:]
  with pytest.raises(input_lib.RecordReadError, match=r"clips-00001-of-00003\.tfrecord\.json "
                     r"does not describe its shard: record 0 is \d+ bytes"):
    take(with_sidecar(wrong, labels), 5)


def test_mixup_partners_are_drawn_uniformly_from_all_clips(tmp_path):
  """As the original's loader: a clip is mixed with probability p, with a partner drawn
  uniformly from the whole training set, also under balanced sampling (whose draws favour the
  rare class); an unmixed clip reads no partner. Before, the partner was the next clip of the
  batch, so under balanced sampling partners were balanced too."""
  labels = [[0]] * 36 + [[1]] * 4
  files = _label_only_records(str(tmp_path), labels, num_shards=4)
  counts = np.bincount(sum(labels, []), minlength=2)
  host = dataset.HostRecords.scan(files, [10] * 4, counts, records.parse_labels)
  config = dataset.DataConfig(batch_size=4, balanced_sampling=True, mixup=0.5)
  seed = dataset._base_seed(0)
  stream = host.with_mixup_partners(dataset.training_records(files, 0, config, host),
                                    0.5, seed, reads_in_flight=16).take(8000)
  spec = {records.VIDEO_ID: tf.io.FixedLenFeature([], tf.string)}
  clip_of = lambda serialized: int(tf.io.parse_single_example(serialized, spec)[
      records.VIDEO_ID].numpy())
  mixed, firsts, partners = 0, [], []
  for _, _, serialized, is_mixed, partner in stream.as_numpy_iterator():
    firsts.append(clip_of(serialized))
    assert bool(is_mixed) == (partner != b"")
    if is_mixed:
      mixed += 1
      partners.append(clip_of(partner))
  assert mixed == pytest.approx(4000, rel=0.05)
  # Drawn clips: half of class 1 (balanced); partners: 4 of 40 of class 1 (uniform).
  assert np.mean(np.array(firsts) >= 36) == pytest.approx(0.5, abs=0.03)
  assert np.mean(np.array(partners) >= 36) == pytest.approx(0.1, abs=0.02)
  per_clip = np.bincount(partners, minlength=40)
  assert per_clip.min() > 0.6 * len(partners) / 40 and per_clip.max() < 1.4 * len(partners) / 40


def test_balanced_sampling_scan_names_a_short_shard_and_unlabeled_clips(tmp_path):
  files = _label_only_records(str(tmp_path / "a"), [[0], [1], [0]], num_shards=2)
  with pytest.raises(tf.errors.DataLossError, match=r"labels-1\.tfrecord holds 1 records, the "
                     "index lists 2"):
    dataset.HostRecords.scan(files, [2, 2], [2, 1], records.parse_labels)
  files = _label_only_records(str(tmp_path / "b"), [[], []], num_shards=1)
  with pytest.raises(ValueError, match="balanced_sampling=True: .* have no labels"):
    dataset.training_records(files, 0, dataset.DataConfig(batch_size=2, balanced_sampling=True),
                             dataset.HostRecords.scan(files, [2], [0, 0], records.parse_labels))


def test_balanced_weights_follow_the_original():
  weights = dataset.class_sampling_weights([10, 0, 3])
  np.testing.assert_allclose(weights, [1000 / 10.01, 1000 / 0.01, 1000 / 3.01])


def test_training_augmentation_with_waveform_mixup_and_smoothing(record_dirs):
  config = make_config(record_dirs, train_dir=record_dirs["wave"], mixup=1.0,
                       mixup_on="waveform", label_smooth=0.1, freqm=8, timem=16, noise=True,
                       fbank_stats="index")
  batch = next(input_lib.InputPipeline(config, "train", process_index=0, process_count=1))
  assert batch["audio"].shape == (4, 1024, 128) and np.isfinite(batch["audio"]).all()
  assert set(batch) == {"audio", "image", "label", "valid", "frame_index"}
  # Every clip is mixed (its partner may share its class): the labels still sum to 1.
  np.testing.assert_allclose(batch["label"].sum(axis=1), 1.0, rtol=1e-5)
  assert ((batch["label"] > 0.1) & (batch["label"] < 0.9)).sum() >= 2
  # The fbank is recomputed from the mixed waveform: no longer the constant clip value.
  assert batch["audio"].reshape(4, -1).std(axis=1).min() > 0.1


def test_bad_config_fails_naming_the_field(record_dirs, tmp_path):
  cases = [
      (dict(train_dir=str(tmp_path / "missing")), "config.data.train_dir"),
      (dict(train_dir=str(tmp_path)), "config.data.train_dir"),
      (dict(batch_size=6), "config.data.batch_size"),
      (dict(mixup_on="spectrum"), "config.data.mixup_on"),
      (dict(mixup=1.5), "config.data.mixup"),
      (dict(fbank_std=None), "config.data.fbank_std"),
      (dict(fbank_stats="audioset"), "config.data.fbank_stats"),
      (dict(train_dir=""), "config.data.train_dir"),  # no records and no TFDS dataset
      (dict(train_dir="", tfds_name="cav_mae_clips/none", tfds_data_dir=str(tmp_path)),
       "config.data.tfds_name"),
      (dict(eval_frame=10), "config.data.eval_frame"),
      (dict(label_smooth=1.0), "config.data.label_smooth"),
      (dict(shuffle_buffr=3), "shuffle_buffr"),
      (dict(mixup=0.5, mixup_on="waveform"), "config.data.mixup_on"),  # no waveforms stored
  ]
  for overrides, field in cases:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
      dataset.make_dataset(make_config(record_dirs, **overrides), "train", process_index=0,
                           process_count=4)
  config = make_config(record_dirs)
  config.model.audio_length = 512
  with pytest.raises(ValueError, match="audio_length"):
    input_lib.InputPipeline(config, "train", process_index=0, process_count=1)
  with pytest.raises(ValueError, match="split"):
    input_lib.InputPipeline(make_config(record_dirs), "test", process_index=0, process_count=1)


def test_index_stats_are_the_training_index_for_every_split(record_dirs, caplog):
  # fbank_mean/std are unused with 'index' (None would be refused with 'fixed').
  config = make_config(record_dirs, fbank_stats="index", fbank_mean=None, fbank_std=None)
  train = records.open_records_dir(record_dirs["train"])  # clips 0..9: mean 4.5
  assert train.fbank_mean != records.open_records_dir(record_dirs["eval"]).fbank_mean
  with caplog.at_level("INFO", logger=input_lib.logger.name):
    pipelines = [input_lib.InputPipeline(config, split, process_index=0, process_count=1)
                 for split in ("train", "train", "eval")]
  for pipeline in pipelines:
    normalization = pipeline.fbank_normalization
    assert (normalization.mean, normalization.std) == (train.fbank_mean, train.fbank_std)
    assert "fbank_stats='index'" in normalization.origin
    assert record_dirs["train"] in normalization.origin
  logged = [r.getMessage() for r in caplog.records if "fbank normalization" in r.getMessage()]
  assert len(logged) == 2 and logged[0].startswith("split 'train'")  # once per split
  # Eval clips in file order (shards 0,3,6 | 1,4 | 2,5): each fbank is its constant clip id.
  audio = next(pipelines[2])["audio"]
  np.testing.assert_allclose(audio[:, 0, 0], (np.array([0, 3, 6, 1]) - train.fbank_mean) /
                             train.fbank_std, rtol=1e-6)
  fixed = input_lib.InputPipeline(make_config(record_dirs), "eval", process_index=0,
                                  process_count=1)
  assert (fixed.fbank_normalization.mean, fixed.fbank_normalization.std) == (0.0, 1.0)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_an_evaluator_reading_another_directory_keeps_the_runs_normalization(record_dirs, split):
  from cav_mae_jax.eval import common  # pylint: disable=g-import-not-at-top
  config = make_config(record_dirs, fbank_stats="index", fbank_mean=None, fbank_std=None)
  config.seed = 0
  train = records.open_records_dir(record_dirs["train"])
  other = records.open_records_dir(record_dirs["rare"])  # clips 0..19: mean 9.5
  assert other.fbank_mean != train.fbank_mean
  pipeline = common.records_batch_source(config)(split, record_dirs["rare"], 4)
  normalization = pipeline.fbank_normalization
  assert (normalization.mean, normalization.std) == (train.fbank_mean, train.fbank_std)
  assert record_dirs["train"] in normalization.origin
  # Rare clips in file order (shards 0,2,4.. | 1,3,..): each fbank is its constant clip id.
  audio = next(pipeline)["audio"]
  np.testing.assert_allclose(audio[:, 0, 0], (np.array([0, 2, 4, 6]) - train.fbank_mean) /
                             train.fbank_std, rtol=1e-6)


def test_an_evaluation_batch_larger_than_the_clips_is_cut_without_opening_the_split_again(
    record_dirs, monkeypatch):
  from cav_mae_jax.eval import common  # pylint: disable=g-import-not-at-top
  config = make_config(record_dirs)
  config.seed = 0
  loads = []
  load_split = dataset.load_split
  monkeypatch.setattr(dataset, "load_split", lambda *a: loads.append(a[1]) or load_split(*a))
  pipeline = common.records_batch_source(config)("eval", "", 64)  # 7 clips
  devices = jax.device_count()
  cut = max(devices, -(-7 // devices) * devices)  # rows for 7 clips, in whole devices
  assert (pipeline.batch_size, pipeline.host_batch, pipeline.num_batches) == (cut, cut, 1)
  assert loads == ["eval"]
  batches = list(pipeline)
  assert len(batches) == 1 and batches[0]["valid"].sum() == 7
  assert sorted(np.asarray(clip_ids(batches[0]))[batches[0]["valid"]]) == list(range(7))
  # A pipeline is cut before it starts only.
  pipeline.reset()
  next(pipeline)
  assert loads == ["eval"]  # nor for its passes (each evaluation opened the split again)
  with pytest.raises(ValueError, match="has started"):
    pipeline.with_batch_size(4)


def test_same_train_and_eval_clips_warn(record_dirs, caplog):
  with caplog.at_level("WARNING", logger=dataset.logger.name):
    dataset.check_data_sources(make_config(record_dirs))
    assert not caplog.records
    dataset.check_data_sources(make_config(record_dirs, eval_dir=record_dirs["train"] + "/"))
  assert len(caplog.records) == 1
  assert "the eval split is the training clips" in caplog.records[0].getMessage()
  # An evaluation alone (tools/evaluate.py) warns too; it said nothing. A training split that
  # cannot be read there is not compared.
  caplog.clear()
  with caplog.at_level("WARNING", logger=dataset.logger.name):
    dataset.check_data_sources(make_config(record_dirs, eval_dir=record_dirs["train"]),
                               training=False)
    assert len(caplog.records) == 1
    dataset.check_data_sources(make_config(record_dirs, train_dir="/no/records"), training=False)
  assert len(caplog.records) == 1


@pytest.mark.parametrize("shards, listed", [(1, [3]), (2, [1, 2])])
def test_an_eval_shard_with_records_the_index_does_not_list_stops_the_pass(tmp_path, shards,
                                                                           listed):
  """The padding was counted from the index while the shard's records ran on: clips the index
  does not list were scored, and listed ones fell off the last batch, without a word."""
  directory = str(tmp_path / "eval")
  write_records(directory, [[i % 3] for i in range(4)], num_shards=shards)
  index_path = os.path.join(directory, records.INDEX_FILE)
  index = json.load(open(index_path))
  for shard, count in zip(index["shards"], listed):
    shard["num_examples"] = count
  index["num_examples"] = sum(listed)
  json.dump(index, open(index_path, "w"))
  config = make_config({"train": directory, "eval": directory}, batch_size=4)
  dataset.check_data_sources(config, training=False)  # no sidecars: the sizes cannot tell
  pipeline = input_lib.InputPipeline(config, "eval", training=False, process_index=0,
                                     process_count=1)
  with pytest.raises(input_lib.RecordReadError,
                     match=r"clips-00000-of-0000\d\.tfrecord is damaged: holds \d records, the "
                     r"index lists \d"):
    list(pipeline)


def test_an_eval_shard_of_the_wrong_size_is_refused_before_the_run(record_dirs, tmp_path):
  """A training run checked only its training shards' sizes: an eval shard that its index
  miscounts stopped the run at its first evaluation."""
  damaged = tmp_path / "eval"
  shutil.copytree(record_dirs["eval"], damaged)
  shard = sorted(damaged.glob("*.tfrecord"))[0]
  serialized = [x.numpy() for x in tf.data.TFRecordDataset(str(shard))]
  records.write_record_layout(str(shard))
  with tf.io.TFRecordWriter(str(shard)) as writer:
    for record in serialized[:-1]:
      writer.write(record)
  for training in (True, False):
    with pytest.raises(ValueError, match=rf"shard {shard} is damaged: holds "
                       rf"{len(serialized) - 1} records, the index lists {len(serialized)} "):
      dataset.check_data_sources(make_config(record_dirs, eval_dir=str(damaged)),
                                 training=training)


def test_a_training_shard_of_the_wrong_size_is_refused_before_training(record_dirs, tmp_path):
  # Cut at a record boundary (or emptied), it read without an error: the run found it when an
  # epoch ended short, an epoch of AudioSet-2M after it started.
  damaged = tmp_path / "train"
  shutil.copytree(record_dirs["train"], damaged)
  shard = damaged / "clips-00001-of-00003.tfrecord"
  serialized = [x.numpy() for x in tf.data.TFRecordDataset(str(shard))]
  records.write_record_layout(str(shard))  # its sidecar: each record's size
  with tf.io.TFRecordWriter(str(shard)) as writer:
    for record in serialized[:-1]:
      writer.write(record)
  with pytest.raises(ValueError, match=rf"shard {shard} is damaged: holds "
                     rf"{len(serialized) - 1} records, the index lists {len(serialized)} "):
    dataset.check_data_sources(make_config(record_dirs, train_dir=str(damaged)))
  # A whole shard with a sidecar of another version of it: not believed, its records counted.
  with tf.io.TFRecordWriter(str(shard)) as writer:
    for record in serialized:
      writer.write(record + b"x")  # other sizes, the same count
  dataset.check_data_sources(make_config(record_dirs, train_dir=str(damaged)))
  os.remove(str(shard) + records.SIDECAR_SUFFIX)  # without one: the smallest size records take
  shard.write_bytes(b"")
  with pytest.raises(ValueError, match=rf"shard {shard} is damaged: is 0 bytes, too small for the "
                     f"{len(serialized)} records"):
    dataset.check_data_sources(make_config(record_dirs, train_dir=str(damaged)))
  dataset.check_data_sources(make_config(record_dirs, train_dir=str(damaged)), training=False)


def test_uneven_training_shares_of_the_processes_warn(record_dirs, caplog):
  """10 clips in 3 shards (4, 3, 3): processes read shards 0 and 2 (7 clips) and 1 (3), and add
  as many clips to every batch, so process 1's clips are drawn 7/3 times as often."""
  with caplog.at_level("WARNING", logger=dataset.logger.name):
    dataset.check_data_sources(make_config(record_dirs), process_count=1)
    dataset.check_data_sources(make_config(record_dirs, train_dir=record_dirs["rare"]),
                               process_count=2)  # 20 clips in 2 shards: even
    assert not caplog.records
    dataset.check_data_sources(make_config(record_dirs), process_count=2)
  assert len(caplog.records) == 1
  assert ("give the 2 processes 3 to 7 training clips, so a clip of a process with fewer is "
          "drawn up to 2.33x as often; write a multiple of 2 shards"
          ) in caplog.records[0].getMessage()


def test_a_missing_split_names_the_evaluator_that_reads_it(record_dirs):
  config = make_config(record_dirs, eval_dir="")
  config.evals = ml_collections.ConfigDict({"val": {"type": "losses", "split": "eval", "dir": ""}})
  with pytest.raises(ValueError, match=re.escape(
      "config.data.eval_dir='': no records directory given (or set config.data.tfds_name to "
      "read split config.data.tfds_eval_split of a TFDS dataset) (read by evaluator "
      "config.evals.val; --config.evals.val=None removes it)")):
    dataset.check_data_sources(config)


def test_a_losses_evaluator_without_one_full_batch_is_refused(record_dirs):
  # Its losses are means over full batches: on 7 clips at batch 8 it reported only
  # `val/full_batches 0`, no loss and no word why.
  config = make_config(record_dirs)
  config.evals = ml_collections.ConfigDict({"val": {"type": "losses", "split": "eval", "dir": "",
                                                    "batch_size": 8}})
  with pytest.raises(ValueError, match=re.escape(
      "config.evals.val.batch_size=8: the losses evaluator scores full batches only, and "
      f"records directory {record_dirs['eval']} has 7 clips")):
    dataset.check_data_sources(config)
  config.evals.val.batch_size = 7
  dataset.check_data_sources(config)
  # On 2 processes the shards (3, 2, 2 clips) give 5 and 2 clips: at batch 6 (3 a process) the
  # second process's part is never full, so no global batch is.
  config.evals.val.batch_size = 6
  dataset.check_data_sources(config)
  with pytest.raises(ValueError, match=re.escape(
      "config.evals.val.batch_size=6: the losses evaluator scores full batches only (every "
      "process's 3 clips), and the shard files of records directory "
      f"{record_dirs['eval']} give the 2 processes 2 clips at the least")):
    dataset.check_data_sources(config, process_count=2)
  config.evals.val.batch_size = 4
  dataset.check_data_sources(config, process_count=2)
  config.evals.val.update(type="retrieval", batch_size=8)  # scores every clip: fine
  dataset.check_data_sources(config)


def test_index_statistics_without_spread_are_refused(record_dirs, tmp_path):
  # One clip of a constant fbank: std 0, and every clip would normalize to inf / NaN.
  flat = write_records(str(tmp_path / "flat"), [[0]], 1)
  config = make_config({**record_dirs, "train": flat}, fbank_stats="index", fbank_mean=None,
                       fbank_std=None)
  for check in (dataset.fbank_normalization, dataset.check_data_sources):
    with pytest.raises(ValueError, match=r"config.data.fbank_stats='index': the fbank "
                       r"statistics of records directory .*flat are mean 0.0, std 0.0"):
      check(config)


def test_a_class_count_other_than_the_models_is_named(record_dirs):
  # A fine-tuning head of 5 classes on clips of 8 was a shape error with a traceback, at trace
  # time of the loss (`mul got incompatible shapes for broadcasting: (16, 8), (16, 5)`).
  dataset.check_data_sources(make_config(record_dirs), num_classes=NUM_CLASSES)
  with pytest.raises(ValueError, match=re.escape(
      f"config.model.num_classes={NUM_CLASSES + 1}: the clips of records directory "
      f"{record_dirs['train']} have {NUM_CLASSES} classes")):
    dataset.check_data_sources(make_config(record_dirs), num_classes=NUM_CLASSES + 1)


def test_measure_input_counts_samples_per_wall_and_cpu_second(record_dirs):
  result = input_lib.measure_input(make_config(record_dirs, noise=True), num_batches=3)
  assert result["samples"] == 12
  assert 0 < result["samples_per_second"] < 1e7 and 0 < result["samples_per_cpu_second"] < 1e7
  assert result["cpu_cores_used"] == pytest.approx(
      result["samples_per_second"] / result["samples_per_cpu_second"])


def test_a_damaged_shard_fails_naming_the_file(record_dirs, tmp_path):
  def truncate(data: bytes) -> bytes:  # ends cleanly after the first record: no read error
    return data[:len(data) // 2]

  def corrupt(data: bytes) -> bytes:  # a flipped byte inside a record: checksum error
    middle = len(data) // 4
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]

  for damage in (truncate, corrupt):
    damaged = tmp_path / damage.__name__
    damaged.mkdir()
    for name in os.listdir(record_dirs["eval"]):
      data = open(os.path.join(record_dirs["eval"], name), "rb").read()
      if name.startswith("clips-00001"):
        data = damage(data)
      (damaged / name).write_bytes(data)
    config = make_config(record_dirs, eval_dir=str(damaged))
    with pytest.raises(input_lib.RecordReadError, match="clips-00001-of-00003.tfrecord") as info:
      list(input_lib.InputPipeline(config, "eval", process_index=0, process_count=1))
    # Bad input, which the tools print as one `error:` line (an OSError), in TF's own words only.
    assert isinstance(info.value, OSError)
    if damage is corrupt:
      assert re.search(r"clips-00001-of-00003\.tfrecord is damaged: corrupted record at \d+$",
                       str(info.value)), str(info.value)
  # Training notices the short epoch (6 of 7 clips) at its end; reading at offsets (balanced
  # sampling, exact shuffling, mixup partners) notices the short shard when it finds the records.
  for overrides in ({}, {"balanced_sampling": True}, {"exact_shuffle": True}, {"mixup": 0.5}):
    config = make_config(record_dirs, train_dir=str(tmp_path / "truncate"), **overrides)
    with pytest.raises(input_lib.RecordReadError, match="clips-00001-of-00003.tfrecord"):
      take(input_lib.InputPipeline(config, "train", process_index=0, process_count=1), 3)


def test_pipelines_are_traced_as_written_without_autograph(record_dirs, monkeypatch):
  """Autograph's rewrite of our tf.data functions (they have no Python control flow on
  tensors, so the graph is the same) took 1.3 s of every process's first pipeline build."""
  from tensorflow.python.autograph.impl import api  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.eval import clips  # pylint: disable=import-outside-toplevel
  converted = []
  convert = api._convert_actual  # pylint: disable=protected-access

  def recording_convert(entity, program_ctx):
    converted.append(f"{getattr(entity, '__module__', '?')}.{entity.__qualname__}")
    return convert(entity, program_ctx)

  monkeypatch.setattr(api, "_convert_actual", recording_convert)
  pipelines = [
      input_lib.InputPipeline(make_config(record_dirs), "train", process_index=0,
                              process_count=1),
      input_lib.InputPipeline(make_config(record_dirs, balanced_sampling=True, mixup=0.5,
                                          mixup_on="fbank"), "train", process_index=0,
                              process_count=1),
      input_lib.InputPipeline(make_config(record_dirs, exact_shuffle=True, noise=True, freqm=8,
                                          timem=16), "train", process_index=0, process_count=1),
      input_lib.InputPipeline(make_config(record_dirs, train_dir=record_dirs["wave"], mixup=1.0,
                                          mixup_on="waveform"), "train", process_index=0,
                              process_count=1),
      input_lib.InputPipeline(make_config(record_dirs), "eval", training=False,
                              process_index=0, process_count=1),
  ]
  for pipeline in pipelines:
    assert next(pipeline)["audio"].shape == (4, 1024, 128)
  subset = clips.record_batches(make_config(record_dirs), 4, video_ids=["clip1", "clip5"])
  assert sum(int(b["valid"].sum()) for b in subset) == 2
  ours = [name for name in converted if name.startswith(("cav_mae_jax", "test_"))]
  assert not ours, ours
