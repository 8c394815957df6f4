"""Clip batches with ids: records (subset lists) and video files (decode, quarantine).

Records batches must equal the evaluation input pipeline's; video files must give what their
records give (the records written by the data tools from the same files).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cav_mae_jax.data import dataset
from cav_mae_jax.data import decode
from cav_mae_jax.data import fbank
from cav_mae_jax.data import input as input_lib
from cav_mae_jax.data import prepare
from cav_mae_jax.data import synthetic
from cav_mae_jax.eval import clips
from test_features import (  # pylint: disable=unused-import
    RECORD_ORDER, fixture_records_dir, tiny_config)

VIDEO_SECONDS = 2.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", name="videos")
def fixture_videos(tmp_path_factory):
  """Three short synthetic MP4s and the records tools/preprocess.py writes from them."""
  root = tmp_path_factory.mktemp("videos")
  data = synthetic.generate_dataset(root, num_clips=3, num_classes=2, duration_s=VIDEO_SECONDS,
                                    fps=10, width=64, height=48, split_name="eval")
  records_dir = str(root / "records")
  prepare.prepare_records(data["datafile"], data["labels_csv"], records_dir, num_workers=0,
                          examples_per_shard=2, progress=False)
  return data, records_dir


def test_record_batches_are_the_eval_pipelines_with_ids(records_dir):
  config = tiny_config(records_dir)
  ours = list(clips.record_batches(config, 4))
  theirs = list(input_lib.InputPipeline(config, "eval", training=False, batch_size=4,
                                        process_index=0, process_count=1))
  assert len(ours) == len(theirs) == 2
  for mine, reference in zip(ours, theirs):
    np.testing.assert_array_equal(mine["valid"], reference["valid"])
    np.testing.assert_array_equal(mine["audio"], reference["audio"])
    np.testing.assert_array_equal(mine["image"], reference["image"])
  ids = np.concatenate([b["video_id"] for b in ours])
  assert list(ids) == RECORD_ORDER + [""]


_ONE_BATCH_THEN_EXIT = """
import sys
from test_features import tiny_config
from cav_mae_jax.eval import clips
batches = clips.record_batches(tiny_config(sys.argv[1]), 4)
print(len(next(batches)["video_id"]))
"""


def test_a_program_may_end_with_record_batches_unfinished(records_dir):
  # The generator is closed as the program ends, after TensorFlow's modules are torn down:
  # its `except tf.errors.OpError` printed 'Exception ignored in ... AttributeError'.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
  done = subprocess.run([sys.executable, "-c", _ONE_BATCH_THEN_EXIT, records_dir], env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert (done.returncode, done.stdout) == (0, "4\n"), done.stderr[-3000:]
  assert "Exception ignored" not in done.stderr, done.stderr[-3000:]


def _rewrite_shard(path: str, keep: slice, extra: int = 0) -> None:
  """Rewrites a shard with only its records `keep` (cut at a record boundary: it still reads
  without an error) and its first record `extra` more times at the end."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  serialized = [x.numpy() for x in tf.data.TFRecordDataset(path)]
  with tf.io.TFRecordWriter(path) as writer:
    for record in serialized[keep] + serialized[:1] * extra:
      writer.write(record)


@pytest.mark.parametrize("shard,keep,extra,why", [
    (0, slice(0, 0), 0, "holds 0 records, the index lists 3"),
    (1, slice(0, 1), 0, "holds 1 records, the index lists 2"),
    (2, slice(None), 1, "holds more than 2 records, the index lists 2")])
def test_a_shard_holding_another_count_than_its_index_is_named(records_dir, tmp_path, shard,
                                                                keep, extra, why):
  # Cut at a record boundary (or emptied) a shard reads without an error: its clips were left
  # out (or others took their places) and features, retrieval and inpainting went on.
  from cav_mae_jax.eval import inpaint  # pylint: disable=g-import-not-at-top
  damaged = str(tmp_path / "records")
  shutil.copytree(records_dir, damaged)
  path = os.path.join(damaged, f"clips-{shard:05d}-of-00003.tfrecord")
  _rewrite_shard(path, keep, extra)
  config = tiny_config(damaged)
  message = rf"shard {path} is damaged: {why}"
  with pytest.raises(input_lib.RecordReadError, match=message):
    list(clips.record_batches(config, 4))
  with pytest.raises(input_lib.RecordReadError, match=message):
    list(clips.record_batches(config, 4, video_ids=["clip0"]))
  if shard == 0:  # the first clip would be shard 1's: refused before it is shown
    with pytest.raises(input_lib.RecordReadError, match=message):
      inpaint.record_clip(config, index=0)
  assert len(list(clips.record_batches(tiny_config(records_dir), 4))) == 2  # the intact copy


def test_subset_keeps_listed_clips_and_names_missing_ones(records_dir, tmp_path):
  config = tiny_config(records_dir)
  batches = list(clips.record_batches(config, 4, video_ids=["clip4", "clip0"]))
  assert len(batches) == 1
  assert list(batches[0]["video_id"]) == ["clip0", "clip4", "", ""]
  assert list(batches[0]["valid"]) == [True, True, False, False]
  with pytest.raises(ValueError, match="nope7, nope8"):
    list(clips.record_batches(config, 4, video_ids=["clip1", "nope7", "nope8"]))
  with pytest.raises(ValueError, match="empty"):
    list(clips.record_batches(config, 4, video_ids=[]))
  (tmp_path / "subset.json").write_text(json.dumps({"data": [{"video_id": "a"},
                                                             {"video_id": "b"}]}))
  (tmp_path / "subset.txt").write_text("# five per class\na\n\nb\na\n")
  assert clips.read_id_list(str(tmp_path / "subset.json")) == ["a", "b"]
  assert clips.read_id_list(str(tmp_path / "subset.txt")) == ["a", "b"]
  (tmp_path / "empty.txt").write_text("\n")
  with pytest.raises(ValueError, match="no clip ids"):
    clips.read_id_list(str(tmp_path / "empty.txt"))



def test_video_files_give_what_their_records_give(videos):
  data, records_dir = videos
  config = tiny_config(records_dir)
  listed = clips.list_videos(data["video_dir"])
  assert [c.video_id for c in listed] == [f"syn_eval_{i:05d}" for i in range(3)]
  from_videos = list(clips.video_batches(listed, config, 4, on_error=pytest.fail))
  from_records = list(clips.record_batches(config, 4))
  assert len(from_videos) == len(from_records) == 1
  by_id = {v: i for i, v in enumerate(from_records[0]["video_id"])}
  order = [by_id[v] for v in from_videos[0]["video_id"][:3]]
  np.testing.assert_array_equal(from_videos[0]["image"][:3], from_records[0]["image"][order])
  # Records hold float16 fbanks: 2**-7 at most on log-mel values under 16, / std.
  np.testing.assert_allclose(from_videos[0]["audio"][:3], from_records[0]["audio"][order],
                             atol=2**-7 / fbank.AUDIOSET_STD)
  assert list(from_videos[0]["valid"]) == [True, True, True, False]


def test_video_files_are_normalized_as_records_with_index_statistics(videos):
  # With fbank_stats='index' every split is normalized by the training split's statistics:
  # video files too (they were normalized by fbank_mean / fbank_std, AudioSet's, instead).
  data, records_dir = videos
  config = tiny_config(records_dir)
  config.data.train_dir = records_dir
  config.data.fbank_stats = "index"
  listed = clips.list_videos(data["video_dir"])
  from_videos = list(clips.video_batches(listed, config, 4, on_error=pytest.fail))[0]
  from_records = list(clips.record_batches(config, 4))[0]
  by_id = {v: i for i, v in enumerate(from_records["video_id"])}
  order = [by_id[v] for v in from_videos["video_id"][:3]]
  std = dataset.fbank_normalization(config).std
  assert abs(std - fbank.AUDIOSET_STD) > 0.1  # the test tells the two normalizations apart
  # The same values: the video path rounds the fbank to the record's float16 as well.
  np.testing.assert_allclose(from_videos["audio"][:3], from_records["audio"][order], atol=1e-6)


def test_short_audio_is_padded_as_the_original(videos):
  data, _ = videos
  config = tiny_config()
  data_config = clips.eval_data_config(config)
  preprocess = clips.eval_preprocess_fn(data_config, -5.081, 4.4849)
  path = clips.list_videos(data["video_dir"])[0].path
  audio = clips.video_inputs(path, data_config, preprocess)["audio"]
  frames = fbank.clip_fbank(decode.decode_audio(path)[0]).shape[0]
  assert 190 < frames < 220  # about 2 s
  assert audio.shape == (1024, 128)
  np.testing.assert_allclose(audio[frames:], (0 + 5.081) / 4.4849, rtol=1e-6)  # zero log-mel
  assert np.abs(audio[:frames] - (0 + 5.081) / 4.4849).min(axis=1).max() > 0.01
  # A shorter model window cuts the audio to what its frames see.
  config.model.audio_length = 96
  short = clips.video_inputs(path, clips.eval_data_config(config), preprocess)["audio"]
  np.testing.assert_allclose(short, audio[:96], atol=1e-5)


def test_the_originals_extracted_layout_gives_the_videos_inputs(videos, tmp_path):
  """A datafile of the original's extracted layout (audio file + frame folders) -> the inputs
  the video gives."""
  data, _ = videos
  video = clips.list_videos(data["video_dir"])[0]
  audio, frames_dir = synthetic.write_extracted_layout(video.path, str(tmp_path), "clip")
  datafile = tmp_path / "extracted.json"
  datafile.write_text(json.dumps({"data": [{"video_id": "clip", "wav": audio,
                                            "video_path": frames_dir, "labels": ""}]}))
  extracted, = clips.list_videos(str(datafile))
  assert (extracted.path, extracted.frames_dir) == (audio, frames_dir)
  data_config = clips.eval_data_config(tiny_config())
  preprocess = clips.eval_preprocess_fn(data_config, -5.081, 4.4849)
  ours = clips.video_inputs(extracted.path, data_config, preprocess, extracted.frames_dir,
                            extracted.video_id)
  theirs = clips.video_inputs(video.path, data_config, preprocess)
  for key in ("audio", "image"):
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_bad_videos_are_quarantined_or_fatal(videos, tmp_path):
  data, _ = videos
  good = clips.list_videos(data["video_dir"])[0]
  (tmp_path / "empty.mp4").write_bytes(b"")
  listing = tmp_path / "list.txt"
  listing.write_text(f"{good.path}\nmissing.mp4\nempty.mp4\n")
  listed = clips.list_videos(str(listing))
  assert [c.video_id for c in listed] == [good.video_id, "missing", "empty"]
  quarantine = clips.Quarantine(str(tmp_path / "quarantine.jsonl"))
  batches = list(clips.video_batches(listed, tiny_config(), 8, on_error=quarantine))
  assert list(batches[0]["valid"][:3]) == [True, False, False] and quarantine.count == 2
  lines = [json.loads(x) for x in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
  assert [(x["video_id"], x["reason"]) for x in lines] == [("missing", "missing_file"),
                                                           ("empty", "empty_file")]
  assert lines[0]["path"] == str(tmp_path / "missing.mp4")
  # The next run's list starts without the earlier one's lines, and is made at a bad clip only:
  # a list made at the start stayed behind a run that failed before any clip, and the rerun
  # was refused (an existing output).
  clean = clips.Quarantine(str(tmp_path / "quarantine.jsonl"))
  assert not os.path.exists(tmp_path / "quarantine.jsonl")
  list(clips.video_batches([good], tiny_config(), 8, on_error=clean))
  assert clean.count == 0 and not os.path.exists(tmp_path / "quarantine.jsonl")
  strict = clips.Quarantine(str(tmp_path / "unused.jsonl"), strict=True)
  with pytest.raises(ValueError, match="missing.mp4: missing_file"):
    list(clips.video_batches(listed, tiny_config(), 8, on_error=strict))
  assert not os.path.exists(tmp_path / "unused.jsonl")


def test_video_lists_name_their_problems(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such video"):
    clips.list_videos(str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match="lists no video files"):
    clips.list_videos(str(tmp_path))
  (tmp_path / "list.txt").write_text("a/x.mp4\nb/x.mp4\n")
  with pytest.raises(ValueError, match="repeated: x"):
    clips.list_videos(str(tmp_path / "list.txt"))
  # A directory lists its own video files: what it leaves out is said (its subfolders' videos
  # were left out without a word), and a video file given as the list is named as such.
  (tmp_path / "sub dir").mkdir()
  (tmp_path / "sub dir" / "a.mp4").write_bytes(b"")
  assert clips.unlisted_entries(str(tmp_path)) == (
      "not read: 1 subfolder(s) (sub dir; a directory lists its own video files, a text file of "
      "paths names files anywhere); 1 file(s) of other extensions")
  with pytest.raises(ValueError, match=r"lists no video files .*; not read: 1 subfolder\(s\)"):
    clips.list_videos(str(tmp_path))
  assert clips.unlisted_entries(str(tmp_path / "list.txt")) == ""
  (tmp_path / "clip.mp4").write_bytes(b"\x00\xff")
  assert [c.video_id for c in clips.list_videos(str(tmp_path))] == ["clip"]
  with pytest.raises(ValueError, match=r"clip.mp4: a video file, not a list: give a directory"):
    clips.list_videos(str(tmp_path / "clip.mp4"))
