"""TFDS builder `cav_mae_clips`: raw videos -> clip examples, locally or on Apache Beam.

Every clip goes through `clips.try_clip_example`, the function `tools/preprocess.py` uses,
so both write the same examples (same keys as `records.py`; TFDS stores them in its own
format). Configs:

  datafile      the original's JSON datafiles: MANUAL_DIR/{train,validation,test}.json
                (whichever exist) and MANUAL_DIR/class_labels_indices.csv.
  audioset_csv  AudioSet segment CSVs: MANUAL_DIR/{train,validation,test}.csv with rows
                `YTID, start_seconds, end_seconds, "positive_labels"` ('#' lines skipped),
                MANUAL_DIR/class_labels_indices.csv, videos MANUAL_DIR/videos/{ytid}_{start:.3f}.mp4
                (the name of the original's sample video `00W1lcxW-WU_40.000.mp4`).
  vggsound_csv  MANUAL_DIR/vggsound.csv with rows `ytid,start_seconds,label,split` (label is a
                class display name), MANUAL_DIR/class_labels_indices.csv,
                videos MANUAL_DIR/videos/{ytid}_{start:06d}.mp4 (VGGSound's file names).
  synthetic     `synthetic.generate_dataset` clips made in the download directory.

Under Beam (`tfds build --imports cav_mae_jax.data.tfds_builder cav_mae_clips/datafile
--manual_dir DIR --beam_pipeline_options="runner=DataflowRunner,..."`, or a `DownloadConfig`
with `beam_runner`/`beam_options`), `_generate_examples` returns a Beam transform; without,
a Python generator. Under Beam the clip list is read inside the pipeline, so the manual dir
may be on any file system TensorFlow reads (gs://...), and so may the videos: `decode.py` reads
non-local paths through tf.io.gfile, so the workers need no mounted bucket. Clips that cannot
be made into examples are never replaced by zeros: they are written to
`quarantine-{split}-*.jsonl` in the dataset directory (path, video_id, reason, message) and
counted in Beam counters `quarantined_{reason}`; with `strict=True` the build fails at the first
one, naming it. An entry with no labels is quarantined (`no_labels`) unless
`allow_unlabeled=True` (a list for pretraining only), which writes it and counts it
(`ShardStats.num_unlabeled`).

Every split also gets the statistics a records directory's index.json holds (example and
per-class label counts, fbank sums over the valid frames: `records.ShardStats`, the code the
tool uses), computed while the examples are made (a Beam combine, or a running sum locally)
and stored in the dataset's metadata (`metadata.json`, `info.metadata[STATS_KEY][split]`), so
balanced sampling and `fbank_stats='index'` work on a TFDS dataset as on records
(`read_split_stats`; `splits.open_tfds_split` reads a built dataset). Beam counters are kept
per split: `builder.beam_counters[split][name]`, names `written` and `quarantined_{reason}`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cav_mae_jax.data import clips
from cav_mae_jax.data import records
from cav_mae_jax.data import sources

SOURCES = ("datafile", "audioset_csv", "vggsound_csv", "synthetic")
STATS_KEY = "split_stats"  # info.metadata[STATS_KEY][split]: records.ShardStats JSON
COUNTER_NAMESPACE = "cav_mae_clips"
SPLITS = ("train", "validation", "test")
LABELS_CSV = "class_labels_indices.csv"

EntryReader = Callable[[], list[sources.ClipEntry]]


@dataclasses.dataclass(eq=False)
class ClipsConfig(tfds.core.BuilderConfig):
  """Where the clips come from and what the examples carry."""

  source: str = "datafile"
  store_waveform: bool = False
  strict: bool = False
  allow_unlabeled: bool = False  # write entries with no labels (else quarantined no_labels)
  video_name_format: str = ""
  synthetic_clips_per_split: tuple[tuple[str, int], ...] = (("train", 64), ("test", 16))
  synthetic_num_classes: int = 8
  synthetic_duration_s: float = 10.0

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"ClipsConfig.source must be one of {SOURCES}, got {self.source!r}")

  @property
  def write_options(self) -> clips.WriteOptions:
    """`store_waveform`, `strict` and `allow_unlabeled` as the object the writers take (the
    fields stay, as `tools/preprocess.py`'s flags do: a config is written out by name)."""
    return clips.WriteOptions(store_waveform=self.store_waveform, strict=self.strict,
                              allow_unlabeled=self.allow_unlabeled)


def tfds_example(values: records.ExampleValues) -> dict[str, Any]:
  """Record values -> the TFDS features' input form (same keys)."""
  example = dict(values)
  example[records.LABEL_IDS] = np.asarray(values[records.LABEL_IDS], dtype=object)
  example[records.FRAMES] = np.asarray(values[records.FRAMES], dtype=object)
  return example


def _features(store_waveform: bool) -> tfds.features.FeaturesDict:
  features = {
      records.VIDEO_ID: tfds.features.Text(),
      records.LABELS: tfds.features.Tensor(shape=(None,), dtype=np.int64),
      records.LABEL_IDS: tfds.features.Tensor(shape=(None,), dtype=tf.string),
      records.FBANK: tfds.features.Tensor(
          shape=(records.TARGET_FBANK_FRAMES, records.NUM_MEL_BINS), dtype=np.float16),
      records.FBANK_NUM_FRAMES: tfds.features.Scalar(dtype=np.int64),
      records.FRAMES: tfds.features.Tensor(shape=(records.NUM_VIDEO_FRAMES,), dtype=tf.string),
      records.FRAME_INDICES: tfds.features.Tensor(shape=(records.NUM_VIDEO_FRAMES,),
                                                  dtype=np.int64),
      records.DURATION_S: tfds.features.Scalar(dtype=np.float32),
      records.SOURCE_SAMPLE_RATE: tfds.features.Scalar(dtype=np.int64),
      records.FPS: tfds.features.Scalar(dtype=np.float32),
      records.FRAME_COUNT: tfds.features.Scalar(dtype=np.int64),
      records.ROTATION: tfds.features.Scalar(dtype=np.int64),
  }
  if store_waveform:
    features[records.WAVEFORM] = tfds.features.Tensor(shape=(None,), dtype=np.int16)
  return tfds.features.FeaturesDict(features)


def _example_or_quarantine(entry: sources.ClipEntry, labels: sources.ClassLabels,
                           options: clips.WriteOptions
                           ) -> tuple[str, dict[str, Any]] | clips.Quarantined:
  """The (key, example) of a clip, or its quarantine record (raises with `options.strict`)."""
  result = clips.try_clip_example(entry, labels, options=options)
  if isinstance(result, clips.Quarantined):
    if options.strict:
      raise clips.StrictModeError(result)
    return result
  return entry.video_id, tfds_example(result)


def _read_known_labels(read_entries: EntryReader, labels: sources.ClassLabels
                       ) -> list[sources.ClipEntry]:
  """The entries of a split, refused (as tools/preprocess.py refuses them) when the labels CSV
  knows none of their label ids."""
  entries = read_entries()
  sources.check_labels_known(entries, labels, getattr(read_entries, "args", ["its list"])[0])
  return entries


def _stats_path(data_dir: str, split: str) -> str:
  """Where a split's statistics wait until the build folds them into the metadata."""
  return os.path.join(data_dir, f"stats-{split}.json")


def _write_stats(path: str, stats: records.ShardStats) -> None:
  with tf.io.gfile.GFile(path, "w") as f:
    json.dump(stats.to_json(), f)


def _merge_stats(parts: Iterable[records.ShardStats], num_classes: int) -> records.ShardStats:
  """One `ShardStats` of many (Beam's combiner: associative, takes its own outputs)."""
  return functools.reduce(records.ShardStats.merge, parts, records.ShardStats(num_classes))


def _one_example_stats(keyed_example: tuple[str, dict[str, Any]],
                       num_classes: int) -> records.ShardStats:
  stats = records.ShardStats(num_classes)
  stats.add(keyed_example[1])
  return stats


def _beam_clip_examples(read_entries: EntryReader, labels: sources.ClassLabels,
                        options: clips.WriteOptions, quarantine_prefix: str, split: str,
                        stats_path: str):
  """The Beam transform: clips -> (key, example), quarantined clips -> JSONL files.

  The clip list is read inside the pipeline (not embedded in the job graph), then spread
  over the workers, so millions of clips make a small job description; `options` is pickled
  with the transform. The examples' statistics are combined into one `ShardStats` written to
  `stats_path`; counters are named `{split}/written` and `{split}/quarantined_{reason}`.
  """
  beam = tfds.core.lazy_imports.apache_beam

  def process(entry):
    result = _example_or_quarantine(entry, labels, options)
    if isinstance(result, clips.Quarantined):
      beam.metrics.Metrics.counter(COUNTER_NAMESPACE,
                                   f"{split}/quarantined_{result.reason}").inc()
      yield beam.pvalue.TaggedOutput("quarantine", json.dumps(result.to_json()))
    else:
      beam.metrics.Metrics.counter(COUNTER_NAMESPACE, f"{split}/written").inc()
      yield result

  @beam.ptransform_fn
  def transform(root):
    outputs = (root
               | "Start" >> beam.Create([None])
               | "ReadEntries" >> beam.FlatMap(lambda _: read_entries())
               | "Spread" >> beam.Reshuffle()
               | "Decode" >> beam.FlatMap(process).with_outputs("quarantine", main="examples"))
    _ = outputs.quarantine | "Quarantine" >> beam.io.WriteToText(quarantine_prefix,
                                                                  file_name_suffix=".jsonl")
    # A split with no clip written fails saying why (small side inputs: counts, one line).
    by_reason = (outputs.quarantine
                 | "Reasons" >> beam.Map(lambda line: json.loads(line)["reason"])
                 | "CountReasons" >> beam.combiners.Count.PerElement())
    sample = outputs.quarantine | "OneQuarantined" >> beam.combiners.Sample.FixedSizeGlobally(1)
    written = outputs.examples | "CountWritten" >> beam.combiners.Count.Globally()
    # No element; fed to TFDS's writer with the examples, so that the check runs before TFDS's
    # own count check, which would otherwise come first at random.
    checked = (root
               | "CheckStart" >> beam.Create([None])
               | "SomeWritten" >> beam.FlatMap(_check_beam_written, split=split,
                                               written=beam.pvalue.AsSingleton(written),
                                               by_reason=beam.pvalue.AsDict(by_reason),
                                               sample=beam.pvalue.AsList(sample)))
    num_classes = labels.num_classes
    _ = (outputs.examples
         | "ExampleStats" >> beam.Map(_one_example_stats, num_classes=num_classes)
         | "MergeStats" >> beam.CombineGlobally(_merge_stats, num_classes=num_classes)
         | "WriteStats" >> beam.Map(lambda stats: _write_stats(stats_path, stats)))
    return (outputs.examples, checked) | "Checked" >> beam.Flatten()

  return transform()  # pylint: disable=no-value-for-parameter


def _check_written(split: str, written: int, by_reason: Mapping[str, int],
                   first: clips.Quarantined | None) -> None:
  """Raises ValueError naming why when a split's clips were all quarantined (`by_reason`: their
  count by reason; `first`: one of them): TFDS's own error ('No examples were yielded') named
  no clip, and its cleanup removed the quarantine file."""
  if written:
    return
  counts = clips.reason_counts(by_reason)
  example = f"; e.g. {first.path}: {first.reason}: {first.message}" if first else ""
  raise ValueError(f"split {split!r}: no clip was written: all {sum(by_reason.values())} were "
                   f"quarantined ({counts or 'the list is empty'}){example}")


def _check_beam_written(_, split: str, written: int, by_reason: Mapping[str, int],
                        sample: list[list[str]]) -> list[Any]:
  """`_check_written` in the Beam transform; yields nothing."""
  first = sample[0][0] if sample and sample[0] else None
  _check_written(split, written, by_reason,
                 clips.Quarantined(**json.loads(first)) if first else None)
  return []


def labels_parser(labels_feature: tfds.features.FeatureConnector
                  ) -> Callable[[tf.Tensor], tf.Tensor]:
  """The classes of a serialized example of the builder, deserializing its labels alone (the
  whole example's fbank list costs most of a read)."""
  labels_only = tfds.features.FeaturesDict({records.LABELS: labels_feature})
  return lambda serialized: labels_only.deserialize_example(serialized)[records.LABELS]


def _write_layout(path: str) -> None:
  """The layout sidecar of one of the builder's shards (its labels in TFDS's encoding)."""
  records.write_record_layout(path, labels_parser(_features(False)[records.LABELS]))


def read_split_stats(info: tfds.core.DatasetInfo, split: str) -> records.ShardStats:
  """The statistics of one split of a built dataset; ValueError if the build stored none."""
  metadata = info.metadata or {}
  stored = metadata.get(STATS_KEY, {})
  if split not in stored:
    raise ValueError(f"{info.full_name}: no statistics of split {split!r} in its metadata "
                     f"(built by a version before 1.2.0, or not by cav_mae_clips: rebuild it)")
  return records.ShardStats.from_json(stored[split])


def read_quarantine(data_dir: str, split: str) -> list[dict[str, str]]:
  """The quarantined clips of one split of a built dataset."""
  lines = []
  for path in sorted(tf.io.gfile.glob(os.path.join(data_dir, f"quarantine-{split}-*.jsonl"))):
    with tf.io.gfile.GFile(path) as f:
      lines.extend(json.loads(line) for line in f if line.strip())
  return lines


class _ClipsInfo(tfds.core.DatasetInfo):
  """The builder's DatasetInfo, never looked for in TFDS's bucket of public datasets."""

  def initialize_from_bucket(self) -> None:
    """Nothing: cav_mae_clips is not in gs://tfds-data. (TFDS's own, called at the builder's
    construction until its data dir holds a build, made an empty temporary folder each time,
    `/tmp/tmp*tfds`, and never removed it.)"""


class CavMaeClips(tfds.core.GeneratorBasedBuilder):
  """Clips with raw Kaldi fbank [1024, 128], 10 JPEG frames, labels and metadata."""

  VERSION = tfds.core.Version("1.4.0")
  RELEASE_NOTES = {
      "1.0.0": "First release: records format version 1.",
      "1.1.0": "Frames are made upright by the display matrix; `rotation` says by how much.",
      "1.2.0": "Per-split label counts and fbank statistics in the metadata (as index.json).",
      "1.3.0": "Frames of BT.709-tagged (and full-range yuv420p) videos are converted as the "
               "original's OpenCV (<= 4.12) converted them: BT.601, limited range.",
      "1.4.0": "Every shard has a sidecar `<shard>.json` listing its records' sizes and "
               "classes: balanced sampling and mixup find a host's records without reading "
               "them at start.",
  }
  BUILDER_CONFIGS = [
      ClipsConfig(name="datafile", source="datafile",
                  description="The original's JSON datafiles in the manual dir."),
      ClipsConfig(name="audioset_csv", source="audioset_csv",
                  video_name_format="{ytid}_{start:.3f}.mp4",
                  description="AudioSet segment CSVs + a folder of videos."),
      ClipsConfig(name="vggsound_csv", source="vggsound_csv",
                  video_name_format="{ytid}_{start:06d}.mp4",
                  description="vggsound.csv + a folder of videos."),
      ClipsConfig(name="synthetic", source="synthetic",
                  description="The synthetic audio-visual set (generated, no manual dir)."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    # What dataset_info_from_configs gives (its description: the data README), as _ClipsInfo.
    metadata = self.get_metadata()
    texts = {key: value for key, value in (("description", metadata.description),
                                           ("citation", metadata.citation)) if value}
    return _ClipsInfo(
        builder=self,
        features=_features(self.builder_config.store_waveform),
        supervised_keys=None,
        homepage="https://github.com/YuanGongND/cav-mae",
        metadata=tfds.core.MetadataDict(),
        **texts,
    )

  # Set after a Beam build: {split: {"written": n, "quarantined_{reason}": n}}.
  beam_counters: dict[str, dict[str, int]] | None = None

  def _download_and_prepare(self, dl_manager, download_config) -> None:
    if self.info.file_format != tfds.core.FileFormat.TFRECORD:  # before any clip is decoded
      raise ValueError(
          f"file_format={self.info.file_format.value}: {self.name} writes TFRecord shards (each "
          "with a sidecar of its records' sizes and classes, read by the input pipeline, which "
          "reads TFRecord files); build without file_format (--file_format)")
    self._use_beam = bool(download_config.beam_runner or download_config.beam_options)
    super()._download_and_prepare(dl_manager, download_config)
    self._store_split_stats()
    self._write_record_layouts(download_config)

  def _write_record_layouts(self, download_config) -> None:
    """Writes every shard's layout sidecar (`records.write_record_layout`: each record's size
    and classes), so that balanced sampling, mixup partners and exact shuffling find a host's
    records without reading them at every start. Each shard is read once, by a Beam pipeline
    on the build's runner under Beam (a shard per task), else here."""
    paths = [os.fspath(path) for split in self.info.splits.values() for path in split.filepaths]
    if not self._use_beam:
      for path in paths:
        _write_layout(path)
      return
    import apache_beam as beam  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    with beam.Pipeline(runner=download_config.beam_runner,
                       options=download_config.beam_options) as pipeline:
      _ = (pipeline | "Shards" >> beam.Create(paths) | "Reshuffle" >> beam.Reshuffle()
           | "WriteLayouts" >> beam.Map(_write_layout))

  def _store_split_stats(self) -> None:
    """Moves every split's statistics file into the metadata (written with the info)."""
    stats = {}
    for split in self.info.splits.keys():
      path = _stats_path(self.data_dir, split)
      with tf.io.gfile.GFile(path) as f:
        stats[split] = json.load(f)
      tf.io.gfile.remove(path)
    self.info.metadata[STATS_KEY] = stats

  def _process_pipeline_result(self, pipeline_result) -> None:
    """Keeps and logs the Beam counters of the build, per split."""
    counters: dict[str, dict[str, int]] = {}
    for counter in pipeline_result.metrics().query()["counters"]:
      if counter.key.metric.namespace != COUNTER_NAMESPACE:
        continue
      split, name = counter.key.metric.name.split("/", 1)
      value = counter.committed if counter.committed is not None else counter.attempted
      counters.setdefault(split, {})
      counters[split][name] = counters[split].get(name, 0) + value
    self.beam_counters = counters
    logging.info("cav_mae_clips Beam counters: %s", self.beam_counters)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    readers: dict[str, EntryReader] = {}
    if config.source == "synthetic":
      from cav_mae_jax.data import synthetic  # pylint: disable=g-import-not-at-top

      for split, num_clips in config.synthetic_clips_per_split:
        made = synthetic.generate_dataset(
            os.path.join(dl_manager.download_dir, "synthetic"), num_clips,
            num_classes=config.synthetic_num_classes, duration_s=config.synthetic_duration_s,
            split_name=split)
        readers[split] = functools.partial(sources.read_datafile, made["datafile"])
      labels_csv = made["labels_csv"]
    else:
      manual_dir = os.fspath(dl_manager.manual_dir)
      labels_csv = os.path.join(manual_dir, LABELS_CSV)
      video_dir = os.path.join(manual_dir, "videos")
      for split in SPLITS:
        json_path = os.path.join(manual_dir, f"{split}.json")
        csv_path = os.path.join(manual_dir, f"{split}.csv")
        if config.source == "datafile" and tf.io.gfile.exists(json_path):
          readers[split] = functools.partial(sources.read_datafile, json_path)
        elif config.source == "audioset_csv" and tf.io.gfile.exists(csv_path):
          readers[split] = functools.partial(sources.read_audioset_csv, csv_path, video_dir,
                                             config.video_name_format)
      if config.source == "vggsound_csv":
        csv_path = os.path.join(manual_dir, "vggsound.csv")
        readers = {split: functools.partial(sources.read_vggsound_csv, csv_path, video_dir,
                                            config.video_name_format, split)
                   for split in sources.vggsound_splits(csv_path)}
      if not readers:
        raise ValueError(f"{manual_dir}: no split files found for config {config.name!r}; "
                         f"see MANUAL_DOWNLOAD_INSTRUCTIONS")
      suffix = {"datafile": ".json", "audioset_csv": ".csv"}.get(config.source)
      unread = sorted(name for name in tf.io.gfile.listdir(manual_dir) if suffix and
                      name.endswith(suffix) and name[:-len(suffix)] not in SPLITS
                      and name != LABELS_CSV)
      if unread:  # an eval.json was left out without a word
        logging.warning("%s: not read as a split: %s (config %r reads %s)", manual_dir,
                        ", ".join(unread), config.name,
                        ", ".join(f"{split}{suffix}" for split in SPLITS))
    labels = sources.read_class_labels(labels_csv)
    readers = {split: functools.partial(_read_known_labels, read_entries, labels)
               for split, read_entries in readers.items()}
    return {split: self._generate_examples(read_entries, labels, split)
            for split, read_entries in readers.items()}

  def _generate_examples(self, read_entries: EntryReader, labels: sources.ClassLabels,
                         split: str):
    config = self.builder_config
    quarantine_prefix = os.path.join(self.data_dir, f"quarantine-{split}")
    stats_path = _stats_path(self.data_dir, split)
    if getattr(self, "_use_beam", False):
      return _beam_clip_examples(read_entries, labels, config.write_options, quarantine_prefix,
                                 split, stats_path)
    return self._local_examples(read_entries(), labels, split, quarantine_prefix, stats_path)

  def _local_examples(self, entries: Sequence[sources.ClipEntry], labels: sources.ClassLabels,
                      split: str, quarantine_prefix: str, stats_path: str
                      ) -> Iterator[tuple[str, dict[str, Any]]]:
    options = self.builder_config.write_options
    stats = records.ShardStats(labels.num_classes)
    by_reason: dict[str, int] = {}  # the quarantined clips' count by reason, and the first
    first: clips.Quarantined | None = None
    try:
      with tf.io.gfile.GFile(f"{quarantine_prefix}-00000-of-00001.jsonl", "w") as quarantine:
        for entry in entries:
          result = _example_or_quarantine(entry, labels, options)
          if isinstance(result, clips.Quarantined):
            quarantine.write(json.dumps(result.to_json()) + "\n")
            by_reason[result.reason] = by_reason.get(result.reason, 0) + 1
            first = first or result
          else:
            stats.add(result[1])
            yield result
    finally:  # Also when TFDS stops early (max_examples_per_split): the examples it took.
      _write_stats(stats_path, stats)
    _check_written(split, stats.num_examples, by_reason, first)


def builder(config: str | ClipsConfig, data_dir: str | None = None) -> CavMaeClips:
  """The builder for a config name or a custom `ClipsConfig`."""
  return CavMaeClips(config=config, data_dir=data_dir)
