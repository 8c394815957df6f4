#!/usr/bin/env python3
"""Looks inside a clip-record directory: counts, shapes, label histogram, fbank/frame PNGs.

  python tools/inspect_records.py --records DIR [--labels class_labels_indices.csv] \
      [--png-dir DIR/inspect] [--num-images 4] [--top 20]

Reads every record (checking the counts against index.json), prints a report, and writes
`fbank_<video_id>.png` (time to the right, mel bin 0 at the bottom, the raw fbank scaled to
its own min..max) and `frames_<video_id>.png` (the 10 stored JPEG frames in a 2 x 5 grid) for
the first `--num-images` clips.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cav_mae_jax.data import prepare  # pylint: disable=g-import-not-at-top,wrong-import-position
from cav_mae_jax.data import records  # pylint: disable=g-import-not-at-top,wrong-import-position


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


def inspect(records_dir: str, png_dir: str, num_images: int = 4) -> dict:
  """Reads all records of a directory; returns counts, shapes and histograms, writes PNGs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  index_path = os.path.join(records_dir, prepare.INDEX)
  index = records.read_index(index_path)
  os.makedirs(png_dir, exist_ok=True)
  label_counts: collections.Counter[int] = collections.Counter()
  shard_counts, shapes, fbank_frames, images = {}, {}, [], []
  for shard, path in zip(index.shards, index.shard_paths(index_path)):
    count = 0
    for serialized in tf.data.TFRecordDataset(path):
      parsed = records.parse_example(serialized, with_waveform=index.store_waveform)
      if not shapes:
        shapes = {k: (v.dtype.name, tuple(v.shape)) for k, v in parsed.items()}
      values = records.parsed_to_values(parsed)
      label_counts.update(int(x) for x in values[records.LABELS])
      fbank_frames.append(values[records.FBANK_NUM_FRAMES])
      if len(images) < 2 * num_images:  # Two PNGs per clip.
        name = _safe_name(values[records.VIDEO_ID])
        fbank_path = os.path.join(png_dir, f"fbank_{name}.png")
        frames_path = os.path.join(png_dir, f"frames_{name}.png")
        fbank_image(values[records.FBANK], values[records.FBANK_NUM_FRAMES]).save(fbank_path)
        frames_grid(values[records.FRAMES]).save(frames_path)
        images += [fbank_path, frames_path]
      count += 1
    if count != shard.num_examples:
      raise ValueError(f"{path}: {count} records, index.json says {shard.num_examples}")
    shard_counts[shard.file] = count
  counted = [label_counts.get(i, 0) for i in range(index.num_classes)]
  if counted != list(index.label_counts):
    raise ValueError(f"{index_path}: label_counts differ from the records' labels")
  return {
      "num_examples": sum(shard_counts.values()),
      "shards": shard_counts,
      "shapes": shapes,
      "label_counts": counted,
      "fbank_num_frames": {"min": int(np.min(fbank_frames)), "max": int(np.max(fbank_frames)),
                           "mean": float(np.mean(fbank_frames))},
      "fbank_mean": index.fbank_mean,
      "fbank_std": index.fbank_std,
      "pngs": images,
  }


def format_report(report: dict, class_names: list[str] | None, top: int) -> str:
  """Human-readable lines for `inspect`'s report."""
  lines = [f"{report['num_examples']} examples in {len(report['shards'])} shards"]
  lines += [f"  {name}: {count}" for name, count in report["shards"].items()]
  lines.append("parsed keys (dtype, shape):")
  lines += [f"  {key}: {dtype} {shape}" for key, (dtype, shape) in report["shapes"].items()]
  frames = report["fbank_num_frames"]
  lines.append(f"fbank frames before pad/cut: min {frames['min']} max {frames['max']} "
               f"mean {frames['mean']:.1f}; fbank mean {report['fbank_mean']:.4f} "
               f"std {report['fbank_std']:.4f} (raw, valid frames)")
  order = sorted(range(len(report["label_counts"])), key=lambda i: -report["label_counts"][i])
  most = max(report["label_counts"]) or 1
  lines.append(f"label histogram (top {top} of {len(order)} classes):")
  for i in order[:top]:
    count = report["label_counts"][i]
    name = class_names[i] if class_names else ""
    lines.append(f"  {i:4d} {name[:30]:30s} {count:7d} {'#' * round(40 * count / most)}")
  lines.append(f"wrote {len(report['pngs'])} PNGs, e.g. {report['pngs'][:2]}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--records", required=True, help="directory with index.json")
  parser.add_argument("--labels", help="class_labels_indices.csv, for class names")
  parser.add_argument("--png-dir", help="where to write PNGs (default RECORDS/inspect)")
  parser.add_argument("--num-images", type=int, default=4)
  parser.add_argument("--top", type=int, default=20)
  args = parser.parse_args(argv)
  report = inspect(args.records, args.png_dir or os.path.join(args.records, "inspect"),
                   args.num_images)
  names = list(prepare.read_class_labels(args.labels).display_names) if args.labels else None
  print(format_report(report, names, args.top))
  return 0


if __name__ == "__main__":
  sys.exit(main())
