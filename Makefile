# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Each bootstraps .venv (torch pinned first, so that no CUDA build is pulled on a CPU box).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a GPU cluster: make venv TORCH_SPEC="torch==2.11.0" (a CUDA build)
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8
PYTEST_ARGS ?=
# Two pytest-xdist workers (CI has 2 cores): the suite takes ~10 minutes instead of ~14.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadgroup

.PHONY: venv bytecode demo test test-quick clean-demo
# The project's own packages: byte-compiled before tests and the demo, because every launcher rank
# imports them afresh and an environment with PYTHONDONTWRITEBYTECODE set would recompile them each time.
PY_PACKAGES := common models data_prep tiny_models trainer eval benchmarks tests

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	# DeepSpeed's setup imports torch: build it against the torch installed above.
	$(BIN)/pip install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

bytecode: venv
	$(BIN)/python -m compileall -q -j 0 $(PY_PACKAGES) > /dev/null

## The main job on an embedded default: synthetic data -> shards -> 2-process ZeRO-2 training
## (uniform and summary-centric) -> generation, comparison, scores and plots. CPU, minutes.
demo: bytecode
	PATH="$(abspath $(BIN)):$$PATH" bash launch/demo.sh demo_out

## The whole test suite (what CI runs).
test: bytecode
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -ra $(XDIST) $(PYTEST_ARGS) tests

## The quick subset while you work: everything but the slow end-to-end tests.
test-quick: bytecode
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -ra -m "not slow" $(XDIST) $(PYTEST_ARGS) tests

clean-demo:
	rm -rf demo_out
