#!/usr/bin/env bash
# The prepared accelerator check of issue 11: base parity on the device, then the bf16 train step
# at batches 48/120/256 against the PyTorch reference, cuDNN attention and remat (what it runs and
# why: cav_mae_jax/train/gpu_check.py). Under 8 minutes on one H100/H200:
#   bash tools/gpu_check.sh            # results printed, and written to $OUT when OUT is set
#   bash tools/gpu_check.sh --tiny     # the same sequence, tiny model, any backend, ~1 minute
# Needs jax, flax, optax, torch and ml_collections; no TensorFlow. Where ml_collections is not
# installed (the device machine), it is installed from wheels in .whl/, made beforehand with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     ml_collections==1.1.0
# and carried with the tree (its other needs, absl-py and PyYAML, are on the device machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import ml_collections" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    site="${TMPDIR:-/tmp}/gpu_check_site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
      .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    if ! why="$("$PYTHON" -c "import ml_collections" 2>&1)"; then
      echo "error: ml_collections from .whl/ does not import ($(tail -n 1 <<<"$why")): put the" \
        "wheels of what it needs there too (see $0)" >&2
      exit 2
    fi
  else
    echo "error: ml_collections is not installed and .whl/ holds no wheels (see $0)" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m cav_mae_jax.train.gpu_check ${OUT:+--out "$OUT"} "$@"
