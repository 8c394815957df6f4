"""A 2-process fine-tuning run with balanced sampling, killed after a checkpoint and resumed,
continues with the same batches on both processes as an unbroken run, and its epoch ends'
params are the unbroken run's.

Each host draws its own clips, at their byte offsets in its shard files; the checkpoint holds
each process's input state (train/checkpoint.py) and each restores its own. Two local processes x 2 CPU devices joined by jax.distributed train the
tiny fine-tuning recipe, shrunk, on tiny records with skewed labels (tests/test_input.py's
writer). This file is also the processes' entry point:

  python tests/test_train_multihost_resume.py PROCESS_ID NUM_PROCESSES PORT RECORDS WORKDIR MODE

MODE 'train' runs to the end; 'train_then_kill' SIGKILLs itself when asked for the batch after
the step-3 checkpoint is complete. Every batch handed to the trainer is logged (a hash per line)
to WORKDIR/batches_<process>.txt.
"""

from __future__ import annotations

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multihost_worker  # noqa: E402  pylint: disable=wrong-import-position

TOTAL_STEPS = 6
KILL_AFTER_STEP = 3
PROCESSES = 2
CLASSES = 4
# Skewed labels over 4 shard files (2 per process): class 0 on 12 clips, class 3 on one.
LABELS = [[0]] * 12 + [[1]] * 4 + [[2]] * 2 + [[3]]


def resume_config(records_dir: str):
  """The tiny fine-tuning recipe with balanced sampling, shrunk; checkpoints every 3 steps."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from configs import finetune  # pylint: disable=import-outside-toplevel
  config = finetune.get_config(f"tiny,classes={CLASSES}")
  model = config.model
  model.embed_dim, model.num_heads, model.encoder_depth, model.modality_specific_depth = 32, 2, 2, 1
  model.image_size = 32  # audio stays 1024 x 128, the records' fbank
  config.data.train_dir = records_dir
  config.data.batch_size, config.data.shuffle_buffer = 8, 8
  config.data.balanced_sampling = True
  config.total_epochs = TOTAL_STEPS / (len(LABELS) // config.data.batch_size)  # 2 steps per epoch
  config.checkpoint.every_steps, config.checkpoint.every_epoch = KILL_AFTER_STEP, True
  config.checkpoint.keep = 2  # the epoch ends' params are kept apart, all of them
  config.log_every_steps = 1
  with config.unlocked():
    config.evals = ml_collections.ConfigDict()  # no eval records
  return config


def worker(process_id: int, num_processes: int, port: int, records_dir: str, workdir: str,
           mode: str) -> None:
  """One process of the run: trains (resuming if the workdir has a checkpoint), logging batches."""
  multihost_worker.initialize_distributed(process_id, num_processes, port)
  from cav_mae_jax import cli  # pylint: disable=import-outside-toplevel
  cli.import_tensorflow()  # as tools/train.py does (without Keras: 2.3 s less per process)
  import test_train_resume  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import trainer  # pylint: disable=import-outside-toplevel
  config = resume_config(records_dir)
  inputs = trainer.records_inputs(config)
  inputs.train = test_train_resume.RecordingInput(
      inputs.train, os.path.join(workdir, f"batches_{process_id}.txt"),
      kill_on_call=KILL_AFTER_STEP + 1 if mode == "train_then_kill" else None,
      wait_for_dir=os.path.join(workdir, "checkpoints", str(KILL_AFTER_STEP)))
  trainer.train_and_evaluate(config, workdir, inputs)


def _run(records_dir, workdir, mode, cache_dir):
  port = multihost_worker.free_port()
  env = multihost_worker.process_env(2, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return multihost_worker.run_processes(
      os.path.abspath(__file__),
      [[i, PROCESSES, port, records_dir, workdir, mode] for i in range(PROCESSES)], env)


def _assert_exits(results, returncode):
  logs = "\n".join(f"--- process {i} (exit {r.returncode}):\n{r.stderr[-2500:]}"
                   for i, r in enumerate(results))
  assert [r.returncode for r in results] == [returncode] * len(results), logs


def _batches(workdir, process_id):
  with open(os.path.join(workdir, f"batches_{process_id}.txt")) as f:
    return f.read().split()


def test_balanced_two_process_run_resumes_with_the_same_batches(tmp_path):
  import test_input  # pylint: disable=import-outside-toplevel
  assert test_input.NUM_CLASSES == CLASSES
  records_dir = test_input.write_records(str(tmp_path / "records"), LABELS, num_shards=4)
  cache, straight, resumed = tmp_path / "cache", tmp_path / "straight", tmp_path / "resumed"

  _assert_exits(_run(records_dir, straight, "train", cache), 0)
  _assert_exits(_run(records_dir, resumed, "train_then_kill", cache), -signal.SIGKILL)
  assert all(len(_batches(resumed, p)) == KILL_AFTER_STEP for p in range(PROCESSES))

  # The step-3 checkpoint holds both processes' input states, and they differ.
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  input_dir = resumed / checkpoint.CHECKPOINT_DIR / str(KILL_AFTER_STEP) / "input"
  states = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(str(input_dir))[
      checkpoint.INPUT_STATES_KEY]
  assert [s["process_index"] for s in states] == [0, 1]
  assert [s["batches"] for s in states] == [KILL_AFTER_STEP] * 2
  assert (states[0]["epoch"], states[0]["position"]) != (states[1]["epoch"], states[1]["position"])

  # As if stopped between epoch end 2's full state and its params: both processes take them
  # from the full state.
  import shutil  # pylint: disable=import-outside-toplevel
  assert sorted(os.listdir(resumed / checkpoint.CHECKPOINT_DIR)) == ["2", "3"]
  shutil.rmtree(resumed / checkpoint.EPOCH_PARAMS_DIR / "2")

  _assert_exits(_run(records_dir, resumed, "train", cache), 0)
  for process in range(PROCESSES):
    assert len(_batches(straight, process)) == TOTAL_STEPS
    assert _batches(resumed, process) == _batches(straight, process), f"process {process}"
  assert _batches(straight, 0) != _batches(straight, 1)  # each host its own clips
  # Both processes wrote their shards of every epoch end's params, and the resumed run's are
  # the unbroken run's.
  import numpy as np  # pylint: disable=import-outside-toplevel
  for workdir in (straight, resumed):
    assert sorted(os.listdir(workdir / checkpoint.CHECKPOINT_DIR)) == ["4", "6"]
    assert sorted(os.listdir(workdir / checkpoint.EPOCH_PARAMS_DIR)) == ["2", "4", "6"]
  for step in (2, 4, 6):
    params = [checkpoint.read_workdir_params(str(w), step)[0] for w in (straight, resumed)]
    for a, b in zip(*(jax_leaves(p) for p in params)):
      np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.leaves(tree)


if __name__ == "__main__":
  _ID, _COUNT, _PORT, _RECORDS, _WORKDIR, _MODE = sys.argv[1:]
  worker(int(_ID), int(_COUNT), int(_PORT), _RECORDS, _WORKDIR, _MODE)
