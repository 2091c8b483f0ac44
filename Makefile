# mixlab developer entry points. `make train` sets everything up and runs the default job;
# `make test` runs the test suite (what CI runs).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A pinned CPU-friendly torch for fresh machines; set TORCH_SPEC= to keep an existing torch.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,tokenizers,data,plot,tensorboard,eval

.PHONY: setup train test lint bench-cpu clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

train: setup
	$(VENV)/bin/mixlab train

test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
