"""The sharded train step gives the same loss on 1 device, on a (data=4, fsdp=2) mesh of 8 fake
CPU devices, and on 2 processes x 4 devices joined by jax.distributed (f32, tiny model)."""

import os
import sys

import jax
import ml_collections
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multihost_worker  # pylint: disable=wrong-import-position

ROOT = multihost_worker.ROOT


pytestmark = pytest.mark.usefixtures("fast_compilation")  # conftest.py


@pytest.fixture(scope="module", name="one_device")
def fixture_one_device():
  return multihost_worker.one_step(ml_collections.ConfigDict(dict(data=1, fsdp=1)),
                                   devices=jax.devices()[:1])


def test_eight_devices_data4_fsdp2_match_one_device(one_device):
  assert jax.device_count() == 8
  loss, param_sum = multihost_worker.one_step(ml_collections.ConfigDict(dict(data=4, fsdp=2)))
  assert loss == pytest.approx(one_device[0], abs=1e-5)
  assert param_sum == pytest.approx(one_device[1], rel=1e-5)


def test_two_processes_match_one_device(one_device):
  worker = os.path.join(ROOT, "tests", "multihost_worker.py")
  port = multihost_worker.free_port()
  results = multihost_worker.run_processes(worker, [[i, 2, port] for i in range(2)],
                                           multihost_worker.process_env(4))
  for result in results:
    assert result.returncode == 0, result.stderr[-3000:]
    values = dict(line.split() for line in result.stdout.strip().splitlines()
                  if line[:4] in ("LOSS", "PARA"))
    assert float(values["LOSS"]) == pytest.approx(one_device[0], abs=1e-5)
    assert float(values["PARAM_SUM"]) == pytest.approx(one_device[1], rel=1e-5)


def test_each_step_draws_its_own_masks():
  """The step's randomness is `fold_in(rng, step)`: the same params, batch and key give other
  masks at another step (another loss), and the same at the same step. Resume tests compare two
  runs of the same code, which a fixed key would pass: every step with the same masks."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from cav_mae_jax import tasks  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import array_input  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import optim  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  config = multihost_worker.tiny_config()
  task = tasks.get_task(config)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), jax.devices()[:1])
  schedule, tx = optim.for_task(config, task, steps_per_epoch=10, total_steps=100)
  state, shardings = step_lib.create_train_state(task, tx, mesh, jax.random.PRNGKey(0))
  train_step = step_lib.make_train_step(task, tx, schedule, mesh, shardings)
  clips = array_input.random_clips(multihost_worker.GLOBAL_BATCH, 32, 32, 32, seed=3)
  batch = jax.device_put(dict(clips), mesh_lib.batch_sharding(mesh))
  rng = jax.random.PRNGKey(1)

  def loss_at(step):
    at = dataclasses.replace(jax.tree.map(jnp.copy, state),  # the step donates its state
                             step=jnp.asarray(step, state.step.dtype))
    return float(train_step(at, batch, rng)[1]["loss"])

  first = loss_at(0)
  assert loss_at(0) == first
  assert len({first, loss_at(1), loss_at(2)}) == 3
