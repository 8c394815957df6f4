"""One tiny train step on a given mesh; the entry point of each process in the 2-process test.

  python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES COORDINATOR_PORT

Each process sees 4 CPU devices (XLA_FLAGS set by the caller) and joins the others through
`jax.distributed.initialize`; the global mesh (data=4, fsdp=2) spans all 8 devices. It prints
`LOSS <value>` and `PARAM_SUM <value>` (process 0) for the caller to compare with one device.
The launch helpers (free_port, process_env, run_processes, initialize_distributed) serve every
multi-process test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 8


def free_port() -> int:
  """A free TCP port on localhost for the jax.distributed coordinator."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(devices_per_process: int, **extra: str) -> dict[str, str]:
  """Environment of a worker process: CPU only, `devices_per_process` devices, this checkout."""
  return dict(os.environ, XLA_FLAGS=xla_flags.xla_flags(devices_per_process),
              JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_DISABLE_MOST_OPTIMIZATIONS="1", **extra)


def run_processes(script: str, args: list[list[str]], env: dict[str, str], timeout: float = 400,
                  grace: float = 60) -> list[subprocess.CompletedProcess]:
  """Runs `python script *args[i]` for every i at once and waits for all.

  Once a process fails, the others get `grace` seconds before they are killed: the peers of a
  failed process would otherwise wait in a collective until `timeout`.
  """
  outputs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in args]
  procs = [subprocess.Popen([sys.executable, script, *map(str, a)], env=env, stdout=out,
                            stderr=err, text=True) for a, (out, err) in zip(args, outputs)]
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      if any(p.returncode not in (None, 0) for p in procs):
        deadline = min(deadline, time.monotonic() + grace)
      time.sleep(0.2)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  results = []
  for proc, (out, err) in zip(procs, outputs):
    out.seek(0), err.seek(0)
    results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()))
    out.close(), err.close()
  return results


def initialize_distributed(process_id: int, num_processes: int, port: int) -> None:
  """Joins the other processes through jax.distributed (CPU collectives over gloo)."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:
    pass  # older/newer JAX: gloo is the default
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=num_processes, process_id=process_id)


def tiny_config():
  """The tiny recipe, float32, small inputs."""
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  config = pretrain.get_config("tiny")
  config.model.audio_length, config.model.num_mel_bins, config.model.image_size = 32, 32, 32
  config.model.encoder_depth, config.model.modality_specific_depth = 2, 1
  config.model.contrast_group_size = 0
  config.data.batch_size = GLOBAL_BATCH
  return config


def one_step(mesh_config, devices=None) -> tuple[float, float]:
  """(loss, sum of updated params) of one train step on a fixed global batch and init."""
  import jax  # pylint: disable=import-outside-toplevel
  from cav_mae_jax import tasks  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import array_input  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import optim  # pylint: disable=import-outside-toplevel

  config = tiny_config()
  task = tasks.get_task(config)
  mesh = mesh_lib.make_mesh(mesh_config, devices)
  schedule, tx = optim.for_task(config, task, steps_per_epoch=10, total_steps=100)
  state, shardings = step_lib.create_train_state(task, tx, mesh, jax.random.PRNGKey(0))
  train_step = step_lib.make_train_step(task, tx, schedule, mesh, shardings)
  clips = array_input.random_clips(GLOBAL_BATCH, 32, 32, 32, seed=3)
  sharding = mesh_lib.batch_sharding(mesh)
  batch = {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
           for k, v in clips.items()}
  rng = jax.device_put(jax.random.PRNGKey(1), mesh_lib.replicated(mesh))
  state, metrics = train_step(state, batch, rng)
  total = jax.jit(lambda p: sum(x.sum() for x in jax.tree.leaves(p)),
                  out_shardings=mesh_lib.replicated(mesh))(state.params)
  return float(metrics["loss"]), float(total)


def main(process_id: int, num_processes: int, port: int) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  initialize_distributed(process_id, num_processes, port)
  assert jax.process_count() == num_processes and jax.device_count() == 8, jax.devices()
  loss, param_sum = one_step(ml_collections.ConfigDict(dict(data=4, fsdp=2)))
  print(f"LOSS {loss!r}\nPARAM_SUM {param_sum!r}", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
