#!/usr/bin/env bash
# Every stage of the paper's config at tiny limits on one GPU, with its figures (bench/gpu_check.py; docs/gpu.md).
#   bash scripts/gpu_check.sh [--shape llama-3.1-8b] [--out DIR]   # on a CUDA machine, <= 8 min on one H200
#   bash scripts/gpu_check.sh --cpu                                # the same on a tiny model, here
# Python: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" bench/gpu_check.py "$@"
