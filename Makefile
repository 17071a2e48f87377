# One command each for a fresh machine: `make demo` (set up + run the pipeline on the built-in model)
# and `make test` (set up + run the test suite). Both create .venv on first use.
PY := .venv/bin/python
CONFIG ?= configs/smollm2-demo.yaml
RUN_DIR ?= runs/smollm2-demo

.PHONY: setup demo test test-fast lint

.venv/.installed: pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $@

setup: .venv/.installed

demo: setup
	.venv/bin/selfdistill run $(CONFIG) --run-dir $(RUN_DIR)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	.venv/bin/ruff check selfdistill tests bench
