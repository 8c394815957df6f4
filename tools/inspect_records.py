#!/usr/bin/env python3
"""Looks inside a split of clips: counts, shapes, label histogram, fbank and frame PNGs.

  python tools/inspect_records.py --records DIR [--labels class_labels_indices.csv] \
      [--png-dir DIR/inspect] [--num-images 4] [--top 20]
  python tools/inspect_records.py --tfds cav_mae_clips/<config> [--tfds-data-dir D] \
      [--split train] [--labels ...] [--png-dir inspect_<config>_<split>]

Reads every example of a records directory (tools/preprocess.py output) or of a split of a
TFDS dataset built by the cav_mae_clips builder (the same reader as the input pipeline,
`cav_mae_jax.data.splits`), checks the counts, label counts and unlabeled count against the
index (for TFDS, the dataset info and the builder's statistics), prints a report, and for the first
`--num-images` clips writes `fbank_<video_id>.png` (the raw fbank's valid frames: time frame
across, mel bin up, a colorbar in raw log-mel units; titled with the clip id and its labels)
and `frames_<video_id>.png` (the 10 stored JPEG frames in a 2 x 5 grid, each with its source
frame number, titled with the clip id, labels and the rotation that made them upright). A
source that is not a records directory or a built TFDS split, a missing labels CSV or damaged
records print one line `error: ...` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import io
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from cav_mae_jax import cli
from cav_mae_jax import files


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.error = lambda message: sys.exit(cli.error_line(message))
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--records", type=cli.path_type,
                      help="a records directory (tools/preprocess.py output)")
  source.add_argument("--tfds", help="a TFDS dataset built by the cav_mae_clips builder, "
                      "e.g. cav_mae_clips/datafile")
  parser.add_argument("--tfds-data-dir", type=cli.path_type,
                      help="its TFDS data directory (default: TFDS's)")
  parser.add_argument("--split", help="the TFDS split (with --tfds; default train)")
  parser.add_argument("--labels", type=cli.path_type,
                      help="class_labels_indices.csv, for class names")
  parser.add_argument("--png-dir", type=cli.path_type,
                      help="where to write PNGs (default RECORDS/inspect, or "
                      "inspect_<dataset>_<split> here for --tfds)")
  parser.add_argument("--num-images", type=cli.number_type(int, 0), default=4)
  parser.add_argument("--top", type=cli.number_type(int, 0), default=20)
  return parser


# The longest name, in UTF-8 bytes, a clip id gives its pictures (a file name holds 255).
_MAX_NAME_BYTES = 150


def _safe_name(video_id: str) -> str:
  """`video_id` as a file name: other characters than letters, digits and '-_.' become '_',
  and a longer name than _MAX_NAME_BYTES is cut, ending in a digest of the whole id."""
  name = "".join(c if c.isalnum() or c in "-_." else "_" for c in video_id)
  if len(name.encode()) > _MAX_NAME_BYTES:
    digest = hashlib.sha256(video_id.encode()).hexdigest()[:12]
    cut = name.encode()[:_MAX_NAME_BYTES - len(digest) - 1].decode("utf-8", "ignore")
    name = f"{cut}_{digest}"
  return name


def default_png_dir(args: argparse.Namespace) -> str:
  """Where the PNGs go without --png-dir: RECORDS/inspect, or inspect_<dataset>_<split> in the
  working directory for --tfds (`args` with TFDS's defaults filled in)."""
  if args.records:
    return os.path.join(args.records, "inspect")
  return f"inspect_{_safe_name(args.tfds.replace('/', '_'))}_{args.split}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The flags, with TFDS's defaults filled in; what they cannot mean is refused (one line,
  exit 2): --split or --tfds-data-dir with --records (both were silently ignored), a --png-dir
  that is a file (the folder could not be made, and the error did not name the flag), and so is
  a default PNG folder that is one (the error was the OS's '[Errno 17] File exists', after
  TensorFlow's import and the split's index)."""
  parser = _parser()
  args = parser.parse_args(argv)
  if args.records:
    given = [flag for flag, value in (("--split", args.split),
                                      ("--tfds-data-dir", args.tfds_data_dir))
             if value is not None]
    if given:
      verb = "applies" if len(given) == 1 else "apply"
      parser.error(f"{' and '.join(given)}: {verb} to --tfds only, not to --records")
  else:
    args.split = "train" if args.split is None else args.split
    args.tfds_data_dir = args.tfds_data_dir or ""
  png_dir = args.png_dir or default_png_dir(args)
  if os.path.exists(png_dir) and not os.path.isdir(png_dir):
    parser.error(f"--png-dir {png_dir}: a file, not a folder for the PNGs" if args.png_dir else
                 f"{png_dir} (the default --png-dir): a file, not a folder for the PNGs; give "
                 "--png-dir another folder")
  return args


if __name__ == "__main__":
  # TensorFlow's start-up notices would bury the one-line errors (set before it is imported);
  # this tool does no TensorFlow arithmetic (it only parses records with it), so oneDNN's
  # kernels are not needed.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  with cli.signals_end_with_one_line():  # Ctrl-C in TensorFlow's import (seconds) too
    parse_args()  # A bad flag is answered now, not after TensorFlow's import.
    cli.import_tensorflow()  # as the other tools: without Keras, its GPUs hidden

# pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
from PIL import Image
import tensorflow as tf

from cav_mae_jax.data import dataset
from cav_mae_jax.data import decode
from cav_mae_jax.data import records
from cav_mae_jax.data import sources
from cav_mae_jax.data import splits
# pylint: enable=g-import-not-at-top,wrong-import-position


def label_text(values: records.ExampleValues, class_names: list[str] | None) -> str:
  """The clip's labels: class names when known, else the stored label ids; joined by '; ' (class
  names have commas: 'Speech; Male speech, man speaking' is two labels)."""
  if class_names:
    names = [class_names[i] if i < len(class_names) else f"class {i}"
             for i in values[records.LABELS]]
  else:
    names = list(values[records.LABEL_IDS])
  return "; ".join(names) if names else "no labels"


def fbank_figure(values: records.ExampleValues, class_names: list[str] | None = None) -> Figure:
  """The valid frames of the clip's raw fbank: time frames across, mel bins up, a colorbar."""
  frames = max(min(int(values[records.FBANK_NUM_FRAMES]), records.TARGET_FBANK_FRAMES), 1)
  fbank = values[records.FBANK][:frames].astype(np.float32)
  figure = Figure(figsize=(10, 4), dpi=100)
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  image = axes.imshow(fbank.T, origin="lower", aspect="auto", cmap="magma",
                      interpolation="nearest", extent=(-0.5, frames - 0.5, -0.5,
                                                       fbank.shape[1] - 0.5))
  axes.set_xlabel(f"time frame (10 ms; {frames} of {records.TARGET_FBANK_FRAMES} valid)")
  axes.set_ylabel("mel bin")
  axes.set_title(f"{values[records.VIDEO_ID]}: {label_text(values, class_names)}")
  figure.colorbar(image, ax=axes, label="log-mel energy (raw, not normalized)")
  figure.tight_layout()
  return figure


def frames_figure(values: records.ExampleValues, class_names: list[str] | None = None,
                  columns: int = 5) -> Figure:
  """The JPEG frames in rows of `columns`, each titled with its source frame number (frames
  of the original's extracted layout, whose numbers are not known, with their frame_{i} folder)."""
  images = []
  for i, jpeg in enumerate(values[records.FRAMES]):
    try:
      images.append(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    except (OSError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
      raise ValueError(f"clip {values[records.VIDEO_ID]}: stored frame {i} is not a decodable "
                       f"image ({e.__class__.__name__}: {str(e).split(' <')[0]})") from None
  indices = [int(index) for index in values[records.FRAME_INDICES]]
  extracted = all(index == decode.EXTRACTED_FRAME_INDEX for index in indices)
  rows = -(-len(images) // columns)
  figure = Figure(figsize=(3 * columns, 3.2 * rows + 0.6), dpi=100)
  FigureCanvasAgg(figure)
  for i, (image, index) in enumerate(zip(images, indices)):
    axes = figure.add_subplot(rows, columns, i + 1)
    axes.imshow(image)
    axes.set_title(f"frame_{i}" if extracted else f"frame {index}")
    axes.axis("off")
  rotation = int(values[records.ROTATION])
  turned = f"turned {rotation} degrees clockwise to be upright" if rotation else "not rotated"
  numbers = ("the original's extracted frame_{i} files, source frame numbers not known"
             if extracted else "source frame numbers, 0-based")
  figure.suptitle(f"{values[records.VIDEO_ID]}: {label_text(values, class_names)}\n"
                  f"rotation {rotation} ({turned}); {numbers}")
  figure.tight_layout()
  return figure


def _unique_name(video_id: str, taken: set[str]) -> str:
  """`_safe_name(video_id)`, with `_2`, `_3`, ... when another clip's id gave the same name
  (ids 'a/b' and 'a_b': the second picture overwrote the first)."""
  name = base = _safe_name(video_id)
  copy = 1
  while name in taken:
    copy += 1
    name = f"{base}_{copy}"
  taken.add(name)
  return name


def save_png(figure: Figure, png: str) -> None:
  """Writes `figure` to `png`: only a complete picture carries its name (a full disk left a
  truncated PNG beside complete ones), and a refused write names it (the line was 'error:
  None: ...')."""
  with files.staged_output(png) as staged:
    figure.savefig(staged, format="png")  # the format given: the name does not end in .png


def _parsed_or_fail(path: str, parse: Callable[[tf.Tensor], dict[str, tf.Tensor]]):
  """A shard's parsed examples, in order; a shard that cannot be read or parsed raises
  ValueError naming it. Parsed in a tf.data graph on parallel threads: an eager parse per
  example made the tool 4x slower than reading the shards (70 min for AudioSet-2M's 2M clips
  read from memory)."""
  try:
    yield from tf.data.TFRecordDataset(path).map(
        dataset.no_autograph(parse), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  except tf.errors.OpError as e:
    raise ValueError(f"shard {path} is damaged: {records.op_error_text(e)}") from None


def inspect(split: splits.Split, png_dir: str, num_images: int = 4,
            class_names: list[str] | None = None) -> dict[str, Any]:
  """Reads every example of a split; returns counts, shapes and histograms, writes PNGs."""
  index = split.index
  os.makedirs(png_dir, exist_ok=True)
  label_counts: collections.Counter[int] = collections.Counter()
  rotations: collections.Counter[int] = collections.Counter()
  shard_counts, shapes, fbank_frames, images = {}, {}, [], []
  unlabeled = 0
  names_taken: set[str] = set()
  parse = functools.partial(split.parse, with_waveform=index.store_waveform)
  with_layout = 0
  for shard, path in zip(index.shards, split.files):
    count = 0
    layout = records.read_record_layout(path, shard.num_examples, index.num_classes)
    with_layout += layout is not None
    for parsed in _parsed_or_fail(path, parse):
      if not shapes:
        shapes = {k: (v.dtype.name, tuple(v.shape)) for k, v in sorted(parsed.items())}
      # What is counted is read from the tensors; the whole clip (parsed_to_values, as slow
      # again as the parse) only for the clips drawn.
      clip_labels = parsed[records.LABELS].numpy()
      if layout is not None and layout[1][count] != clip_labels.tolist():
        raise ValueError(f"{path}{records.SIDECAR_SUFFIX} does not describe its shard: record "
                         f"{count} has classes {clip_labels.tolist()}, the sidecar lists "
                         f"{layout[1][count]}")
      label_counts.update(int(x) for x in clip_labels)
      unlabeled += clip_labels.size == 0
      fbank_frames.append(int(parsed[records.FBANK_NUM_FRAMES]))
      rotations[records.parsed_rotation(parsed)] += 1
      if len(images) < 2 * num_images:  # Two PNGs per clip.
        values = records.parsed_to_values(parsed)
        name = _unique_name(values[records.VIDEO_ID], names_taken)
        for kind, draw in (("fbank", fbank_figure), ("frames", frames_figure)):
          png = os.path.join(png_dir, f"{kind}_{name}.png")
          with warnings.catch_warnings():  # an id in a script the font lacks (CJK): boxes
            warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
            try:
              figure = draw(values, class_names)
            except ValueError as e:
              raise ValueError(f"shard {path}: {e}") from None
            save_png(figure, png)
          images.append(png)
      count += 1
    if count != shard.num_examples:
      raise ValueError(f"{path}: {count} examples, the index says {shard.num_examples}")
    shard_counts[shard.file] = count
  counted = [label_counts.get(i, 0) for i in range(index.num_classes)]
  if counted != list(index.label_counts):
    raise ValueError(f"{split.description}: the index's label_counts differ from the "
                     "examples' labels")
  # An index that counts unlabeled clips must count them right; 0 is also what an index written
  # before they were counted reads as, so a count there is reported, not refused.
  if index.num_unlabeled and index.num_unlabeled != unlabeled:
    raise ValueError(f"{split.description}: the index counts {index.num_unlabeled} clips with no "
                     f"labels, the examples have {unlabeled}")
  return {
      "source": split.description,
      "num_examples": sum(shard_counts.values()),
      "shards": shard_counts,
      "shards_with_layout": with_layout,
      "shapes": shapes,
      "label_counts": counted,
      "unlabeled": unlabeled,
      "index_unlabeled": index.num_unlabeled,
      "fbank_num_frames": {"min": int(np.min(fbank_frames)), "max": int(np.max(fbank_frames)),
                           "mean": float(np.mean(fbank_frames))},
      "rotation": dict(sorted(rotations.items())),
      "fbank_mean": index.fbank_mean,
      "fbank_std": index.fbank_std,
      "pngs": images,
  }


def format_report(report: dict[str, Any], class_names: list[str] | None, top: int) -> str:
  """Human-readable lines for `inspect`'s report."""
  lines = [f"{report['source']}: {report['num_examples']} examples in "
           f"{len(report['shards'])} shards"]
  lines += [f"  {name}: {count}" for name, count in report["shards"].items()]
  num_shards, with_layout = len(report["shards"]), report["shards_with_layout"]
  lines.append(
      f"record layouts in shard sidecars: {with_layout} of {num_shards} shards" + (
          "; balanced sampling, mixup and exact_shuffle find the records without reading them"
          if with_layout == num_shards else
          "; balanced sampling, mixup and exact_shuffle read the shards without one at start "
          "(shards written before 2026-12-04, TFDS builds before 1.4.0)"))
  lines.append("parsed keys (dtype, shape):")
  lines += [f"  {key}: {dtype} {shape}" for key, (dtype, shape) in report["shapes"].items()]
  frames = report["fbank_num_frames"]
  lines.append(f"fbank frames before padding (at most 1024): min {frames['min']} max "
               f"{frames['max']} mean {frames['mean']:.1f}; fbank mean "
               f"{report['fbank_mean']:.4f} std {report['fbank_std']:.4f} (raw, valid frames)")
  lines.append("frames turned upright by (clockwise degrees: clips): " + ", ".join(
      f"{degrees}: {count}" for degrees, count in report["rotation"].items()))
  order = sorted(range(len(report["label_counts"])), key=lambda i: -report["label_counts"][i])
  most = max(report["label_counts"]) or 1
  note = ""
  if report["unlabeled"] and report["index_unlabeled"]:
    note = (" (written with tools/preprocess.py --allow-unlabeled: fine-tuning takes them as "
            "clips of no class)")
  elif report["unlabeled"]:
    note = (" (the index does not count them: written before index.json counted clips with no "
            "labels; fine-tuning takes them as clips of no class)")
  lines.append(f"clips with no labels: {report['unlabeled']}{note}")
  lines.append(f"label histogram (top {top} of {len(order)} classes):")
  for i in order[:top]:
    count = report["label_counts"][i]
    name = class_names[i] if class_names else ""
    lines.append(f"  {i:4d} {name[:30]:30s} {count:7d} {'#' * round(40 * count / most)}")
  lines.append(f"wrote {len(report['pngs'])} PNGs, e.g. {report['pngs'][:2]}")
  return "\n".join(lines)


def open_source(args: argparse.Namespace) -> tuple[splits.Split, str]:
  """The split the flags name and the default PNG folder for it."""
  if args.records:
    split = splits.open_records_split(args.records, "--records")
  else:
    split = splits.open_tfds_split(args.tfds, args.split, args.tfds_data_dir, name_field="--tfds",
                                   split_field="--split")
  return split, default_png_dir(args)


def main(argv: list[str] | None = None) -> int:
  """Runs the tool; returns the exit status (2 on bad input, with one line on stderr)."""
  args = parse_args(argv)
  try:
    names = list(sources.read_class_labels(args.labels).display_names) if args.labels else None
    split, default_png_dir = open_source(args)
    if names is not None and len(names) != split.index.num_classes:
      # (fewer names: a traceback at the class histogram; more: the names of another class list)
      raise ValueError(f"--labels {args.labels}: lists {len(names)} classes, and the records "
                       f"have {split.index.num_classes} (the labels CSV of another dataset?)")
    report = inspect(split, args.png_dir or default_png_dir, args.num_images, names)
  except OSError as e:
    return cli.error_line(f"{e.filename}: {e.strerror or e}")
  except ValueError as e:  # not a records dir or TFDS split, sources.SourceError, wrong counts
    return cli.error_line(e)
  except tf.errors.OpError as e:  # An example that cannot be parsed.
    return cli.error_line(f"{args.records or args.tfds}: damaged records: "
                          f"{records.op_error_text(e)}")
  print(format_report(report, names, args.top))
  return 0


if __name__ == "__main__":
  with cli.signals_end_with_one_line():
    sys.exit(main())
