"""One process's failure ends every process of a 2-process run at once, each saying why
(`cav_mae_jax/train/peers.py`).

Before, the peers of a failed process waited in their next collective until JAX's shutdown
barrier timed out (5 minutes); then every process aborted with a C++ fatal error that named no
cause. Two local processes x 2 CPU devices joined by jax.distributed. This file is also the
processes' entry point:

  python tests/test_peers.py tool PROCESS_ID PORT FAILING WHEN [HEARTBEAT_TIMEOUT_S]
      (FAILING: a process id, -1 for none, 2 for both; WHEN: 'mid' with the peer in the next
      collective, 'late' after the last one, once the peer has returned, 'killed' with a
      SIGKILL while the peer is in the next collective)
  python tests/test_peers.py train PROCESS_ID PORT RECORDS WORKDIR LEARNING_RATE
  python tests/test_peers.py settings PROCESS_ID PORT
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multihost_worker  # noqa: E402  pylint: disable=wrong-import-position

PROCESSES = 2
BAD_INPUT = "videos.csv line 3: no such file /data/clip.mp4"


def tool_worker(process_id: int, port: int, failing: int, when: str,
                heartbeat_timeout_s: str = "") -> None:
  """A multi-host tool (cli.run, --distributed): process `failing` (both: 2) fails on a bad
  input after one collective, while its peer waits in the next, or after the last one; or is
  killed (SIGKILL) while its peer waits in the next."""
  from cav_mae_jax import cli  # pylint: disable=import-outside-toplevel
  distributed = cli.define_distributed_flags("work alone")

  def main(argv):
    del argv
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    distributed.initialize()
    import numpy as np  # pylint: disable=import-outside-toplevel
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.process_allgather(np.ones(2))
    fails = failing in (jax.process_index(), PROCESSES)
    if fails and when == "killed":
      os.kill(os.getpid(), signal.SIGKILL)
    if fails and when == "mid":
      raise ValueError(BAD_INPUT)
    multihost_utils.process_allgather(np.ones(2))
    if fails:  # late: as process 0 writing the results, once the peer is at its exit
      time.sleep(1)
      raise ValueError(BAD_INPUT)
    print(f"process {jax.process_index()} done")

  sys.argv = [sys.argv[0], "--distributed", f"--coordinator_address=localhost:{port}",
              f"--num_processes={PROCESSES}", f"--process_id={process_id}"]
  if heartbeat_timeout_s:
    sys.argv.append(f"--heartbeat_timeout_s={heartbeat_timeout_s}")
  cli.run(main, uses_tensorflow=False)


def train_worker(process_id: int, port: int, records_dir: str, workdir: str,
                 learning_rate: float) -> None:
  """One process of a fine-tuning run (`learning_rate`: 0 for the recipe's)."""
  multihost_worker.initialize_distributed(process_id, PROCESSES, port)
  import test_train_multihost_resume  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import trainer  # pylint: disable=import-outside-toplevel
  records_dir = records_dir.replace("@I@", str(process_id))  # each process its own, if asked
  config = test_train_multihost_resume.resume_config(records_dir)
  config.data.balanced_sampling = False
  config.data.train_dir = records_dir + "/" * process_id  # a path may differ: where it is found
  if learning_rate:
    config.optim.learning_rate = learning_rate
  trainer.train_and_evaluate(config, workdir)


def settings_worker(process_id: int, port: int) -> None:
  """Checks a config whose data path differs (allowed) with a tool's --step that differs."""
  multihost_worker.initialize_distributed(process_id, PROCESSES, port)
  from cav_mae_jax.train import run_config  # pylint: disable=import-outside-toplevel
  config = multihost_worker.tiny_config()
  config.data.train_dir = f"/host{process_id}/records"
  run_config.check_same_on_every_process(config, {"--step": 3 + process_id})


def _run(args, timeout):
  port = multihost_worker.free_port()
  started = time.monotonic()
  results = multihost_worker.run_processes(
      os.path.abspath(__file__), [[args[0], i, port, *args[1:]] for i in range(PROCESSES)],
      multihost_worker.process_env(2), timeout=timeout, grace=timeout)
  return results, time.monotonic() - started


def _logs(results):
  return "\n".join(f"--- process {i} (exit {r.returncode}):\n{r.stderr[-3000:]}"
                   for i, r in enumerate(results))


def _error_lines(result):
  return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_one_process_starts_no_watch():
  from cav_mae_jax.train import peers  # pylint: disable=import-outside-toplevel
  assert not peers.start()  # no jax.distributed here
  peers.report(ValueError("nothing to tell"))  # nothing happens


def test_a_run_without_failure_ends_as_before():
  results, seconds = _run(["tool", -1, "mid"], timeout=120)
  assert [r.returncode for r in results] == [0, 0], _logs(results)
  done = [[line for line in r.stdout.splitlines() if "Gloo" not in line] for r in results]
  assert done == [["process 0 done"], ["process 1 done"]]  # Gloo prints its connections
  assert not any(_error_lines(r) for r in results), _logs(results)
  assert seconds < 60, seconds


@pytest.mark.parametrize("failing", [0, 1])
@pytest.mark.parametrize("when", ["mid", "late"])
def test_a_failed_process_ends_its_peer(failing, when):
  # mid: the peer waits in the next collective (JAX's shutdown barrier alone waited 300 s).
  # late: the peer has returned and waits at its exit, before JAX's shutdown barrier, where
  # the failure reaches it (left at JAX's barrier, it aborted once JAX gave up).
  results, seconds = _run(["tool", failing, when], timeout=150)
  peer = 1 - failing
  assert results[failing].returncode == 2, _logs(results)  # its own error's status
  assert _error_lines(results[failing]) == [f"error: {BAD_INPUT}"], _logs(results)
  assert results[peer].returncode == 1, _logs(results)
  assert _error_lines(results[peer]) == [
      f"error: process {failing} of 2 failed: {BAD_INPUT}; process {peer} stops too"
  ], _logs(results)
  assert "Check failure" not in results[peer].stderr + results[failing].stderr
  assert seconds < 60, seconds


def test_processes_failing_together_print_one_line_each():
  # A config error every process raises: one line each, its own or the first failure's.
  results, seconds = _run(["tool", 2, "mid"], timeout=150)
  for process, result in enumerate(results):
    lines = _error_lines(result)
    assert len(lines) == 1, _logs(results)
    assert (lines[0], result.returncode) in [
        (f"error: {BAD_INPUT}", 2),
        (f"error: process {1 - process} of 2 failed: {BAD_INPUT}; process {process} stops too",
         1)], _logs(results)
    assert "Traceback" not in result.stderr and "Check failure" not in result.stderr
  assert seconds < 60, seconds


@pytest.mark.parametrize("killed", [0, 1])
def test_a_killed_process_ends_its_peer_after_the_heartbeat_timeout(killed):
  # A process killed outright cannot report: JAX notices its missing heartbeats (100 s by
  # default, 93 s measured in a training run) and ends the other process (its own message).
  # Here the survivor's Gloo collective fails at once (one `error:` line); without the flag it
  # then waited for its peer at its exit until peers.EXIT_WAIT_S (34 s in all), with 2 s 6 s.
  # The survivor's line races JAX's abort at the 2 s heartbeat timeout: on a loaded machine the
  # abort can come first (1 run in 5 with 3 busy loops on 2 cores, 2026-12-07), so such a run
  # of process 1's kill is run once more; the line must come in one of the two.
  for _ in range(2):
    results, seconds = _run(["tool", killed, "killed", 2], timeout=90)
    assert results[killed].returncode == -signal.SIGKILL, _logs(results)
    survivor = results[1 - killed]
    assert survivor.returncode != 0, _logs(results)  # 1, or JAX's abort at the heartbeat timeout
    assert f"process {1 - killed} done" not in survivor.stdout
    # The failed collective is named in one line (it was a traceback of a JaxRuntimeError).
    assert "Traceback" not in survivor.stderr, _logs(results)
    lines = _error_lines(survivor)
    assert seconds < 25, seconds
    if lines:
      break
    assert "JAX distributed service detected fatal errors" in survivor.stderr, _logs(results)
    if killed == 0:  # the coordination service went with process 0: JAX's agent may abort first
      return
  assert len(lines) == 1 and lines[0].startswith(
      "error: a collective lost another process of the run, which ended without reporting a "
      "failure (killed? out of host memory? see its log): UNKNOWN: Gloo AllGather failed: ["
  ), _logs(results)
  assert re.search("Connection (reset|closed) by peer", lines[0]), lines[0]  # Gloo's words


def test_a_damaged_shard_ends_both_processes_of_a_training_run(tmp_path):
  import test_input  # pylint: disable=import-outside-toplevel
  import test_train_multihost_resume  # pylint: disable=import-outside-toplevel
  records_dir = test_input.write_records(str(tmp_path / "records"),
                                         test_train_multihost_resume.LABELS, num_shards=4)
  shard = os.path.join(records_dir, sorted(f for f in os.listdir(records_dir)
                                           if f.endswith(".tfrecord"))[1])
  with open(shard, "r+b") as f:  # one byte of its first record's data: its checksum fails
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 0xFF]))

  results, seconds = _run(["train", records_dir, str(tmp_path / "workdir"), 0], timeout=200)
  failed = [i for i, r in enumerate(results) if "Traceback" in r.stderr]
  assert len(failed) == 1, _logs(results)
  failing, peer = failed[0], 1 - failed[0]
  assert os.path.basename(shard) in results[failing].stderr, _logs(results)
  assert [r.returncode for r in results] == [1, 1], _logs(results)
  lines = _error_lines(results[peer])
  assert len(lines) == 1 and lines[0].startswith(f"error: process {failing} of 2 failed: "), (
      _logs(results))
  assert os.path.basename(shard) in lines[0] and lines[0].endswith(f"process {peer} stops too")
  assert "Check failure" not in results[peer].stderr + results[failing].stderr
  assert seconds < 150, seconds


def test_processes_given_different_configs_are_refused_naming_the_field(tmp_path):
  # Each traced its own step: process 1's learning rate trained its replica of the params apart.
  import test_input  # pylint: disable=import-outside-toplevel
  import test_train_multihost_resume  # pylint: disable=import-outside-toplevel
  records_dir = test_input.write_records(str(tmp_path / "records"),
                                         test_train_multihost_resume.LABELS, num_shards=4)
  port = multihost_worker.free_port()
  args = [["train", i, port, records_dir, str(tmp_path / "workdir"), [0, 0.5][i]]
          for i in range(PROCESSES)]
  results = multihost_worker.run_processes(os.path.abspath(__file__), args,
                                           multihost_worker.process_env(2), timeout=200)
  assert [r.returncode for r in results] == [1, 1], _logs(results)
  wanted = ("the run's processes differ: config.optim.learning_rate is 0.001 on "
            "process 0, 0.5 on process 1: every process of a run is given the same config and "
            "runs the same software")
  for result in results:
    assert wanted in result.stderr, _logs(results)
  assert not os.path.exists(tmp_path / "workdir" / "checkpoints")


def test_processes_given_records_that_differ_are_refused_naming_them(tmp_path):
  # Only the paths were compared: other clip counts planned other steps per epoch and the
  # processes hung in mismatched collectives; the same clips in other shards were read twice
  # or not at all.
  import test_input  # pylint: disable=import-outside-toplevel
  import test_train_multihost_resume  # pylint: disable=import-outside-toplevel
  for i, num_shards in enumerate((4, 2)):
    test_input.write_records(str(tmp_path / f"records{i}"), test_train_multihost_resume.LABELS,
                             num_shards=num_shards)
  results, _ = _run(["train", str(tmp_path / "records@I@"), str(tmp_path / "workdir"), 0],
                    timeout=200)
  assert [r.returncode for r in results] == [1, 1], _logs(results)
  for result in results:
    assert re.search(r"the run's processes differ: config.data's training records is '4 "
                     r"shard\(s\) of 19 clips: .*' on process 0, '2 shard\(s\) of 19 clips: "
                     r"clips-00000-of-00002.tfrecord \(10\), clips-00001-of-00002.tfrecord "
                     r"\(9\) \[[0-9a-f]{8}\]' on process 1", result.stderr), _logs(results)
  assert not os.path.exists(tmp_path / "workdir" / "checkpoints")


def test_a_tools_setting_that_differs_between_processes_is_named():
  results, _ = _run(["settings"], timeout=120)
  wanted = ("ValueError: the run's processes differ: --step is 3 on process 0, 4 on process 1: "
            "every process of a run is given the same config and runs the same software")
  for result in results:
    assert result.returncode == 1 and wanted in result.stderr, _logs(results)


if __name__ == "__main__":
  if sys.argv[1] == "settings":
    settings_worker(int(sys.argv[2]), int(sys.argv[3]))
  elif sys.argv[1] == "tool":
    tool_worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:7])
  else:
    train_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5],
                 float(sys.argv[6]))
