"""One clip -> one record's values, or the reason it is quarantined.

`clip_example` decodes a clip (`decode.py`), computes its fbank (`fbank.py`), encodes its
frames and checks its labels; `try_clip_example` turns the expected failures (bad media, an
unknown label, audio shorter than one fbank window) into a `Quarantined` record with a reason
code instead of an exception. `tools/preprocess.py` (through `shards.write_shard`) and the
TFDS builder both call `try_clip_example`, so they write the same examples and quarantine the
same clips. A clip that cannot be made into a correct record is never replaced by zeros.
`WriteOptions` holds a run's settings of writing clips, one object from the entry point
(`prepare.prepare_records`, the builder's `ClipsConfig`) down to every clip.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import platform
from collections.abc import Callable, Mapping

from cav_mae_jax.data import records
from cav_mae_jax.data import sources

UNKNOWN_LABEL = "unknown_label"
AUDIO_TOO_SHORT = "audio_too_short"
DUPLICATE_ID = "duplicate_id"
# A list entry with no label ('"labels": ""', '[]', '","'). The original stops on such an entry
# (its loader looks the empty label up in the class list: a KeyError); a fine-tuning run would
# take it as a clip of no class. It is quarantined unless the caller allows unlabeled clips
# (`WriteOptions.allow_unlabeled`: a pretraining-only list), and then written and counted
# (`records.ShardStats.num_unlabeled`).
NO_LABELS = "no_labels"
# Every caller of `clip_example` (tools/preprocess.py's workers, the TFDS builder's Beam
# workers) runs one process per core, so the video decoder gets one thread: FFmpeg's default
# (a thread per core in every process) only adds CPU time there (`decode.decode_clip`).
DECODER_THREADS = 1

# glibc's malloc serves a block above its mmap threshold (128 KiB, raised to the largest block
# freed so far) with a fresh mapping, and gives the heap's free top back to the kernel beyond
# twice that threshold. A clip's large temporaries (the fbank's ~3 MB arrays, decoded pictures,
# the audio) are all freed before the next clip, so each clip page-faulted them in anew: 4,600
# page faults and 9 ms of system time per 640x360 camera clip (5% of its CPU time). A worker
# keeps freed memory for reuse instead: blocks up to glibc's largest threshold (32 MiB) come from
# the heap, whose top is trimmed only beyond 128 MiB. The settings cap what a worker keeps free,
# not its peak (the largest clip's working set, as before).
_MALLOC_SETTINGS = ((-3, 32 << 20),    # M_MMAP_THRESHOLD
                    (-1, 128 << 20))   # M_TRIM_THRESHOLD
# What a user sets to choose glibc's malloc settings themselves; then we leave them alone.
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
  """Lets this process's malloc keep freed memory for reuse (see `_MALLOC_SETTINGS`).

  For a process that decodes clip after clip (the preprocessing workers, the preprocessing
  benchmark): no effect on what is computed. Returns whether the settings were applied: not
  where the C library is not glibc, nor where the user chose malloc settings in the environment
  (`MALLOC_*_` variables, or malloc tunables in `GLIBC_TUNABLES`).
  """
  if platform.libc_ver()[0] != "glibc":
    return False
  if (any(name in os.environ for name in _MALLOC_ENV) or
      "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
    return False
  mallopt = ctypes.CDLL(None).mallopt
  return all(mallopt(option, value) == 1 for option, value in _MALLOC_SETTINGS)


def reason_counts(by_reason: Mapping[str, int]) -> str:
  """'empty_file: 2, missing_file: 1': quarantined clips' counts by reason code, in code order
  (the one-line errors of a run that wrote no clip)."""
  return ", ".join(f"{reason}: {count}" for reason, count in sorted(by_reason.items()))


class ClipError(Exception):
  """A clip that cannot become a record; `reason` is a short code, the message says why."""

  def __init__(self, path: str, reason: str, message: str):
    super().__init__(f"{path}: {reason}: {message}")
    self.path = path
    self.reason = reason
    self.message = message


@dataclasses.dataclass(frozen=True)
class Quarantined:
  """A clip left out of the records, and why."""

  path: str
  video_id: str
  reason: str
  message: str

  def to_json(self) -> dict[str, str]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class WriteOptions:
  """A run's settings of writing clip records, the same for every clip of the run.

  One object instead of three flags passed through every layer (entry point, shard writer,
  worker processes, Beam workers): frozen and made of plain values, so it pickles to a worker
  process or a Beam worker as it is.

  Attributes:
    store_waveform: records also carry the clip's 16 kHz int16 waveform (`records.WAVEFORM`),
      for waveform mixup; the writer's output says so (sidecar, manifest, index, TFDS features).
    strict: the first clip that is not written (quarantined, or a worker that died on it)
      raises `StrictModeError` naming it, instead of being quarantined and skipped. Applied by
      the writers (`shards.write_shard`, the TFDS builder), not by `try_clip_example`, which
      always returns the `Quarantined` record.
    allow_unlabeled: a list entry with no labels is written (and counted,
      `records.ShardStats.num_unlabeled`) instead of quarantined as `NO_LABELS`: for a list
      used only for pretraining.
  """

  store_waveform: bool = False
  strict: bool = False
  allow_unlabeled: bool = False


class StrictModeError(RuntimeError):
  """Raised in strict mode (tool or TFDS builder) at the first clip that is not written."""

  def __init__(self, quarantined: Quarantined):
    super().__init__(f"{quarantined.path}: {quarantined.reason}: {quarantined.message}")
    self.quarantined = quarantined


def clip_example(entry: sources.ClipEntry, labels: sources.ClassLabels,
                 store_waveform: bool = False) -> records.ExampleValues:
  """Decodes one clip and returns its record values; raises ClipError or decode.DecodeError."""
  from cav_mae_jax.data import decode, fbank  # pylint: disable=g-import-not-at-top

  indices = []
  for label_id in entry.label_ids:
    index = labels.index_of(label_id)
    if index is None:
      hint = labels.comma_split_hint(label_id)
      raise ClipError(entry.path, UNKNOWN_LABEL,
                      f"label {label_id!r} is not in {labels.source}"
                      f"{' (' + hint + ')' if hint else ''}")
    indices.append(index)
  media = decode.read_clip_media(entry.path, entry.frames_dir, entry.video_id,
                                 num_frames=records.NUM_VIDEO_FRAMES,
                                 image_size=records.IMAGE_SIZE,
                                 target_sample_rate=records.WAVEFORM_SAMPLE_RATE,
                                 # Exactly the audio the original's 1024 fbank frames see.
                                 max_seconds=decode.ORIGINAL_AUDIO_SECONDS,
                                 decoder_threads=DECODER_THREADS)
  features = fbank.clip_fbank(media.waveform, records.WAVEFORM_SAMPLE_RATE,
                              records.NUM_MEL_BINS)
  if features.shape[0] == 0:
    raise ClipError(entry.path, AUDIO_TOO_SHORT,
                    f"{media.waveform.size} samples at 16 kHz is shorter than one 25-ms window")
  return records.make_example_values(
      video_id=entry.video_id,
      labels=indices,
      label_ids=[labels.mids[i] for i in indices],
      fbank=fbank.pad_or_trim(features, records.TARGET_FBANK_FRAMES),
      fbank_num_frames=features.shape[0],
      jpeg_frames=media.jpeg_frames,
      frame_indices=media.frame_indices,
      duration_s=media.duration_s,
      source_sample_rate=media.source_sample_rate,
      fps=media.fps,
      frame_count=media.frame_count,
      waveform=media.waveform if store_waveform else None,
      rotation=media.rotation,
  )


ClipFn = Callable[[sources.ClipEntry, sources.ClassLabels, bool], records.ExampleValues]


def try_clip_example(entry: sources.ClipEntry, labels: sources.ClassLabels, *,
                     options: WriteOptions = WriteOptions(),
                     clip_fn: ClipFn = clip_example) -> records.ExampleValues | Quarantined:
  """Returns the clip's record values, or why it is quarantined (bad input, not a bug).

  A repeated id (`DUPLICATE_ID`) and, unless `options.allow_unlabeled`, an entry without
  labels (`NO_LABELS`) are quarantined before any decoding. `clip_fn` makes the values
  (`clip_example`, or a stand-in in tests) and is given `options.store_waveform`;
  `options.strict` is left to the caller (a quarantined clip is returned either way).
  """
  from cav_mae_jax.data import decode  # pylint: disable=g-import-not-at-top

  if entry.duplicate_of is not None:
    return Quarantined(entry.path, entry.video_id, DUPLICATE_ID,
                       f"video id {entry.video_id!r} repeats that of {entry.duplicate_of}, the "
                       "entry kept for it (an id is an example's key: that entry is written, "
                       "or quarantined for its own reason)")
  if not entry.label_ids and not options.allow_unlabeled:
    return Quarantined(entry.path, entry.video_id, NO_LABELS,
                       f"the list gives video id {entry.video_id!r} no labels (fine-tuning "
                       "would take it as a clip of no class; the original stops on it); a "
                       "list for pretraining only may allow unlabeled clips "
                       "(tools/preprocess.py --allow-unlabeled)")
  try:
    return clip_fn(entry, labels, options.store_waveform)
  except ClipError as e:
    return Quarantined(entry.path, entry.video_id, e.reason, e.message)
  except decode.DecodeError as e:
    return Quarantined(entry.path, entry.video_id, e.reason,
                       e.detail or e.reason.replace("_", " "))
