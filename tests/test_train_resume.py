"""Exact resume after SIGKILL, atomic async saves, and the non-finite-loss guard.

Training runs in subprocesses (this file is also their entry point: `python THIS MODE WORKDIR`)
so they can be killed like a preempted job; a shared compilation cache keeps them fast. They
write no TensorBoard summaries (so they never import TensorFlow) except the straight run of the
SIGKILL test, which checks both writers.
"""

import hashlib
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import multihost_worker

TOTAL_STEPS = 6
KILL_AFTER_STEP = 3  # the last checkpoint before the kill
LOGGED_AFTER_CHECKPOINT = 2  # steps 4 and 5 are logged, then the kill: they are run again


def tiny_config():
  """The tiny recipe with small inputs: seconds per run on a CPU."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  config = pretrain.get_config("tiny")
  config.model.audio_length, config.model.num_mel_bins, config.model.image_size = 32, 32, 32
  config.model.encoder_depth, config.model.modality_specific_depth = 2, 1
  config.mesh.data, config.mesh.fsdp = 1, -1  # parameters sharded over the 2 devices
  config.data.batch_size = 8
  config.total_steps = TOTAL_STEPS
  config.checkpoint.every_steps = KILL_AFTER_STEP
  with config.unlocked():
    config.evals = ml_collections.ConfigDict()  # no records here: no evaluators
  config.log_every_steps = 1
  config.tensorboard = False  # metrics.jsonl only: TensorFlow is never imported
  return config


class RecordingInput:
  """Wraps an input and appends a hash of every batch it hands out to a file."""

  def __init__(self, inner, log_path, kill_on_call=None, wait_for_dir=None, poison_call=None,
               sigterm_on_call=None):
    self.inner, self.log_path, self.poison_call = inner, log_path, poison_call
    self.sigterm_on_call = sigterm_on_call
    self.kill_on_call, self.wait_for_dir, self.calls = kill_on_call, wait_for_dir, 0

  def __next__(self):
    self.calls += 1
    if self.calls == self.kill_on_call:
      deadline = time.time() + 120
      while not os.path.isdir(self.wait_for_dir) and time.time() < deadline:
        time.sleep(0.05)  # the step-3 checkpoint directory appears when its save is complete
      os.kill(os.getpid(), signal.SIGKILL)
    if self.calls == self.sigterm_on_call:
      os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice while step 2 is prepared
    batch = next(self.inner)
    if self.calls == self.poison_call:
      batch["audio"] = batch["audio"].copy()
      batch["audio"][0, 0, 0] = np.nan
    with open(self.log_path, "a") as f:
      f.write(hashlib.sha1(batch["audio"].tobytes() + batch["image"].tobytes()).hexdigest() + "\n")
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def run_training(workdir, kill=False, poison_call=None, sigterm_call=None, overrides=(),
                 raise_on_preemption=False):
  """Trains the tiny config in `workdir` on in-memory clips (resuming if checkpoints exist);
  says at the end whether TensorFlow was imported."""
  from cav_mae_jax.train import array_input, run_config, trainer  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  for field, value in overrides:
    run_config._set(config, field, value)  # pylint: disable=protected-access
  if poison_call is not None:
    config.checkpoint.every_steps = 2
  source = array_input.ArrayInput(array_input.random_clips(24, 32, 32, 32, seed=0), 8, seed=0)
  wrapped = RecordingInput(
      source, os.path.join(workdir, "batches.txt"),
      kill_on_call=KILL_AFTER_STEP + LOGGED_AFTER_CHECKPOINT + 1 if kill else None,
      wait_for_dir=os.path.join(workdir, "checkpoints", str(KILL_AFTER_STEP)),
      poison_call=poison_call, sigterm_on_call=sigterm_call)
  os.makedirs(workdir, exist_ok=True)
  try:
    trainer.train_and_evaluate(config, workdir, trainer.Inputs(wrapped, None, 24),
                               raise_on_preemption=raise_on_preemption)
    print(f"tensorflow imported: {'tensorflow' in sys.modules}")
  except trainer.Preempted as error:
    print(f"Preempted: {error}")
    raise SystemExit(143) from error
  except trainer.NonFiniteLossError as error:
    print(f"NonFiniteLossError: {error}")
    raise SystemExit(3) from error
  except run_config.ResumeConfigError as error:
    print(f"error: {error}")
    raise SystemExit(2) from error


@pytest.fixture(scope="module", name="cache")
def fixture_cache(tmp_path_factory):
  """One compilation cache for every training subprocess of this module."""
  return tmp_path_factory.mktemp("jax_cache")


def _start(mode, workdir, cache_dir):
  # Cheap XLA compilation (the same for every run, so results stay bit-comparable).
  env = multihost_worker.process_env(2, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.Popen([sys.executable, __file__, mode, str(workdir)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
  stdout, stderr = proc.communicate(timeout=400)
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _subprocess(mode, workdir, cache_dir):
  return _finish(_start(mode, workdir, cache_dir))


def _restore_state(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state"))


def test_resume_after_sigkill_is_bit_identical(tmp_path, cache):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  straight_proc = _start("train_tensorboard", straight, cache)  # both at once: 2 cores
  killed = _finish(_start("train_then_kill", resumed, cache))
  result = _finish(straight_proc)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "tensorflow imported: True" in result.stdout  # clu's TensorBoard writer
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  batches_before = (resumed / "batches.txt").read_text().split()
  killed_at = KILL_AFTER_STEP + LOGGED_AFTER_CHECKPOINT
  assert len(batches_before) == killed_at
  # Every logged step reached metrics.jsonl before the SIGKILL, the checkpoint's and later ones.
  from cav_mae_jax.train import metrics  # pylint: disable=import-outside-toplevel
  logged = [r["step"] for r in metrics.read_jsonl(str(resumed / metrics.METRICS_FILE))]
  assert logged == list(range(1, killed_at + 1))
  result = _subprocess("train", resumed, cache)
  assert result.returncode == 0, result.stderr[-3000:]
  # Without TensorBoard summaries, training on in-memory data never imports TensorFlow.
  assert "tensorflow imported: False" in result.stdout, result.stdout[-2000:]
  assert not (resumed / "tensorboard").exists()

  # Identical batch order: 3 up to the checkpoint + 3 after resuming == 6 straight (steps 4 and
  # 5, run before the kill, are run again on the same batches).
  batches = (resumed / "batches.txt").read_text().split()
  assert batches[:KILL_AFTER_STEP] + batches[killed_at:] == \
      (straight / "batches.txt").read_text().split()
  assert batches[KILL_AFTER_STEP:killed_at] == \
      batches[killed_at:killed_at + LOGGED_AFTER_CHECKPOINT]
  # The resumed run's metrics.jsonl has each step once, in order: the records of steps 4 and 5
  # that the killed run logged after its checkpoint were dropped at the resume.
  logged = [r["step"] for r in metrics.read_jsonl(str(resumed / metrics.METRICS_FILE))]
  assert logged == list(range(1, TOTAL_STEPS + 1))
  # Bit-identical params, optimizer state, step and RNG.
  import jax  # pylint: disable=import-outside-toplevel
  a, b = _restore_state(straight, TOTAL_STEPS), _restore_state(resumed, TOTAL_STEPS)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(a["state"]["step"]) == TOTAL_STEPS
  # Metrics: one JSONL record per logged step with the documented keys, and TensorBoard events
  # (the straight run writes both).
  records = metrics.read_jsonl(str(straight / metrics.METRICS_FILE))
  assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))
  for key in ("loss", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc", "grad_norm", "lr",
              "samples_per_s", "step_time_s"):
    assert all(np.isfinite(r[f"train/{key}"]) for r in records), key
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(straight / "tensorboard"))
  # The resumed run really restored (it did not retrain from scratch): 3 steps were run after.
  assert len((resumed / "batches.txt").read_text().split()) == TOTAL_STEPS + 2
  # hparams are written once, at the run's start, not at the resume.
  with open(straight / metrics.METRICS_FILE) as f:
    assert sum('"hparams"' in line for line in f) == 1

  # Resuming with a model change that alters parameter shapes: one line naming the field.
  result = _subprocess("train_decoder_depth_2", resumed, cache)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:"), result.stdout
  assert "config.model.decoder_depth (1 -> 2)" in lines[0] and "total_steps" not in lines[0]
  # A longer run (changed total_steps) continues from step 6 to 8.
  result = _subprocess("train_8_steps", resumed, cache)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "changed fields: total_steps 6 -> 8" in result.stdout
  assert len((resumed / "batches.txt").read_text().split()) == 8 + 2
  # Running a finished run again says so and trains nothing.
  result = _subprocess("train_8_steps", resumed, cache)
  assert result.returncode == 0 and "finished: step 8 of 8" in result.stdout, result.stdout
  assert len((resumed / "batches.txt").read_text().split()) == 8 + 2


def test_sigkill_during_async_save_keeps_previous_checkpoint(tmp_path, cache):
  result = _subprocess("save_then_kill", tmp_path, cache)
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  from cav_mae_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  checkpointer = checkpoint.Checkpointer(
      str(tmp_path / "ckpt"), ml_collections.ConfigDict(dict(every_steps=1, keep=3,
                                                             async_save=True, every_epoch=False)))
  assert checkpointer.latest_step() == 1
  import jax  # pylint: disable=import-outside-toplevel
  abstract = {"w": jax.ShapeDtypeStruct((SAVE_ELEMENTS,), np.float32)}
  state, input_state = checkpointer.restore(1, abstract)
  assert input_state == {"position": 1}
  np.testing.assert_array_equal(np.asarray(state["w"])[:5], np.full(5, 1.0, np.float32))
  checkpointer.close()


def test_a_resume_on_records_rebuilt_with_other_shards_is_refused(tmp_path):
  # The input position counts batches in the shards' order: records rebuilt with the same clips
  # in other shards (another --examples-per-shard) resumed with another order, only a changed
  # data.train_dir said (and nothing where they were rebuilt in place).
  from cav_mae_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import run_config  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import trainer  # pylint: disable=import-outside-toplevel
  from test_input import write_records  # pylint: disable=import-outside-toplevel
  from test_train_multihost_resume import LABELS  # pylint: disable=import-outside-toplevel
  from test_train_multihost_resume import resume_config  # pylint: disable=import-outside-toplevel
  config = resume_config(write_records(str(tmp_path / "records"), LABELS, 4))
  shards = trainer.records_inputs(config).train_shards
  assert shards == [[f"clips-{i:05d}-of-00004.tfrecord", n] for i, n in enumerate([5, 5, 5, 4])]
  workdir = str(tmp_path / "run")  # as a run that saved step 3 leaves it
  os.makedirs(workdir)
  run_config.write_run_config(workdir, config, steps_per_epoch=len(LABELS) // 8,
                              train_shards=shards)
  assert run_config.read_plan(workdir) == {"steps_per_epoch": 2, "train_shards": shards}
  saved = checkpoint.Checkpointer(checkpoint.workdir_checkpoints(workdir), config.checkpoint)
  saved.save(3, {"w": np.ones(3, np.float32)}, {"position": 3})
  saved.close()
  original = config.data.train_dir
  config.data.train_dir = write_records(str(tmp_path / "rebuilt"), LABELS, 2)
  with pytest.raises(ValueError, match=(
      r"the run read 4 shard\(s\) of 19 clips: clips-00000-of-00004.tfrecord \(5\), "
      r"clips-00001-of-00004.tfrecord \(5\), clips-00002-of-00004.tfrecord \(5\), \.\.\. "
      r"\(1 more\) \[[0-9a-f]{8}\], config.data's training records are 2 shard\(s\) of 19 "
      r"clips: clips-00000-of-00002.tfrecord \(10\), clips-00001-of-00002.tfrecord \(9\) "
      r"\[[0-9a-f]{8}\]: its input position counts batches")):
    trainer.train_and_evaluate(config, workdir)
  # A resume refused at its restore (here: the stand-in checkpoint's tree) leaves the workdir's
  # record as it was; the config was written before the restore, and said no change next time.
  recorded = {name: (pathlib.Path(workdir) / name).read_text()
              for name in (run_config.RUN_CONFIG_FILE, run_config.PLAN_FILE)}
  config.data.train_dir, config.total_epochs = original, 8.0
  with pytest.raises(Exception):
    trainer.train_and_evaluate(config, workdir)
  assert recorded == {name: (pathlib.Path(workdir) / name).read_text() for name in recorded}


def _damage_digest(step_path):
  """Stands for a damaged data file: a checksum that the arrays do not have."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  digest = {name: value + 1 for name, value in checkpoint.read_digest(step_path).items()}
  ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(
      os.path.join(step_path, checkpoint.DIGEST_ITEM), digest, force=True)


def test_a_damaged_latest_checkpoint_names_the_earlier_one_to_resume_from(tmp_path):
  # The run stops (a damaged checkpoint is not passed over without a word); it did not say that
  # an earlier one is there, nor how to resume from it.
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  options = ml_collections.ConfigDict(dict(every_steps=1, keep=3, async_save=False,
                                           every_epoch=False))
  abstract = {"w": jax.ShapeDtypeStruct((3,), np.float32)}
  checkpointer = checkpoint.Checkpointer(str(tmp_path), options)
  for step in (1, 2):
    checkpointer.save(step, {"w": np.full(3, step, np.float32)}, {"position": step})
  checkpointer.wait()
  _damage_digest(str(tmp_path / "2"))
  with pytest.raises(checkpoint.CheckpointReadError, match=(
      rf"differ from what was saved.*; the newest earlier checkpoint is step 1: to resume from "
      rf"it, move {re.escape(str(tmp_path / '2'))} out of {re.escape(str(tmp_path))}$")):
    checkpointer.restore(2, abstract)
  shutil.rmtree(tmp_path / "2")
  checkpointer.close()
  checkpointer = checkpoint.Checkpointer(str(tmp_path), options)
  assert checkpointer.latest_step() == 1
  np.testing.assert_array_equal(checkpointer.restore(1, abstract)[0]["w"], np.ones(3))
  _damage_digest(str(tmp_path / "1"))
  with pytest.raises(checkpoint.CheckpointReadError, match=r"differ from what was saved.*"
                     r"damaged$"):  # no earlier one: nothing to add
    checkpointer.restore(1, abstract)
  checkpointer.close()


def test_checkpoints_keep_every_process_input_state_and_old_ones_restore(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  options = ml_collections.ConfigDict(dict(every_steps=1, keep=3, async_save=False,
                                           every_epoch=False))
  abstract = {"w": jax.ShapeDtypeStruct((3,), np.float32)}
  checkpointer = checkpoint.Checkpointer(str(tmp_path), options)
  checkpointer.save(1, {"w": np.ones(3, np.float32)}, {"position": 4})
  checkpointer.wait()
  # A checkpoint written before the list (process 0's state alone) restores as it was saved.
  checkpointer.manager.save(2, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"w": np.ones(3, np.float32)}),
      input=ocp.args.JsonSave({"position": 7})))
  checkpointer.wait()
  assert checkpointer.restore(1, abstract)[1] == {"position": 4}
  assert checkpointer.restore(2, abstract)[1] == {"position": 7}
  checkpointer.close()
  saved = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(str(tmp_path / "1" / "input"))
  assert saved == {checkpoint.INPUT_STATES_KEY: [{"position": 4}]}
  # Saved by 2 processes, restored by 1: process 0's state (the input decides if it fits).
  two = {checkpoint.INPUT_STATES_KEY: [{"position": 1}, {"position": 2}]}
  assert checkpoint.own_input_state(two) == {"position": 1}


def test_an_evaluation_between_log_rows_leaves_the_step_time_right(tmp_path, monkeypatch):
  """The time since an evaluation was divided by every step since the last row: with the
  fine-tuning recipe's epoch-end evaluations between rows of 100 steps, a row's step time came
  out up to 100x too small (its samples/s and MFU as much too large)."""
  import json  # pylint: disable=import-outside-toplevel
  from cav_mae_jax import eval as eval_lib  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import array_input, trainer  # pylint: disable=import-outside-toplevel

  class SlowInput:
    def __init__(self, inner):
      self.inner = inner

    def __next__(self):
      time.sleep(0.2)  # every step takes at least this
      return next(self.inner)

    def get_state(self):
      return self.inner.get_state()

    def set_state(self, state):
      self.inner.set_state(state)

  class SlowEvaluator:
    def due(self, step, total_steps, steps_per_epoch):
      del total_steps, steps_per_epoch
      return step == 3  # one step before the row of step 4

    def run(self, params):
      del params
      time.sleep(0.5)
      return {"val/seconds": 0.5}

  monkeypatch.setattr(eval_lib, "build_evaluators", lambda *args, **kwargs: [SlowEvaluator()])
  config = tiny_config()
  config.total_steps, config.log_every_steps, config.checkpoint.every_steps = 4, 4, 4
  source = array_input.ArrayInput(array_input.random_clips(24, 32, 32, 32, seed=0), 8, seed=0)
  trainer.train_and_evaluate(config, str(tmp_path), trainer.Inputs(SlowInput(source), None, 24))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  row, = [r for r in rows if "train/step_time_s" in r]
  assert row["train/step_time_s"] >= 0.2, row
  assert row["train/samples_per_s"] <= 8 / 0.2, row


def _full_state(value: float) -> dict:
  """A full state as the trainer saves it: params, optimizer moments (twice their size), rng."""
  rng = np.random.default_rng(value)  # random: the sizes on disk are not compression's
  params, mu, nu = (rng.standard_normal(65536).astype(np.float32) for _ in range(3))
  return {"state": {"params": {"w": params}, "opt": {"mu": mu, "nu": nu}, "step": value},
          "rng": np.zeros(2, np.uint32)}


def test_epoch_ends_keep_their_params_apart_and_the_newest_full_states_only(tmp_path):
  # Every epoch end was a full state kept forever (3x the original's params-only files: 30 GB
  # for AS-20K's base model). Now the newest `keep` full states, and every epoch's params.
  import ml_collections  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  options = ml_collections.ConfigDict(dict(every_steps=1, keep=2, async_save=True,
                                           every_epoch=True))
  workdir = str(tmp_path)
  checkpointer = checkpoint.Checkpointer(checkpoint.workdir_checkpoints(workdir), options,
                                         steps_per_epoch=2)
  assert checkpointer.settle_epoch_params() == ([], [])
  calls = []  # an epoch end's params are complete before the next full state's save starts

  def recorded(name, method):
    return lambda *args, **kwargs: calls.append((name, args[:1])) or method(*args, **kwargs)

  checkpointer.manager.save = recorded("save", checkpointer.manager.save)
  checkpointer.epoch_manager.wait_until_finished = recorded(
      "epoch wait", checkpointer.epoch_manager.wait_until_finished)
  for step in range(1, 6):
    state = _full_state(step)
    checkpointer.save(step, state, {"position": step}, params=state["state"]["params"])
  assert calls[calls.index(("save", (2,))):calls.index(("save", (3,)))][-1] == ("epoch wait", ())
  with pytest.raises(ValueError, match="step 6 ends an epoch"):
    checkpointer.save(6, _full_state(6), {"position": 6})
  checkpointer.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "5"]
  assert sorted(os.listdir(tmp_path / checkpoint.EPOCH_PARAMS_DIR)) == ["2", "4"]
  assert checkpoint.saved_steps(workdir) == [2, 4, 5]
  assert checkpoint.latest_saved_step(workdir) == 5  # the resume point
  for step in (2, 4, 5):
    params, read_step = checkpoint.read_workdir_params(workdir, step)
    assert read_step == step
    np.testing.assert_array_equal(params["w"], _full_state(step)["state"]["params"]["w"])

  def size(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

  # The params alone: a third of a full state's arrays.
  assert size(tmp_path / checkpoint.EPOCH_PARAMS_DIR / "4") < size(tmp_path / "checkpoints" /
                                                                    "5") / 2
  # Stopped between an epoch end's two saves, either way round. The params written and the
  # full state not: the run resumes before that epoch end and saves it again (it failed: "step
  # 6 already exists").
  checkpointer = checkpoint.Checkpointer(checkpoint.workdir_checkpoints(workdir), options, 2)
  checkpointer.save(6, _full_state(6), {"position": 6}, params=_full_state(6)["state"]["params"])
  checkpointer.close()
  shutil.rmtree(tmp_path / "checkpoints" / "6")
  checkpointer = checkpoint.Checkpointer(checkpoint.workdir_checkpoints(workdir), options, 2)
  assert checkpointer.settle_epoch_params() == ([], [6])
  assert checkpointer.latest_step() == 5
  assert checkpoint.saved_steps(workdir) == [2, 4, 5]
  checkpointer.save(6, _full_state(6), {"position": 6}, params=_full_state(6)["state"]["params"])
  checkpointer.close()
  assert checkpoint.saved_steps(workdir) == [2, 4, 5, 6]
  # The full state written and the params not: the run resumes at that epoch end and does not
  # save it again; its params come from the full state (they were lost once `keep` rotated it).
  shutil.rmtree(tmp_path / checkpoint.EPOCH_PARAMS_DIR / "6")
  checkpointer = checkpoint.Checkpointer(checkpoint.workdir_checkpoints(workdir), options, 2)
  assert checkpointer.settle_epoch_params() == ([6], [])
  for step in (7, 8, 9):
    checkpointer.save(step, _full_state(step), {"position": step},
                      params=_full_state(step)["state"]["params"])
  checkpointer.close()
  assert checkpoint.saved_steps(workdir) == [2, 4, 6, 8, 9]
  np.testing.assert_array_equal(checkpoint.read_workdir_params(workdir, 6)[0]["w"],
                                _full_state(6)["state"]["params"]["w"])

  # Its digest is the params' and is checked as a full state's is.
  step_path = str(tmp_path / checkpoint.EPOCH_PARAMS_DIR / "2")
  digest = checkpoint.read_digest(step_path)
  expected = checkpoint.tree_digest({"state": {"state": {"params": _full_state(2)["state"][
      "params"]}}})
  assert digest == expected and list(digest) == ["state/state/params/w"]
  ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(
      os.path.join(step_path, checkpoint.DIGEST_ITEM), {"state/state/params/w": 1}, force=True)
  with pytest.raises(checkpoint.CheckpointReadError, match="differ from what was saved"):
    checkpoint.read_workdir_params(workdir, 2)


def test_a_workdir_with_epoch_end_full_states_keeps_their_params(tmp_path):
  # Written before epoch params were kept apart: `keep` alone would now delete its epochs.
  import ml_collections  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  directory = checkpoint.workdir_checkpoints(str(tmp_path))
  earlier = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      max_to_keep=1, keep_period=2, create=True))
  for step in (1, 2, 3, 4, 5):
    earlier.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_full_state(step)),
                                               input=ocp.args.JsonSave({"position": step})))
  earlier.close()
  assert sorted(os.listdir(directory), key=int) == ["2", "4", "5"]
  options = ml_collections.ConfigDict(dict(every_steps=1, keep=1, async_save=False,
                                           every_epoch=True))
  # A damaged older one is named with what reading it is for, and how to go on without it.
  digest = os.path.join(directory, "2", checkpoint.DIGEST_ITEM)
  ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(digest, {"state/state/params/w": 1})
  checkpointer = checkpoint.Checkpointer(directory, options, steps_per_epoch=2)
  with pytest.raises(checkpoint.CheckpointReadError,
                     match=rf"differ from what was saved .* \(read to keep epoch-end step 2's "
                     rf"params in epoch_params/; remove {directory}/2 to go on without them\)"):
    checkpointer.settle_epoch_params()
  checkpointer.close()
  shutil.rmtree(digest)  # as written before digests (unchecked)
  checkpointer = checkpoint.Checkpointer(directory, options, steps_per_epoch=2)
  assert checkpointer.settle_epoch_params() == ([2, 4], [])
  for step in (6, 7):
    state = _full_state(step)
    checkpointer.save(step, state, {"position": step}, params=state["state"]["params"])
  checkpointer.close()
  assert os.listdir(directory) == ["7"]
  assert sorted(os.listdir(tmp_path / checkpoint.EPOCH_PARAMS_DIR), key=int) == ["2", "4", "6"]
  assert checkpoint.saved_steps(str(tmp_path)) == [2, 4, 6, 7]
  for step in (2, 4, 6):
    np.testing.assert_array_equal(checkpoint.read_workdir_params(str(tmp_path), step)[0]["w"],
                                  _full_state(step)["state"]["params"]["w"])
  # Without every_epoch, nothing is kept apart; epoch params after the resume point still go.
  options.every_epoch = False
  other = checkpoint.Checkpointer(str(tmp_path / "other" / "checkpoints"), options, 2)
  assert other.epoch_manager is None and other.settle_epoch_params() == ([], [])
  other.close()
  assert os.listdir(tmp_path / "other") == ["checkpoints"]
  options.every_epoch, options.keep = True, 3
  other = checkpoint.Checkpointer(str(tmp_path / "other" / "checkpoints"), options, 2)
  for step in (1, 2, 3, 4):
    other.save(step, _full_state(step), {}, params=_full_state(step)["state"]["params"])
  other.close()
  shutil.rmtree(tmp_path / "other" / "checkpoints" / "4")  # stopped before its full state
  options.every_epoch = False
  other = checkpoint.Checkpointer(str(tmp_path / "other" / "checkpoints"), options, 2)
  assert other.settle_epoch_params() == ([], [4])
  other.close()
  assert os.listdir(tmp_path / "other" / checkpoint.EPOCH_PARAMS_DIR) == ["2"]


SAVE_ELEMENTS = 32 * 2**20  # 128 MB: the background write is still running when the kill lands


def save_then_kill(workdir):
  """Saves step 1 completely, starts an async save of step 2, and SIGKILLs itself."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  checkpointer = checkpoint.Checkpointer(
      os.path.join(workdir, "ckpt"),
      ml_collections.ConfigDict(dict(every_steps=1, keep=3, async_save=True, every_epoch=False)))
  checkpointer.save(1, {"w": jnp.full((SAVE_ELEMENTS,), 1.0)}, {"position": 1})
  checkpointer.wait()
  checkpointer.save(2, {"w": jnp.full((SAVE_ELEMENTS,), 2.0)}, {"position": 2})
  os.kill(os.getpid(), signal.SIGKILL)


def test_nan_batch_stops_run_and_keeps_last_good_checkpoint(tmp_path, cache):
  # The 4th batch carries a NaN, so step 4's loss is NaN; checkpoints every 2 steps.
  result = _subprocess("nan_at_step_4", tmp_path, cache)
  assert result.returncode == 3, result.stderr[-3000:]
  assert re.search(r"Non-finite loss nan at step 4\b.*last good checkpoint is step 2",
                   result.stdout), result.stdout[-2000:]
  state = _restore_state(str(tmp_path), 2)
  import jax  # pylint: disable=import-outside-toplevel
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["state"]))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_sigterm_saves_and_stops(tmp_path, cache):
  result = _subprocess("sigterm_at_step_2", tmp_path, cache)
  # Not as a finished run (tools/train.py then exits with 143, so `train && average` stops).
  assert result.returncode == 143, result.stderr[-3000:]
  assert "Preempted: preempted: step 2 is saved" in result.stdout
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # saved at once, not at 3
  assert len((tmp_path / "batches.txt").read_text().split()) == 2
  assert int(_restore_state(str(tmp_path), 2)["state"]["step"]) == 2


def test_a_sigterm_at_the_last_step_finishes_the_run(tmp_path, cache):
  # It saved the last step and then reported the run as preempted (tools/train.py: status 143,
  # "the same command resumes from it"), though nothing was left to train.
  result = _subprocess("sigterm_at_last_step", tmp_path, cache)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Preempted" not in result.stdout and "tensorflow imported" in result.stdout
  assert str(TOTAL_STEPS) in os.listdir(tmp_path / "checkpoints")


def test_a_sigterm_during_the_final_save_and_evaluation_finishes_the_run(tmp_path, monkeypatch,
                                                                          caplog):
  # It said "saving a checkpoint and stopping at the next step" while the final checkpoint and
  # evaluation ran (the run then finished, status 0: no step was left to stop at).
  from cav_mae_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  last_step_taken = checkpoint.PreemptionWatcher.last_step_taken

  def then_sigterm(watcher):
    last_step_taken(watcher)
    os.kill(os.getpid(), signal.SIGTERM)  # handled by the watcher: the run is not stopped

  monkeypatch.setattr(checkpoint.PreemptionWatcher, "last_step_taken", then_sigterm)
  with caplog.at_level("WARNING"):
    run_training(str(tmp_path), raise_on_preemption=True)  # Preempted: SystemExit(143)
  messages = [r.getMessage() for r in caplog.records if "SIGTERM" in r.getMessage()]
  assert messages == ["SIGTERM received after the last training step: the run finishes its "
                      "final checkpoint and evaluation."]
  assert str(TOTAL_STEPS) in os.listdir(tmp_path / "checkpoints")


class _Signalled(Exception):
  pass


def test_a_signal_while_a_checkpoint_is_finished_waits_for_it(tmp_path):
  # Ctrl-C while the trainer waited for an asynchronous save (its last checkpoint, say) ended the
  # process with the save half done: "1.orbax-checkpoint-tmp" left, and a RuntimeError ("cannot
  # schedule new futures after shutdown"). The signal is now held until the save is complete.
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from cav_mae_jax import signals_held  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import checkpoint  # pylint: disable=import-outside-toplevel

  def signalled(signum, frame):
    raise _Signalled(signum)

  previous = signal.signal(signal.SIGTERM, signalled)
  try:
    options = ml_collections.ConfigDict(dict(every_steps=1, every_epoch=False, keep=3,
                                              async_save=True))
    checkpointer = checkpoint.Checkpointer(str(tmp_path / "ckpt"), options)
    checkpointer.save(1, {"w": jnp.ones((256, 1024), jnp.float32)}, {"batches": 1})
    with pytest.raises(_Signalled):
      with signals_held.held("the checkpoint being written"):
        os.kill(os.getpid(), signal.SIGTERM)  # held: the handler runs after the block
        checkpointer.close()
    assert os.listdir(tmp_path / "ckpt") == ["1"]
    assert signal.getsignal(signal.SIGTERM) is signalled
    # (A second signal abandons the wait: tests/test_signals_held.py.)
  finally:
    signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
  MODE, WORKDIR = sys.argv[1], sys.argv[2]
  if MODE == "train":
    run_training(WORKDIR)
  elif MODE == "train_tensorboard":
    run_training(WORKDIR, overrides=[("tensorboard", True)])
  elif MODE == "train_then_kill":
    run_training(WORKDIR, kill=True)
  elif MODE == "sigterm_at_step_2":
    run_training(WORKDIR, sigterm_call=2, raise_on_preemption=True)
  elif MODE == "sigterm_at_last_step":
    run_training(WORKDIR, sigterm_call=TOTAL_STEPS, raise_on_preemption=True)
  elif MODE == "nan_at_step_4":
    run_training(WORKDIR, poison_call=4)
  elif MODE == "train_decoder_depth_2":
    run_training(WORKDIR, overrides=[("model.decoder_depth", 2), ("total_steps", 8)])
  elif MODE == "train_8_steps":
    run_training(WORKDIR, overrides=[("total_steps", 8)])
  elif MODE == "save_then_kill":
    save_then_kill(WORKDIR)
  else:
    raise SystemExit(f"unknown mode {MODE}")
