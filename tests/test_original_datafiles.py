"""The original's own data files as a user migrating from it feeds them to the data tools.

Its preprocessing (src/preprocess/extract_{audio,video_frame}.py) writes `{target}/{id}.wav` and
`{target}/frame_{i}/{id}.jpg`; its datafiles name the audio in `wav` and that folder, often with
a trailing slash, in `video_path`.
"""

import dataclasses
import json
import os
import wave

import pytest

from cav_mae_jax.data import clips
from cav_mae_jax.data import sources

LABELS = sources.ClassLabels(("/m/09x0r", "/m/05zppz"),
                             ("Speech", "Male speech, man speaking"), "labels.csv")


def _write_wav(path, seconds=0.5):
  with wave.open(str(path), "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(16000)
    f.writeframes(b"\0\0" * int(16000 * seconds))


def test_a_frames_folder_that_is_not_there_is_named_not_decoded_as_a_video(tmp_path):
  """video_path names the extracted frames folder, which does not exist (a typo, another
  machine's path as in the original's shared datafiles): the clip is quarantined as missing its
  frames, naming the folder, not as an audio file without a video stream."""
  (tmp_path / "audio").mkdir()
  _write_wav(tmp_path / "audio" / "clip.wav")
  datafile = tmp_path / "data.json"
  for video_path in (str(tmp_path / "frames_typo") + "/", str(tmp_path / "frames_typo")):
    datafile.write_text(json.dumps({"data": [{
        "video_id": "clip", "wav": str(tmp_path / "audio" / "clip.wav"),
        "video_path": video_path, "labels": "/m/09x0r,/m/05zppz"}]}))
    entry, = sources.read_datafile(str(datafile))
    assert (entry.path, entry.frames_dir) == (str(tmp_path / "audio" / "clip.wav"), video_path)
    result = clips.try_clip_example(entry, LABELS)
    assert isinstance(result, clips.Quarantined), result
    assert result.reason == "missing_frame", result
    assert "frame_0/clip.jpg" in result.message, result.message
    assert f"frames folder {video_path} " in result.message, result.message
    assert "does not exist" in result.message, result.message

  # A video_path that is a file (a video named without an extension) is a video.
  (tmp_path / "video_without_extension").write_bytes(b"")
  datafile.write_text(json.dumps({"data": [{
      "video_id": "clip", "wav": "audio/clip.wav", "video_path": "video_without_extension",
      "labels": "/m/09x0r"}]}))
  entry, = sources.read_datafile(str(datafile))
  assert (entry.path, entry.frames_dir) == (str(tmp_path / "video_without_extension"), "")
  # An audio file named in both fields is not a frames folder: it has no video stream.
  datafile.write_text(json.dumps({"data": [{
      "video_id": "clip", "wav": "audio/clip.wav", "video_path": "audio/clip.wav",
      "labels": "/m/09x0r"}]}))
  entry, = sources.read_datafile(str(datafile))
  assert (entry.path, entry.frames_dir) == (str(tmp_path / "audio" / "clip.wav"), "")
  assert clips.try_clip_example(entry, LABELS).reason == "no_video_stream"


def test_a_display_name_with_a_comma_is_named_not_called_another_lists_label(tmp_path):
  """Labels are split at commas (the original's rule), so a display name with a comma, as
  VGGSound's 'bird chirping, tweeting' or AudioSet's 'Male speech, man speaking', arrives in
  pieces: the messages say so and name the mid, rather than calling the CSV another list's."""
  datafile = tmp_path / "data.json"
  datafile.write_text(json.dumps({"data": [{
      "video_id": "clip", "wav": "clip.wav", "video_path": "frames/",
      "labels": "Male speech, man speaking"}]}))
  entries = sources.read_datafile(str(datafile))
  assert entries[0].label_ids == ("Male speech", "man speaking")
  with pytest.raises(sources.SourceError) as info:
    sources.check_labels_known(entries, LABELS, str(datafile))
  assert "not the list's labels CSV" not in str(info.value)
  assert ("'Male speech' is a piece of the display name 'Male speech, man speaking': name "
          "that class by its mid '/m/05zppz'") in str(info.value)
  entries = [dataclasses.replace(entries[0], label_ids=("Speech", "Male speech", "man speaking"))]
  sources.check_labels_known(entries, LABELS, str(datafile))  # 'Speech' is known
  result = clips.try_clip_example(entries[0], LABELS)
  assert result.reason == clips.UNKNOWN_LABEL
  assert "'Male speech' is not in labels.csv (labels are split at commas" in result.message
  assert "its mid '/m/05zppz'" in result.message


def test_inspect_titles_extracted_frames_by_their_folder_not_as_frame_minus_1():
  """Records of the original's extracted layout store frame_indices -1 (not known): the figure
  names each frame by the frame_{i} folder it came from, not 'frame -1' under 'source frame
  numbers'."""
  import io  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.data import decode  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "inspect_records.py")
  spec = importlib.util.spec_from_file_location("inspect_records", path)
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  buffer = io.BytesIO()
  Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
  values = {"video_id": "clip", "labels": [1], "label_ids": ["/m/05zppz"], "rotation": 0,
            "frames": [buffer.getvalue()] * 10,
            "frame_indices": [decode.EXTRACTED_FRAME_INDEX] * 10}
  figure = tool.frames_figure(values)
  assert [a.get_title() for a in figure.axes] == [f"frame_{i}" for i in range(10)]
  title = figure.texts[0].get_text()
  assert "source frame numbers not known" in title and "0-based" not in title, title
  # Two labels, one of them a name with a comma, stay two labels to read.
  values["labels"], values["label_ids"] = [0, 1], ["/m/09x0r", "/m/05zppz"]
  title = tool.frames_figure(values, list(LABELS.display_names)).texts[0].get_text()
  assert title.startswith("clip: Speech; Male speech, man speaking\n"), title


def test_a_subset_list_saved_with_a_byte_order_mark_reads_its_first_id(tmp_path):
  """A clip-id list saved by an editor that writes a UTF-8 byte-order mark: the mark is not part
  of the first id (it was, and that id was then 'not in the records')."""
  from cav_mae_jax.eval import clips as eval_clips  # pylint: disable=import-outside-toplevel
  text_list, datafile, latin = (tmp_path / "ids.txt", tmp_path / "subset.json",
                                tmp_path / "latin.txt")
  text_list.write_bytes("--4gqARaEJE\n-0nqfRcnAYE\n".encode("utf-8-sig"))
  datafile.write_bytes(json.dumps({"data": [{"video_id": "--4gqARaEJE", "labels": "/m/068hy"}]}
                                  ).encode("utf-8-sig"))
  assert eval_clips.read_id_list(str(text_list)) == ["--4gqARaEJE", "-0nqfRcnAYE"]
  assert eval_clips.read_id_list(str(datafile)) == ["--4gqARaEJE"]
  # The same for a list of video paths (as the original's sample_video_extract_list.csv).
  video_list = tmp_path / "videos.csv"
  video_list.write_bytes("./sample_video/00W1lcxW-WU_40.000.mp4\n".encode("utf-8-sig"))
  clip, = eval_clips.list_videos(str(video_list))
  assert (clip.video_id, clip.path) == (
      "00W1lcxW-WU_40.000", os.path.join(str(tmp_path), "./sample_video/00W1lcxW-WU_40.000.mp4"))
  latin.write_bytes("caf\xe9\n".encode("latin-1"))
  with pytest.raises(ValueError, match="latin.txt: not UTF-8 text"):
    eval_clips.read_id_list(str(latin))


def test_a_videos_directory_lists_every_container_the_datafile_reader_knows(tmp_path):
  """A --videos directory of MPEG-TS or MPEG-PS clips (which decode reads, and which a datafile
  names as videos) was 'lists no video files'."""
  from cav_mae_jax.eval import clips as eval_clips  # pylint: disable=import-outside-toplevel
  assert set(eval_clips.VIDEO_EXTENSIONS) == sources.VIDEO_FILE_EXTENSIONS
  for name in ("a.ts", "b.MPG", "notes.txt"):
    (tmp_path / name).write_bytes(b"")
  assert [c.video_id for c in eval_clips.list_videos(str(tmp_path))] == ["a", "b"]


def test_a_labels_csv_in_another_row_order_is_read_by_its_indices(tmp_path):
  # The original looks each mid's index up (make_index_dict), so any row order works there; a
  # shuffled CSV was refused here ("row 2 has index '1', expected 0").
  path = tmp_path / "labels.csv"
  path.write_text('index,mid,display_name\n1,/m/05zppz,"Male speech, man speaking"\n'
                  '0,/m/09x0r,"Speech"\n')
  labels = sources.read_class_labels(str(path))
  assert labels.mids == LABELS.mids and labels.display_names == LABELS.display_names
  for rows, why in (('0,/m/a,A\n0,/m/b,B\n', "row 3 has index '0', which is listed twice"),
                    ('0,/m/a,A\n2,/m/b,B\n', r"row 3 has index '2', which is outside 0\.\.1"),
                    ('0,/m/a,A\nx,/m/b,B\n', "row 3 has index 'x', which is not an integer")):
    path.write_text("index,mid,display_name\n" + rows)
    with pytest.raises(sources.SourceError, match=why):
      sources.read_class_labels(str(path))


def test_a_labels_csv_without_its_header_names_the_first_row_it_has(tmp_path):
  # A header with spaces after the commas, a semicolon-separated export or a CSV without its
  # header row were all told "expected a CSV with columns index,mid,display_name" only.
  path = tmp_path / "labels.csv"
  for text, found in (("index, mid, display_name\n0, /m/a, A\n",
                       "its first row is 'index, mid, display_name'"),
                      ("index;mid;display_name\n0;/m/a;A\n",
                       "its first row is 'index;mid;display_name'"),
                      ("0,/m/a,A\n", "its first row is '0,/m/a,A'"),
                      ("", "it is empty")):
    path.write_text(text)
    with pytest.raises(sources.SourceError) as info:
      sources.read_class_labels(str(path))
    assert str(info.value) == (f"labels CSV {path}: expected a CSV with columns "
                               f"index,mid,display_name; {found}")


def test_a_labels_csv_row_without_a_mid_is_refused_and_duplicates_are_named(tmp_path):
  # A row whose mid is empty (a short row: 'index' alone, or ',,') was a class no label could
  # name, accepted silently; duplicate mids were refused without saying which.
  path = tmp_path / "labels.csv"
  for text, why in (("index,mid,display_name\n0,/m/a,A\n1\n", "row 3 (index 1) has no mid"),
                    ("index,mid,display_name\n0, ,A\n", "row 2 (index 0) has no mid"),
                    ("index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n2,/m/a,C\n",
                     "duplicate mids: /m/a"),
                    # An unquoted comma: the name was read as 'Vehicle' and ' car' dropped.
                    ("index,mid,display_name\n0,/m/v,Vehicle, car\n",
                     'row 2 has 4 fields, the header 3: a display name that holds a comma must '
                     'be quoted ("Male speech, man speaking")')):
    path.write_text(text)
    with pytest.raises(sources.SourceError) as info:
      sources.read_class_labels(str(path))
    assert str(info.value) == f"labels CSV {path}: {why}"
  path.write_text("index,mid,display_name\n0,/m/a\n")  # a display name only names the class
  assert sources.read_class_labels(str(path)).display_names == ("",)
  path.write_text('index,mid,display_name\n0,/m/v,"Vehicle, car"\n')
  assert sources.read_class_labels(str(path)).display_names == ("Vehicle, car",)


class _CountedLabel(str):
  """A label id that counts the comparisons a lookup makes with it."""

  comparisons = 0

  def __eq__(self, other):
    type(self).comparisons += 1
    return str.__eq__(self, other)

  __hash__ = str.__hash__


def test_a_label_is_found_by_its_mid_else_its_display_name_without_scanning_the_classes():
  # A clip writer looks up every label of every clip (about 5M for AudioSet-2M); a scan of
  # the 527 mids and names per lookup took 11 s of a core's time there.
  labels = sources.ClassLabels(tuple(f"/m/{i}" for i in range(527)),
                               tuple(f"Class {i}" for i in range(526)) + ("/m/3",), "l.csv")
  assert labels.index_of("/m/5") == 5
  assert labels.index_of("/m/3") == 3  # a mid before a display name
  assert labels.index_of("Class 7") == 7
  assert labels.index_of("Class 600") is None
  assert sources.ClassLabels(("/m/a", "/m/b"), ("Same", "Same"), "l.csv").index_of("Same") == 0
  for label in ("/m/526", "Class 525"):
    _CountedLabel.comparisons = 0
    assert labels.index_of(_CountedLabel(label)) == int(label.split()[-1].split("/")[-1])
    assert _CountedLabel.comparisons <= 2


@pytest.mark.parametrize("video_id", [None, "", "  ", {"x": 1}, ["a"], 1.5, True])
def test_a_video_id_that_is_not_a_string_or_an_integer_is_refused_naming_its_entry(
    tmp_path, video_id):
  # null became the id 'None' (two of them: a "duplicate of 'None'"), an object "{'x': 1}",
  # and "" was taken; the other fields already got a SourceError naming data[i].
  rows = [{"video_id": "ok", "video_path": "a.mp4", "labels": "/m/09x0r"},
          {"video_id": video_id, "video_path": "b.mp4", "labels": "/m/09x0r"}]
  (tmp_path / "data.json").write_text(json.dumps({"data": rows}))
  with pytest.raises(sources.SourceError) as info:
    sources.read_datafile(str(tmp_path / "data.json"))
  assert str(info.value) == (f"datafile {tmp_path / 'data.json'}: data[1]: 'video_id' is "
                             f"{video_id!r}, expected a non-empty string (or an integer)")


def test_blank_labels_in_a_list_are_dropped_as_in_a_comma_separated_string(tmp_path):
  # "labels": ["/m/09x0r", ""] was quarantined unknown_label ("label '' is not in ...") where
  # "/m/09x0r," is written, and [""] was unknown_label where "" is no_labels.
  rows = [{"video_id": "list", "video_path": "a.mp4", "labels": ["/m/09x0r", " ", ""]},
          {"video_id": "string", "video_path": "a.mp4", "labels": "/m/09x0r, ,"},
          {"video_id": "blank_list", "video_path": "a.mp4", "labels": [""]},
          {"video_id": "blank_string", "video_path": "a.mp4", "labels": ""}]
  (tmp_path / "data.json").write_text(json.dumps({"data": rows}))
  entries = sources.read_datafile(str(tmp_path / "data.json"))
  assert [entry.label_ids for entry in entries] == [("/m/09x0r",), ("/m/09x0r",), (), ()]
  quarantined = clips.try_clip_example(entries[2], LABELS, clip_fn=None)
  assert quarantined.reason == clips.NO_LABELS


def test_an_integer_video_id_is_read_as_its_digits(tmp_path):
  rows = [{"video_id": 7, "video_path": "a.mp4", "labels": "/m/09x0r"}]
  (tmp_path / "data.json").write_text(json.dumps({"data": rows}))
  assert sources.read_datafile(str(tmp_path / "data.json"))[0].video_id == "7"


def test_a_long_datafile_is_read_without_a_dict_per_entry_or_a_copy_per_label(tmp_path):
  """AudioSet-2M's datafile has 2M entries naming 527 labels: each entry held a __dict__ and its
  own copy of every label string (517 B per entry retained here, 871 at the peak, where the
  parsed JSON was held whole); slots, interned labels and freeing each parsed entry as it is
  read give 353 and 645."""
  import tracemalloc  # pylint: disable=import-outside-toplevel
  num_entries, mids = 20_000, [f"/m/0{i:05d}" for i in range(527)]
  items = [{"video_id": f"{i:011x}_{i}", "wav": f"/data/audioset/wav/{i:07d}.wav",
            "video_path": f"/data/audioset/video/{i:07d}.mp4",
            "labels": ",".join(mids[(i * 7 + k * 13) % 527] for k in range(1 + i % 3))}
           for i in range(num_entries)]
  path = tmp_path / "data.json"
  path.write_text(json.dumps({"data": items}))
  del items
  tracemalloc.start()
  try:
    entries = sources.read_datafile(str(path))
    retained, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert len(entries) == num_entries and not hasattr(entries[0], "__dict__")
  assert entries[0].label_ids[0] is entries[527].label_ids[0]  # one string per label
  assert retained / num_entries < 440, retained / num_entries
  assert peak / num_entries < 780, peak / num_entries


def test_lists_with_old_mac_line_ends_are_read_and_an_unreadable_csv_is_one_error(tmp_path):
  # A spreadsheet's "CSV (Macintosh)" export ends lines with a lone '\r': the original (text
  # mode) reads it; csv's "new-line character seen in unquoted field" was a traceback.
  path = tmp_path / "labels.csv"
  path.write_bytes(b'index,mid,display_name\r0,/m/09x0r,"Speech"\r'
                   b'1,/m/05zppz,"Male speech, man speaking"\r')
  labels = sources.read_class_labels(str(path))
  assert labels.mids == LABELS.mids and labels.display_names == LABELS.display_names
  segments = tmp_path / "segments.csv"
  segments.write_bytes(b'# YTID, start_seconds, end_seconds, positive_labels\r'
                       b'abc, 10.000, 20.000, "/m/09x0r,/m/05zppz"\r')
  entry, = sources.read_audioset_csv(str(segments), "videos", "{ytid}.mp4")
  assert (entry.video_id, entry.label_ids) == ("abc", ("/m/09x0r", "/m/05zppz"))
  path.write_text("index,mid,display_name\n0,/m/a," + "A" * 200_000 + "\n")  # not a CSV
  with pytest.raises(sources.SourceError) as info:
    sources.read_class_labels(str(path))
  assert str(info.value) == (f"labels CSV {path}: not a readable CSV: field larger than field "
                             "limit (131072)")


def test_a_frames_folder_without_its_audio_file_says_so(tmp_path):
  (tmp_path / "frames").mkdir()
  datafile = tmp_path / "data.json"
  for wav in ("", None):
    datafile.write_text(json.dumps({"data": [{"video_id": "a4", "wav": wav,
                                              "video_path": "frames", "labels": "/m/09x0r"}]}))
    with pytest.raises(sources.SourceError) as info:  # it said "names no media file"
      sources.read_datafile(str(datafile))
    assert str(info.value) == (
        f"datafile {datafile}: data[0] (a4): 'video_path' is a folder of extracted frames "
        f"({tmp_path / 'frames'}), and 'wav' names no audio file to go with them")


def test_a_subset_list_takes_integer_ids_as_the_datafile_reader_does(tmp_path):
  from cav_mae_jax.eval import clips as eval_clips  # pylint: disable=import-outside-toplevel
  datafile, id_list = tmp_path / "subset.json", tmp_path / "ids.json"
  datafile.write_text(json.dumps({"data": [{"video_id": 17, "labels": "/m/09x0r"},
                                           {"video_id": "x", "labels": "/m/09x0r"}]}))
  id_list.write_text(json.dumps([17, "x"]))
  assert eval_clips.read_id_list(str(datafile)) == ["17", "x"]
  assert eval_clips.read_id_list(str(id_list)) == ["17", "x"]
