"""Where a split's clips are stored: a records directory or a split of a TFDS dataset.

Two writers make clip examples (the same ones, `clips.try_clip_example`): `tools/preprocess.py`
writes a records directory (shard files + index.json, `records.py`), the `cav_mae_clips` TFDS
builder (`tfds_builder.py`, locally or on Beam) a TFDS dataset (TFDS's shard files, its
dataset_info, and per-split label counts and fbank statistics in its metadata). TFDS encodes
the features its own way (fbank as a list of float16 values, not raw bytes), so each source
has its own parser.

A `Split` hides the difference: the split's `records.RecordIndex` (shard files and counts,
label counts, fbank mean/std; for TFDS built from the dataset info and the builder's
metadata), the folder of its files, and parse functions giving the tensors of
`records.parse_example` (fbank float32 [1024, 128] from both). The tf.data graph (`dataset.py`)
and `tools/inspect_records.py` read both kinds through it.

TFDS files are read by the same graph as records, not through `builder.as_dataset`, so that
the per-host file assignment, the seeded shuffles, balanced sampling and resume positions are
the records' ones: the same clips in the same files give the same batches.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable

import tensorflow as tf

from cav_mae_jax.data import records

ParseFn = Callable[..., dict[str, tf.Tensor]]  # (serialized, with_waveform=False) -> tensors


@dataclasses.dataclass(frozen=True)
class Split:
  """One split's clips, however stored: its index, the folder of its files, its parsers."""

  index: records.RecordIndex
  directory: str    # the folder of `index.shards`
  description: str  # one line for logs and errors: what and where
  parse: ParseFn    # serialized example -> the tensors of `records.parse_example`
  parse_labels: Callable[[tf.Tensor], tf.Tensor]  # serialized example -> int64 [L] classes

  @property
  def files(self) -> list[str]:
    """Paths of the split's shard files, in the index's order."""
    return self.index.shard_paths(self.directory)


def open_records_split(directory: str, field: str) -> Split:
  """A records directory (tools/preprocess.py output); a bad one raises naming `field`."""
  try:
    index = records.open_records_dir(directory)
  except records.RecordsDirError as e:
    raise ValueError(f"{field}: {e}") from None
  return Split(index=index, directory=directory, description=f"records directory {directory}",
               parse=records.parse_example, parse_labels=records.parse_labels)


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _built_versions(config_dir: str) -> list[str]:
  """The versions built in a TFDS config folder (`<config_dir>/<version>/dataset_info.json`),
  oldest first."""
  try:
    names = tf.io.gfile.listdir(config_dir)
  except tf.errors.OpError:
    return []
  versions = [name.rstrip("/") for name in names
              if re.fullmatch(r"\d+\.\d+\.\d+/?", name)
              and tf.io.gfile.exists(os.path.join(config_dir, name, "dataset_info.json"))]
  return sorted(versions, key=lambda version: tuple(map(int, version.split("."))))


def open_tfds_split(name: str, split: str, data_dir: str = "", *,
                    name_field: str = "tfds_name", split_field: str = "split") -> Split:
  """Split `split` of the built TFDS dataset `name` ('cav_mae_clips/<config>[:version]').

  `data_dir` '' is TFDS's default. Errors name `name_field` or `split_field`: an unknown or
  unbuilt dataset, a missing split, a dataset without the clip features or without the
  builder's statistics (built before version 1.2.0), files not in TFRecord format.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top  (registers it)

  if not name:
    raise ValueError(f"{name_field}='': no TFDS dataset given")
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  # AssertionError: TFDS's way of saying that a version it does not know was asked for.
  except (ValueError, KeyError, OSError, AssertionError, tf.errors.OpError) as e:
    detail = _first_line(e)
    if detail.startswith("Failed to construct dataset") and '": ' in detail:
      detail = detail.rpartition('": ')[2]  # what failed, without the builder's arguments
    raise ValueError(f"{name_field}={name!r}: {detail}") from None
  if not builder.is_prepared():
    versions = _built_versions(os.path.dirname(builder.data_dir))
    other = (f"; built here: version {', '.join(versions)}, read as "
             f"'{name.partition(':')[0]}:{versions[-1]}'" if versions else "")
    raise ValueError(f"{name_field}={name!r}: not built in {builder.data_dir} (build it "
                     f"with the cav_mae_clips builder, see cav_mae_jax/data/README.md){other}")
  info = builder.info
  features = info.features
  missing = sorted(set(records.feature_spec()) - set(features.keys()))
  if missing:
    raise ValueError(f"{name_field}={name!r}: not a cav_mae_clips dataset (no features "
                     f"{missing})")
  if info.file_format != tfds.core.FileFormat.TFRECORD:
    raise ValueError(f"{name_field}={name!r}: files in {info.file_format.value} format; the "
                     "input reads TFRecord files (the builder's default)")
  if split not in info.splits:
    whole = ("; name a whole split: the input gives each process whole shard files, so a slice "
             "or sum of splits ('train[:10%]', 'train+test') is not read (build the clips as a "
             "split of their own)" if re.search(r"[\[+]", split) else "")
    raise ValueError(f"{split_field}={split!r}: {info.full_name} has splits "
                     f"{sorted(info.splits.keys())}{whole}")
  split_info = info.splits[split]
  paths = [os.fspath(path) for path in split_info.filepaths]
  shards = tuple(records.ShardInfo(file=os.path.basename(path), num_examples=count)
                 for path, count in zip(paths, split_info.shard_lengths))
  try:
    index = records.index_from_stats(shards, tfds_builder.read_split_stats(info, split),
                                     store_waveform=records.WAVEFORM in features.keys())
  except ValueError as e:
    raise ValueError(f"{name_field}={name!r}, split {split!r}: {e}") from None

  def parse(serialized: tf.Tensor, with_waveform: bool = False) -> dict[str, tf.Tensor]:
    if with_waveform and records.WAVEFORM not in features.keys():
      raise ValueError(f"{info.full_name} has no {records.WAVEFORM!r} feature")
    parsed = dict(features.deserialize_example(serialized))
    if not with_waveform:
      parsed.pop(records.WAVEFORM, None)
    parsed[records.FBANK] = tf.cast(parsed[records.FBANK], tf.float32)  # float16 in TFDS
    return parsed

  return Split(index=index, directory=os.path.dirname(paths[0]),
               description=f"TFDS split {split!r} of {builder.data_dir}", parse=parse,
               parse_labels=tfds_builder.labels_parser(features[records.LABELS]))


def check_fbank_shape(split: Split, audio_length: int, num_mel_bins: int) -> None:
  """The split's fbank [frames, mel bins] must be the model's; ValueError naming config.model."""
  frames, bins = split.index.fbank_shape
  if bins != num_mel_bins:
    raise ValueError(f"config.model.num_mel_bins={num_mel_bins}: the clips of "
                     f"{split.description} have {bins} mel bins.")
  if frames != audio_length:
    raise ValueError(f"config.model.audio_length={audio_length}: the clips of "
                     f"{split.description} have {frames}-frame fbanks.")


def same_clips(first: Split, second: Split) -> bool:
  """Whether two splits read the same shard files."""
  def normalized(split: Split) -> list[str]:
    return [path if "://" in path else os.path.realpath(path) for path in split.files]
  return normalized(first) == normalized(second)
