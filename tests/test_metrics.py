"""The trainer's metric records on resume: TensorBoard event files cut back to the checkpoint."""
import os

import numpy as np
import pytest

from cav_mae_jax.train import metrics

tf = pytest.importorskip("tensorflow")


def _write(workdir, steps, offset):
  # pylint: disable-next=import-outside-toplevel
  from clu.metric_writers.summary_writer import SummaryWriter
  writer = SummaryWriter(os.path.join(workdir, metrics.TENSORBOARD_DIR))
  for step in steps:
    writer.write_scalars(step, {"train/loss": offset + step})
  writer.close()


def _points(workdir):
  """(step, value) of train/loss as TensorBoard's Python loader shows them."""
  # pylint: disable-next=import-outside-toplevel
  from tensorboard.backend.event_processing import plugin_event_accumulator
  accumulator = plugin_event_accumulator.EventAccumulator(
      os.path.join(workdir, metrics.TENSORBOARD_DIR))
  accumulator.Reload()
  return [(e.step, float(tf.make_ndarray(e.tensor_proto)))
          for e in accumulator.Tensors("train/loss")]


def _event_files(workdir):
  directory = os.path.join(workdir, metrics.TENSORBOARD_DIR)
  return sorted(os.path.join(directory, n) for n in os.listdir(directory))


def test_resume_drops_the_summaries_after_the_checkpoint(tmp_path):
  interrupted = tmp_path / "interrupted"
  _write(interrupted, range(1, 11), 0.0)  # logged up to step 10, checkpointed at 6
  # What TensorBoard drew without the cut: both runs' points over steps 7-10.
  duplicated = tmp_path / "duplicated"
  _write(duplicated, range(1, 11), 0.0)
  _write(duplicated, range(7, 13), 100.0)
  assert [s for s, _ in _points(duplicated)] == list(range(1, 11)) + list(range(7, 13))

  assert metrics.drop_summaries_after(str(interrupted), 6) == 4
  assert metrics.drop_summaries_after(str(interrupted), 6) == 0  # nothing more to drop
  _write(interrupted, range(7, 13), 100.0)
  assert _points(interrupted) == [(s, float(s)) for s in range(1, 7)] + [
      (s, 100.0 + s) for s in range(7, 13)]
  assert all("tfevents" in os.path.basename(p) for p in _event_files(interrupted))


def test_a_record_cut_short_is_dropped(tmp_path):
  _write(tmp_path, range(1, 6), 0.0)
  (path,) = _event_files(tmp_path)
  with open(path, "rb+") as f:
    f.truncate(os.path.getsize(path) - 5)
  with pytest.raises(tf.errors.DataLossError):
    list(tf.data.TFRecordDataset(path))
  assert metrics.drop_summaries_after(str(tmp_path), 5) == 0  # the cut record is not counted
  assert len(list(tf.data.TFRecordDataset(path))) == 5  # file version + steps 1-4
  np.testing.assert_array_equal([s for s, _ in _points(tmp_path)], [1, 2, 3, 4])


def test_a_start_from_scratch_drops_every_summary(tmp_path):
  _write(tmp_path, range(1, 4), 0.0)
  assert metrics.drop_summaries_after(str(tmp_path), 0) == 3
  assert not _event_files(tmp_path)
  assert metrics.drop_summaries_after(str(tmp_path / "elsewhere"), 3) == 0  # no folder
