"""The trainer's console line and metric records: TensorBoard event files cut back to the
checkpoint on resume."""
import io
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from cav_mae_jax.train import metrics


@pytest.fixture(name="tf")
def fixture_tf():
  return pytest.importorskip("tensorflow")


def _write(workdir, steps, offset):
  # pylint: disable-next=import-outside-toplevel
  from clu.metric_writers.summary_writer import SummaryWriter
  writer = SummaryWriter(os.path.join(workdir, metrics.TENSORBOARD_DIR))
  for step in steps:
    writer.write_scalars(step, {"train/loss": offset + step})
  writer.close()


def _next_second():
  """Waits for the clock's next second: an event file's name holds its second, then a counter
  of the process's writers, compared as text ('10' before '9'); a resumed run's file, made
  seconds later, is read after the earlier one as TensorBoard reads them, in name order."""
  time.sleep(1.0 - time.time() % 1.0 + 0.01)


def _points(tf, workdir):
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


def test_resume_drops_the_summaries_after_the_checkpoint(tf, tmp_path):
  interrupted = tmp_path / "interrupted"
  _write(interrupted, range(1, 11), 0.0)  # logged up to step 10, checkpointed at 6
  # What TensorBoard drew without the cut: both runs' points over steps 7-10.
  duplicated = tmp_path / "duplicated"
  _write(duplicated, range(1, 11), 0.0)
  _next_second()
  _write(duplicated, range(7, 13), 100.0)
  assert [s for s, _ in _points(tf, duplicated)] == list(range(1, 11)) + list(range(7, 13))

  assert metrics.drop_summaries_after(str(interrupted), 6) == 4
  assert metrics.drop_summaries_after(str(interrupted), 6) == 0  # nothing more to drop
  _next_second()
  _write(interrupted, range(7, 13), 100.0)
  assert _points(tf, interrupted) == [(s, float(s)) for s in range(1, 7)] + [
      (s, 100.0 + s) for s in range(7, 13)]
  assert all("tfevents" in os.path.basename(p) for p in _event_files(interrupted))


def test_a_record_cut_short_is_dropped(tf, tmp_path):
  _write(tmp_path, range(1, 6), 0.0)
  (path,) = _event_files(tmp_path)
  with open(path, "rb+") as f:
    f.truncate(os.path.getsize(path) - 5)
  with pytest.raises(tf.errors.DataLossError):
    list(tf.data.TFRecordDataset(path))
  assert metrics.drop_summaries_after(str(tmp_path), 5) == 0  # the cut record is not counted
  assert len(list(tf.data.TFRecordDataset(path))) == 5  # file version + steps 1-4
  np.testing.assert_array_equal([s for s, _ in _points(tf, tmp_path)], [1, 2, 3, 4])


def test_a_record_damaged_inside_leaves_the_file_as_it_is(tf, tmp_path, capsys):
  _write(tmp_path, range(1, 6), 0.0)
  (path,) = _event_files(tmp_path)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF  # a bad checksum inside, whole records after it
  open(path, "wb").write(bytes(data))
  assert metrics.drop_summaries_after(str(tmp_path), 2) == 0
  assert open(path, "rb").read() == bytes(data)  # not cut at the damage: the later steps stay
  assert "a damaged record after" in capsys.readouterr().out


def test_a_start_from_scratch_drops_every_summary(tf, tmp_path):  # pylint: disable=unused-argument
  _write(tmp_path, range(1, 4), 0.0)
  assert metrics.drop_summaries_after(str(tmp_path), 0) == 3
  assert not _event_files(tmp_path)
  assert metrics.drop_summaries_after(str(tmp_path / "elsewhere"), 3) == 0  # no folder


_SLOW_REWIND = textwrap.dedent("""
    import os, sys, time
    from cav_mae_jax.train import metrics
    workdir, replace = sys.argv[1], os.replace
    def slow_replace(src, dst):  # the rewrite is read and staged: let an append come now
      open(os.path.join(workdir, "staged"), "w").close()
      time.sleep(1.5)
      replace(src, dst)
    metrics.os.replace = slow_replace
    metrics.rewind(workdir, 2)
    """)


def test_an_evaluation_appending_while_a_run_rewinds_keeps_its_rows(tmp_path):
  # tools/evaluate.py appends to a workdir's metrics while a resumed run may be rewriting them:
  # an append between the rewrite's read and its replace went to the replaced file.
  rows = [{"step": s, "train/loss": float(s)} for s in (1, 2, 3)]
  writer = metrics.JsonlWriter(str(tmp_path / metrics.METRICS_FILE))
  for row in rows:
    writer.write_scalars(row["step"], {"train/loss": row["train/loss"]})
  writer.close()
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  rewinding = subprocess.Popen([sys.executable, "-c", _SLOW_REWIND, str(tmp_path)], env=env)
  deadline = time.monotonic() + 60
  while not (tmp_path / "staged").exists():
    assert rewinding.poll() is None and time.monotonic() < deadline, "the rewind did not start"
    time.sleep(0.02)
  with metrics.appending(str(tmp_path), True, tensorboard=False) as writer:
    writer.write_scalars(2, {"evaluate/val/loss": 0.5})
  assert rewinding.wait(timeout=60) == 0
  assert metrics.read_jsonl(str(tmp_path / metrics.METRICS_FILE)) == [
      *rows[:2], {"step": 2, "evaluate/val/loss": 0.5}]


class _Terminal(io.StringIO):
  def isatty(self):
    return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_redraws_on_a_terminal_and_writes_lines_to_a_log(monkeypatch, terminal):
  out = _Terminal() if terminal else io.StringIO()
  monkeypatch.setattr("sys.stdout", out)
  progress = metrics.ProgressBar(total_steps=20, start_step=0)
  for step in (10, 20):
    progress.update(step, {"loss": 1.0 / step})
  progress.close()
  text = out.getvalue()
  if terminal:  # one line, redrawn
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
  else:  # a log file: a line per update (it was one line of the whole run)
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 2 and text.endswith("\n")
    assert lines[0].startswith("[############............] 10/20  50% loss=0.1 elapsed ")
    assert lines[1].startswith("[########################] 20/20 100% loss=0.05 elapsed ")


_TENSORBOARD_WRITER = textwrap.dedent("""
    import json, sys
    from cav_mae_jax import cli
    cli.import_tensorflow()  # as the tools import it (without Keras)
    from cav_mae_jax.train import metrics
    writer = metrics.make_writer(sys.argv[1], True, tensorboard=True)
    writer.write_hparams({"optim": {"learning_rate": 0.001}, "task": "pretrain"})
    writer.close()
    print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] == "keras")))
""")


def test_the_tensorboard_writer_records_hparams_without_importing_keras(tf, tmp_path):
  # clu's SummaryWriter imports TensorBoard's hparams api, whose Keras callback class imported
  # all of Keras: 1.6 s of every training and evaluation start.
  del tf
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
       *filter(None, [os.environ.get("PYTHONPATH")])]))
  done = subprocess.run([sys.executable, "-c", _TENSORBOARD_WRITER, str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.splitlines()[-1] == "[]"  # no Keras module
  # pylint: disable-next=import-outside-toplevel
  from tensorboard.backend.event_processing import plugin_event_accumulator
  from tensorboard.plugins.hparams import metadata  # pylint: disable=import-outside-toplevel
  accumulator = plugin_event_accumulator.EventAccumulator(
      os.path.join(tmp_path, metrics.TENSORBOARD_DIR))
  accumulator.Reload()
  content = accumulator.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
  info = metadata.parse_session_start_info_plugin_data(content)
  assert {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
          for name, value in info.hparams.items()} == {"optim.learning_rate": 0.001,
                                                       "task": "pretrain"}
