"""Shared pytest set-up, applied before jax is imported anywhere in the test process.

- 8 fake CPU devices, so multi-device logic is tested on any machine.
- Cheaper XLA compilation (tests/xla_flags.py: LLVM -O0 and XLA's elemental fusion emitter).
- One persistent XLA compilation cache for the session, in a temporary folder removed at exit
  (or JAX_COMPILATION_CACHE_DIR where the caller set it): the pytest-xdist workers and the tools
  and trainers that tests start as subprocesses compile each program once. The same program gives
  the same executable, so no number changes. Several tests of a file often build the same tiny
  step: tests/test_train_init.py took 100 CPU-seconds with the cache against 146-165 without
  (2 cores, alternating runs, 2026-12-02). Tests that pass their own cache folder keep it.
Subprocesses started by tests inherit these variables.
"""
import atexit
import os
import shutil
import tempfile

import pytest

import xla_flags

_FLAGS = xla_flags.xla_flags(device_count=8).split()
_existing = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_existing] + [f for f in _FLAGS if f.split("=")[0] not in _existing]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set before pytest-xdist starts its workers
  _CACHE_DIR = tempfile.mkdtemp(prefix="cav_mae_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def fast_compilation():
  """Cheap XLA compilation for one test module (`pytestmark = usefixtures(...)`); numbers
  compared within such a module are all built the same way."""
  import jax  # pylint: disable=import-outside-toplevel  (after the environment above is set)
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
