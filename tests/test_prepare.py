"""Tests for cav_mae_jax.data.prepare and tools/preprocess.py on a generated bad-input corpus."""
from __future__ import annotations

import errno
import fractions
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
import weakref

import av
import numpy as np
import pytest
import tensorflow as tf

from cav_mae_jax.data import clips
from cav_mae_jax.data import dataset
from cav_mae_jax.data import decode
from cav_mae_jax.data import prepare
from cav_mae_jax.data import records
from cav_mae_jax.data import shards
from cav_mae_jax.data import sources
from cav_mae_jax.data import splits
from cav_mae_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS_CSV = 'index,mid,display_name\n0,/m/a,"Alpha"\n1,/m/b,"Beta, b"\n2,/m/c,"Gamma"\n'


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
  """Runs tools/<name>.py as a user would: this checkout's package, TensorFlow's default logs."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
  env["PYTHONPATH"] = os.pathsep.join([REPO] + ([env["PYTHONPATH"]] if "PYTHONPATH" in env
                                                else []))
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{name}.py"), *args],
                        capture_output=True, text=True, env=env, timeout=300, check=False)


def assert_one_error_line(returncode: int, stderr: str, *fragments: str) -> None:
  """Exit status 2 and exactly one stderr line `error: ...` holding every fragment."""
  lines = stderr.splitlines()
  assert returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


def write_clip(path: str, *, seconds: float, fps: int = 4, size: tuple[int, int] = (64, 48),
               sample_rate: int = 44100, channels: int = 2, audio: bool = True,
               video: bool = True, silent: bool = False, variable_frame_rate: bool = False,
               channel_freqs: tuple[float, ...] | None = None, seed: int = 0,
               display_rotation: int = 0) -> str:
  """Writes a small H.264 + AAC MP4 whose frames and tones differ per frame / channel."""
  layout = {1: "mono", 2: "stereo", 6: "5.1"}[channels]
  freqs = channel_freqs or tuple(440.0 * (c + 1) + 10 * seed for c in range(channels))
  with av.open(path, "w", format="mp4") as out:
    if video:
      vstream = out.add_stream("libx264", rate=fps)
      vstream.width, vstream.height, vstream.pix_fmt = size[0], size[1], "yuv420p"
      vstream.options = {"preset": "ultrafast"}
      if display_rotation:
        vstream.set_display_rotation(display_rotation)
      if variable_frame_rate:
        vstream.codec_context.time_base = fractions.Fraction(1, 1000)
    if audio:
      astream = out.add_stream("aac", rate=sample_rate, layout=layout)
    if video:
      pts_ms = 0
      for i in range(int(seconds * fps)):
        image = np.zeros((size[1], size[0], 3), np.uint8)
        image[..., 0] = (i * 7 + 40 * seed) % 256
        image[: (i % size[1]) + 1, :, 1] = 200
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        if variable_frame_rate:  # Alternating long and short frame durations.
          frame.pts, frame.time_base = pts_ms, fractions.Fraction(1, 1000)
          pts_ms += int(1000 / fps * (0.5 if i % 2 else 1.5))
        out.mux(vstream.encode(frame))
      out.mux(vstream.encode())
    if audio:
      total = int(seconds * sample_rate)
      t = np.arange(total) / sample_rate
      data = np.stack([0.3 * np.sin(2 * np.pi * f * t) for f in freqs]).astype(np.float32)
      if silent:
        data[:] = 0
      for start in range(0, total, 1024):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, start:start + 1024]),
                                           format="fltp", layout=layout)
        frame.sample_rate, frame.pts = sample_rate, start
        out.mux(astream.encode(frame))
      out.mux(astream.encode())
  return path


def write_datafile(path: str, rows: list[tuple[str, str, str]]) -> str:
  """Writes the original's JSON datafile for (video_id, media path, labels) rows (any FS)."""
  data = [{"video_id": v, "wav": p, "video_path": p, "labels": l} for v, p, l in rows]
  write_file(path, json.dumps({"data": data}).encode())
  return path


def write_file(path: str, data: bytes) -> str:
  """Writes a file on any file system TensorFlow writes (ram:// included)."""
  if tf.io.gfile.exists(path):
    tf.io.gfile.remove(path)  # ram:// appends to an existing file instead of replacing it.
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(data)
  return path


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, str]:
  """The bad-input corpus of issue 5, plus a few good clips."""
  root = tmp_path_factory.mktemp("media")
  p = lambda name: str(root / name)
  files = {
      "good_a": write_clip(p("good_a.mp4"), seconds=10, seed=1),
      "good_b": write_clip(p("good_b.mp4"), seconds=10, seed=2),
      "silent": write_clip(p("silent.mp4"), seconds=10, silent=True),
      "one_second": write_clip(p("one_second.mp4"), seconds=1),
      "thirty_seconds": write_clip(p("thirty_seconds.mp4"), seconds=30, fps=2),
      "mono_8k": write_clip(p("mono_8k.mp4"), seconds=2, sample_rate=8000, channels=1),
      "six_48k": write_clip(p("six_48k.mp4"), seconds=2, sample_rate=48000, channels=6,
                            channel_freqs=(1000.0, 2500.0, 3000.0, 60.0, 3500.0, 4000.0)),
      "vfr": write_clip(p("vfr.mp4"), seconds=10, variable_frame_rate=True),
      "rotated": write_clip(p("rotated.mp4"), seconds=2, display_rotation=-90),  # rotate=90
      "audio_only": write_clip(p("audio_only.mp4"), seconds=2, video=False),
      "video_only": write_clip(p("video_only.mp4"), seconds=2, audio=False),
      "zero_byte": p("zero_byte.mp4"),
      "truncated": p("truncated.mp4"),
      "text": p("text.mp4"),
      "missing": p("missing.mp4"),
  }
  open(files["zero_byte"], "wb").close()
  with open(files["good_a"], "rb") as f:
    content = f.read()
  with open(files["truncated"], "wb") as f:
    f.write(content[: len(content) // 2])
  with open(files["text"], "w") as f:
    f.write("this is not a video\n" * 20)
  with open(p("class_labels_indices.csv"), "w") as f:
    f.write(LABELS_CSV)
  files["labels_csv"] = p("class_labels_indices.csv")
  return files


EXPECTED_QUARANTINE = {
    "zero_byte": "empty_file",
    "truncated": "unreadable_container",
    "text": "unreadable_container",
    "missing": "missing_file",
    "audio_only": "no_video_stream",
    "video_only": "no_audio_stream",
    "unknown_label": "unknown_label",
}
WRITTEN = ["good_a", "good_b", "silent", "one_second", "thirty_seconds", "mono_8k", "six_48k",
           "vfr", "rotated"]


@pytest.fixture(scope="module")
def corpus_run(media, tmp_path_factory):
  """Runs prepare_records (in-process) once over the whole corpus, storing waveforms."""
  root = tmp_path_factory.mktemp("corpus_run")
  rows = [(name, media[name], "/m/a,/m/b" if name == "good_b" else "/m/a")
          for name in WRITTEN + [k for k in EXPECTED_QUARANTINE if k != "unknown_label"]]
  rows.append(("unknown_label", media["good_a"], "/m/a,/m/not_a_class"))
  datafile = write_datafile(str(root / "data.json"), rows)
  out = str(root / "out")
  summary = prepare.prepare_records(datafile, media["labels_csv"], out, num_workers=0,
                                    examples_per_shard=4, store_waveform=True, progress=False)
  examples = {e["video_id"]: e for e in records.iter_examples(out)}
  return out, summary, examples


def test_corpus_quarantine_and_summary(corpus_run):
  out, summary, examples = corpus_run
  assert sorted(examples) == sorted(WRITTEN)
  with open(os.path.join(out, prepare.QUARANTINE)) as f:
    lines = [json.loads(line) for line in f]
  assert {line["video_id"]: line["reason"] for line in lines} == EXPECTED_QUARANTINE
  for line in lines:
    assert line["path"] and line["message"]
  with open(os.path.join(out, prepare.SUMMARY)) as f:
    on_disk = json.load(f)
  assert on_disk["written"] == len(WRITTEN) == summary.written
  assert on_disk["quarantined"] == len(EXPECTED_QUARANTINE)
  expected_by_reason = {}
  for reason in EXPECTED_QUARANTINE.values():
    expected_by_reason[reason] = expected_by_reason.get(reason, 0) + 1
  assert on_disk["quarantined_by_reason"] == expected_by_reason
  assert on_disk["seconds"] > 0 and on_disk["index_written"]


def test_corpus_valid_clips(corpus_run):
  from cav_mae_jax.data import fbank as fbank_lib

  _, _, examples = corpus_run
  for name, e in examples.items():
    valid = e["fbank_num_frames"]
    assert valid == fbank_lib.num_frames(e["waveform"].size), name
    assert np.all(np.isfinite(e["fbank"])), name
    assert np.all(e["fbank"][valid:] == 0), name  # Zero padding only after the clip's frames.
    assert len(e["frames"]) == 10 and e["frames"][0][:2] == b"\xff\xd8", name
    assert np.all(np.diff(e["frame_indices"]) >= 0), name
  silent = examples["silent"]
  # 10 s of audio (+ the AAC encoder's padding, which the original's ffmpeg decode keeps too).
  assert 998 <= silent["fbank_num_frames"] <= 1010 and not np.any(silent["waveform"])
  np.testing.assert_allclose(silent["fbank"][:silent["fbank_num_frames"]],
                             np.log(np.finfo(np.float32).eps), atol=1e-2)  # log floor, not zeros
  one = examples["one_second"]
  assert 90 <= one["fbank_num_frames"] <= 105 and one["duration_s"] == pytest.approx(1, abs=0.1)
  long = examples["thirty_seconds"]
  # Cut where the original's 1024 fbank frames end (10.255 s), not at 10 s.
  assert long["waveform"].size == 164080 and long["fbank_num_frames"] == 1024
  assert long["duration_s"] == pytest.approx(30, abs=0.1)
  assert long["frame_indices"].max() < 20  # 2 fps: frames come from the first 10 s only.
  assert examples["mono_8k"]["source_sample_rate"] == 8000
  six = examples["six_48k"]
  assert six["source_sample_rate"] == 48000
  spectrum = np.abs(np.fft.rfft(six["waveform"].astype(np.float64)))
  freqs = np.fft.rfftfreq(six["waveform"].size, 1 / 16000)
  assert abs(freqs[np.argmax(spectrum)] - 1000) < 5  # First channel, not a downmix.
  assert spectrum[np.abs(freqs - 2500) < 20].max() < 0.01 * spectrum.max()
  assert {name: e["rotation"] for name, e in examples.items() if e["rotation"]} == {"rotated": 90}
  assert examples["good_b"]["labels"].tolist() == [0, 1]
  assert examples["good_b"]["label_ids"] == ["/m/a", "/m/b"]


def test_corpus_index_stats(corpus_run):
  out, _, examples = corpus_run
  index = records.open_records_dir(out)
  assert index.num_examples == len(WRITTEN) and len(index.shards) == 4
  assert index.store_waveform and index.num_classes == 3
  assert list(index.label_counts) == [len(WRITTEN), 1, 0]
  valid = np.concatenate([e["fbank"][:e["fbank_num_frames"]].astype(np.float64).ravel()
                          for e in examples.values()])
  assert index.fbank_mean == pytest.approx(valid.mean(), abs=1e-6)
  assert index.fbank_std == pytest.approx(valid.std(), abs=1e-6)


def assert_layouts_match(split: splits.Split) -> list[int]:
  """Every shard of `split` has a sidecar layout equal to its records' sizes and classes (and
  `layout_mismatch` agrees); returns the shards' record counts."""
  counts = [shard.num_examples for shard in split.index.shards]
  for path, count in zip(split.files, counts):
    sizes, labels = records.read_record_layout(path, count, split.index.num_classes)
    stored = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    assert sizes.tolist() == [len(serialized) for serialized in stored]
    assert labels == [split.parse_labels(serialized).numpy().tolist() for serialized in stored]
    assert records.layout_mismatch(path, count, split.index.num_classes,
                                   split.parse_labels) is None
  return counts


def test_corpus_sidecars_locate_every_record(corpus_run, tmp_path):
  """Each shard's sidecar lists its records' sizes and classes, so balanced sampling finds the
  records without reading them; it finds the same offsets and weights as reading them."""
  out, _, _ = corpus_run
  split = splits.open_records_split(out, "records")
  counts = assert_layouts_match(split)
  from_sidecars = dataset.HostRecords.scan(split.files, counts, split.index.label_counts,
                                               split.parse_labels)
  # The same shards without their sidecars (or with one that does not fit its shard) are read.
  copies = []
  for i, path in enumerate(split.files):
    copies.append(str(tmp_path / os.path.basename(path)))
    with open(path, "rb") as f, open(copies[-1], "wb") as g:
      g.write(f.read())
  with open(split.files[0] + records.SIDECAR_SUFFIX) as f:
    sidecar = json.load(f)
  sidecar[records.RECORD_BYTES][0] += 1
  with open(copies[0] + records.SIDECAR_SUFFIX, "w") as f:
    json.dump(sidecar, f)
  assert records.read_record_layout(copies[0], counts[0], split.index.num_classes) is None
  read = dataset.HostRecords.scan(copies, counts, split.index.label_counts,
                                      split.parse_labels)
  for field in ("file_index", "offset", "cumulative_weight"):
    np.testing.assert_array_equal(getattr(from_sidecars, field), getattr(read, field))
  assert from_sidecars.cumulative_weight[-1] > 0


def load_tool(name):
  """tools/<name>.py as a module (its main() runs in this process)."""
  spec = importlib.util.spec_from_file_location(
      f"{name}_tool", os.path.join(REPO, "tools", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_strict_cli_names_first_bad_file(media, tmp_path, capsys):
  datafile = write_datafile(str(tmp_path / "data.json"), [
      ("good_a", media["good_a"], "/m/a"),
      ("zero_byte", media["zero_byte"], "/m/a"),
      ("text", media["text"], "/m/a")])
  out = str(tmp_path / "out")
  exit_code = load_tool("preprocess").main([
      "--datafile", datafile, "--labels", media["labels_csv"], "--out", out, "--workers", "0",
      "--examples-per-shard", "1", "--strict", "--no-progress"])
  stderr = capsys.readouterr().err
  assert exit_code == 1
  assert media["zero_byte"] in stderr and "empty_file" in stderr
  assert media["text"] not in stderr
  assert os.path.exists(os.path.join(out, shards.shard_file_name(0, 3)))  # kept
  assert not os.path.exists(os.path.join(out, shards.shard_file_name(1, 3)))
  assert not any(".tmp-" in name for name in os.listdir(out))
  assert not os.path.exists(records.index_path(out))


def _never_called(entry, labels, store_waveform):
  raise AssertionError(f"{entry.video_id} was processed again although its shard was finished")


def test_a_finalize_killed_while_writing_leaves_nothing_after_the_next(media, tmp_path):
  # kill -9 while finalize wrote quarantine.jsonl, summary.json or the index left its temporary
  # file for good; the next finalize removes those of this host's dead processes, and not those
  # of a live process or of another host (a split run's task finishing at the same time).
  rows = [("clip0", media["good_a"], "/m/c")]
  datafile = write_datafile(str(tmp_path / "data.json"), rows)
  out = str(tmp_path / "out")
  prepare.prepare_records(datafile, media["labels_csv"], out, num_workers=0, progress=False)
  finished = sorted(os.listdir(out))
  dead = subprocess.Popen(["true"])
  dead.wait()
  host = socket.gethostname()
  stale = [f"{name}.tmp-{host}-{dead.pid}"
           for name in (prepare.QUARANTINE, prepare.SUMMARY, records.INDEX_FILE)]
  others = [f"{prepare.SUMMARY}.tmp-{host}-{os.getppid()}",
            f"{prepare.QUARANTINE}.tmp-{host}x-{dead.pid}"]
  for name in stale + others:
    open(os.path.join(out, name), "w").close()
  prepare.finalize(out)
  assert sorted(os.listdir(out)) == sorted(finished + others)


def test_a_rerun_says_which_shards_an_earlier_run_finished(media, tmp_path, capsys):
  # A rerun on a finished directory printed "written 3 clips ... in 0.0 s" as if it wrote them.
  rows = [(f"clip{i}", media["good_a"], "/m/c") for i in range(3)]
  datafile = write_datafile(str(tmp_path / "data.json"), rows)
  out = str(tmp_path / "out")
  kwargs = dict(examples_per_shard=1, num_workers=0)
  prepare.prepare_records(datafile, media["labels_csv"], out, task_index=1, num_tasks=2,
                          progress=False, **kwargs)  # shard 1 of 3
  capsys.readouterr()
  prepare.prepare_records(datafile, media["labels_csv"], out, task_index=1, num_tasks=2,
                          progress=True, **kwargs)
  assert capsys.readouterr().out.splitlines() == [
      "note: 1 of 1 shards of this task were finished by an earlier run and are kept (their "
      "clips count in the totals below)"]
  summary = prepare.prepare_records(datafile, media["labels_csv"], out, progress=True, **kwargs)
  assert summary.written == 3
  assert capsys.readouterr().out.splitlines() == [
      "note: 1 of 3 shards were finished by an earlier run and are kept (their clips count in "
      "the totals below)"]


def test_split_runs_merge_and_resume(media, tmp_path):
  rows = [(f"clip{i}", media["good_a" if i % 2 else "good_b"], "/m/c") for i in range(3)]
  datafile = write_datafile(str(tmp_path / "data.json"), rows)
  out = str(tmp_path / "out")
  kwargs = dict(examples_per_shard=1, num_workers=0, progress=False)
  first = prepare.prepare_records(datafile, media["labels_csv"], out, task_index=0,
                                  num_tasks=2, **kwargs)
  assert (first.shards_finished, first.index_written) == (2, False)  # shards 0 and 2
  assert not os.path.exists(records.index_path(out))
  stale = os.path.join(out, shards.shard_file_name(1, 3) + ".tmp-deadhost-1")
  open(stale, "w").close()  # A temp file left by a killed run.
  second = prepare.prepare_records(datafile, media["labels_csv"], out, task_index=1,
                                   num_tasks=2, **kwargs)
  assert (second.shards_finished, second.index_written, second.written) == (3, True, 3)
  assert not os.path.exists(stale)
  mtimes = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)
            if n.endswith(".tfrecord")}
  again = prepare.prepare_records(datafile, media["labels_csv"], out, clip_fn=_never_called,
                                  **kwargs)
  assert again.written == 3
  assert mtimes == {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in mtimes}
  os.remove(records.index_path(out))
  assert prepare.finalize(out).index_written  # --merge-index
  # A changed setting is refused naming what the user set (it said "num_shards was 3" for
  # --examples-per-shard, and printed the datafile's SHA-256s).
  with pytest.raises(ValueError, match=r"--store-waveform was False when this directory was "
                     r"started, now True; use a new output directory"):
    prepare.prepare_records(datafile, media["labels_csv"], out, store_waveform=True, **kwargs)
  with pytest.raises(ValueError, match=r"the shard count \(the datafile's entries over "
                     r"--examples-per-shard\) was 3 when this directory was started, now 2"):
    prepare.prepare_records(datafile, media["labels_csv"], out,
                            **{**kwargs, "examples_per_shard": 2})
  write_datafile(datafile, rows[::-1])
  with pytest.raises(ValueError, match=r"--datafile's contents differ from those of the file "
                     "this directory was started with"):
    prepare.prepare_records(datafile, media["labels_csv"], out, **kwargs)


def test_a_strict_rerun_counts_the_finished_shards_quarantined_clips(media, tmp_path):
  """A rerun with --strict (to check the data) skipped the finished shards and succeeded,
  their quarantined clips unseen."""
  datafile = write_datafile(str(tmp_path / "data.json"), [
      ("good_a", media["good_a"], "/m/a"), ("zero_byte", media["zero_byte"], "/m/a")])
  out = str(tmp_path / "out")
  kwargs = dict(examples_per_shard=1, num_workers=0, progress=False)
  first = prepare.prepare_records(datafile, media["labels_csv"], out, **kwargs)
  assert (first.written, first.quarantined, first.shards_finished) == (1, 1, 2)
  with pytest.raises(clips.StrictModeError, match=rf"^{re.escape(media['zero_byte'])}: "
                     "empty_file"):
    prepare.prepare_records(datafile, media["labels_csv"], out, strict=True,
                            clip_fn=_never_called, **kwargs)


def _every_other_clip(entry, labels, store_waveform):
  """A clip function without media: clips with an odd number are missing, the others written."""
  if int(entry.video_id[4:]) % 2:
    raise clips.ClipError(entry.path, "missing_file", "not there")
  return records.make_example_values(
      video_id=entry.video_id, labels=[labels.index_of("/m/c")], label_ids=["/m/c"],
      fbank=np.full((1024, 128), float(entry.video_id[4:])), fbank_num_frames=1024,
      jpeg_frames=[b"jpeg"] * 10, frame_indices=range(10), duration_s=10.0,
      source_sample_rate=16000, fps=25.0, frame_count=250)


class _Sidecar(dict):
  """A sidecar dict that can be watched with a weak reference."""


def test_merging_reads_one_sidecar_at_a_time(tmp_path, monkeypatch):
  # A list of 2M missing files leaves 2M quarantined clips in the sidecars: finalize held every
  # sidecar at once (1 GB more for AudioSet-2M); it reads them one by one now, and writes the
  # same quarantine.jsonl, index and summary.
  (tmp_path / "labels.csv").write_text(LABELS_CSV)
  datafile = write_datafile(str(tmp_path / "data.json"),
                            [(f"clip{i}", f"clip{i}.mp4", "/m/c") for i in range(8)])
  out = str(tmp_path / "out")
  summary = prepare.prepare_records(datafile, str(tmp_path / "labels.csv"), out,
                                    examples_per_shard=2, num_workers=0, progress=False,
                                    clip_fn=_every_other_clip)
  assert (summary.written, summary.quarantined, summary.index_written) == (4, 4, True)
  read_sidecar, alive, most_alive = shards.read_sidecar, [], []

  def watched(*args):
    most_alive.append(sum(ref() is not None for ref in alive))
    sidecar = read_sidecar(*args)
    alive.append(weakref.ref(sidecar := _Sidecar(sidecar)))
    return sidecar

  monkeypatch.setattr(shards, "read_sidecar", watched)
  files = {name: open(os.path.join(out, name)).read()
           for name in (prepare.QUARANTINE, prepare.SUMMARY, records.INDEX_FILE)}
  for name in files:
    os.remove(os.path.join(out, name))
  assert prepare.finalize(out, seconds=summary.seconds) == summary
  assert files == {name: open(os.path.join(out, name)).read() for name in files}
  assert [json.loads(line)["video_id"] for line in files[prepare.QUARANTINE].splitlines()] == [
      "clip1", "clip5", "clip3", "clip7"]  # shard by shard (clips go round-robin)
  assert len(most_alive) == 4 and max(most_alive) <= 1


def _prepare_listing(rows, media, tmp_path, field: str):
  """Records of a datafile of `rows` in tmp_path/out, 2 clips a shard: (datafile, out, summary,
  the `field` of every entry decoded, in order)."""
  datafile = write_datafile(str(tmp_path / "data.json"), rows)
  decoded = []

  def clip_fn(entry, labels, store_waveform):
    decoded.append(getattr(entry, field))
    return clips.clip_example(entry, labels, store_waveform)

  out = str(tmp_path / "out")
  summary = prepare.prepare_records(datafile, media["labels_csv"], out, num_workers=0,
                                    examples_per_shard=2, clip_fn=clip_fn, progress=False)
  return datafile, out, summary, decoded


def test_a_repeated_video_id_is_written_once_and_the_repeat_quarantined(media, tmp_path):
  # An id is an example's key: the tool wrote both (the TFDS build failed on them, after all the
  # decoding). Now the first is written and each repeat is quarantined before any decoding.
  rows = [("a", media["good_a"], "/m/a"), ("b", media["good_b"], "/m/b"),
          ("a", media["good_b"], "/m/c"), ("a", media["good_a"], "/m/a")]
  datafile, out, summary, decoded = _prepare_listing(rows, media, tmp_path, "path")
  assert decoded == [media["good_a"], media["good_b"]]
  assert (summary.written, summary.quarantined_by_reason) == (2, {clips.DUPLICATE_ID: 2})
  with open(os.path.join(out, prepare.QUARANTINE)) as f:
    repeats = sorted((q["video_id"], q["path"], q["message"]) for q in map(json.loads, f))
  # The first entry is named as the datafile's errors name entries (it said "entry 0").
  first = f"data[0] ({media['good_a']})"
  assert repeats == [
      ("a", media["good_a"], f"video id 'a' repeats that of {first}, the entry kept for it (an "
       "id is an example's key: that entry is written, or quarantined for its own reason)"),
      ("a", media["good_b"], f"video id 'a' repeats that of {first}, the entry kept for it (an "
       "id is an example's key: that entry is written, or quarantined for its own reason)")]
  index = records.read_index(records.index_path(out))
  assert (index.num_examples, index.label_counts) == (2, (1, 1, 0))  # the first 'a': /m/a
  with pytest.raises(clips.StrictModeError,
                     match=r"duplicate_id: video id 'a' repeats that of data\[0\] \("):
    prepare.prepare_records(datafile, media["labels_csv"], str(tmp_path / "strict"),
                            num_workers=0, strict=True, progress=False)


def test_entries_without_labels_are_quarantined_unless_allowed_and_then_counted(
    media, tmp_path, capsys):
  # '"labels": ""', '[]' and '","' give no labels: the original stops on them (a KeyError on the
  # empty label); the tool wrote them silently, as clips of no class. Now they are quarantined
  # before any decoding, or, with allow_unlabeled (pretraining lists), written and counted.
  rows = [("a", media["good_a"], "/m/a"), ("empty", media["good_b"], ""),
          ("list", media["good_b"], []), ("comma", media["good_a"], ",")]
  datafile, out, summary, decoded = _prepare_listing(rows, media, tmp_path, "video_id")
  assert decoded == ["a"]
  assert (summary.written, summary.unlabeled) == (1, 0)
  assert summary.quarantined_by_reason == {clips.NO_LABELS: 3}
  with open(os.path.join(out, prepare.QUARANTINE)) as f:
    lines = [json.loads(line) for line in f]
  assert sorted(q["video_id"] for q in lines) == ["comma", "empty", "list"]
  assert "no labels" in lines[0]["message"] and "--allow-unlabeled" in lines[0]["message"]
  with pytest.raises(clips.StrictModeError,
                     match="no_labels: the list gives video id 'empty' no labels"):
    prepare.prepare_records(datafile, media["labels_csv"], str(tmp_path / "strict"),
                            num_workers=0, strict=True, progress=False)
  with pytest.raises(ValueError, match="--allow-unlabeled was False"):  # not mixed in one dir
    prepare.prepare_records(datafile, media["labels_csv"], out, num_workers=0,
                            examples_per_shard=2, allow_unlabeled=True, progress=False)

  allowed = str(tmp_path / "allowed")
  summary = prepare.prepare_records(datafile, media["labels_csv"], allowed, num_workers=0,
                                    examples_per_shard=2, allow_unlabeled=True,
                                    progress=False)
  assert (summary.written, summary.unlabeled, summary.quarantined) == (4, 3, 0)
  assert "written 4 clips (3 of them with no labels" in prepare.format_summary(summary)
  with open(os.path.join(allowed, prepare.SUMMARY)) as f:
    assert json.load(f)["unlabeled"] == 3
  index = records.read_index(records.index_path(allowed))
  assert (index.num_examples, index.num_unlabeled, index.label_counts) == (4, 3, (1, 0, 0))
  tool = load_tool("inspect_records")
  assert tool.main(["--records", allowed, "--png-dir", str(tmp_path / "png")]) == 0
  assert "clips with no labels: 3 (" in capsys.readouterr().out

  # Directories, sidecars and TFDS statistics written before the count read it as 0.
  path = records.index_path(allowed)
  with open(path) as f:
    data = json.load(f)
  del data["num_unlabeled"]
  with open(path, "w") as f:
    json.dump(data, f)
  assert records.read_index(path).num_unlabeled == 0
  assert tool.main(["--records", allowed, "--png-dir", str(tmp_path / "png")]) == 0
  assert "clips with no labels: 3 (the index does not count them" in capsys.readouterr().out
  # An index that counts them must count them right (as its label counts).
  data["num_unlabeled"] = 2
  with open(path, "w") as f:
    json.dump(data, f)
  assert tool.main(["--records", allowed, "--png-dir", str(tmp_path / "png")]) == 2
  assert ("the index counts 2 clips with no labels, the examples have 3"
          in capsys.readouterr().err)
  stats = records.ShardStats(3, num_unlabeled=2).to_json()
  del stats["num_unlabeled"]
  assert records.ShardStats.from_json(stats).num_unlabeled == 0


def _crash_on_marked_clip(entry, labels, store_waveform):
  """A clip function whose process dies on the clip with id 'crash' (like a decoder segfault)."""
  if entry.video_id == "crash":
    os._exit(7)
  return clips.clip_example(entry, labels, store_waveform)


def test_worker_crash_loses_nothing_else(media, tmp_path):
  ids = ["a0", "b0", "crash", "b1", "a2", "b2"]  # shard 0: a0, crash, a2; shard 1: b0, b1, b2
  rows = [(v, media["one_second"], "/m/b") for v in ids]
  datafile = write_datafile(str(tmp_path / "data.json"), rows)
  out = str(tmp_path / "out")
  summary = prepare.prepare_records(datafile, media["labels_csv"], out, num_workers=2,
                                    examples_per_shard=3, clip_fn=_crash_on_marked_clip,
                                    progress=False)
  assert summary.written == 5 and summary.quarantined_by_reason == {"worker_crashed": 1}
  assert sorted(e["video_id"] for e in records.iter_examples(out)) == sorted(
      set(ids) - {"crash"})
  with open(os.path.join(out, prepare.QUARANTINE)) as f:
    (line,) = [json.loads(x) for x in f]
  assert line["video_id"] == "crash" and "exit code 7" in line["message"]
  assert not any(".tmp-" in name for name in os.listdir(out))  # The dead worker's temp file.


def _killed_between_the_renames(entry, labels, store_waveform):
  """A clip function that leaves the state of a worker killed between its shard's rename and
  its sidecar's (the shard in place, no sidecar), then interrupts the parent, whose pid is the
  clip's id, as a Ctrl-C would, and waits to be ended."""
  del labels, store_waveform
  out = os.path.join(os.path.dirname(entry.path), "out")
  with open(os.path.join(out, shards.shard_file_name(0, 1)), "wb"):
    pass
  os.kill(int(entry.video_id), signal.SIGINT)
  time.sleep(60)


def test_an_interrupted_pool_leaves_no_shard_without_its_sidecar(media, tmp_path):
  # The pool ends its workers with SIGKILL when it is interrupted; one killed between its
  # shard's two renames left the shard without its sidecar (seen in a CI run of
  # test_interrupts' Ctrl-C test). Resuming redid it, but the directory held a shard that
  # looked finished; the pool now removes it with the temporary files.
  clip = os.path.join(tmp_path, "clip.mp4")
  shutil.copy(media["one_second"], clip)
  datafile = write_datafile(str(tmp_path / "data.json"), [(str(os.getpid()), clip, "/m/b")])
  out = str(tmp_path / "out")
  os.makedirs(out)
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
  try:
    with pytest.raises(KeyboardInterrupt):
      prepare.prepare_records(datafile, media["labels_csv"], out, num_workers=1,
                              examples_per_shard=1, clip_fn=_killed_between_the_renames,
                              progress=False)
  finally:
    signal.signal(signal.SIGINT, previous)
  assert not any(name.endswith((".tfrecord", ".tfrecord.json")) or ".tmp-" in name
                 for name in os.listdir(out)), os.listdir(out)


def test_workers_are_replaced_after_a_number_of_shards(media, tmp_path, monkeypatch):
  # A fresh fork of the fork server takes over after shards.SHARDS_PER_WORKER shards (a bound on
  # what a long-lived worker accumulates), and the records are the same.
  ids = [f"c{i}" for i in range(5)]  # 5 shards of one clip, one worker
  datafile = write_datafile(str(tmp_path / "data.json"),
                            [(v, media["one_second"], "/m/b") for v in ids])
  starts = []
  start = shards._WorkerPool._start
  monkeypatch.setattr(shards._WorkerPool, "_start",
                      lambda self: (starts.append(1), start(self))[1])
  monkeypatch.setattr(shards, "SHARDS_PER_WORKER", 2)
  out = str(tmp_path / "out")
  summary = prepare.prepare_records(datafile, media["labels_csv"], out, num_workers=1,
                                    examples_per_shard=1, progress=False)
  assert summary.written == 5 and len(starts) == 3  # after shards 2 and 4; none after the last
  assert sorted(e["video_id"] for e in records.iter_examples(out)) == ids


def _fail_on_marked_clip(entry, labels, store_waveform):
  """A clip function with a bug that only the clip with id 'bug' reaches."""
  if entry.video_id == "bug":
    raise AttributeError("'NoneType' object has no attribute 'channels'")
  return clips.clip_example(entry, labels, store_waveform)


@pytest.mark.parametrize("workers", [1, 0])
def test_a_failing_shard_names_the_clip_it_failed_on(media, tmp_path, workers):
  # Without workers, the failure was raised as it was: TensorFlow's error of a full disk under
  # a shard printed a traceback, and the other shards were not written.
  ids = ["a0", "b0", "bug", "b1"]  # shard 0: a0, bug; shard 1: b0, b1
  rows = [(v, media["good_a" if v == "bug" else "one_second"], "/m/b") for v in ids]
  datafile = write_datafile(str(tmp_path / "data.json"), rows)
  out = str(tmp_path / "out")
  with pytest.raises(RuntimeError) as info:
    prepare.prepare_records(datafile, media["labels_csv"], out, num_workers=workers,
                            examples_per_shard=2, clip_fn=_fail_on_marked_clip, progress=False)
  # One line (the shards were a line each after it), as without workers.
  assert str(info.value) == (
      f"1 of 2 shards failed (finished shards are kept; rerun to resume): "
      f"{shards.shard_file_name(0, 2)}: AttributeError: 'NoneType' object has no attribute "
      f"'channels' (at clip 1 of the shard, {media['good_a']})")
  finished = sorted(name for name in os.listdir(out) if name.endswith(".tfrecord"))
  assert finished == [shards.shard_file_name(1, 2)]  # The other shard is kept.


def test_inspect_records_tool(corpus_run, tmp_path, capsys):
  out, _, examples = corpus_run
  tool = load_tool("inspect_records")
  report = tool.inspect(splits.open_records_split(out, "--records"), str(tmp_path / "png"),
                        num_images=2)
  assert report["num_examples"] == len(WRITTEN)
  assert report["shapes"]["fbank"] == ("float32", (1024, 128))
  assert report["shapes"]["frames"] == ("string", (10,))
  assert report["label_counts"] == [len(WRITTEN), 1, 0]
  assert report["rotation"] == {0: len(WRITTEN) - 1, 90: 1}
  assert len(report["pngs"]) == 4 and all(os.path.getsize(p) > 0 for p in report["pngs"])
  assert tool.main(["--records", out, "--png-dir", str(tmp_path / "png2")]) == 0
  printed = capsys.readouterr().out
  assert f"{len(WRITTEN)} examples in 4 shards" in printed
  assert ("frames turned upright by (clockwise degrees: clips): "
          f"0: {len(WRITTEN) - 1}, 90: 1") in printed
  assert ("record layouts in shard sidecars: 4 of 4 shards; balanced sampling, mixup and "
          "exact_shuffle find the records without reading them") in printed


def test_inspect_records_refuses_labels_of_another_class_count(corpus_run, tmp_path, capsys):
  """A labels CSV of fewer classes than the records ended in an IndexError traceback at the
  class histogram; one of more classes named the classes from another list."""
  tool = load_tool("inspect_records")
  for count in (2, 4):
    labels = tmp_path / f"labels{count}.csv"
    labels.write_text("index,mid,display_name\n" + "".join(
        f'{i},/m/{i},"class {i}"\n' for i in range(count)))
    assert tool.main(["--records", corpus_run[0], "--labels", str(labels), "--png-dir",
                      str(tmp_path / "png"), "--num-images", "0"]) == 2
    assert capsys.readouterr().err == (f"error: --labels {labels}: lists {count} classes, and "
                                       "the records have 3 (the labels CSV of another "
                                       "dataset?)\n")


def test_inspect_on_a_full_disk_leaves_no_partial_png_and_names_it(corpus_run, tmp_path,
                                                                   capsys, monkeypatch):
  """A PNG write that failed midway (a full disk) left a truncated PNG under its final name
  beside complete ones, and the error line read 'error: None: ...' (the OSError names no
  file)."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  savefig = Figure.savefig
  calls = []

  def fill_the_disk_at_the_third(figure, fname, **kwargs):
    calls.append(fname)
    if len(calls) < 3:
      return savefig(figure, fname, **kwargs)
    whole = tmp_path / "whole.png"
    savefig(figure, str(whole), format="png")
    with open(fname, "wb") as f:
      f.write(whole.read_bytes()[:whole.stat().st_size // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(Figure, "savefig", fill_the_disk_at_the_third)
  tool = load_tool("inspect_records")
  png_dir = str(tmp_path / "png")
  assert tool.main(["--records", corpus_run[0], "--png-dir", png_dir, "--num-images", "2"]) == 2
  (line,) = capsys.readouterr().err.splitlines()
  match = re.fullmatch(rf"error: ({re.escape(png_dir)}/fbank_\w+\.png): No space left on device",
                       line)
  assert match, line
  assert not os.path.exists(match.group(1))
  left = sorted(os.listdir(png_dir))  # the first clip's two pictures, complete; no temporary
  assert [name.split("_")[0] for name in left] == ["fbank", "frames"]
  for name in left:  # a PNG ends with its IEND chunk (length 0, type, CRC)
    with open(os.path.join(png_dir, name), "rb") as f:
      assert f.read().endswith(b"\0\0\0\0IEND\xaeB`\x82"), name


def test_inspect_counts_and_checks_the_sidecar_layouts(corpus_run, tmp_path):
  """Which shards balanced sampling finds without reading them, and a sidecar whose classes are
  not its records' is named."""
  out, _, _ = corpus_run
  copy = tmp_path / "records"
  shutil.copytree(out, copy)
  split = splits.open_records_split(str(copy), "--records")
  os.remove(split.files[0] + records.SIDECAR_SUFFIX)  # written before sidecars had layouts
  tool = load_tool("inspect_records")
  report = tool.inspect(split, str(tmp_path / "png"), 0)
  assert report["shards_with_layout"] == 3
  assert "3 of 4 shards; balanced sampling, mixup and exact_shuffle read the shards without one" \
      in tool.format_report(report, None, 3)
  sidecar = split.files[1] + records.SIDECAR_SUFFIX
  with open(sidecar) as f:
    data = json.load(f)
  data[records.RECORD_LABELS][-1] = [1 - data[records.RECORD_LABELS][-1][0]]
  with open(sidecar, "w") as f:
    json.dump(data, f)
  with pytest.raises(ValueError, match=rf"^{re.escape(sidecar)} does not describe its shard: "
                     rf"record {len(data[records.RECORD_LABELS]) - 1} has classes"):
    tool.inspect(split, str(tmp_path / "png"), 0)


def _records_with_one_example_rewritten(tmp_path, count, shard, edit):
  """Records of `count` clips (the odd ones missing), one example per shard; then shard `shard`
  holds its clip's example as `edit` changed it. Returns (records dir, that shard's path)."""
  (tmp_path / "labels.csv").write_text(LABELS_CSV)
  datafile = write_datafile(str(tmp_path / "data.json"),
                            [(f"clip{i}", f"clip{i}.mp4", "/m/c") for i in range(count)])
  out = str(tmp_path / "out")
  prepare.prepare_records(datafile, str(tmp_path / "labels.csv"), out, examples_per_shard=1,
                          num_workers=0, progress=False, clip_fn=_every_other_clip)
  values = _every_other_clip(sources.ClipEntry(f"clip{shard}", f"clip{shard}.mp4", ("/m/c",)),
                             sources.read_class_labels(str(tmp_path / "labels.csv")), False)
  example = tf.train.Example.FromString(records.serialize_example(values))
  edit(example)
  path = os.path.join(out, shards.shard_file_name(shard, count))
  with tf.io.TFRecordWriter(path) as writer:
    writer.write(example.SerializeToString())
  return out, path


def test_inspect_names_the_shard_of_a_record_that_cannot_be_parsed(tmp_path):
  # Of thousands of shards (AudioSet-2M has 2,000), the one with a record that reads but does not
  # parse (an fbank of another length) is named, as a shard that cannot be read is.
  def shorter_fbank(example):
    example.features.feature[records.FBANK].bytes_list.value[0] = b"\0\0" * 1000

  out, damaged = _records_with_one_example_rewritten(tmp_path, 4, 2, shorter_fbank)
  tool = load_tool("inspect_records")
  with pytest.raises(ValueError, match=f"shard {damaged} is damaged: .*1000"):
    tool.inspect(splits.open_records_split(out, "--records"), str(tmp_path / "png"), 0)


def test_inspect_names_the_clip_and_shard_of_a_frame_that_cannot_be_decoded(tmp_path):
  def frame_3_not_an_image(example):
    frames = example.features.feature[records.FRAMES].bytes_list.value
    for i in range(len(frames)):
      frames[i] = b"not a jpeg" if i == 3 else decode.encode_jpeg(np.zeros((8, 8, 3), np.uint8))

  out, damaged = _records_with_one_example_rewritten(tmp_path, 2, 0, frame_3_not_an_image)
  tool = load_tool("inspect_records")
  with pytest.raises(ValueError, match=f"shard {damaged}: clip clip0: stored frame 3 is not a "
                     "decodable image"):
    tool.inspect(splits.open_records_split(out, "--records"), str(tmp_path / "png"), 1)


def test_inspect_pictures_of_ids_with_one_safe_name_are_all_kept(tmp_path):
  """Ids 'x/1' and 'x_1' both became fbank_x_1.png: the second overwrote the first while the
  report listed both. An id in a script the font lacks draws boxes, without a warning per glyph.
  A long id (270 bytes) made a name too long for a file, which ended the tool."""
  ids = {0: "x/1", 2: "x_1", 4: "日本語" * 30}

  def rename(shard):
    def edit(example):
      example.features.feature[records.VIDEO_ID].bytes_list.value[0] = ids[shard].encode()
      frames = example.features.feature[records.FRAMES].bytes_list.value
      for i in range(len(frames)):
        frames[i] = decode.encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    return edit

  out, _ = _records_with_one_example_rewritten(tmp_path, 6, 0, rename(0))
  for shard in (2, 4):
    path = os.path.join(out, shards.shard_file_name(shard, 6))
    example = tf.train.Example.FromString(next(iter(tf.data.TFRecordDataset(path))).numpy())
    rename(shard)(example)
    with tf.io.TFRecordWriter(path) as writer:
      writer.write(example.SerializeToString())
  tool = load_tool("inspect_records")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    report = tool.inspect(splits.open_records_split(out, "--records"), str(tmp_path / "png"), 3)
  assert len(set(report["pngs"])) == 6
  assert all(os.path.isfile(png) for png in report["pngs"])
  names = {tool._safe_name(video_id) for video_id in ("x" * 300, "x" * 299 + "y", "日" * 90)}
  assert len(names) == 3 and all(len(name.encode()) <= 150 for name in names)


def test_inspect_figures_have_titles_axes_and_frame_numbers(corpus_run):
  tool = load_tool("inspect_records")
  values = next(v for v in corpus_run[2].values() if v["rotation"] == 90)
  figure = tool.fbank_figure(values, ["Alpha", "Beta", "Gamma"])
  axes, colorbar = figure.axes
  assert axes.get_title() == f"{values['video_id']}: Alpha"
  assert axes.get_xlabel().startswith("time frame") and axes.get_ylabel() == "mel bin"
  assert "log-mel" in colorbar.get_ylabel()
  np.testing.assert_array_equal(axes.images[0].get_array(),
                                values["fbank"][:values["fbank_num_frames"]].T)
  figure = tool.frames_figure(values)  # no class names: the stored label ids
  title = figure.texts[0].get_text()
  assert title.startswith(f"{values['video_id']}: /m/a\nrotation 90 (turned 90 degrees")
  assert [a.get_title() for a in figure.axes] == [
      f"frame {i}" for i in values["frame_indices"]]
  assert figure.axes[0].images[0].get_array().shape == (224, 224, 3)


def test_preprocess_tool_bad_lists_print_one_error_line(media, tmp_path, capsys):
  out = str(tmp_path / "out")
  missing = str(tmp_path / "missing.json")
  result = run_tool("preprocess", "--datafile", missing, "--labels", media["labels_csv"],
                    "--out", out)
  assert_one_error_line(result.returncode, result.stderr, "datafile", missing, "no such file")
  assert not os.path.exists(out)  # Nothing is started before the lists are read.
  datafile = write_datafile(str(tmp_path / "data.json"), [("a", media["good_a"], "/m/a")])
  not_json = tmp_path / "not_json.json"
  not_json.write_text("{'data': []}")
  # Wrong types in an entry (an int where the labels go raised a TypeError with a traceback).
  int_labels = tmp_path / "int_labels.json"
  int_labels.write_text(json.dumps({"data": [{"video_id": "a", "wav": media["good_a"],
                                              "labels": 3}]}))
  int_path = tmp_path / "int_path.json"
  int_path.write_text(json.dumps({"data": [{"video_id": "a", "video_path": 7, "labels": ""}]}))
  no_classes = tmp_path / "no_classes.csv"
  no_classes.write_text("index,mid,display_name\n")
  other_labels = tmp_path / "other.csv"
  other_labels.write_text('index,mid,display_name\n0,/m/x,"X"\n')
  tool = load_tool("preprocess")
  for args, fragments in [
      (["--datafile", str(int_labels), "--labels", media["labels_csv"]],
       ["int_labels.json", "data[0] (a): 'labels' is 3, expected a string"]),
      (["--datafile", str(int_path), "--labels", media["labels_csv"]],
       ["int_path.json", "data[0] (a): 'video_path' is 7, expected a path"]),
      (["--datafile", datafile, "--labels", str(no_classes)],
       ["no_classes.csv", "has no classes"]),
      (["--datafile", datafile, "--labels", str(tmp_path / "none.csv")],
       ["labels CSV", "none.csv", "no such file"]),
      (["--datafile", str(not_json), "--labels", media["labels_csv"]],
       ["datafile", "not_json.json", "not valid JSON"]),
      (["--datafile", datafile, "--labels", datafile], ["labels CSV", "expected a CSV"]),
      (["--datafile", write_datafile(str(tmp_path / "empty.json"), []), "--labels",
        media["labels_csv"]], ["datafile", "empty.json", "lists no clips"]),
      # Labels CSV of another list: refused before any decoding (every clip was quarantined).
      (["--datafile", datafile, "--labels", str(other_labels)],
       ["labels CSV", "other.csv", "has none of the 1 label id(s) of", "'/m/a'", "'/m/x'"]),
      # Nothing written (every clip quarantined) is an error, after the summary.
      (["--datafile", write_datafile(str(tmp_path / "gone.json"),
                                     [("g", str(tmp_path / "gone.mp4"), "/m/a")]),
        "--labels", media["labels_csv"], "--out", str(tmp_path / "gone_out")],
       ["gone_out: no clip was written: all 1 were quarantined (missing_file: 1"]),
      (["--merge-index"], [out, "not an output directory"]),
  ]:
    status = tool.main(args + (["--out", out] if "--out" not in args else []) +
                       ["--workers", "0", "--no-progress"])
    assert_one_error_line(status, capsys.readouterr().err, *fragments)


def test_inspect_records_tool_rejects_other_folders(corpus_run, tmp_path, capsys):
  result = run_tool("inspect_records", "--records", str(tmp_path / "missing"))
  assert_one_error_line(result.returncode, result.stderr, str(tmp_path / "missing"),
                        "directory does not exist")
  tool = load_tool("inspect_records")
  status = tool.main(["--records", str(tmp_path)])
  assert_one_error_line(status, capsys.readouterr().err, "no index.json",
                        "not a records directory")
  status = tool.main(["--records", corpus_run[0], "--labels", str(tmp_path / "none.csv")])
  assert_one_error_line(status, capsys.readouterr().err, "labels CSV", "no such file")


def test_lists_and_videos_on_ram_filesystem_give_the_local_records(media, tmp_path):
  # TensorFlow's in-memory file system stands for gs:// and the like. It lives in this process
  # only, hence --workers 0.
  root = f"ram://preprocess_{tmp_path.name}"
  names = ["good_a", "one_second", "six_48k", "text", "zero_byte", "truncated", "missing"]
  local_rows, remote_rows = [], []
  for name in names:
    if os.path.exists(media[name]):
      with open(media[name], "rb") as f:
        write_file(f"{root}/videos/{name}.mp4", f.read())
    local_rows.append((name, media[name], "/m/a"))
    remote_rows.append((name, f"videos/{name}.mp4", "/m/a"))  # relative to the datafile
  with open(media["labels_csv"], "rb") as f:
    remote_labels = write_file(f"{root}/labels.csv", f.read())
  runs = {"local": (write_datafile(str(tmp_path / "data.json"), local_rows), media["labels_csv"]),
          "ram": (write_datafile(f"{root}/data.json", remote_rows), remote_labels)}
  tool = load_tool("preprocess")
  for kind, (datafile, labels) in runs.items():
    assert tool.main(["--datafile", datafile, "--labels", labels, "--out", str(tmp_path / kind),
                      "--workers", "0", "--examples-per-shard", "2", "--no-progress"]) == 0
  local, remote = (str(tmp_path / kind) for kind in runs)
  shard_files = sorted(n for n in os.listdir(local) if n.endswith(".tfrecord"))
  assert len(shard_files) == 4 and shard_files == sorted(
      n for n in os.listdir(remote) if n.endswith(".tfrecord"))
  for name in shard_files + [os.path.basename(records.index_path(local))]:
    with open(os.path.join(local, name), "rb") as a, open(os.path.join(remote, name), "rb") as b:
      assert a.read() == b.read(), name
  assert [e["video_id"] for e in records.iter_examples(remote)] == ["good_a", "one_second",
                                                                     "six_48k"]
  quarantined = {}
  for kind, out in (("local", local), ("ram", remote)):
    with open(os.path.join(out, prepare.QUARANTINE)) as f:
      quarantined[kind] = {(q["video_id"], q["reason"]) for q in map(json.loads, f)}
  assert quarantined["ram"] == quarantined["local"] == {
      ("text", "unreadable_container"), ("zero_byte", "empty_file"),
      ("truncated", "unreadable_container"), ("missing", "missing_file")}


_WORKER_ENV_SCRIPT = """
import multiprocessing, os, sys
from cav_mae_jax.data import shards
with shards._worker_environment():
  with multiprocessing.get_context('forkserver').Pool(1) as pool:
    seen = pool.apply(os.getenv, ('OPENBLAS_NUM_THREADS',))
print(seen, os.getenv('OPENBLAS_NUM_THREADS'))
"""


def test_workers_run_native_thread_pools_single_threaded():
  # The fork server (and so every worker) starts with OPENBLAS_NUM_THREADS=1 when the user did not
  # set it; the parent's own environment is left as it was.
  env = {k: v for k, v in os.environ.items() if k != 'OPENBLAS_NUM_THREADS'}
  out = subprocess.run([sys.executable, '-c', _WORKER_ENV_SCRIPT], env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  assert out == ['1', 'None']


_MALLOC_SCRIPT = """
import resource, sys
import numpy as np
from cav_mae_jax.data import clips
applied = clips.keep_freed_memory() if sys.argv[1] == 'keep' else None
def clip():  # a clip's large temporaries (the fbank's are 3.2 MB), all freed before the next
  arrays = [np.ones(400_000) for _ in range(6)]
  del arrays
for _ in range(3):
  clip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  clip()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults_of_ten_clips(how: str, **env: str) -> tuple[str, int]:
  environment = {k: v for k, v in os.environ.items()
                 if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
  environment.update(env)
  lines = subprocess.run([sys.executable, "-c", _MALLOC_SCRIPT, how], env=environment,
                         check=True, capture_output=True, text=True).stdout.split("\n")
  applied, faults = [line for line in lines if line.strip()][-1].split()
  return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_a_worker_keeps_freed_memory_for_the_next_clip():
  # glibc's defaults give a clip's freed temporaries back to the kernel, and the next clip
  # page-faults them in again (6 x 782 pages per clip here); kept, they are reused.
  assert _page_faults_of_ten_clips("default")[1] > 20_000
  applied, faults = _page_faults_of_ten_clips("keep")
  assert applied == "True" and faults < 500


@pytest.mark.parametrize("name,value", [("MALLOC_TOP_PAD_", "0"),
                                        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000")])
def test_a_users_own_malloc_settings_are_left_as_they_are(name, value, monkeypatch):
  # Read from the environment at the call (this process's malloc is left alone when they are).
  monkeypatch.setenv(name, value)
  assert not clips.keep_freed_memory()


def test_workers_keep_freed_memory(monkeypatch):
  calls = []
  monkeypatch.setattr(clips, "keep_freed_memory", lambda: calls.append(True))
  monkeypatch.setattr(shards.signal, "signal", lambda *args: None)  # pytest keeps its Ctrl-C

  class Closed:  # the parent's end of the pipe, already gone
    def recv(self):
      raise EOFError

  shards._worker_main(Closed(), "", None, clips.WriteOptions(), clips.clip_example)
  assert calls == [True]


def test_the_tool_keeps_freed_memory_where_it_decodes_itself(media, tmp_path, monkeypatch):
  # --workers 0: the tool's own process decodes every clip, and keeps memory as workers do;
  # main called with arguments (another program, as the other tests here) leaves malloc alone.
  calls = []
  monkeypatch.setattr(clips, "keep_freed_memory", lambda: calls.append(True))
  datafile = write_datafile(str(tmp_path / "data.json"), [("good_a", media["good_a"], "/m/a")])
  args = ["--datafile", datafile, "--labels", media["labels_csv"], "--workers", "0",
          "--no-progress"]
  tool = load_tool("preprocess")
  assert tool.main(args + ["--out", str(tmp_path / "in_process")]) == 0
  assert not calls
  monkeypatch.setattr(sys, "argv", ["preprocess.py", *args, "--out", str(tmp_path / "out")])
  assert tool.main() == 0
  assert calls == [True]


def test_the_originals_extracted_layout_gives_the_videos_records(media, tmp_path):
  """Audio file + frame folders (the original's datafiles) -> the same fbank and frames as the
  video; missing or malformed frames are quarantined naming the frame file, never replaced."""
  audio, frames_dir = synthetic.write_extracted_layout(media["good_a"], str(tmp_path), "clip")
  from PIL import Image  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  broken, bad_size = tmp_path / "missing_frame_7", tmp_path / "frame_3_100x100"
  for i in range(10):
    data = open(os.path.join(frames_dir, f"frame_{i}", "clip.jpg"), "rb").read()
    for folder in (broken, bad_size):
      (folder / f"frame_{i}").mkdir(parents=True)
      if folder is broken and i == 7:
        continue
      if folder is bad_size and i == 3:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).resize((100, 100)).save(buffer, format="JPEG")
        data = buffer.getvalue()
      (folder / f"frame_{i}" / f"{folder.name}.jpg").write_bytes(data)
  data = [{"video_id": "video", "wav": media["good_a"], "video_path": media["good_a"],
           "labels": "/m/a"},
          {"video_id": "clip", "wav": audio, "video_path": frames_dir, "labels": "/m/a"},
          {"video_id": broken.name, "wav": audio, "video_path": str(broken), "labels": "/m/b"},
          {"video_id": bad_size.name, "wav": audio, "video_path": str(bad_size),
           "labels": "/m/c"}]
  datafile = write_file(str(tmp_path / "data.json"), json.dumps({"data": data}).encode())
  out = str(tmp_path / "out")
  summary = prepare.prepare_records(datafile, media["labels_csv"], out, num_workers=0,
                                    examples_per_shard=4, store_waveform=True, progress=False)
  written = {e["video_id"]: e for e in records.iter_examples(out)}
  assert sorted(written) == ["clip", "video"]
  video, extracted = written["video"], written["clip"]
  np.testing.assert_array_equal(extracted["waveform"], video["waveform"])
  np.testing.assert_array_equal(extracted["fbank"], video["fbank"])
  assert extracted["frames"] == video["frames"]  # the stored JPEG bytes, kept as they are
  assert list(extracted["frame_indices"]) == [decode.EXTRACTED_FRAME_INDEX] * 10
  assert extracted["frame_count"] == 0 and extracted["fps"] == 0.0
  assert extracted["duration_s"] == pytest.approx(10.0, abs=0.05)

  with open(os.path.join(out, "quarantine.jsonl")) as f:
    quarantined = [json.loads(line) for line in f]
  assert summary.quarantined_by_reason == {"missing_frame": 1, "bad_frame": 1}
  by_reason = {q["reason"]: q["message"] for q in quarantined}
  assert by_reason.keys() == {"missing_frame", "bad_frame"}
  assert os.path.join(str(broken), "frame_7", f"{broken.name}.jpg") in by_reason["missing_frame"]
  assert "100x100" in by_reason["bad_frame"] and "frame_3" in by_reason["bad_frame"]


def test_a_shards_tensorflow_failure_is_said_in_its_own_words():
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  error = tf.errors.ResourceExhaustedError(
      None, None, "{{function_node __wrapped__WriteRecord}} /out/r.tfrecord.tmp-h-1; No space "
      "left on device\n\tmore [Op:WriteRecord]")
  assert shards.failure_text(error) == (
      "ResourceExhaustedError: /out/r.tfrecord.tmp-h-1; No space left on device")


def test_a_json_file_the_disk_refuses_is_named_and_leaves_no_temporary(tmp_path, monkeypatch):
  # manifest.json's temporary stayed for good (no rerun removes it), and the tool's line named
  # the output folder: the OSError of the write named no file.
  import errno  # pylint: disable=import-outside-toplevel
  def full_disk(*args, **kwargs):
    del args, kwargs
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(shards.json, "dump", full_disk)
  path = str(tmp_path / "manifest.json")
  with pytest.raises(OSError) as info:
    shards.write_json_atomic(path, {"a": 1})
  assert (info.value.filename, info.value.strerror) == (path, os.strerror(errno.ENOSPC))
  assert os.listdir(tmp_path) == []
