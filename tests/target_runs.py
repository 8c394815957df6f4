"""`tools/benchmark.py` for an accelerator that is not here: JAX's CUDA plugin compiles for a GPU,
libtpu for TPU chips, on this host's CPU."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None,
    reason="needs JAX's CUDA plugin (pip install -e '.[cuda]'; no GPU is needed)")
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="needs JAX's TPU library (pip install -e '.[tpu]'; no TPU is needed)")

# The tiny model in bfloat16 on odd-length streams (5 x 5 image patches, 11 kept: video 11, joint
# 32 + 11 and decoder 128 + 25 tokens), which JAX's cuDNN attention refuses untreated.
TINY_BF16_ODD = ["--config=configs/pretrain.py:tiny", "--batch_size=8",
                 "--config.model.audio_length=256", "--config.model.image_size=80",
                 "--config.model.mask_ratio_v=0.55", "--config.model.dtype=bfloat16"]


def run_benchmark(tmp_path, args: list[str], **env: str) -> list[str]:
  """The lines `tools/benchmark.py ARGS` prints, run from `tmp_path` on this host's CPU with
  these `env` variables besides; the run must succeed."""
  return run_python(tmp_path, [os.path.join(ROOT, "tools", "benchmark.py"), *args], **env)


def run_python(tmp_path, args: list[str], **env: str) -> list[str]:
  """The lines `python ARGS` prints, run as `run_benchmark` runs the tool."""
  done = subprocess.run(
      [sys.executable, *args], cwd=tmp_path,
      env=dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT] + sys.path[1:]), **env),
      capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout.strip().splitlines()
