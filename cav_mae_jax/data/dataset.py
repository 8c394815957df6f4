"""The tf.data graph of the input: a split's clip files -> host-local batch dicts.

A split ("train" or "eval") is read from its records directory, `config.data.<split>_dir`
(tools/preprocess.py output) when that is set, else from split `config.data.tfds_<split>_split`
of the TFDS dataset `config.data.tfds_name` (the `cav_mae_clips` builder's output), so either
source, or one of each, works; `open_split` resolves this and `splits.py` reads both kinds the
same way. Each process reads a disjoint, deterministic subset of the split's shard files
(`files[process_index::process_count]`) and `make_dataset` builds its batches of
`batch_size // process_count` clips, as the batch dict of docs/design.md:

  audio [B, T, 128] f32 (normalized fbank), image [B, H, W, 3] f32 (ImageNet-normalized; eval
  with all frames: [B, 10, H, W, 3]), label [B, C] f32, valid [B] bool, frame_index [B] int32
  (-1 when all frames are used).

Training: an endless stream of epochs; each epoch reads this host's files in a seeded random
order, interleaved, through a seeded shuffle buffer (with balanced sampling or exact_shuffle:
the epoch's seeded draws or permutation, below); one random frame per clip; the augmentations
configured below (order and semantics of the original, see `augment.py`). Batches are full
(an epoch's tail joins the next epoch). Evaluation: one pass in file order, a fixed frame or all
frames, no augmentation and no label smoothing (as the original's eval loader); every clip is
kept: the last batches are padded with zero clips marked `valid=False`, and every process yields
the same number of batches (`num_eval_batches`).

Every random choice is a stateless function of (seed, process index, epoch, position in the
epoch) or (seed, process index, batch number), so the stream is fixed by the seed and can start
anywhere, and each process draws its own augmentations (process 0 those of a one-process run):
`make_dataset` takes the epoch, position and batch number to start from, which is how
`input.InputPipeline` resumes.

The fields of `config.data` are documented and checked in `config.py` (`DataConfig`).

Balanced sampling is the original's `WeightedRandomSampler(weights, N, replacement=True)` over
this host's N clips: each epoch draws N clips independently, each with probability
proportional to its weight (the sum over its labels of 1000 / (label count + 0.01), the counts
of the whole split), in draw order, no shuffle buffer. Mixup is the original loader's too: a
clip is mixed with probability `mixup`, with a partner drawn uniformly from the host's clips
(whatever the sampling), parsed with its own random frame; `augment.mixup` mixes the two.
With `exact_shuffle` each epoch is a fresh random permutation of the host's clips, as the
original's shuffling loader, instead of the shuffle buffer over streamed shards.
Drawn records (balanced draws, permutations, partners) are read at their byte offsets in their
shard files (`HostRecords`: from the shards' sidecars, or one pass that reads the records'
lengths and labels, once per `input.InputPipeline`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from cav_mae_jax.data import augment
from cav_mae_jax.data import records
from cav_mae_jax.data import splits
from cav_mae_jax.data.config import SPLITS, DataConfig

logger = logging.getLogger(__name__)

BALANCED_WEIGHT_NUMERATOR = 1000.0
BALANCED_COUNT_OFFSET = 0.01
INTERLEAVE_CYCLE = 16
EPOCH_KEY, POSITION_KEY = "_epoch", "_position"  # where a training clip sits
_OUTPUT_KEYS = ("audio", "image", "label", "valid", "frame_index")


def no_autograph(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn`, for a tf.data transformation (map, interleave, filter, ...), traced as written.

  tf.data hands its functions to autograph, which rewrites Python control flow on tensors
  into graph ops; ours have none (a Python `if` on a tensor fails loudly at trace time), so
  the graph is the same without it. The conversion took 1.3 s of a training pipeline's first
  build (0.27 s without; 2 cores, 2026-12-07), paid by every process at start. Functions that
  run inside `fn` (the nested maps of an interleave) are left as written too.
  """
  return tf.autograph.experimental.do_not_convert(fn)


def open_split(config: Any, split: str) -> splits.Split:
  """The clips of `split` ('train' or 'eval'): its records directory, else its TFDS split.

  `config` is the run's config (or a `DataConfig`). Errors name the config field: no source
  given, a bad records directory or TFDS dataset, fbank frames or mel bins other than the
  model's.
  """
  config = config if isinstance(config, DataConfig) else DataConfig.from_config(config)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; the input reads {SPLITS}")
  directory = getattr(config, f"{split}_dir")
  if directory:
    source = splits.open_records_split(directory, f"config.data.{split}_dir")
  elif config.tfds_name:
    source = splits.open_tfds_split(
        config.tfds_name, getattr(config, f"tfds_{split}_split"), config.tfds_data_dir,
        name_field="config.data.tfds_name", split_field=f"config.data.tfds_{split}_split")
  else:
    raise ValueError(f"config.data.{split}_dir='': no records directory given (or set "
                     f"config.data.tfds_name to read split config.data.tfds_{split}_split of a "
                     "TFDS dataset)")
  splits.check_fbank_shape(source, config.audio_length, config.num_mel_bins)
  return source


def open_evaluator_split(config: Any, name: str, entry: Mapping[str, Any]) -> splits.Split:
  """The clips evaluator `config.evals.<name>` (`entry`) reads: its records directory `dir`, else
  its split of config.data; errors name the field."""
  config = config if isinstance(config, DataConfig) else DataConfig.from_config(config)
  if entry["dir"]:
    source = splits.open_records_split(entry["dir"], f"config.evals.{name}.dir")
    splits.check_fbank_shape(source, config.audio_length, config.num_mel_bins)
    return source
  try:
    return open_split(config, entry["split"])
  except ValueError as e:
    raise ValueError(f"{e} (read by evaluator config.evals.{name}; "
                     f"--config.evals.{name}=None removes it)") from None


def check_data_sources(config: Any, training: bool = True,
                       num_classes: int | None = None, process_count: int = 1) -> None:
  """Opens every split a run reads and checks it against the model; ValueError naming the field.

  The run reads the training split (when `training`, or for fbank_stats='index'), the split
  (or records directory `dir`) of each `config.evals` entry, and checks `eval_dir` when set.
  A `losses` evaluator needs at least one full batch of its split. The shard files of every
  split read must have the sizes their records take (`check_shard_sizes`).
  With `num_classes` (a task that reads labels), every split's clips must have that many
  classes. Logs one warning when the training clips are also read as the "eval" split, and one
  when the training shards give `process_count` processes uneven shares (`uneven_hosts`).
  """
  data_config = DataConfig.from_config(config)
  train = None
  if training or data_config.fbank_stats == "index":
    train = open_split(data_config, "train")
    if training:
      check_training_split(data_config, train, host_shares(train, process_count))
  if data_config.fbank_stats == "index":
    _index_normalization(train)
  eval_sources = [open_split(data_config, "eval")] if data_config.eval_dir else []
  evaluated = list(eval_sources)  # every split an evaluator reads
  evals = config["evals"] if isinstance(config, Mapping) else getattr(config, "evals", None)
  for name, entry in (evals or {}).items():
    source = open_evaluator_split(data_config, name, entry)
    evaluated.append(source)
    if entry["split"] == "eval":
      eval_sources.append(source)
    if entry.get("type") == "losses":
      _check_full_batches(source, f"config.evals.{name}.batch_size", entry.get("batch_size", 0),
                          process_count)
  for source in ([train] if train is not None else []) + eval_sources:
    if num_classes is not None and source.index.num_classes != num_classes:
      raise ValueError(f"config.model.num_classes={num_classes}: the clips of "
                       f"{source.description} have {source.index.num_classes} classes (the "
                       "labels CSV they were made with)")
  compared = train
  if compared is None and (data_config.train_dir or data_config.tfds_name):
    try:  # an evaluation alone: the run's training split, if it can be read here, to compare
      compared = open_split(data_config, "train")
    except (ValueError, OSError):
      compared = None
  if compared is not None and any(splits.same_clips(compared, s) for s in eval_sources):
    logger.warning("config.data: the eval split is the training clips (%s): evaluation "
                   "measures the training data.", compared.description)
  # Every split the run reads, once (an evaluator's miscounting index was found hours in).
  read = ([train] if train is not None and training else []) + evaluated
  for source in {source.description: source for source in read}.values():
    check_shard_sizes(source)
  if train is not None and training:
    uneven = uneven_hosts(train, process_count)
    if uneven:
      logger.warning("config.data: %s", uneven)


def check_shard_sizes(source: splits.Split) -> None:
  """Every shard file of `source` has the size its records take (`records.shard_size_problem`):
  a training shard cut at a record boundary or emptied was found only when an epoch ended
  short, an epoch of AudioSet-2M into the run. One file-size query (and sidecar read) per
  shard, some at once: a remote file system answers each in tens of milliseconds."""
  shards = list(zip(source.files, (shard.num_examples for shard in source.index.shards)))
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, max(1, len(shards)))) as pool:
    problems = list(pool.map(lambda shard: records.shard_size_problem(*shard), shards))
  for (path, _), problem in zip(shards, problems):
    if problem:
      raise ValueError(f"{source.description}: shard {path} is damaged: {problem}")


def check_training_split(data_config: DataConfig, source: splits.Split,
                         shares: Sequence[int]) -> None:
  """What training needs of its split beyond the model's shapes: waveforms for mixup on the
  waveform, and clips for every process (`shares`: `host_shares`). Checked with the run's
  config (`check_data_sources`), before a workdir is written, and again by `batches`."""
  if _uses_waveform(data_config, True) and not source.index.store_waveform:
    raise ValueError(f"config.data.mixup_on='waveform' needs records with waveforms, but "
                     f"{source.description} was written without them (use 'fbank' or "
                     f"rewrite the records with waveforms)")
  if min(shares) == 0:
    how = (" (a TFDS build: tfds.download.DownloadConfig(num_shards=N), a multiple of the "
           "process count)" if source.description.startswith("TFDS ") else "")
    raise ValueError(f"{source.description}: process {list(shares).index(0)} of {len(shares)} "
                     f"gets no training examples ({len(source.index.shards)} shard files); "
                     f"write more shards{how}")


def _check_full_batches(source: splits.Split, field: str, batch_size: int,
                        process_count: int) -> None:
  check_full_batches(host_shares(source, process_count), field, batch_size, source.description)


def check_full_batches(shares: Sequence[int], field: str, batch_size: int,
                       description: str) -> None:
  """A `losses` evaluator's split must give at least one full global batch: its losses are
  means over full batches only (a global batch is full when every process's part is), so it
  would report none, and say nothing. `shares`: the clips each process reads of the split
  (`host_shares`); `field` names `batch_size` in the error."""
  if not batch_size:
    return
  process_count = len(shares)
  host_batch = max(batch_size // process_count, 1)
  smallest = min(shares)
  if smallest // host_batch > 0:
    return
  if process_count == 1:
    raise ValueError(f"{field}={batch_size}: the losses evaluator scores full batches only, and "
                     f"{description} has {smallest} clips; lower the "
                     "batch size (a multiple of the contrast group size)")
  raise ValueError(f"{field}={batch_size}: the losses evaluator scores full batches only (every "
                   f"process's {host_batch} clips), and the shard files of {description} "
                   f"give the {process_count} processes {smallest} "
                   f"clips at the least; lower the batch size or write a multiple of "
                   f"{process_count} shards")


def host_shares(source: splits.Split, process_count: int) -> list[int]:
  """The clips each process reads of `source` (its every process_count-th shard file)."""
  return [sum(source.index.shards[i].num_examples
              for i in host_file_indices(len(source.files), p, process_count))
          for p in range(process_count)]


# Hosts' training shares may differ by this factor before a run is warned.
UNEVEN_HOSTS_RATIO = 1.1


def uneven_hosts(source: splits.Split, process_count: int) -> str:
  """Why `source`'s shard files give `process_count` processes uneven training shares ('' if
  they do not). Every process adds the same number of clips to each global batch from its own
  files, so the clips of a process with fewer are drawn more often, by the ratio of the shares."""
  counts = host_shares(source, process_count)
  if process_count == 1 or min(counts) == 0 or max(counts) <= UNEVEN_HOSTS_RATIO * min(counts):
    return ""
  return (f"the {len(source.files)} shard files of {source.description} give the "
          f"{process_count} processes {min(counts)} to {max(counts)} training clips, so a clip "
          f"of a process with fewer is drawn up to {max(counts) / min(counts):.2f}x as often; "
          f"write a multiple of {process_count} shards of equal size "
          "(tools/preprocess.py --examples-per-shard)")


@dataclasses.dataclass(frozen=True)
class FbankNormalization:
  """The mean and std fbanks are normalized with, and where they come from."""

  mean: float
  std: float
  origin: str

  def describe(self) -> str:
    """One line for the log."""
    return f"fbank normalization: mean {self.mean:.6g}, std {self.std:.6g} ({self.origin})"


def fbank_normalization(config: Any) -> FbankNormalization:
  """The fbank mean and std of every split: the config's fixed numbers or the training split's."""
  config = config if isinstance(config, DataConfig) else DataConfig.from_config(config)
  if config.fbank_stats == "fixed":
    return FbankNormalization(float(config.fbank_mean), float(config.fbank_std),
                              "config.data.fbank_mean/fbank_std, fbank_stats='fixed'")
  return _index_normalization(open_split(config, "train"))


def _index_normalization(train: splits.Split) -> FbankNormalization:
  """The training split's own fbank statistics; ValueError if they cannot normalize."""
  if not (math.isfinite(train.index.fbank_mean) and train.index.fbank_std > 0):
    # Every clip would normalize to inf or NaN.
    raise ValueError(f"config.data.fbank_stats='index': the fbank statistics of "
                     f"{train.description} are mean {train.index.fbank_mean}, std "
                     f"{train.index.fbank_std}; normalizing needs a positive std (use "
                     "fbank_stats='fixed' with fbank_mean / fbank_std)")
  return FbankNormalization(float(train.index.fbank_mean), float(train.index.fbank_std),
                            f"statistics of the training split, {train.description}, "
                            "fbank_stats='index'")


@dataclasses.dataclass(frozen=True)
class SplitFiles:
  """One split's clips and this process's share of its shard files."""

  source: splits.Split
  files: tuple[str, ...]
  file_examples: tuple[int, ...]  # examples in each of `files`, as the index lists them
  host_examples: tuple[int, ...]  # examples of every process, by process index

  @property
  def index(self) -> records.RecordIndex:
    return self.source.index

  @property
  def num_examples(self) -> int:
    return sum(self.host_examples)


def host_file_indices(num_files: int, process_index: int, process_count: int) -> list[int]:
  """The shard files one process reads: every process_count-th, from process_index."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")
  return list(range(process_index, num_files, process_count))


def first_clips_per_process(source: splits.Split, process_count: int, count: int) -> list[int]:
  """How many of each process's clips are among the split's first `count` in shard order.

  Each process reads its own shard files in order (`host_file_indices`), so its share of those
  first clips is the first that many of what it reads: together the same clips whatever the
  process count."""
  shares = [0] * process_count
  start = 0
  for shard, info in enumerate(source.index.shards):
    shares[shard % process_count] += max(0, min(info.num_examples, count - start))
    start += info.num_examples
  return shares


def load_split(config: DataConfig, split: str, process_index: int,
               process_count: int) -> SplitFiles:
  """Opens and checks the split's clips (`open_split`) and picks this process's shard files."""
  source = open_split(config, split)
  index, paths = source.index, source.files
  host_examples = tuple(host_shares(source, process_count))
  mine = host_file_indices(len(paths), process_index, process_count)
  return SplitFiles(source=source, files=tuple(paths[i] for i in mine),
                    file_examples=tuple(index.shards[i].num_examples for i in mine),
                    host_examples=host_examples)


def host_batch_size(batch_size: int, process_count: int,
                    field: str = "config.data.batch_size") -> int:
  """This process's share of a global batch; it must divide evenly."""
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"{field}={batch_size}: must be a positive multiple of the process count "
                     f"{process_count}")
  return batch_size // process_count


def class_sampling_weights(label_counts: Any) -> np.ndarray:
  """Per-class balanced-sampling weight 1000 / (count + 0.01); a clip's weight is their sum."""
  counts = np.asarray(label_counts, np.float64)
  return BALANCED_WEIGHT_NUMERATOR / (counts + BALANCED_COUNT_OFFSET)


@dataclasses.dataclass(frozen=True)
class HostRecords:
  """Where each of this host's training clips is, and its balanced-sampling weight: what
  balanced sampling, exact shuffling and mixup partners need to draw clips and read them at
  their offsets.

  `file_index` [N] (which of the host's `files` holds the clip), `offset` [N] (its record's
  byte offset there), `cumulative_weight` [N] (running sum of the clips' weights).
  """

  files: tuple[str, ...]
  file_index: np.ndarray
  offset: np.ndarray
  cumulative_weight: np.ndarray

  @classmethod
  def scan(cls, files: Sequence[str], file_examples: Sequence[int], label_counts: Any,
           parse_labels: Callable[[tf.Tensor], tf.Tensor]) -> HostRecords:
    """Where the records of `files` are and their weights (`label_counts` are the whole
    split's; the weights are the original's, `class_sampling_weights`): from each shard's
    sidecar (`records.read_record_layout`; tools/preprocess.py and the TFDS builder write
    it), else by reading the shard once for its records' lengths and labels. A file holding
    another count than `file_examples` raises tf.errors.DataLossError naming it."""
    class_weights = class_sampling_weights(label_counts)
    sizes: list[np.ndarray | None] = []
    weights: list[np.ndarray | None] = []
    for path, count in zip(files, file_examples):
      layout = records.read_record_layout(path, count, len(class_weights))
      sizes.append(None if layout is None else layout[0])
      weights.append(None if layout is None else _clip_weights(layout[1], class_weights))
    unread = [i for i, size in enumerate(sizes) if size is None]
    if unread:
      read = _read_sizes_and_weights([files[i] for i in unread], class_weights, parse_labels)
      for i, (size, weight) in zip(unread, read):
        if len(size) != file_examples[i]:
          raise tf.errors.DataLossError(
              None, None, f"{files[i]} {records.count_problem(len(size), file_examples[i])}")
        sizes[i], weights[i] = size, weight
    # A record's offset: the sizes of the records before it in its file, with their framing.
    offsets = [np.cumsum(size + records.TFRECORD_FRAMING_BYTES) - size
               - records.TFRECORD_FRAMING_BYTES for size in sizes]
    return cls(files=tuple(files),
               file_index=np.repeat(np.arange(len(files), dtype=np.int64),
                                    [len(size) for size in sizes]),
               offset=np.concatenate(offsets + [np.zeros([0])]).astype(np.int64),
               cumulative_weight=np.cumsum(np.concatenate(weights + [np.zeros([0])])))

  @property
  def num_clips(self) -> int:
    return len(self.offset)

  def read(self, clip: tf.Tensor) -> tf.data.Dataset:
    """The raw record of clip `clip` (int64 scalar), read at its offset (the file is opened
    when the record is asked for). A read that finds no record there (the file was cut short
    since `scan`) fails (InvalidArgumentError) instead of dropping the clip."""
    record = tf.data.experimental.from_variant(tf.raw_ops.TFRecordDatasetV2(
        filenames=tf.reshape(tf.gather(tf.constant(self.files, tf.string),
                                       tf.gather(self.file_index, clip)), [1]),
        compression_type="", buffer_size=tf.constant(0, tf.int64),
        byte_offsets=tf.reshape(tf.gather(self.offset, clip), [1])),
        tf.TensorSpec([], tf.string))

    def found(serialized: tf.Tensor) -> tf.Tensor:
      with tf.control_dependencies([tf.debugging.assert_positive(
          tf.strings.length(serialized), message="no record at its offset")]):
        return tf.identity(serialized)

    return record.concatenate(tf.data.Dataset.from_tensors(tf.constant(b""))).take(1).map(
        found)

  def balanced_epoch(self, epoch: tf.Tensor, base_seed: tf.Tensor, skip: tf.Tensor,
                     reads_in_flight: int) -> tf.data.Dataset:
    """(position, raw record) of one epoch of balanced sampling from the position `skip` on:
    the original's `WeightedRandomSampler(weights, N, replacement=True)`, N independent draws,
    each clip with probability proportional to its weight, in draw order (`check_weights`
    first)."""
    return self._read_in_order(self.balanced_draws(epoch, base_seed), skip, reads_in_flight)

  def balanced_draws(self, epoch: tf.Tensor, base_seed: tf.Tensor) -> tf.Tensor:
    """The clips [N] (indices) that `balanced_epoch` reads in epoch `epoch`, in draw order."""
    cumulative = tf.constant(self.cumulative_weight, tf.float64)
    uniform = tf.random.stateless_uniform(
        [self.num_clips], _salted(base_seed, "balanced", epoch), dtype=tf.float64)
    # A draw u * total falls in clip k's interval [cumulative[k-1], cumulative[k]); clips of
    # weight 0 have empty intervals. The clamp keeps a draw rounded up to the total in range.
    last = int(np.flatnonzero(np.diff(self.cumulative_weight, prepend=0.0) > 0)[-1])
    return tf.minimum(tf.searchsorted(cumulative, uniform * self.cumulative_weight[-1],
                                      side="right"), last)

  def permuted_epoch(self, epoch: tf.Tensor, base_seed: tf.Tensor, skip: tf.Tensor,
                     reads_in_flight: int) -> tf.data.Dataset:
    """(position, raw record) of one epoch of every clip once, in a fresh random permutation
    (the original's shuffling loader), from the position `skip` on."""
    order = tf.random.experimental.stateless_shuffle(
        tf.range(self.num_clips, dtype=tf.int64), _salted(base_seed, "permutation", epoch))
    return self._read_in_order(order, skip, reads_in_flight)

  def _read_in_order(self, clips: tf.Tensor, skip: tf.Tensor,
                     reads_in_flight: int) -> tf.data.Dataset:
    """(position, raw record) of `clips` [N] (indices), from position `skip` on, in order."""
    return tf.data.Dataset.from_tensor_slices(clips).enumerate().skip(skip).interleave(
        lambda position, clip: self.read(clip).map(lambda serialized: (position, serialized)),
        cycle_length=reads_in_flight, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def check_weights(self) -> None:
    """ValueError unless some clip has a balanced-sampling weight (some clip has labels)."""
    if not self.num_clips or self.cumulative_weight[-1] <= 0:
      raise ValueError("config.data.balanced_sampling=True: the training clips of this "
                       "process have no labels, so none has a sampling weight")

  def with_mixup_partners(self, clips: tf.data.Dataset, probability: float,
                          base_seed: tf.Tensor, reads_in_flight: int) -> tf.data.Dataset:
    """Adds (mixed, partner's raw record) to each (epoch, position, raw record) of `clips`: as
    the original's loader, a clip is mixed with probability `probability`, with a partner
    drawn uniformly from all the clips (the host's), whatever the sampling; an unmixed clip's
    partner is b'' (nothing is read)."""

    def add_partner(epoch: tf.Tensor, position: tf.Tensor,
                    serialized: tf.Tensor) -> tf.data.Dataset:
      mixed = tf.random.stateless_uniform(
          [], _salted(base_seed, "mixup", epoch, position)) < probability
      partner = tf.random.stateless_uniform(
          [], _salted(base_seed, "partner", epoch, position), maxval=self.num_clips,
          dtype=tf.int64)
      record = self.read(partner).take(tf.cast(mixed, tf.int64)).concatenate(
          tf.data.Dataset.from_tensors(tf.constant(b""))).take(1)
      return record.map(lambda partner_record: (epoch, position, serialized, mixed,
                                                partner_record))

    return clips.interleave(no_autograph(add_partner), cycle_length=reads_in_flight,
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _read_sizes_and_weights(files: Sequence[str], class_weights: np.ndarray,
                            parse_labels: Callable[[tf.Tensor], tf.Tensor]
                            ) -> list[tuple[np.ndarray, np.ndarray]]:
  """(record sizes int64, weights float64) of every file, in file order, by reading them."""
  weights_tensor = tf.constant(class_weights, tf.float64)

  def sizes_and_weights(file_index: tf.Tensor, path: tf.Tensor) -> tf.data.Dataset:
    return tf.data.TFRecordDataset(path).map(lambda serialized: (
        file_index, tf.strings.length(serialized, unit="BYTE"),
        tf.reduce_sum(tf.gather(weights_tensor, parse_labels(serialized)))))

  scanned = tf.data.Dataset.from_tensor_slices(
      (tf.range(len(files), dtype=tf.int64), tf.constant(list(files), tf.string))).interleave(
          no_autograph(sizes_and_weights), cycle_length=min(len(files), INTERLEAVE_CYCLE),
          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(65536)
  columns: list[list[np.ndarray]] = [[], [], []]
  for batch in scanned:
    for column, values in zip(columns, batch):
      column.append(values.numpy())
  file_index, size, weight = (np.concatenate(column + [np.zeros([0], dtype)]).astype(dtype)
                              for column, dtype in zip(columns, (np.int64, np.int64,
                                                                 np.float64)))
  order = np.argsort(file_index, kind="stable")  # each file's records stay in file order
  bounds = np.cumsum(np.bincount(file_index, minlength=len(files)))[:-1]
  return list(zip(np.split(size[order], bounds), np.split(weight[order], bounds)))


def _clip_weights(labels: Sequence[Sequence[int]], class_weights: np.ndarray) -> np.ndarray:
  """Each clip's balanced-sampling weight: the sum of its classes' weights."""
  rows = np.repeat(np.arange(len(labels)), [len(clip) for clip in labels])
  flat = np.fromiter((k for clip in labels for k in clip), np.int64, count=len(rows))
  return np.bincount(rows, weights=class_weights[flat], minlength=len(labels))


def host_records(split_files: SplitFiles) -> HostRecords:
  """The `HostRecords` of this process's training files (from their sidecars, or reading them
  once; logs the time)."""
  start = time.perf_counter()
  found = HostRecords.scan(split_files.files, split_files.file_examples,
                           split_files.index.label_counts, split_files.source.parse_labels)
  logger.info("found the records and sampling weights of %d clips of %s in %.1f s",
              found.num_clips, split_files.source.description, time.perf_counter() - start)
  return found


def needs_host_records(config: DataConfig, training: bool) -> bool:
  """Whether training reads clips at their offsets: balanced sampling, exact shuffling, mixup
  partners."""
  return training and (config.balanced_sampling or config.exact_shuffle or config.mixup > 0)


def example_preprocess_spec(config: DataConfig, training: bool, num_classes: int) -> str:
  """The per-clip op string: frame choice, JPEG decode, resize + crop, multi-hot labels."""
  if training:
    frame = f"choose_frame(None, {records.NUM_VIDEO_FRAMES})"
  elif config.eval_all_frames:
    frame = "all_frames"
  else:
    frame = f"choose_frame({config.eval_frame}, {records.NUM_VIDEO_FRAMES})"
  return f"{frame}|decode_jpeg|resize_crop({config.image_size})|multi_hot({num_classes})"


def batch_preprocess_spec(config: DataConfig, training: bool, mean: float, std: float) -> str:
  """The per-batch op string, in the original's order (evaluation: normalization only)."""
  ops = []
  if training and config.mixup > 0:
    ops.append(f"mixup({config.mixup_on!r})")
  if training and (config.freqm or config.timem):
    ops.append(f"specaugment({config.freqm}, {config.timem})")
  ops.append(f"normalize_fbank({mean!r}, {std!r})")
  if training and config.noise and not config.noise_on_device:
    ops.append("noise_roll")
  ops.append("normalize_image")
  if training and config.label_smooth > 0:
    ops.append(f"smooth_labels({config.label_smooth!r})")
  return "|".join(ops)


def _salted(seed: tf.Tensor, name: str, *values: tf.Tensor) -> tf.Tensor:
  """Stateless seed [2] derived from `seed`, a name and integers."""
  seed = tf.random.experimental.stateless_fold_in(seed, zlib.crc32(name.encode()) & 0x7FFFFFFF)
  for value in values:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int64))
  return seed


def _uses_waveform(config: DataConfig, training: bool) -> bool:
  return training and config.mixup > 0 and config.mixup_on == "waveform"


def _parse_fn(config: DataConfig, training: bool, source: splits.Split, with_waveform: bool):
  example_pp = augment.get_preprocess_fn(
      example_preprocess_spec(config, training, source.index.num_classes))

  def parse(serialized: tf.Tensor, seed: tf.Tensor) -> dict[str, tf.Tensor]:
    parsed = source.parse(serialized, with_waveform=with_waveform)
    data = {
        "audio": parsed[records.FBANK],
        "frames": parsed[records.FRAMES],
        "labels": parsed[records.LABELS],
        augment.SEED_KEY: seed,
    }
    data = example_pp(data)
    out = {
        "audio": data["audio"],
        "image": data["image"],
        "label": data["label"],
        "valid": tf.constant(True),
        "frame_index": tf.cast(data["frame_index"], tf.int32),
    }
    if with_waveform:
      out["waveform"] = parsed[records.WAVEFORM]
      out["waveform_length"] = tf.shape(parsed[records.WAVEFORM], out_type=tf.int32)[0]
    return out

  return parse


def _epoch_records(files: tuple[str, ...], epoch: tf.Tensor, base_seed: tf.Tensor,
                   config: DataConfig, skip: tf.Tensor) -> tf.data.Dataset:
  """(position, raw record) of one epoch of this host's records from position `skip` on, in
  the epoch's deterministic shuffled order."""
  order = tf.random.experimental.stateless_shuffle(
      tf.constant(files), _salted(base_seed, "files", epoch))
  dataset = tf.data.Dataset.from_tensor_slices(order).interleave(
      tf.data.TFRecordDataset, cycle_length=min(len(files), INTERLEAVE_CYCLE), block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  shuffle_seed = tf.random.stateless_uniform(
      [], _salted(base_seed, "shuffle", epoch), minval=None, maxval=None, dtype=tf.int64)
  return dataset.shuffle(config.shuffle_buffer, seed=shuffle_seed).enumerate().skip(skip)


def _base_seed(seed: int, process_index: int = 0) -> tf.Tensor:
  """Each process draws its own augmentations (process 0's are those of a one-process run)."""
  return tf.constant([process_index, seed], tf.int64)


def training_records(files: tuple[str, ...], seed: int, config: DataConfig,
                     host: HostRecords | None = None, *, start_epoch: int = 0,
                     start_position: int = 0, process_index: int = 0) -> tf.data.Dataset:
  """Endless (epoch, position, raw record) of this host's training `files`, epoch after epoch,
  from record `start_position` of epoch `start_epoch`: every record once per epoch, through the
  shuffle buffer or (`config.exact_shuffle`) in a random permutation, or with
  `config.balanced_sampling` the balanced draws; the last two read `host` (the `HostRecords` of
  these files). Each epoch has as many records as the files hold."""
  base_seed = _base_seed(seed, process_index)
  if config.balanced_sampling or config.exact_shuffle:
    if host is None or host.files != tuple(files):
      raise ValueError("balanced_sampling and exact_shuffle read the clips of the HostRecords "
                       "of the files")
  if config.balanced_sampling:
    host.check_weights()

  def epoch_stream(epoch: tf.Tensor) -> tf.data.Dataset:
    skip = tf.where(epoch == start_epoch, tf.cast(start_position, tf.int64), 0)
    if config.balanced_sampling:
      stream = host.balanced_epoch(epoch, base_seed, skip, config.reads_in_flight)
    elif config.exact_shuffle:
      stream = host.permuted_epoch(epoch, base_seed, skip, config.reads_in_flight)
    else:
      stream = _epoch_records(files, epoch, base_seed, config, skip)
    return stream.map(lambda position, serialized: (epoch, position, serialized))

  return tf.data.Dataset.range(start_epoch, 2**62).flat_map(no_autograph(epoch_stream))


def _batch_fn(batch_pp, base_seed: tf.Tensor, zero_padding: bool):
  def apply(batch_number: tf.Tensor, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    batch = dict(batch)
    batch[augment.SEED_KEY] = _salted(base_seed, "batch", batch_number)
    batch = batch_pp(batch)
    batch = {k: v for k, v in batch.items() if k in _OUTPUT_KEYS or k in (EPOCH_KEY, POSITION_KEY)}
    if zero_padding:  # padding clips are exactly zero after normalization too
      for key in ("audio", "image", "label"):
        valid = tf.reshape(batch["valid"], [-1] + [1] * (batch[key].shape.rank - 1))
        batch[key] = tf.where(valid, batch[key], tf.zeros_like(batch[key]))
    return batch

  return apply


def _batch(dataset: tf.data.Dataset, host_batch: int, with_waveform: bool) -> tf.data.Dataset:
  if with_waveform:  # waveforms differ in length: zero-pad to the batch's longest
    return dataset.padded_batch(host_batch, drop_remainder=True)
  return dataset.batch(host_batch, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)


def _options(threads: int | None) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  if threads:
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
  return options


def resolve_host_batch(config: DataConfig, batch_size: int | None, process_count: int) -> int:
  """This process's batch: of `batch_size` if given, else of config.data.batch_size."""
  if batch_size is None:
    return host_batch_size(config.batch_size, process_count)
  return host_batch_size(batch_size, process_count, field="batch_size (passed to the input)")


def _listed_record(i: tf.Tensor, serialized: tf.Tensor, listed: int) -> tf.Tensor:
  """`serialized`, the `i`-th record of a host's eval files, which the index says hold `listed`:
  a record past them stops the pass (an OpError; `InputPipeline` names the shard). Else its
  padding would be counted from the index while the real records ran on: unlisted clips
  scored and listed ones cut off by the last batch, without a word. (Fewer records end the
  pass early, which `InputPipeline` refuses.)"""
  check = tf.debugging.assert_less(
      i, tf.constant(listed, tf.int64),
      message="the shard files hold more records than the index lists")
  with tf.control_dependencies([check]):
    return tf.identity(serialized)


def num_eval_batches(split_files: SplitFiles, host_batch: int) -> int:
  """Batches every process yields in evaluation: enough for the process with most clips."""
  return max(math.ceil(n / host_batch) for n in split_files.host_examples)


def make_dataset(config: Any, split: str, *, process_index: int, process_count: int,
                 seed: int = 0, training: bool | None = None, start_epoch: int = 0,
                 start_position: int = 0, start_batch: int = 0, batch_size: int | None = None,
                 threads: int | None = None, normalization: FbankNormalization | None = None,
                 host: HostRecords | None = None,
                 split_files: SplitFiles | None = None) -> tf.data.Dataset:
  """This process's batches of `split` as a tf.data.Dataset of dicts (see the module doc).

  `training` defaults to `split == "train"`; `batch_size` (global) overrides
  config.data.batch_size, e.g. with config.eval.batch_size for evaluation. Training batches
  also carry `EPOCH_KEY` and `POSITION_KEY` [B] (where each clip sits in the stream, for
  `InputPipeline`'s state); the stream starts at clip `start_position` of epoch `start_epoch`,
  numbering batches from `start_batch`. `normalization` (default: `fbank_normalization` of the
  config) is the fbank mean and std, given by a caller that reads another directory as `split`.
  `host` (training with balanced sampling, exact shuffling or mixup; default: `host_records` of
  the split) is where the host's clips are, and `split_files` (default: `load_split`) the
  split's files, each given by a caller that builds the stream more than once.
  """
  data_config = config if isinstance(config, DataConfig) else DataConfig.from_config(config)
  training = split == "train" if training is None else training
  split_files = split_files or load_split(data_config, split, process_index, process_count)
  source = split_files.source
  host_batch = resolve_host_batch(data_config, batch_size, process_count)
  with_waveform = _uses_waveform(data_config, training)
  if training:
    check_training_split(data_config, source, split_files.host_examples)
  normalization = normalization or fbank_normalization(data_config)
  parse = _parse_fn(data_config, training, source, with_waveform)
  batch_pp = augment.get_preprocess_fn(
      batch_preprocess_spec(data_config, training, normalization.mean, normalization.std))
  base_seed = _base_seed(seed, process_index)

  if training:
    if needs_host_records(data_config, training) and host is None:
      host = host_records(split_files)

    def parse_clip(epoch: tf.Tensor, position: tf.Tensor, serialized: tf.Tensor,
                   *mixup: tf.Tensor) -> dict[str, tf.Tensor]:
      clip = parse(serialized, _salted(base_seed, "clip", epoch, position))
      if mixup:  # the partner's fields (zeros when the clip is not mixed), for augment.mixup
        mixed, partner = mixup
        other = tf.cond(
            mixed, lambda: parse(partner, _salted(base_seed, "partner_clip", epoch, position)),
            lambda: {key: tf.zeros_like(value) for key, value in clip.items()})
        for key in augment.MIX_FIELDS:
          if key in other:
            clip[augment.MIX_PREFIX + key] = other[key]
        clip[augment.MIXED_KEY] = mixed
      clip[EPOCH_KEY], clip[POSITION_KEY] = epoch, position
      return clip

    clips = training_records(
        split_files.files, seed, data_config, host, start_epoch=start_epoch,
        start_position=start_position, process_index=process_index)
    if data_config.mixup > 0:
      clips = host.with_mixup_partners(clips, data_config.mixup, base_seed,
                                       data_config.reads_in_flight)
    clips = clips.map(no_autograph(parse_clip), num_parallel_calls=tf.data.AUTOTUNE,
                      deterministic=True)
    batches = _batch(clips, host_batch, with_waveform)
  else:
    # A process may hold no shard at all (more processes than files): it yields padding only.
    files = tf.constant(split_files.files, tf.string, shape=[len(split_files.files)])
    listed = split_files.host_examples[process_index]
    clips = tf.data.TFRecordDataset(files).enumerate().map(
        no_autograph(lambda i, serialized: parse(_listed_record(i, serialized, listed),
                                                 base_seed)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    total = num_eval_batches(split_files, host_batch) * host_batch
    padding = total - listed
    blank = {k: tf.zeros(s.shape, s.dtype) for k, s in clips.element_spec.items()}
    batches = clips.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding)).batch(
        host_batch, drop_remainder=True).skip(start_batch)

  batches = batches.enumerate(start=start_batch).map(
      no_autograph(_batch_fn(batch_pp, base_seed, zero_padding=not training)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if data_config.prefetch:
    batches = batches.prefetch(data_config.prefetch)
  return batches.with_options(_options(threads))
