"""XLA flags of the test suite: cheaper CPU compilation, the same numbers within every test.

- `--xla_backend_optimization_level=0`: LLVM at -O0, half of XLA's CPU compile time for the
  tiny test models (XLA's CPU backend does not enable fast-math at any level).
- `--xla_cpu_use_fusion_emitters=false`: fusions emitted by XLA's elemental IR emitter instead of
  its MLIR fusion emitters. The whole suite on 2 cores: 20m13s -> 14m47s, user CPU 35.3 -> 25.9
  minutes; tests/test_train_init.py alone 141 -> 114 s (2026-12-02, jax 0.10.2). That emitter
  lowers a scatter as a loop, so a test that looks for scatters in compiled HLO compiles with
  `native_compile_options()`.
- `--xla_llvm_disable_expensive_passes=true` (as `jax_disable_most_optimizations` sets it) and
  `--xla_cpu_multi_thread_eigen=false` (XLA's Eigen matmuls and convolutions on one thread: the
  suite's two workers and the subprocesses they start already share the 2 cores, and the tiny
  test models' matmuls gain nothing from splitting). tests/test_train_init.py alone on 2 cores:
  142-146 s -> 112 s wall, user CPU 131-134 -> 105 s (2026-12-06, jax 0.10.2).
A test only compares numbers built under the same flags (its trainer subprocesses inherit them);
the tools, the demo and users' programs compile with XLA's defaults.

XLA aborts a process on a flag it does not know, so the flags are first tried in a subprocess
(once per test session: the result is kept in the environment the workers inherit) and a jaxlib
that lacks one runs the suite without it.
"""

import os
import subprocess
import sys

_DEVICE_COUNT = "--xla_force_host_platform_device_count"
_FAST = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
         "--xla_llvm_disable_expensive_passes=true", "--xla_cpu_multi_thread_eigen=false")
_FUSION_EMITTERS = "xla_cpu_use_fusion_emitters"
_ACCEPTED_ENV = "CAV_MAE_JAX_TEST_XLA_FLAGS"  # the fast flags this jaxlib accepted


def _accepted(flags):
  env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
  try:
    done = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                          capture_output=True, timeout=120, check=False)
  except subprocess.TimeoutExpired:
    return False
  return done.returncode == 0


def fast_flags():
  """The fast-compile flags this jaxlib accepts."""
  if _ACCEPTED_ENV not in os.environ:
    accepted = list(_FAST) if _accepted(_FAST) else [f for f in _FAST if _accepted([f])]
    os.environ[_ACCEPTED_ENV] = " ".join(accepted)
  return os.environ[_ACCEPTED_ENV].split()


def xla_flags(device_count=None):
  """XLA_FLAGS for a test subprocess: the fast flags, and `device_count` CPU devices if given."""
  return " ".join(fast_flags() + ([f"{_DEVICE_COUNT}={device_count}"] if device_count else []))


def native_compile_options():
  """`compiler_options` for `.compile()` that restore XLA's default CPU fusion emitters, for a
  test that inspects compiled HLO as users' programs compile it."""
  return {_FUSION_EMITTERS: True} if any(_FUSION_EMITTERS in f for f in fast_flags()) else {}
