"""The sharded train step gives the same loss on 1 device, on a (data=4, fsdp=2) mesh of 8 fake
CPU devices, and on 2 processes x 4 devices joined by jax.distributed (f32, tiny model)."""

import os
import socket
import subprocess
import sys

import jax
import ml_collections
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multihost_worker  # pylint: disable=wrong-import-position

ROOT = multihost_worker.ROOT


@pytest.fixture(scope="module", autouse=True)
def fast_compilation():
  """Cheap XLA compilation for this module only (the numbers compared are all built so)."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module", name="one_device")
def fixture_one_device():
  return multihost_worker.one_step(ml_collections.ConfigDict(dict(data=1, fsdp=1)),
                                   devices=jax.devices()[:1])


def test_eight_devices_data4_fsdp2_match_one_device(one_device):
  assert jax.device_count() == 8
  loss, param_sum = multihost_worker.one_step(ml_collections.ConfigDict(dict(data=4, fsdp=2)))
  assert loss == pytest.approx(one_device[0], abs=1e-5)
  assert param_sum == pytest.approx(one_device[1], rel=1e-5)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_device(one_device):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  worker = os.path.join(ROOT, "tests", "multihost_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, str(i), "2", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=400)
      assert proc.returncode == 0, err[-3000:]
      outputs.append(out)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for out in outputs:
    values = dict(line.split() for line in out.strip().splitlines() if line[:4] in ("LOSS", "PARA"))
    assert float(values["LOSS"]) == pytest.approx(one_device[0], abs=1e-5)
    assert float(values["PARAM_SUM"]) == pytest.approx(one_device[1], rel=1e-5)
