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


# The longest test files (seconds in a 2-worker run of the whole suite on 2 cores, 2026-12-02,
# before this ordering and before test_train_resume's runs left TensorFlow out), run first. tools/test.sh hands whole files to its pytest-xdist workers in collection order
# (--dist loadfile --no-loadscope-reorder); xdist's default order, by the number of tests in a
# file, put these few-test, many-subprocess files last, where one worker ran them alone while the
# other sat idle: 924 s against 879 s for this order in a replay of that run's test times.
_LONGEST_FILES = (
    "test_train_resume.py",  # 225 s: trainer subprocesses killed and resumed
    "test_benchmark.py",  # 151
    "test_models.py",  # 143
    "test_train_multihost_resume.py",  # 127
    "test_gpu_check.py",  # 120
    "test_train_init.py",  # 108
    "test_feature_tools_cli.py",  # 101
    "test_tools_cli.py",  # 94
    "test_finetune.py",  # 78
    "test_peers.py",  # ~60 alone (2026-12-06): 2-process runs
)


def pytest_collection_modifyitems(items):
  """Runs the files of `_LONGEST_FILES` first, longest first; the others follow as collected."""
  rank = {name: i for i, name in enumerate(_LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
