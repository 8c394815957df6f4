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
