"""Tests for cav_mae_jax.data.records: serialize/parse round trip, stats and the index JSON."""
import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cav_mae_jax.data import records


def _jpeg(value: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((224, 224, 3), value, np.uint8)).save(buf, format="JPEG", quality=75)
  return buf.getvalue()


def _values(video_id="clip_0", labels=(2, 5), waveform=True, num_frames=1024, seed=0):
  rng = np.random.default_rng(seed)
  fbank = np.zeros((1024, 128), np.float32)
  fbank[:num_frames] = rng.normal(-5.0, 4.0, size=(min(num_frames, 1024), 128))
  return records.make_example_values(
      video_id=video_id,
      labels=list(labels),
      label_ids=[f"/m/{x}" for x in labels],
      fbank=fbank,
      fbank_num_frames=num_frames,
      jpeg_frames=[_jpeg(10 * i) for i in range(10)],
      frame_indices=[max(int(i * 50 / 10) - 1, 0) for i in range(10)],
      duration_s=10.0,
      source_sample_rate=44100,
      fps=5.0,
      frame_count=50,
      waveform=rng.integers(-2000, 2000, size=160000, dtype=np.int16) if waveform else None,
  )


def test_round_trip_inside_tf_data():
  values = _values()
  serialized = records.serialize_example(values)
  ds = tf.data.Dataset.from_tensor_slices([serialized]).map(
      lambda x: records.parse_example(x, with_waveform=True))
  parsed = next(iter(ds))
  assert parsed["fbank"].dtype == tf.float32 and parsed["fbank"].shape == (1024, 128)
  assert parsed["waveform"].dtype == tf.int16 and parsed["waveform"].shape == (160000,)
  assert parsed["labels"].dtype == tf.int64
  back = records.parsed_to_values(parsed)
  assert back.keys() == values.keys()
  np.testing.assert_array_equal(back["fbank"], values["fbank"])  # float16 exactly
  np.testing.assert_array_equal(back["waveform"], values["waveform"])
  np.testing.assert_array_equal(back["labels"], [2, 5])
  assert back["label_ids"] == ["/m/2", "/m/5"]
  assert back["frames"] == values["frames"]
  np.testing.assert_array_equal(back["frame_indices"], values["frame_indices"])
  assert (back["video_id"], back["fps"], back["frame_count"]) == ("clip_0", 5.0, 50)
  assert back["source_sample_rate"] == 44100 and back["fbank_num_frames"] == 1024


def test_serialized_bytes_do_not_depend_on_the_process():
  serialized = records.serialize_example(_values())
  example = tf.train.Example.FromString(serialized)
  # Map entries in sorted key order, whatever order this process's protobuf maps iterate in.
  assert serialized == example.SerializeToString(deterministic=True)


def test_rotation_is_stored_only_when_frames_were_turned():
  untagged = records.serialize_example(_values(waveform=False))
  assert b"rotation" not in untagged  # The bytes records had before the key existed.
  assert int(records.parse_example(tf.constant(untagged))["rotation"]) == 0
  values = _values(waveform=False)
  values["rotation"] = 270
  parsed = records.parse_example(tf.constant(records.serialize_example(values)))
  assert records.parsed_to_values(parsed)["rotation"] == 270


def test_parse_without_waveform_and_no_labels():
  values = _values(labels=(), waveform=False)
  parsed = records.parse_example(tf.constant(records.serialize_example(values)))
  assert "waveform" not in parsed
  assert parsed["labels"].shape == (0,) and parsed["label_ids"].shape == (0,)
  with pytest.raises(tf.errors.InvalidArgumentError, match="waveform"):
    records.parse_example(tf.constant(records.serialize_example(values)), with_waveform=True)


def test_ragged_labels_batch_after_parse():
  serialized = [records.serialize_example(_values(labels=l, waveform=False))
                for l in [(1,), (0, 3, 4)]]
  ds = tf.data.Dataset.from_tensor_slices(serialized).map(records.parse_example)
  ds = ds.map(lambda x: x["labels"]).ragged_batch(2)
  assert next(iter(ds)).to_list() == [[1], [0, 3, 4]]


@pytest.mark.parametrize("field,kwargs,match", [
    ("fbank", {"fbank": np.zeros((1000, 128))}, "shape"),
    ("fbank", {"fbank": np.full((1024, 128), np.nan)}, "non-finite"),
    ("labels", {"labels": [1]}, "label ids"),
    ("frames", {"jpeg_frames": [b"x"] * 9}, "10 frames"),
    ("waveform", {"waveform": np.zeros(10, np.float32)}, "int16"),
    ("rotation", {"rotation": -90}, "rotation"),
])
def test_make_example_values_rejects_bad_fields(field, kwargs, match):
  base = dict(video_id="v", labels=[], label_ids=[], fbank=np.zeros((1024, 128)),
              fbank_num_frames=1024, jpeg_frames=[b"j"] * 10, frame_indices=list(range(10)),
              duration_s=1.0, source_sample_rate=16000, fps=1.0, frame_count=10)
  base.update(kwargs)
  with pytest.raises(ValueError, match=match):
    records.make_example_values(**base)


def test_stats_use_valid_frames_and_merge_exactly():
  a, b = _values(num_frames=1024, seed=1), _values(labels=(5,), num_frames=98, seed=2)
  sa, sb = records.ShardStats(num_classes=8), records.ShardStats(num_classes=8)
  sa.add(a)
  sb.add(b)
  merged = sa.merge(sb)
  valid = np.concatenate([a["fbank"].astype(np.float64), b["fbank"][:98].astype(np.float64)])
  mean, std = merged.fbank_mean_std()
  assert mean == pytest.approx(valid.mean(), abs=1e-9)
  assert std == pytest.approx(valid.std(), abs=1e-9)
  assert merged.label_counts == [0, 0, 1, 0, 0, 2, 0, 0]
  assert merged.num_examples == 2
  with pytest.raises(ValueError, match="outside"):
    records.ShardStats(num_classes=3).add(a)


def test_index_round_trip_and_validation(tmp_path):
  stats = records.ShardStats(num_classes=8)
  stats.add(_values())
  shards = [records.ShardInfo("records-00000-of-00001.tfrecord", 1)]
  index = records.index_from_stats(shards, stats, store_waveform=True)
  path = records.index_path(str(tmp_path))
  records.write_index(path, index)
  assert records.read_index(path) == index
  assert records.read_index(path).shard_paths(str(tmp_path)) == [
      str(tmp_path / "records-00000-of-00001.tfrecord")]
  data = json.loads(open(path).read())
  data["num_examples"] = 2
  (tmp_path / "bad.json").write_text(json.dumps(data))
  with pytest.raises(ValueError, match="num_examples"):
    records.read_index(str(tmp_path / "bad.json"))
  with pytest.raises(ValueError, match="shard counts"):
    records.index_from_stats(shards * 2, stats, store_waveform=True)


def test_open_records_dir_checks_the_directory_in_one_line(tmp_path):
  stats = records.ShardStats(num_classes=8)
  stats.add(_values(waveform=False))
  good = tmp_path / "good"
  good.mkdir()
  with tf.io.TFRecordWriter(str(good / "records-00000-of-00001.tfrecord")) as writer:
    writer.write(records.serialize_example(_values(waveform=False)))
  index = records.index_from_stats([records.ShardInfo("records-00000-of-00001.tfrecord", 1)],
                                   stats, store_waveform=False)
  records.write_index(records.index_path(str(good)), index)
  assert records.open_records_dir(str(good)) == index
  assert [v["video_id"] for v in records.iter_examples(str(good))] == ["clip_0"]
  shard = good / "records-00000-of-00001.tfrecord"
  for held, serialized in ((0, b""), ("more than 1", shard.read_bytes() * 2)):
    intact = shard.read_bytes()
    shard.write_bytes(serialized)  # reads without an error: its count tells
    with pytest.raises(ValueError, match=f"shard {shard} is damaged: holds {held} records, "
                       "the index lists 1"):
      list(records.iter_examples(str(good)))
    shard.write_bytes(intact)

  (tmp_path / "plain").mkdir()
  (tmp_path / "file.txt").write_text("x")
  bad_json = tmp_path / "bad_json"
  bad_json.mkdir()
  (bad_json / records.INDEX_FILE).write_text("{not json")
  wrong_version = tmp_path / "wrong_version"
  wrong_version.mkdir()
  (wrong_version / records.INDEX_FILE).write_text(json.dumps({"format_version": 99}))
  no_shard = tmp_path / "no_shard"
  no_shard.mkdir()
  records.write_index(records.index_path(str(no_shard)), index)
  cases = {
      "": "no records directory given",
      str(tmp_path / "missing"): "directory does not exist",
      str(tmp_path / "file.txt"): "not a directory",
      str(tmp_path / "plain"): "no index.json: not a records directory",
      str(bad_json): "unreadable index.json: Expecting property name",
      str(wrong_version): "unreadable index.json: format_version 99",
      str(no_shard): "lists 1 shard file(s) that do not exist, e.g. records-00000-of-00001",
  }
  for directory, reason in cases.items():
    with pytest.raises(records.RecordsDirError) as error:
      records.open_records_dir(directory)
    message = str(error.value)
    assert reason in message and "\n" not in message, message
    assert message.startswith(directory), message
    assert isinstance(error.value, ValueError) and error.value.reason in message


def test_a_shard_count_off_the_index_is_called_truncated_only_when_short():
  assert records.count_problem(3, 4) == "holds 3 records, the index lists 4 (truncated file?)"
  assert records.count_problem(None, 4) == "holds more than 4 records, the index lists 4"
  assert records.count_problem(5, 4) == "holds 5 records, the index lists 4"
