"""Tests for the cav_mae_clips TFDS builder: one Beam DirectRunner build equals the tool's output
(examples, quarantine and the index's statistics), with Beam counters per split."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cav_mae_jax.data import clips
from cav_mae_jax.data import prepare
from cav_mae_jax.data import records
from cav_mae_jax.data import sources
from cav_mae_jax.data import splits
from cav_mae_jax.data import tfds_builder
from test_prepare import LABELS_CSV, write_clip, write_datafile, write_file


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory) -> str:
  """A manual dir for the `datafile` config: train.json (good, bad and repeated clips), test.json
  (one good clip, one missing) + labels."""
  root = tmp_path_factory.mktemp("manual")
  good_a = write_clip(str(root / "good_a.mp4"), seconds=3, seed=1)
  good_b = write_clip(str(root / "good_b.mp4"), seconds=1, seed=2)
  empty = str(root / "empty.mp4")
  open(empty, "wb").close()
  write_datafile(str(root / "train.json"), [
      ("a", "good_a.mp4", "/m/a"),  # relative to the datafile's folder
      ("b", good_b, "/m/b,/m/c"),
      ("empty", empty, "/m/a"),
      ("unknown", good_a, "/m/unknown"),
      ("c", good_a, "/m/c"),
      ("a", good_a, "/m/b")])  # a repeated id: quarantined, the first is written
  write_datafile(str(root / "test.json"), [("d", good_b, "/m/b"),
                                           ("gone", str(root / "gone.mp4"), "/m/a")])
  (root / tfds_builder.LABELS_CSV).write_text(LABELS_CSV)
  return str(root)


def _assert_same_examples(got: dict[str, dict], want: dict[str, dict]) -> None:
  assert sorted(got) == sorted(want)
  for video_id, example in want.items():
    assert got[video_id].keys() == example.keys(), video_id
    for key, value in example.items():
      if isinstance(value, np.ndarray):
        np.testing.assert_array_equal(got[video_id][key], value, err_msg=f"{video_id} {key}")
        assert got[video_id][key].dtype == value.dtype, (video_id, key)
      else:
        assert got[video_id][key] == value, (video_id, key)


@pytest.fixture(scope="module")
def tool_records(manual_dir, tmp_path_factory
                 ) -> tuple[dict[str, dict], set[tuple[str, str]], records.RecordIndex]:
  """tools/preprocess.py's examples (by video id), quarantine and index of train.json."""
  out = str(tmp_path_factory.mktemp("tool") / "records")
  prepare.prepare_records(os.path.join(manual_dir, "train.json"),
                          os.path.join(manual_dir, tfds_builder.LABELS_CSV), out,
                          num_workers=0, examples_per_shard=2, store_waveform=True,
                          progress=False)
  examples = {e["video_id"]: e for e in records.iter_examples(out)}
  with open(os.path.join(out, prepare.QUARANTINE)) as f:
    quarantine = {(q["video_id"], q["reason"]) for q in map(json.loads, f)}
  return examples, quarantine, records.open_records_dir(out)


def _beam_build(manual_dir: str, data_dir: str) -> tuple[tfds_builder.CavMaeClips, dict]:
  """Builds train.json of `manual_dir` with Beam's DirectRunner; returns examples by video id."""
  beam = pytest.importorskip("apache_beam", reason="the Beam build needs apache-beam")
  config = tfds_builder.ClipsConfig(name="datafile_waveform", source="datafile",
                                    store_waveform=True)
  builder = tfds_builder.builder(config, data_dir=data_dir)
  # What `tfds build --beam_pipeline_options=runner=DirectRunner` passes to the builder.
  options = beam.options.pipeline_options.PipelineOptions(flags=["--runner=DirectRunner"])
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, beam_options=options))
  examples = {}
  for example in tfds.as_numpy(builder.as_dataset(split="train")):
    values = records.parsed_to_values(example)
    examples[values["video_id"]] = values
  return builder, examples


def test_beam_build_equals_preprocess_tool(manual_dir, tool_records, tmp_path):
  from_tool, tool_quarantine, tool_index = tool_records
  builder, from_tfds = _beam_build(manual_dir, str(tmp_path / "tfds"))
  assert builder.beam_counters == {
      "train": {"written": 3, "quarantined_empty_file": 1, "quarantined_unknown_label": 1,
                "quarantined_duplicate_id": 1},
      "test": {"written": 1, "quarantined_missing_file": 1}}
  assert sorted(from_tool) == ["a", "b", "c"]
  assert from_tool["b"]["labels"].tolist() == [1, 2]
  _assert_same_examples(from_tfds, from_tool)
  tfds_quarantine = {(q["video_id"], q["reason"])
                     for q in tfds_builder.read_quarantine(builder.data_dir, "train")}
  assert tfds_quarantine == tool_quarantine == {("empty", "empty_file"),
                                                ("unknown", "unknown_label"),
                                                ("a", "duplicate_id")}
  # The statistics index.json holds, from the Beam combine, read back by a fresh builder
  # (TFDS's read-only builder for this custom config) through the input's split reader.
  split = splits.open_tfds_split("cav_mae_clips/datafile_waveform", "train",
                                 str(tmp_path / "tfds"))
  index = split.index
  assert (index.num_examples, index.num_classes, index.label_counts, index.fbank_stats_count,
          index.store_waveform) == (tool_index.num_examples, tool_index.num_classes,
                                    tool_index.label_counts, tool_index.fbank_stats_count, True)
  assert index.fbank_mean == pytest.approx(tool_index.fbank_mean, rel=1e-12)
  assert index.fbank_std == pytest.approx(tool_index.fbank_std, rel=1e-12)
  test_stats = tfds_builder.read_split_stats(builder.info, "test")
  assert (test_stats.num_examples, test_stats.label_counts) == (1, [0, 1, 0])


def test_beam_build_reads_videos_from_ram_filesystem(manual_dir, tool_records, tmp_path):
  # The videos live only on TensorFlow's in-memory file system (standing for gs://); the
  # DirectRunner runs in this process, so it sees them. The clip list names them by URI.
  root = f"ram://beam_{tmp_path.name}"
  with open(os.path.join(manual_dir, "train.json")) as f:
    rows = json.load(f)["data"]
  remote_rows = []
  for row in rows:
    local = row["wav"] if os.path.isabs(row["wav"]) else os.path.join(manual_dir, row["wav"])
    with open(local, "rb") as f:
      remote = write_file(f"{root}/{row['video_id']}.mp4", f.read())
    remote_rows.append((row["video_id"], remote, row["labels"]))
  remote_rows.append(("gone", f"{root}/gone.mp4", "/m/a"))
  ram_manual = tmp_path / "manual"
  ram_manual.mkdir()
  write_datafile(str(ram_manual / "train.json"), remote_rows)
  (ram_manual / tfds_builder.LABELS_CSV).write_text(LABELS_CSV)
  builder, from_tfds = _beam_build(str(ram_manual), str(tmp_path / "tfds"))
  from_tool, tool_quarantine, _ = tool_records
  _assert_same_examples(from_tfds, from_tool)
  assert {(q["video_id"], q["reason"]) for q in tfds_builder.read_quarantine(
      builder.data_dir, "train")} == tool_quarantine | {("gone", "missing_file")}


def test_strict_local_build_names_bad_clip(manual_dir, tmp_path):
  config = tfds_builder.ClipsConfig(name="datafile_strict", source="datafile", strict=True)
  builder = tfds_builder.builder(config, data_dir=str(tmp_path / "tfds"))
  with pytest.raises(clips.StrictModeError, match="empty.mp4: empty_file"):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


@pytest.fixture(name="all_bad_test_split")
def fixture_all_bad_test_split(manual_dir, tmp_path):
  """A manual dir whose train.json is good and whose test.json lists one empty file."""
  root = tmp_path / "manual_all_bad"
  root.mkdir()
  write_datafile(str(root / "train.json"), [("a", os.path.join(manual_dir, "good_a.mp4"),
                                             "/m/a")])
  write_datafile(str(root / "test.json"), [("empty", os.path.join(manual_dir, "empty.mp4"),
                                            "/m/a")])
  (root / tfds_builder.LABELS_CSV).write_text(LABELS_CSV)
  return str(root)


ALL_QUARANTINED = (r"split 'test': no clip was written: all 1 were quarantined \(empty_file: 1\); "
                   r"e\.g\. .*empty\.mp4: empty_file: ")


def test_a_split_with_every_clip_quarantined_says_why(all_bad_test_split, tmp_path):
  # TFDS's own error named no clip ('Failed to finalize writing of split "test": No examples
  # were yielded'), and its cleanup removed the quarantine file that said why.
  builder = tfds_builder.builder("datafile", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match=ALL_QUARANTINED):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=all_bad_test_split))


def test_a_beam_split_with_every_clip_quarantined_says_why(all_bad_test_split, tmp_path):
  with pytest.raises(Exception, match=ALL_QUARANTINED):  # (Beam's runner may wrap it)
    _beam_build(all_bad_test_split, str(tmp_path / "tfds"))


def test_another_file_format_is_refused_before_any_clip_is_decoded(manual_dir, tmp_path,
                                                                   monkeypatch):
  # Every clip was decoded, then the shards' sidecars read them as TFRecord files: "corrupted
  # record at 0 (Is this even a TFRecord file?)", the build thrown away.
  monkeypatch.setattr(clips, "try_clip_example", None)  # not reached
  builder = tfds.builder("cav_mae_clips/datafile", data_dir=str(tmp_path / "tfds"),
                         file_format="array_record")
  with pytest.raises(ValueError, match=r"^file_format=array_record: cav_mae_clips writes "
                     r"TFRecord shards .*build without file_format \(--file_format\)$"):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def test_a_list_not_named_as_a_split_is_said_to_be_unread(manual_dir, tmp_path, caplog):
  # An eval.json beside train.json was left out without a word.
  other = tmp_path / "manual"
  shutil.copytree(manual_dir, other)
  shutil.copy(other / "test.json", other / "eval.json")
  config = tfds_builder.ClipsConfig(name="datafile_unread", source="datafile", strict=True)
  builder = tfds_builder.builder(config, data_dir=str(tmp_path / "tfds"))
  with caplog.at_level("WARNING"), pytest.raises(clips.StrictModeError):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(other)))
  assert (f"{other}: not read as a split: eval.json (config 'datafile_unread' reads train.json, "
          "validation.json, test.json)") in caplog.text


def test_a_labels_csv_of_another_list_is_refused(manual_dir, tmp_path):
  # As tools/preprocess.py: every clip would be quarantined unknown_label.
  other = tmp_path / "manual"
  shutil.copytree(manual_dir, other)
  (other / tfds_builder.LABELS_CSV).write_text('index,mid,display_name\n0,/m/x,"X"\n')
  config = tfds_builder.ClipsConfig(name="datafile_labels", source="datafile")
  builder = tfds_builder.builder(config, data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match=r"labels CSV .*: has none of the 4 label id\(s\) of "
                     r".*train.json"):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(other)))


def test_synthetic_config_local_build(tmp_path, monkeypatch):
  temporary = tmp_path / "tmp"  # the temporary folders of the build and TFDS
  temporary.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temporary))
  config = tfds_builder.ClipsConfig(name="synthetic_tiny", source="synthetic",
                                    synthetic_clips_per_split=(("train", 2),),
                                    synthetic_num_classes=2, synthetic_duration_s=1.0)
  builder = tfds_builder.builder(config, data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare()
  # TFDS's look into its bucket of public datasets left an empty /tmp/tmp*tfds per build.
  assert os.listdir(temporary) == []
  assert builder.info.description.startswith("# cav_mae_jax.data: clip records")  # its README
  examples = list(tfds.as_numpy(builder.as_dataset(split="train")))
  assert sorted(e["labels"].tolist() for e in examples) == [[0], [1]]
  assert all(e["fbank"].shape == (1024, 128) and e["frames"].shape == (10,) for e in examples)
  assert builder.beam_counters is None  # no Beam without a runner or options
  stats = tfds_builder.read_split_stats(builder.info, "train")  # the local running sum
  valid = [e["fbank"][:e["fbank_num_frames"]].astype(np.float64) for e in examples]
  assert (stats.num_examples, stats.label_counts) == (2, [1, 1])
  assert stats.fbank_count == sum(v.size for v in valid)
  assert stats.fbank_mean_std()[0] == pytest.approx(np.concatenate(valid).mean(), rel=1e-12)
  split = builder.info.splits["train"]  # each shard's layout sidecar, written here without Beam
  layouts = [records.read_record_layout(os.fspath(path), count, 2)
             for path, count in zip(split.filepaths, split.shard_lengths)]
  assert sorted(labels for _, layout in layouts for labels in layout) == [[0], [1]]


def test_an_unbuilt_version_names_the_versions_built(tmp_path):
  """A dataset built by an older builder version (1.3.0, before the shards' layout sidecars)
  was only 'not built in .../1.4.0'; the line now says how to read the one that is built."""
  for version in ("1.2.0", "1.3.0"):
    built = tmp_path / "cav_mae_clips" / "datafile" / version
    built.mkdir(parents=True)
    (built / "dataset_info.json").write_text("{}")
  (tmp_path / "cav_mae_clips" / "datafile" / "notes").mkdir()
  current = re.escape(f"datafile/{tfds_builder.CavMaeClips.VERSION} ")
  with pytest.raises(ValueError, match=rf"not built in .*{current}.*; built here: version "
                     r"1\.2\.0, 1\.3\.0, read as 'cav_mae_clips/datafile:1\.3\.0'$"):
    splits.open_tfds_split("cav_mae_clips/datafile", "train", str(tmp_path))
  with pytest.raises(ValueError, match=rf"not built in .*{current}\(build it with the "
                     r"cav_mae_clips builder, see cav_mae_jax/data/README.md\)$"):
    splits.open_tfds_split("cav_mae_clips/datafile", "train", str(tmp_path / "elsewhere"))


def test_audioset_and_vggsound_csv_readers(tmp_path):
  audioset = tmp_path / "train.csv"
  audioset.write_text("# Segments csv created Sun Mar  5 10:54:31 2017\n"
                      "# YTID, start_seconds, end_seconds, positive_labels\n"
                      '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"\n'
                      '00W1lcxW-WU, 40.000, 50.000, "/m/04rlf"\n')
  entries = sources.read_audioset_csv(str(audioset), "/videos", "{ytid}_{start:.3f}.mp4")
  assert entries == [
      sources.ClipEntry("--PJHxphWEs", "/videos/--PJHxphWEs_30.000.mp4", ("/m/09x0r", "/t/dd00088")),
      sources.ClipEntry("00W1lcxW-WU", "/videos/00W1lcxW-WU_40.000.mp4", ("/m/04rlf",))]
  vgg = tmp_path / "vggsound.csv"
  vgg.write_text("---g-f_I2yQ,1,people marching,test\nKlsG1EnBEjc,361,dog barking,train\n")
  assert sources.vggsound_splits(str(vgg)) == ["test", "train"]
  assert sources.read_vggsound_csv(str(vgg), "/v", "{ytid}_{start:06d}.mp4", "train") == [
      sources.ClipEntry("KlsG1EnBEjc_000361", "/v/KlsG1EnBEjc_000361.mp4", ("dog barking",))]
  bad = tmp_path / "bad.csv"
  bad.write_text("a,1,2\n")
  with pytest.raises(ValueError, match="bad.csv: line 1 has 3 fields"):
    sources.read_vggsound_csv(str(bad), "/v", "{ytid}.mp4", "train")
  # A row that is not a number where the time goes names the file and the row.
  bad.write_text("KlsG1EnBEjc,361,dog barking,train\nytid,start,label,split\n")
  with pytest.raises(ValueError, match="bad.csv: line 2: start_seconds 'start' is not a whole"):
    sources.vggsound_splits(str(bad))
  audioset.write_text('00W1lcxW-WU, 40.000, 50.000, "/m/04rlf"\nYTID, start, end, labels\n')
  with pytest.raises(ValueError, match="train.csv: data row 2: start_seconds 'start'"):
    sources.read_audioset_csv(str(audioset), "/videos", "{ytid}_{start:.3f}.mp4")
  # An empty id (the clip's key and its video's name) is refused as the JSON datafile's is.
  audioset.write_text('00W1lcxW-WU, 40.000, 50.000, "/m/04rlf"\n , 0, 10, "/m/04rlf"\n')
  with pytest.raises(ValueError, match="train.csv: data row 2 has an empty YTID"):
    sources.read_audioset_csv(str(audioset), "/videos", "{ytid}_{start:.3f}.mp4")
  bad.write_text("KlsG1EnBEjc,361,dog barking,train\n,1,dog barking,train\n")
  with pytest.raises(ValueError, match="bad.csv: line 2 has an empty ytid"):
    sources.vggsound_splits(str(bad))
  # A list without clips is refused (it made an empty records directory); a repeated id is
  # marked as a repeat of its first entry.
  audioset.write_text("# YTID, start_seconds, end_seconds, positive_labels\n")
  with pytest.raises(ValueError, match="train.csv: lists no clips"):
    sources.read_audioset_csv(str(audioset), "/videos", "{ytid}.mp4")
  with pytest.raises(ValueError, match="vggsound.csv: lists no clips of split 'val'"):
    sources.read_vggsound_csv(str(vgg), "/v", "{ytid}.mp4", "val")
  audioset.write_text('x, 0, 10, "/m/a"\ny, 0, 10, "/m/a"\nx, 30, 40, "/m/b"\n')
  entries = sources.read_audioset_csv(str(audioset), "/v", "{ytid}_{start:.0f}.mp4")
  assert [(e.path, e.duplicate_of) for e in entries] == [
      ("/v/x_0.mp4", None), ("/v/y_0.mp4", None), ("/v/x_30.mp4", "data row 1 (/v/x_0.mp4)")]
  # vggsound.csv: its line, counted over every split's rows.
  vgg.write_text("a,1,dog,test\nb,2,dog,train\nc,3,dog,test\nb,4,dog,train\n")
  assert [e.duplicate_of for e in sources.read_vggsound_csv(
      str(vgg), "/v", "{ytid}.mp4", "train")] == [None, "line 2 (/v/b.mp4)"]


def test_a_datafile_asks_the_file_system_once_per_frames_folder(tmp_path, monkeypatch):
  # A stat per clip is a remote call per clip on a bucket (a day for AudioSet-2M): video file
  # names need none, and the original's extracted layout shares one frames folder.
  (tmp_path / "frames").mkdir()
  rows = [{"video_id": f"v{i}", "wav": f"v{i}.wav", "video_path": f"videos/v{i}.MP4",
           "labels": "/m/a"} for i in range(50)]
  rows += [{"video_id": f"x{i}", "wav": f"x{i}.wav", "video_path": "frames", "labels": "/m/a"}
           for i in range(50)]
  datafile = tmp_path / "data.json"
  datafile.write_text(json.dumps({"data": rows}))
  looked_up = []
  isdir = sources.tf.io.gfile.isdir
  monkeypatch.setattr(sources.tf.io.gfile, "isdir", lambda p: looked_up.append(p) or isdir(p))
  entries = sources.read_datafile(str(datafile))
  assert [p for p in looked_up if p != str(datafile)] == [str(tmp_path / "frames")]
  assert entries[0] == sources.ClipEntry("v0", str(tmp_path / "videos/v0.MP4"), ("/m/a",), "")
  assert entries[50] == sources.ClipEntry("x0", str(tmp_path / "x0.wav"), ("/m/a",),
                                          str(tmp_path / "frames"))


def test_unknown_source_is_rejected():
  with pytest.raises(ValueError, match="source"):
    tfds_builder.ClipsConfig(name="x", source="youtube")
