#!/usr/bin/env bash
# The README's main command: installs the package into .venv (CPU JAX is enough) and runs the
# demo (synthetic clips -> records -> tiny pretraining -> held-out retrieval report).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/python tools/demo.py --workdir "${DEMO_WORKDIR:-demo_out}" "$@"
