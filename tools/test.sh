#!/usr/bin/env bash
# The README's test command: creates .venv, installs the package with its test and torch
# extras, and runs the whole suite. Safe to re-run (pip skips what is already installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch CPU build first, so the torch extra does not pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" 2>/dev/null \
  || .venv/bin/python -m pip install -q --index-url https://download.pytorch.org/whl/cpu torch
.venv/bin/python -m pip install -q -e ".[torch,test]"
# pytest exit code 5 ("no tests collected") is a failure, like any other non-zero code.
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
