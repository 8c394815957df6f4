"""Shared pytest set-up, applied before jax is imported anywhere in the test process.

- 8 fake CPU devices, so multi-device logic is tested on any machine.
- LLVM backend optimization level 0: halves XLA's CPU compile time for the tiny test models
  (numerics are unchanged: XLA's CPU backend does not enable fast-math at any level).
Subprocesses started by tests inherit these variables.
"""
import os

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
_existing = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_existing] + [f for f in _FLAGS if f.split("=")[0] not in _existing]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
