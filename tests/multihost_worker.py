"""One tiny train step on a given mesh; the entry point of each process in the 2-process test.

  python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES COORDINATOR_PORT

Each process sees 4 CPU devices (XLA_FLAGS set by the caller) and joins the others through
`jax.distributed.initialize`; the global mesh (data=4, fsdp=2) spans all 8 devices. It prints
`LOSS <value>` and `PARAM_SUM <value>` (process 0) for the caller to compare with one device.
"""

from __future__ import annotations

import os
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 8


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
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:
    pass  # older/newer JAX: gloo is the default
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=num_processes, process_id=process_id)
  assert jax.process_count() == num_processes and jax.device_count() == 8, jax.devices()
  loss, param_sum = one_step(ml_collections.ConfigDict(dict(data=4, fsdp=2)))
  print(f"LOSS {loss!r}\nPARAM_SUM {param_sum!r}", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
