"""Tools under adverse runtime conditions: Ctrl-C and SIGTERM, two runs on one output, outputs
that cannot be written. Each ends with one `error:` line and leaves nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import limits
import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO] + ([env["PYTHONPATH"]] if "PYTHONPATH" in env
                                                else []))
  return env


# Puts back Ctrl-C's default action (a background job inherits SIGINT ignored, and the
# disposition stays across exec), then runs the command.
_WITH_DEFAULT_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                        "os.execv(sys.argv[1], sys.argv[1:])")


def _start(args) -> subprocess.Popen:
  """Starts a Python command in its own process group, with Ctrl-C's default action, so that a
  signal reaches it and its children as a terminal's does."""
  return subprocess.Popen([sys.executable, "-c", _WITH_DEFAULT_SIGINT, *args], env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)


def _wait_for(predicate, proc, seconds=120.0):
  deadline = time.time() + seconds
  while not predicate():
    assert proc.poll() is None, proc.communicate()
    assert time.time() < deadline, "timed out"
    time.sleep(0.05)


_LONG_TOOL = textwrap.dedent("""
    import os, sys, time
    from cav_mae_jax import cli
    def main(argv):
      out = sys.argv[1]
      try:
        open(out + ".started", "w").close()
        time.sleep(60)
      finally:
        os.rename(out + ".started", out + ".cleaned")  # the tool's cleanup ran
    cli.run(main, uses_tensorflow=False, interrupt_note="nothing was written")
""")


# The same, as a tool that parses its own arguments (argparse) runs it.
_LONG_ARGPARSE_TOOL = _LONG_TOOL.replace(
    'cli.run(main, uses_tensorflow=False, interrupt_note="nothing was written")',
    'with cli.signals_end_with_one_line("nothing was written"):\n  sys.exit(main(sys.argv))')


@pytest.mark.parametrize("tool", [_LONG_TOOL, _LONG_ARGPARSE_TOOL], ids=["cli_run", "argparse"])
@pytest.mark.parametrize("signum,status,what", [
    (signal.SIGINT, 130, "interrupted by SIGINT (Ctrl-C)"),
    (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_a_signal_ends_a_tool_with_one_line_after_its_cleanup(tmp_path, signum, status, what,
                                                              tool):
  out = str(tmp_path / "out")
  proc = _start([sys.executable, "-c", tool, out])
  _wait_for(lambda: os.path.exists(out + ".started"), proc)
  os.killpg(proc.pid, signum)
  _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == status, stderr
  assert stderr.splitlines() == [f"error: {what}; nothing was written"], stderr
  assert os.path.exists(out + ".cleaned")  # SIGTERM's default would end it without cleanup


_EXIT_WORK = textwrap.dedent("""
    import atexit, concurrent.futures, os, sys, threading, time
    from cav_mae_jax import cli
    out = sys.argv[1]
    atexit.register(lambda: open(out + ".atexit", "w").close())
    idle = concurrent.futures.ThreadPoolExecutor(1)  # never shut down: its worker waits for work
    def main(argv):
      def late_writer():  # a non-daemon thread: Python waits for it at exit
        time.sleep(1.0)
        open(out + ".thread", "w").close()
      idle.submit(lambda: None).result()
      threading.Thread(target=late_writer).start()
      open(out + ".started", "w").close()
      time.sleep(60)
    cli.run(main, uses_tensorflow=False)
""")


@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
def test_an_interrupted_tool_ends_as_a_normal_exit_does(tmp_path, twice):
  # After the error line a tool leaves without the interpreter's native teardown (XLA's
  # compiler threads crashed in it: status 139 after Ctrl-C); what Python runs at exit must
  # still run: other threads are waited for, atexit functions called. A second signal while
  # it waits for them changes nothing (it raised out of the wait: a traceback, status 1).
  out = str(tmp_path / "out")
  proc = _start([sys.executable, "-c", _EXIT_WORK, out])
  _wait_for(lambda: os.path.exists(out + ".started"), proc)
  os.killpg(proc.pid, signal.SIGINT)
  if twice:
    time.sleep(0.5)  # within the late thread's second
    os.killpg(proc.pid, signal.SIGTERM)
  _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 130, stderr
  assert stderr.splitlines() == ["error: interrupted by SIGINT (Ctrl-C)"], stderr
  assert os.path.exists(out + ".thread") and os.path.exists(out + ".atexit")


_SIGNAL_IN_A_CALLBACK = textwrap.dedent("""
    import gc, signal, sys, time
    from cav_mae_jax import cli
    signum, where = getattr(signal, sys.argv[1]), sys.argv[2]
    class Finalized:
      def __del__(self):
        signal.raise_signal(signum)  # its exception is raised here, where none can propagate
    def in_gc_callback(phase, unused_info, fired=[]):
      if phase == "start" and not fired:
        fired.append(True)
        signal.raise_signal(signum)
    def main(argv):
      if where == "finalizer":
        Finalized()
      else:
        gc.callbacks.append(in_gc_callback)
        gc.collect()
      time.sleep(60)  # a wait the signal must end
      print("went on as if no signal had come", flush=True)
    cli.run(main, uses_tensorflow=False)
""")


@pytest.mark.parametrize("where", ["finalizer", "gc_callback"])
@pytest.mark.parametrize("signum,status,what", [
    (signal.SIGINT, 130, "interrupted by SIGINT (Ctrl-C)"),
    (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_a_signal_landing_in_a_callback_is_not_lost(signum, status, what, where):
  """A signal whose exception Python raises inside a finalizer or gc callback (JAX's, at random,
  in CI) printed 'Exception ignored in ...: KeyboardInterrupt' and was dropped; now it is
  delivered again, ending the wait the tool went on to, and ends the tool with its one line."""
  start = time.monotonic()
  proc = _start([sys.executable, "-c", _SIGNAL_IN_A_CALLBACK, signum.name, where])
  stdout, stderr = proc.communicate(timeout=120)
  assert (proc.returncode, stdout, stderr.splitlines()) == (status, "", [f"error: {what}"])
  assert time.monotonic() - start < 30  # not at the end of the 60-s wait


_OUT_OF_MEMORY_TOOL = textwrap.dedent("""
    from cav_mae_jax import cli
    def main(argv):
      import jax, jax.numpy as jnp
      jax.jit(lambda: jnp.ones((1 << 50,), jnp.float32))().block_until_ready()  # 4 PiB
    cli.run(main, uses_tensorflow=False)
""")


def test_a_device_out_of_memory_ends_a_tool_with_one_line():
  # XLA's RESOURCE_EXHAUSTED (a batch too large for a GPU's memory) was a traceback.
  result = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY_TOOL], env=_env(),
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 1, result.stderr
  assert result.stderr.splitlines() == [
      "error: out of device memory: Out of memory allocating 4503599627370496 bytes. (a smaller "
      "batch per device needs less; --verbosity=1 shows XLA's report)"], result.stderr


_PREPROCESSING_WORKER = """
import json, multiprocessing, signal, sys
from cav_mae_jax.data import shards
def worker(conn):
  conn.send(sorted(name for name in sys.modules if name.split(".")[0] in ("keras", "tensorflow")))
  signal.raise_signal(signal.SIGINT)
if __name__ == "__main__":
  context = multiprocessing.get_context("forkserver")
  context.set_forkserver_preload(shards._WORKER_PRELOAD)
  parent, child = context.Pipe()
  process = context.Process(target=worker, args=(child,))
  process.start()
  loaded = parent.recv()
  process.join()
  print(json.dumps([process.exitcode, "tensorflow" in loaded,
                    [name for name in loaded if name.split(".")[0] == "keras"]]))
"""


def test_preprocessing_workers_ignore_ctrl_c_from_their_start_and_hold_no_keras(tmp_path):
  """A process the workers' fork server forks starts with SIGINT ignored (`worker_signals`):
  it had Python's handler until the worker's own SIG_IGN, and a Ctrl-C landing in JAX's gc
  callback there printed "Exception ignored ... KeyboardInterrupt" into the tool's stderr. And
  the fork server loads TensorFlow without Keras (`worker_tensorflow`): its plain import loaded
  Keras too, a second more of every run's start, which waits for the workers."""
  script = tmp_path / "worker.py"
  script.write_text(_PREPROCESSING_WORKER)
  result = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.splitlines()[-1]) == [0, True, []], result.stderr[-3000:]
  assert "KeyboardInterrupt" not in result.stderr


def test_a_ctrl_c_that_lands_in_a_gc_callback_still_stops_preprocess(tmp_path):
  """tools/preprocess.py (argparse, not `cli.run`) had no `redeliver_swallowed_interrupts`: a
  Ctrl-C landing in JAX's gc callback printed "Exception ignored ... KeyboardInterrupt" and the
  run went on to its end, exit 0 (the fresh-clone CI run of 979fe38, 1 run in ~20). Here the
  interrupt is raised where Python cannot propagate it (a finalizer), as the callback's was."""
  for name in ("data.json", "labels.csv"):
    (tmp_path / name).write_text("")  # never read: prepare_records is replaced
  script = textwrap.dedent("""
      import os, sys, time
      os.environ.update(TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")  # as the tool's
      sys.path.insert(0, sys.argv[1])
      import test_prepare
      tool = test_prepare.load_tool("preprocess")
      class Finalizer:
        def __del__(self):
          raise KeyboardInterrupt  # unraisable: Python prints it and drops it
      def prepare_records(*args, **kwargs):
        Finalizer()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
          time.sleep(0.1)
        raise RuntimeError("the interrupt was lost")
      tool.prepare.prepare_records = prepare_records
      sys.exit(tool.main(["--datafile", "data.json", "--labels", "labels.csv", "--out", "out"]))
      """)
  result = subprocess.run([sys.executable, "-c", script, os.path.join(REPO, "tests")],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120,
                          check=False)
  assert (result.returncode, result.stderr) == (130, "error: interrupted by SIGINT (Ctrl-C); "
                                                "finished shards are kept; the same command "
                                                "resumes\n"), result.stderr[-3000:]


def test_ctrl_c_during_preprocess_keeps_finished_shards_and_prints_one_line(tmp_path):
  import test_prepare  # pylint: disable=import-outside-toplevel
  clip = test_prepare.write_clip(str(tmp_path / "clip.mp4"), seconds=1)
  with open(tmp_path / "labels.csv", "w") as f:
    f.write(test_prepare.LABELS_CSV)
  datafile = test_prepare.write_datafile(str(tmp_path / "data.json"),
                                         [(f"v{i}", clip, "/m/a") for i in range(40)])
  out = tmp_path / "out"
  proc = _start([sys.executable, os.path.join(REPO, "tools", "preprocess.py"),
                 "--datafile", datafile, "--labels", str(tmp_path / "labels.csv"),
                 "--out", str(out), "--workers", "2", "--examples-per-shard", "1",
                 "--no-progress"])
  _wait_for(lambda: out.is_dir() and any(n.endswith(".tfrecord.json") for n in os.listdir(out)),
            proc)
  os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the workers get it too
  _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 130, stderr
  assert stderr.splitlines() == ["error: interrupted by SIGINT (Ctrl-C); finished shards are "
                                 "kept; the same command resumes"], stderr
  names = os.listdir(out)
  assert not any(".tmp-" in name for name in names), names
  for name in names:  # every shard is finished (its sidecar written), none half-written
    if name.endswith(".tfrecord"):
      assert name + ".json" in names
  assert "index.json" not in names  # 40 shards, not all finished


def test_sigterm_after_a_signals_block_ends_the_tool_as_before():
  # The block's SIGTERM handler stayed: a SIGTERM in a tool's imports after the block (between
  # inspect_records' two blocks) raised an uncaught Terminated: a traceback and status 1.
  script = ("import signal\nfrom cav_mae_jax import cli\n"
            "with cli.signals_end_with_one_line():\n  pass\n"
            "signal.raise_signal(signal.SIGTERM)\n")
  result = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True,
                          text=True, timeout=120, check=False)
  assert (result.returncode, result.stderr) == (-signal.SIGTERM, ""), result.stderr[-2000:]


def test_ctrl_c_during_make_synthetic_prints_one_line_and_leaves_no_temporaries(tmp_path):
  # It printed Python's traceback, and its spawned workers "Process SpawnPoolWorker-1:".
  out = tmp_path / "out"
  video_dir = out / "video" / "train"
  proc = _start([sys.executable, os.path.join(REPO, "tools", "make_synthetic.py"),
                 "--out", str(out), "--train", "64", "--eval", "0", "--workers", "2",
                 "--duration", "2"])
  _wait_for(lambda: video_dir.is_dir() and any(n.endswith(".mp4") for n in os.listdir(video_dir)),
            proc)
  os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the workers get it too
  stdout, stderr = proc.communicate(timeout=60)
  assert (proc.returncode, stdout, stderr.splitlines()) == (
      130, "", ["error: interrupted by SIGINT (Ctrl-C); no clip was left half-written"]), stderr
  names = os.listdir(video_dir)
  assert len(names) < 64 and all(name.endswith(".mp4") for name in names), names
  assert not (out / "train.json").exists()


@pytest.mark.parametrize("tool, args", [
    ("preprocess.py", ["--datafile", "data.json", "--labels", "labels.csv", "--out", "out"]),
    ("inspect_records.py", ["--records", "records"])])
def test_ctrl_c_during_tensorflows_import_prints_one_line(tmp_path, tool, args):
  # The argparse tools import TensorFlow after their flags (seconds): a Ctrl-C there printed
  # Python's traceback. Here the import waits for the signal: a `tensorflow` first on the path.
  marker = tmp_path / "importing"
  fake = tmp_path / "slow" / "tensorflow"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text(f"import time\nopen({str(marker)!r}, 'w').close()\n"
                                    "time.sleep(60)\n")
  for name in ("data.json", "labels.csv"):
    (tmp_path / name).write_text("")
  (tmp_path / "records").mkdir()
  env = _env()
  env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "slow"), env["PYTHONPATH"]])
  proc = subprocess.Popen(
      [sys.executable, "-c", _WITH_DEFAULT_SIGINT, sys.executable,
       os.path.join(REPO, "tools", tool), *args], cwd=tmp_path, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
  _wait_for(marker.exists, proc)
  os.killpg(proc.pid, signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=60)
  assert (proc.returncode, stdout, stderr.splitlines()) == (
      130, "", ["error: interrupted by SIGINT (Ctrl-C)"]), stderr


def test_a_directory_holding_only_the_lock_and_empty_folders_is_removed(tmp_path):
  # A run on a full disk made its workdir and checkpoints/, then failed at its first file
  # (config.json: "No space left on device"): the workdir was left behind with the empty folder.
  from cav_mae_jax import dir_lock  # pylint: disable=import-outside-toplevel
  run = tmp_path / "run"
  for kept in [None, "checkpoints/1/data", "notes.txt"]:
    (run / "checkpoints" / "tmp").mkdir(parents=True)
    if kept:
      (run / kept).parent.mkdir(parents=True, exist_ok=True)
      (run / kept).write_text("kept")
    with dir_lock.DirLock(str(run)) as lock:
      assert lock.remove_unused_directory() is (kept is None)
    assert run.exists() is (kept is not None)
    if kept:
      assert (run / kept).read_text() == "kept" and (run / "checkpoints" / "tmp").is_dir()
      shutil.rmtree(run)
  run.mkdir()
  (run / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
  with dir_lock.DirLock(str(run)) as lock:
    assert not lock.remove_unused_directory()
  assert sorted(os.listdir(run)) == ["elsewhere", dir_lock.LOCK_FILE]


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from cav_mae_jax import dir_lock
    dir_lock.DirLock(*sys.argv[1:]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_run_on_a_workdir_in_use_is_refused_and_a_dead_holder_taken_over(tmp_path):
  from cav_mae_jax import dir_lock  # pylint: disable=import-outside-toplevel
  holder = _start([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)])
  assert holder.stdout.readline() == "locked\n"
  try:
    with pytest.raises(dir_lock.DirectoryInUseError,
                       match=rf"in use by another training run \(pid {holder.pid} on host "):
      dir_lock.DirLock(str(tmp_path)).acquire()
  finally:
    holder.kill()  # SIGKILL: no cleanup, the lock file stays with the dead holder's pid
    holder.wait()
  lock = dir_lock.DirLock(str(tmp_path)).acquire()
  assert lock.previous_holder["pid"] == holder.pid
  assert f"pid {holder.pid}" in dir_lock.describe_previous(lock.previous_holder)
  with open(lock.path) as f:
    assert json.load(f)["pid"] == os.getpid()
  lock.release()
  assert dir_lock.DirLock(str(tmp_path)).acquire().previous_holder is None


def test_the_trainer_refuses_a_workdir_another_run_holds(tmp_path):
  import test_train_resume  # pylint: disable=import-outside-toplevel
  from cav_mae_jax import dir_lock  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import array_input, trainer  # pylint: disable=import-outside-toplevel
  holder = _start([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)])
  assert holder.stdout.readline() == "locked\n"
  try:
    source = array_input.ArrayInput(array_input.random_clips(24, 32, 32, 32, seed=0), 8, seed=0)
    with pytest.raises(dir_lock.DirectoryInUseError, match=f"pid {holder.pid}"):
      trainer.train_and_evaluate(test_train_resume.tiny_config(), str(tmp_path),
                                 trainer.Inputs(source, None, 24))
  finally:
    holder.kill()
    holder.wait()
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_a_second_preprocessing_run_of_a_task_is_refused(tmp_path):
  import test_prepare  # pylint: disable=import-outside-toplevel
  from cav_mae_jax import dir_lock  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.data import prepare  # pylint: disable=import-outside-toplevel
  with open(tmp_path / "labels.csv", "w") as f:
    f.write(test_prepare.LABELS_CSV)
  datafile = test_prepare.write_datafile(str(tmp_path / "data.json"),
                                         [(f"v{i}", str(tmp_path / "none.mp4"), "/m/a")
                                          for i in range(4)])
  out = tmp_path / "out"
  out.mkdir()
  holder = _start([sys.executable, "-c", _HOLD_LOCK, str(out), ".lock-task-1-of-2"])
  assert holder.stdout.readline() == "locked\n"
  try:
    with pytest.raises(dir_lock.DirectoryInUseError,
                       match=rf"in use by another preprocessing run of task 1 of 2 \(pid "
                             rf"{holder.pid} on host "):
      prepare.prepare_records(datafile, str(tmp_path / "labels.csv"), str(out),
                              num_workers=0, task_index=1, num_tasks=2, examples_per_shard=1,
                              progress=False)
    assert os.listdir(out) == [".lock-task-1-of-2"]  # nothing was started
    # Another task of the split run may write into the same directory meanwhile.
    summary = prepare.prepare_records(datafile, str(tmp_path / "labels.csv"), str(out),
                                      num_workers=0, task_index=0, num_tasks=2,
                                      examples_per_shard=1, progress=False)
    assert summary.shards_finished == 2 and summary.quarantined == 2  # (missing files)
  finally:
    holder.kill()
    holder.wait()


def test_a_checkpoint_the_disk_refuses_stops_the_run_with_one_line(tmp_path):
  # A disk full (or a quota) while orbax saved in the background: each of its threads logged
  # the error with a traceback, the run trained on to its next save, and ended with TensorStore's
  # "RESOURCE_EXHAUSTED: Error writing ...". Files are limited here to 64 KiB (`ulimit -f`:
  # limits.file_size_limited); the step-10 save needs more.
  # The run stops at a log row after it, before the next save (orbax raises it there).
  import test_input  # pylint: disable=import-outside-toplevel
  records = test_input.write_records(str(tmp_path / "records"),
                                     [[i % test_input.NUM_CLASSES] for i in range(16)], 2)
  workdir = tmp_path / "run"
  done = subprocess.run(
      limits.file_size_limited([
       sys.executable, os.path.join(REPO, "tools", "train.py"), "--config",
       "configs/pretrain.py:tiny", f"--workdir={workdir}", f"--config.data.train_dir={records}",
       "--config.evals.val=None", "--config.evals.retrieval=None", "--config.total_steps=30",
       "--config.total_epochs=None", "--config.checkpoint.every_steps=10",
       "--config.data.batch_size=8", "--config.log_every_steps=1",
       "--config.model.encoder_depth=2", "--config.model.modality_specific_depth=1",
       "--config.model.image_size=32"], 64),
      cwd=REPO, env=dict(_env(), XLA_FLAGS=xla_flags.xla_flags()),  # one device: quicker
      capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and lines[0].startswith(
      f"error: {workdir}: a checkpoint cannot be written: File too large (ValueError: "), lines
  steps = [int(line.split("/")[0].split()[-1]) for line in done.stdout.splitlines()
           if "%" in line]
  assert steps and 10 <= steps[-1] < 20, done.stdout


def test_only_the_file_systems_refusals_are_called_unwritable():
  import errno  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="^a bug$"):  # anything else is raised as it is
    with checkpoint.writing("/w"):
      raise ValueError("a bug")
  with pytest.raises(checkpoint.CheckpointWriteError) as e:
    with checkpoint.writing("/w"):
      raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
  assert e.value.errno == errno.EDQUOT
  assert str(e.value) == (f"/w: a checkpoint cannot be written: {os.strerror(errno.EDQUOT)} "
                          f"(OSError: [Errno {errno.EDQUOT}] {os.strerror(errno.EDQUOT)})")


def test_an_output_in_a_folder_that_cannot_be_written_is_named(tmp_path):
  from cav_mae_jax.convert import io  # pylint: disable=import-outside-toplevel
  # /proc refuses new files even to root (chmod does not stop root).
  with pytest.raises(OSError, match=r"^/proc/params\.npz: cannot write in /proc \("):
    with io.atomic_output("/proc/params.npz"):
      pass
  with pytest.raises(OSError, match=r"^/proc/new/params: cannot make its directory /proc/new"):
    io.check_output_path("/proc/new/params")


@pytest.mark.parametrize("workdir,message", [
    ("/proc/run", r"^workdir /proc/run: cannot make this directory \("),
    ("FILE", r"^workdir .*/file: exists and is not a directory$"),
    ("FILE/run", r"^workdir .*/file/run: cannot make this directory \(Not a directory\)$")])
def test_a_workdir_that_cannot_be_made_is_named_with_the_reason(tmp_path, workdir, message):
  import test_train_resume  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import array_input, trainer  # pylint: disable=import-outside-toplevel
  (tmp_path / "file").write_text("")
  workdir = workdir.replace("FILE", str(tmp_path / "file"))
  source = array_input.ArrayInput(array_input.random_clips(24, 32, 32, 32, seed=0), 8, seed=0)
  with pytest.raises(OSError, match=message):
    trainer.train_and_evaluate(test_train_resume.tiny_config(), workdir,
                               trainer.Inputs(source, None, 24))


def test_a_workdir_url_is_refused_before_anything_is_made(tmp_path, monkeypatch):
  # It made a local folder gs: for the lock, config and logs; orbax wrote to the bucket.
  import test_train_resume  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import array_input, trainer  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  source = array_input.ArrayInput(array_input.random_clips(24, 32, 32, 32, seed=0), 8, seed=0)
  with pytest.raises(ValueError, match=r"^workdir gs://bucket/run: must be a local path \(a "
                     r"shared file system every host sees, or the bucket mounted"):
    trainer.train_and_evaluate(test_train_resume.tiny_config(), "gs://bucket/run",
                               trainer.Inputs(source, None, 24))
  assert not os.listdir(tmp_path)


def test_a_workdir_that_is_a_records_directory_is_refused(tmp_path):
  # The run's checkpoints, metrics and config were written among the shards.
  import test_train_resume  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import array_input, trainer  # pylint: disable=import-outside-toplevel
  source = array_input.ArrayInput(array_input.random_clips(24, 32, 32, 32, seed=0), 8, seed=0)
  records = tmp_path / "records"
  records.mkdir()
  (records / "index.json").write_text("{}")
  config = test_train_resume.tiny_config()
  with pytest.raises(ValueError, match=rf"^workdir {records}: is a records directory \(it "
                     r"holds index.json\)"):
    trainer.train_and_evaluate(config, str(records), trainer.Inputs(source, None, 24))
  with config.unlocked():
    config.data.eval_dir = str(tmp_path / "eval")
  with pytest.raises(ValueError, match=rf"^workdir {tmp_path}/x/../eval: is the records "
                     "directory config.data.eval_dir;"):
    trainer.train_and_evaluate(config, f"{tmp_path}/x/../eval", trainer.Inputs(source, None, 24))
  assert sorted(os.listdir(tmp_path)) == ["records"] and os.listdir(records) == ["index.json"]


def test_an_interrupted_shard_leaves_no_temporary_of_its_sidecar(tmp_path):
  from cav_mae_jax.data import shards  # pylint: disable=import-outside-toplevel
  name = shards.shard_file_name(2, 40)
  # A worker ended (by Ctrl-C's cleanup) after renaming its shard, while it wrote the sidecar.
  for leftover in (f"{name}.tmp-host-1", f"{name}{shards.SIDECAR_SUFFIX}.tmp-host-1", name):
    (tmp_path / leftover).write_text("")
  shards.remove_stale_temporaries(str(tmp_path), name)
  assert os.listdir(tmp_path) == [name]  # not finished (no sidecar): written again on resume
  assert shards.read_sidecar(str(tmp_path), 2, 40) is None


def test_a_ctrl_c_between_a_shards_two_renames_waits_for_its_sidecar(tmp_path, monkeypatch):
  # The shard is renamed into place, then its sidecar: a Ctrl-C between the two left a complete
  # shard without its sidecar (resuming wrote it again; the test above failed on it at random).
  from cav_mae_jax.data import shards, sources  # pylint: disable=import-outside-toplevel
  write_json = shards.write_json_atomic

  def interrupted(path, data):
    os.kill(os.getpid(), signal.SIGINT)  # arrives after the shard's rename
    time.sleep(0.1)
    write_json(path, data)

  monkeypatch.setattr(shards, "write_json_atomic", interrupted)
  plan = shards.ShardPlan(shard_index=0, num_shards=1, entries=())
  labels = sources.ClassLabels(mids=("/m/a",), display_names=("a",), source="test")
  # Ctrl-C as in a terminal: a process started in the background by a non-interactive shell
  # (`cmd &`, as a CI script may start the suite) inherits SIGINT ignored, and Python keeps it so.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt):
      shards.write_shard(plan, str(tmp_path), labels)
  finally:
    signal.signal(signal.SIGINT, previous)
  assert sorted(os.listdir(tmp_path)) == [plan.file_name, plan.file_name + ".json"]
