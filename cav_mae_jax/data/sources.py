"""Source lists: which clips to turn into records, and the class list their labels come from.

Readers for the original's JSON datafile, AudioSet segment CSVs and vggsound.csv, each giving
`ClipEntry`s (an id, a media path and label ids), and for an AudioSet-format
class_labels_indices.csv (`ClassLabels`). `tools/preprocess.py` and the TFDS builder read their
lists here, so both see the same clips. Lists may live on any file system TensorFlow reads
(gs://, ram://, ...). A list that cannot be read or parsed raises `SourceError`, one line
naming the file and the reason, which the tools print as it is.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import tensorflow as tf


class SourceError(ValueError):
  """A source list that cannot be read or parsed; the message names the file and why."""

  def __init__(self, what: str, path: str, reason: str):
    super().__init__(f"{what} {path}: {reason}")
    self.path = path
    self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class ClipEntry:
  """One clip to process: its id, media file and label ids (e.g. AudioSet mids).

  With `frames_dir` (the original's extracted layout) `path` is the clip's audio file and the
  frames are `{frames_dir}/frame_{i}/{video_id}.jpg`; without, `path` is a video with both.
  `where` locates the entry in its list in the list's own terms, as the readers' errors do
  (`data[3]` of a JSON datafile, `data row 4` of an AudioSet CSV, `line 5` of vggsound.csv).
  `duplicate_of` names an earlier entry with the same `video_id` (its `where` and path,
  `mark_duplicates`); such an entry is quarantined, not written a second time.
  """

  video_id: str
  path: str
  label_ids: tuple[str, ...]
  frames_dir: str = ""
  duplicate_of: str | None = None
  where: str = dataclasses.field(default="", compare=False)


@dataclasses.dataclass(frozen=True)
class ClassLabels:
  """The class list of an AudioSet-format class_labels_indices.csv (index,mid,display_name)."""

  mids: tuple[str, ...]
  display_names: tuple[str, ...]
  source: str

  @property
  def num_classes(self) -> int:
    return len(self.mids)

  @functools.cached_property
  def _indices(self) -> tuple[dict[str, int], dict[str, int]]:
    """(mid -> class index, display name -> class index), each name's first, built on first
    use."""
    def first_index(keys: tuple[str, ...]) -> dict[str, int]:
      indices: dict[str, int] = {}
      for index, key in enumerate(keys):
        indices.setdefault(key, index)
      return indices

    return first_index(self.mids), first_index(self.display_names)

  def index_of(self, label_id: str) -> int | None:
    """Class index of a mid (or, failing that, of a display name); None if unknown.

    A dict lookup: the clip writers look up every label of every clip (about 5M lookups for
    AudioSet-2M, where a scan of the 527 classes took 11 s of a core's time)."""
    by_mid, by_name = self._indices
    index = by_mid.get(label_id)
    return by_name.get(label_id) if index is None else index

  def comma_split_hint(self, label_id: str) -> str:
    """For an unknown label id that is one piece of a display name with a comma (a list's
    labels are split at commas, so 'Male speech, man speaking' arrives as two pieces): a
    sentence that says so and names the class's mid; else ''."""
    for mid, name in zip(self.mids, self.display_names):
      if "," in name and label_id in (piece.strip() for piece in name.split(",")):
        return (f"labels are split at commas, and {label_id!r} is a piece of the display name "
                f"{name!r}: name that class by its mid {mid!r}")
    return ""


def read_text(what: str, path: str) -> str:
  """The whole text of a list file on any file system TensorFlow reads; SourceError if not.
  Line ends are '\n': '\r\n' and a lone '\r' (a spreadsheet's old-Mac CSV export) too, as the
  original, which opens its lists in Python's text mode (universal newlines), reads them."""
  try:
    if tf.io.gfile.isdir(path):
      raise SourceError(what, path, "is a directory, not a file")
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read()
  except tf.errors.NotFoundError:
    raise SourceError(what, path, "no such file") from None
  except tf.errors.PermissionDeniedError:
    raise SourceError(what, path, "permission denied") from None
  except tf.errors.OpError as e:
    raise SourceError(what, path, f"cannot be read: {e.message.splitlines()[0]}") from None
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise SourceError(what, path, f"not UTF-8 text (byte {e.start})") from None
  return text.replace("\r\n", "\n").replace("\r", "\n")


def _csv_rows(what: str, path: str, rows: Iterable[Any]) -> list[Any]:
  """All rows of a csv reader over `path`'s text; its errors (a field over csv's size limit,
  as a binary file gives) as SourceError naming the file."""
  try:
    return list(rows)
  except csv.Error as e:
    raise SourceError(what, path, f"not a readable CSV: {e}") from None


def read_class_labels(path: str) -> ClassLabels:
  """Reads class_labels_indices.csv: its indices are 0..C-1, each once, in any row order (the
  original looks each mid's index up, so it takes rows in any order too)."""
  what = "labels CSV"
  reader = csv.DictReader(io.StringIO(read_text(what, path)))
  rows = _csv_rows(what, path, reader)
  if not {"index", "mid", "display_name"} <= set(reader.fieldnames or ()):
    # What the first row holds: spaces after the commas, semicolons (a spreadsheet's export in
    # some locales) or no header row at all are told apart at a glance.
    found = (f"its first row is {','.join(reader.fieldnames)!r}" if reader.fieldnames
             else "it is empty")
    raise SourceError(what, path, f"expected a CSV with columns index,mid,display_name; {found}")
  if not rows:
    raise SourceError(what, path, "has no classes (a header and no rows)")
  by_index: dict[int, dict[str, str]] = {}
  for position, row in enumerate(rows):
    if None in row:  # more fields than the header names (DictReader's rest key)
      fields = len(reader.fieldnames) + len(row[None])
      raise SourceError(what, path, f"row {position + 2} has {fields} fields, the header "
                        f"{len(reader.fieldnames)}: a display name that holds a comma must be "
                        'quoted ("Male speech, man speaking")')
    try:
      index = int(row["index"])
    except (TypeError, ValueError):
      index = None
    if index is None or not 0 <= index < len(rows) or index in by_index:
      why = ("is not an integer" if index is None else "is listed twice" if index in by_index
             else f"is outside 0..{len(rows) - 1} ({len(rows)} classes)")
      raise SourceError(what, path, f"row {position + 2} has index {row['index']!r}, which "
                        f"{why}: the indices must be 0..{len(rows) - 1}, each once")
    if not (row["mid"] or "").strip():  # no datafile label could name the class
      raise SourceError(what, path, f"row {position + 2} (index {index}) has no mid")
    by_index[index] = row
  rows = [by_index[index] for index in range(len(rows))]
  mids = tuple(row["mid"].strip() for row in rows)
  if len(set(mids)) != len(mids):
    twice = sorted({mid for mid in mids if mids.count(mid) > 1})
    raise SourceError(what, path, f"duplicate mids: {', '.join(twice[:5])}")
  return ClassLabels(mids, tuple((row["display_name"] or "").strip() for row in rows), path)


def check_labels_known(entries: Sequence[ClipEntry], labels: ClassLabels, source: str) -> None:
  """Raises SourceError when no label id of `entries` is in `labels`: a labels CSV other than
  the list's (one unknown label only quarantines its clip, `clips.UNKNOWN_LABEL`)."""
  ids = sorted({label_id for entry in entries for label_id in entry.label_ids})
  if ids and all(labels.index_of(label_id) is None for label_id in ids):
    hint = next(filter(None, map(labels.comma_split_hint, ids)), "")
    if hint:
      raise SourceError("labels CSV", labels.source,
                        f"has none of the {len(ids)} label id(s) of {source}: {hint}")
    raise SourceError("labels CSV", labels.source,
                      f"has none of the {len(ids)} label id(s) of {source} (e.g. "
                      f"{', '.join(map(repr, ids[:3]))}; its own: "
                      f"{', '.join(map(repr, labels.mids[:3]))}): not the list's labels CSV")


def _split_labels(labels: str | Sequence[str]) -> tuple[str, ...]:
  """A list entry's label ids, interned: a list of millions of clips names a few hundred labels.

  Blank ids are dropped in both forms, so `["/m/a", ""]` is `"/m/a,"` and `[""]` is `""` (no
  labels, `clips.NO_LABELS`), not a label `''` that no labels CSV has."""
  pieces = labels.split(",") if isinstance(labels, str) else labels
  return tuple(sys.intern(x.strip()) for x in pieces if x.strip())


def _media_path(base: str, media: str) -> str:
  """A datafile's media path: absolute paths and URIs (gs://...) as they are, else under base."""
  return media if "://" in media else os.path.join(base, media)


# Names of video files: a datafile's `video_path` ending in one is a video, not the folder of the
# original's extracted frames, without asking the file system (one remote call per clip, a day
# for AudioSet-2M on a bucket); other names are looked up once per distinct folder.
VIDEO_FILE_EXTENSIONS = frozenset({
    ".3gp", ".avi", ".flv", ".m2ts", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".mts",
    ".mxf", ".ogv", ".ts", ".webm", ".wmv"})

# Names of audio-only files: a datafile entry whose `wav` is one of these and whose `video_path`
# is neither a video nor an audio file name is the original's extracted layout even when that
# folder is not there (its clips are quarantined `missing_frame` naming the folder, not decoded as
# a video they are not).
AUDIO_FILE_EXTENSIONS = frozenset({
    ".aac", ".aif", ".aiff", ".au", ".flac", ".m4a", ".mp3", ".oga", ".ogg", ".opus", ".wav",
    ".wma"})


def _extension(path: str) -> str:
  return os.path.splitext(path)[1].lower()


def mark_duplicates(entries: Sequence[ClipEntry]) -> list[ClipEntry]:
  """The entries, each later one with an already-seen video_id marked `duplicate_of` the first.

  A video id is an example's key (TFDS refuses repeated keys; retrieval and features are
  reported by id), so a list that names a clip twice gets it once, and the repeat is reported.
  """
  first: dict[str, ClipEntry] = {}
  marked = []
  for entry in entries:
    seen = first.setdefault(entry.video_id, entry)
    if seen is not entry:
      entry = dataclasses.replace(
          entry, duplicate_of=f"{seen.where or 'an earlier entry'} ({seen.path})")
    marked.append(entry)
  return marked


def _listed(what: str, path: str, entries: list[ClipEntry], which: str = "") -> list[ClipEntry]:
  """A reader's entries: refused when there are none, repeats marked (`mark_duplicates`)."""
  if not entries:
    raise SourceError(what, path, f"lists no clips{which}")
  return mark_duplicates(entries)


def read_datafile(path: str) -> list[ClipEntry]:
  """Reads the original's JSON datafile `{"data": [{"video_id", "wav", "video_path", "labels"}]}`.

  Either layout: `video_path` names a video with both streams, or, as the original's
  preprocessing leaves them, `video_path` is the folder of extracted frames
  (`frame_{i}/{video_id}.jpg`) and `wav` the extracted audio (`ClipEntry.frames_dir`); that
  is also so when `video_path` does not exist (and has no video or audio file extension) but
  `wav` is an audio file (`AUDIO_FILE_EXTENSIONS`), so the clip's missing frames are reported.
  When `video_path` is empty, or a folder name that does not exist and `wav` is no audio file,
  `wav` must name a video. A `video_path` with a video file extension (`VIDEO_FILE_EXTENSIONS`)
  is a video without a file-system lookup; other names are looked up once per distinct path.
  When `video_path` names a video, its audio is the clip's audio and `wav` is not read, even
  when it names another existing file: a record's audio and frames come from one file (the
  original's `wav` is what its preprocessing extracted from that video, `ffmpeg -vn -ar 16000`
  and its first channel, which is what decoding the video's audio gives).
  Relative paths are taken from the datafile's folder (which may itself be remote); media paths
  may be URIs of any file system TensorFlow reads.
  """
  what = "datafile"
  try:
    data = json.loads(read_text(what, path))
  except json.JSONDecodeError as e:
    raise SourceError(what, path, f"not valid JSON ({e})") from None
  if not isinstance(data, dict) or not isinstance(data.get("data"), list):
    raise SourceError(what, path, "expected a JSON object with a 'data' list")
  base = os.path.dirname(path if "://" in path else os.path.abspath(path))
  folders: dict[str, bool] = {}

  def is_frames_folder(media_path: str) -> bool:
    if _extension(media_path) in VIDEO_FILE_EXTENSIONS:
      return False
    if media_path not in folders:
      folders[media_path] = tf.io.gfile.isdir(media_path)
    return folders[media_path]

  existing: dict[str, bool] = {}

  def exists(media_path: str) -> bool:
    if media_path not in existing:
      existing[media_path] = tf.io.gfile.exists(media_path)
    return existing[media_path]

  entries = []
  items = data.pop("data")
  for position, item in enumerate(items):
    items[position] = None  # each parsed entry is freed as its ClipEntry is made (peak memory)
    if not isinstance(item, dict):
      raise SourceError(what, path, f"data[{position}] is not an object")
    for key in ("video_id", "labels"):
      if key not in item:
        raise SourceError(what, path, f"data[{position}] has no {key!r}")
    video_id = item["video_id"]
    # An id is an example's key and names the clip's frames in the extracted layout: `null`
    # or an object would become the id 'None' or "{'x': 1}".
    if isinstance(video_id, bool) or not (isinstance(video_id, int) or
                                          (isinstance(video_id, str) and video_id.strip())):
      raise SourceError(what, path, f"data[{position}]: 'video_id' is {video_id!r}, expected "
                        "a non-empty string (or an integer)")
    labels = item["labels"]
    if not (isinstance(labels, str) or
            (isinstance(labels, list) and all(isinstance(x, str) for x in labels))):
      raise SourceError(what, path, f"data[{position}] ({item['video_id']}): 'labels' is "
                        f"{labels!r}, expected a string of comma-separated mids or a list of "
                        "them")
    for key in ("video_path", "wav"):
      if not isinstance(item.get(key) or "", str):
        raise SourceError(what, path, f"data[{position}] ({item['video_id']}): {key!r} is "
                          f"{item[key]!r}, expected a path")
    media, frames_dir, wav = item.get("video_path") or "", "", item.get("wav") or ""
    if media and (is_frames_folder(_media_path(base, media)) or (  # the extracted layout
        _extension(wav) in AUDIO_FILE_EXTENSIONS and
        _extension(media) not in VIDEO_FILE_EXTENSIONS | AUDIO_FILE_EXTENSIONS and
        not exists(_media_path(base, media)))):  # (else a video without an extension)
      media, frames_dir = wav, _media_path(base, media)
    elif not media or media.endswith("/"):
      media = wav
    if not media and frames_dir:
      raise SourceError(what, path, f"data[{position}] ({item['video_id']}): 'video_path' is a "
                        f"folder of extracted frames ({frames_dir}), and 'wav' names no audio "
                        "file to go with them")
    if not media:
      raise SourceError(what, path, f"data[{position}] ({item['video_id']}) names no media "
                        "file in 'video_path' or 'wav'")
    entries.append(ClipEntry(str(video_id), _media_path(base, media),
                             _split_labels(labels), frames_dir, where=f"data[{position}]"))
  return _listed(what, path, entries)


def read_audioset_csv(path: str, video_dir: str, video_name_format: str) -> list[ClipEntry]:
  """Reads an AudioSet segments CSV (YTID, start_seconds, end_seconds, positive_labels)."""
  what = "AudioSet CSV"
  lines = [line for line in io.StringIO(read_text(what, path)) if not line.startswith("#")]
  entries = []
  rows = _csv_rows(what, path, csv.reader(lines, skipinitialspace=True))
  for line_number, row in enumerate(rows, 1):
    if not row:
      continue
    if len(row) != 4:
      raise SourceError(what, path, f"data row {line_number} has {len(row)} fields, expected "
                        "4 (YTID, start_seconds, end_seconds, positive_labels)")
    ytid, start, end, labels = row
    if not ytid.strip():  # it names the clip and its video file
      raise SourceError(what, path, f"data row {line_number} has an empty YTID")
    try:
      start, end = float(start), float(end)
    except ValueError:
      raise SourceError(what, path, f"data row {line_number}: start_seconds {start!r} and "
                        f"end_seconds {end!r} must be numbers") from None
    name = video_name_format.format(ytid=ytid, start=start, end=end)
    entries.append(ClipEntry(ytid, os.path.join(video_dir, name), _split_labels(labels),
                             where=f"data row {line_number}"))
  return _listed(what, path, entries)


def _vggsound_rows(path: str) -> list[list[Any]]:
  """The rows of vggsound.csv (ytid, start_seconds as int, label, split, line number), stripped
  and checked."""
  rows = []
  what = "vggsound CSV"
  for line_number, row in enumerate(
      _csv_rows(what, path, csv.reader(io.StringIO(read_text(what, path)))), 1):
    if not row:
      continue
    if len(row) != 4:
      raise SourceError(what, path, f"line {line_number} has {len(row)} fields, "
                        "expected 4 (ytid, start_seconds, label, split)")
    row = [x.strip() for x in row]
    if not row[0]:
      raise SourceError(what, path, f"line {line_number} has an empty ytid")
    try:
      row[1] = int(row[1])
    except ValueError:
      raise SourceError(what, path, f"line {line_number}: start_seconds {row[1]!r} "
                        "is not a whole number") from None
    rows.append(row + [line_number])
  return rows


def read_vggsound_csv(path: str, video_dir: str, video_name_format: str,
                      split: str) -> list[ClipEntry]:
  """Reads the rows of one split of vggsound.csv (ytid, start_seconds, label, split)."""
  entries = []
  for ytid, start, label, row_split, line_number in _vggsound_rows(path):
    if row_split == split:
      name = video_name_format.format(ytid=ytid, start=start)
      entries.append(ClipEntry(os.path.splitext(name)[0], os.path.join(video_dir, name),
                               (label,), where=f"line {line_number}"))
  return _listed("vggsound CSV", path, entries, f" of split {split!r}")


def vggsound_splits(path: str) -> list[str]:
  """The split names used in vggsound.csv, in order of appearance."""
  return list(dict.fromkeys(row[3] for row in _vggsound_rows(path)))
