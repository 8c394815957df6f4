#!/usr/bin/env python3
"""Looks inside a clip-record directory: counts, shapes, label histogram, fbank/frame PNGs.

  python tools/inspect_records.py --records DIR [--labels class_labels_indices.csv] \
      [--png-dir DIR/inspect] [--num-images 4] [--top 20]

Reads every record (checking the counts against index.json), prints a report, and writes
`fbank_<video_id>.png` (time to the right, mel bin 0 at the bottom, the raw fbank scaled to
its own min..max) and `frames_<video_id>.png` (the 10 stored JPEG frames in a 2 x 5 grid) for
the first `--num-images` clips. A folder that is not a records directory, a missing labels
CSV or damaged records print one line `error: ...` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import sys
from typing import Any

if __name__ == "__main__":
  # TensorFlow's start-up notices would bury the one-line errors (set before it is imported);
  # this tool does no TensorFlow arithmetic (it only parses records with it), so oneDNN's
  # kernels are not needed.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from PIL import Image
import tensorflow as tf

from cav_mae_jax.data import records
from cav_mae_jax.data import sources
# pylint: enable=g-import-not-at-top,wrong-import-position


def fbank_image(fbank: np.ndarray, num_frames: int) -> Image.Image:
  """A grayscale picture of the valid part of a [T, 128] fbank (low bins at the bottom)."""
  valid = fbank[:max(num_frames, 1)].astype(np.float32)
  low, high = float(valid.min()), float(valid.max())
  scaled = (valid - low) / (high - low) if high > low else np.zeros_like(valid)
  return Image.fromarray(np.round(255 * scaled.T[::-1]).astype(np.uint8), mode="L")


def frames_grid(jpeg_frames: list[bytes], columns: int = 5) -> Image.Image:
  """The JPEG frames decoded and tiled in rows of `columns`."""
  images = [Image.open(io.BytesIO(jpeg)).convert("RGB") for jpeg in jpeg_frames]
  width, height = images[0].size
  rows = -(-len(images) // columns)
  grid = Image.new("RGB", (columns * width, rows * height))
  for i, image in enumerate(images):
    grid.paste(image, ((i % columns) * width, (i // columns) * height))
  return grid


def _safe_name(video_id: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in video_id)


def inspect(records_dir: str, png_dir: str, num_images: int = 4) -> dict[str, Any]:
  """Reads all records of a directory; returns counts, shapes and histograms, writes PNGs."""
  index = records.open_records_dir(records_dir)
  os.makedirs(png_dir, exist_ok=True)
  label_counts: collections.Counter[int] = collections.Counter()
  rotations: collections.Counter[int] = collections.Counter()
  shard_counts, shapes, fbank_frames, images = {}, {}, [], []
  for shard, path in zip(index.shards, index.shard_paths(records_dir)):
    count = 0
    for serialized in tf.data.TFRecordDataset(path):
      parsed = records.parse_example(serialized, with_waveform=index.store_waveform)
      if not shapes:
        shapes = {k: (v.dtype.name, tuple(v.shape)) for k, v in parsed.items()}
      values = records.parsed_to_values(parsed)
      label_counts.update(int(x) for x in values[records.LABELS])
      fbank_frames.append(values[records.FBANK_NUM_FRAMES])
      rotations[values[records.ROTATION]] += 1
      if len(images) < 2 * num_images:  # Two PNGs per clip.
        name = _safe_name(values[records.VIDEO_ID])
        fbank_path = os.path.join(png_dir, f"fbank_{name}.png")
        frames_path = os.path.join(png_dir, f"frames_{name}.png")
        fbank_image(values[records.FBANK], values[records.FBANK_NUM_FRAMES]).save(fbank_path)
        frames_grid(values[records.FRAMES]).save(frames_path)
        images += [fbank_path, frames_path]
      count += 1
    if count != shard.num_examples:
      raise ValueError(f"{path}: {count} records, {records.INDEX_FILE} says "
                       f"{shard.num_examples}")
    shard_counts[shard.file] = count
  counted = [label_counts.get(i, 0) for i in range(index.num_classes)]
  if counted != list(index.label_counts):
    raise ValueError(f"{records_dir}: label_counts of {records.INDEX_FILE} differ from the "
                     "records' labels")
  return {
      "num_examples": sum(shard_counts.values()),
      "shards": shard_counts,
      "shapes": shapes,
      "label_counts": counted,
      "fbank_num_frames": {"min": int(np.min(fbank_frames)), "max": int(np.max(fbank_frames)),
                           "mean": float(np.mean(fbank_frames))},
      "rotation": dict(sorted(rotations.items())),
      "fbank_mean": index.fbank_mean,
      "fbank_std": index.fbank_std,
      "pngs": images,
  }


def format_report(report: dict[str, Any], class_names: list[str] | None, top: int) -> str:
  """Human-readable lines for `inspect`'s report."""
  lines = [f"{report['num_examples']} examples in {len(report['shards'])} shards"]
  lines += [f"  {name}: {count}" for name, count in report["shards"].items()]
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
  lines.append(f"label histogram (top {top} of {len(order)} classes):")
  for i in order[:top]:
    count = report["label_counts"][i]
    name = class_names[i] if class_names else ""
    lines.append(f"  {i:4d} {name[:30]:30s} {count:7d} {'#' * round(40 * count / most)}")
  lines.append(f"wrote {len(report['pngs'])} PNGs, e.g. {report['pngs'][:2]}")
  return "\n".join(lines)


def _error(message: object) -> int:
  """Prints `error: <message>` as one line to stderr; returns the exit status 2."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  return 2


def main(argv: list[str] | None = None) -> int:
  """Runs the tool; returns the exit status (2 on bad input, with one line on stderr)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.error = lambda message: sys.exit(_error(message))
  parser.add_argument("--records", required=True, help="a records directory (tools/"
                      "preprocess.py output)")
  parser.add_argument("--labels", help="class_labels_indices.csv, for class names")
  parser.add_argument("--png-dir", help="where to write PNGs (default RECORDS/inspect)")
  parser.add_argument("--num-images", type=int, default=4)
  parser.add_argument("--top", type=int, default=20)
  args = parser.parse_args(argv)
  try:
    names = list(sources.read_class_labels(args.labels).display_names) if args.labels else None
    report = inspect(args.records, args.png_dir or os.path.join(args.records, "inspect"),
                     args.num_images)
  except OSError as e:
    return _error(f"{e.filename}: {e.strerror or e}")
  except ValueError as e:  # records.RecordsDirError, sources.SourceError, wrong counts
    return _error(e)
  except tf.errors.OpError as e:  # A shard that cannot be read or parsed.
    return _error(f"{args.records}: damaged records: {e.message}")
  print(format_report(report, names, args.top))
  return 0


if __name__ == "__main__":
  sys.exit(main())
