"""Commands under a file-size limit: a full disk (or a quota) without a mount."""
from __future__ import annotations

import shlex


def file_size_limited(command: list[str], kib: int, xla_cache_dir: str | None = None) -> list[str]:
  """`command` with files of `kib` KiB at most (bash's `ulimit -f`; Python ignores SIGXFSZ, so a
  longer write fails with EFBIG, as a full disk fails with ENOSPC).

  JAX's persistent compilation cache is off in it, or in `xla_cache_dir` with every program
  written there: JAX writes an entry in place, so one the limit refused would stay truncated in
  the suite's shared cache (tests/conftest.py), where the next test to compile that program read
  it (JAX's "Error reading persistent compilation cache entry" warning in a tool's stderr).
  """
  if xla_cache_dir is None:
    cache = "export JAX_ENABLE_COMPILATION_CACHE=false"
  else:
    cache = (f"export JAX_COMPILATION_CACHE_DIR={shlex.quote(xla_cache_dir)} "
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_ENABLE_COMPILATION_CACHE=true")
  return ["bash", "-c", f'{cache} && ulimit -f {int(kib)} && exec "$@"', "bash", *command]
