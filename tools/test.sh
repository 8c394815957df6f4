#!/usr/bin/env bash
# The README's test command: creates .venv, installs the package with its test and torch
# extras, and runs the whole suite. Safe to re-run (pip skips what is already installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch's CPU build first, from PyTorch's CPU index, so that the torch extra does not pull
# PyPI's multi-GB CUDA build, whose triton crashes a process that has imported TensorFlow (a
# segmentation fault at `import triton`, seen with torch 2.13.0+cu130 on Python 3.12: the suite's
# workers died); without that index (an offline machine), whatever torch 2.13.0 pip finds.
.venv/bin/python -m pip install -q --retries 1 --timeout 20 \
  --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" 2>/dev/null \
  || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[torch,test]"
# pytest exit code 5 ("no tests collected") is a failure, like any other non-zero code.
# Two pytest workers (TEST_WORKERS=N for more, 0 for none), each taking whole files so that
# module fixtures are built once: 11m47s on 2 cores against 16m45s in one process (2026-12-01);
# 14m47s on a slower 2-core machine with tests/xla_flags.py's compile flags, 20m13s without
# (2026-12-02). The longest files are handed out first (tests/conftest.py, and
# --no-loadscope-reorder so xdist keeps that order); with that and trainer subprocesses that skip
# TensorFlow, 16m01s -> 13m17s on another slow 2-core machine (2026-12-02).
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-2}" --dist loadfile \
  --no-loadscope-reorder "$@"
