"""Shared pytest set-up, applied before jax is imported anywhere in the test process.

- 8 fake CPU devices, so multi-device logic is tested on any machine.
- LLVM backend optimization level 0: halves XLA's CPU compile time for the tiny test models
  (numerics are unchanged: XLA's CPU backend does not enable fast-math at any level).
Subprocesses started by tests inherit these variables.
"""
import os

import pytest

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
_existing = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_existing] + [f for f in _FLAGS if f.split("=")[0] not in _existing]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="module")
def fast_compilation():
  """Cheap XLA compilation for one test module (`pytestmark = usefixtures(...)`); numbers
  compared within such a module are all built the same way."""
  import jax  # pylint: disable=import-outside-toplevel  (after the environment above is set)
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
