# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
# Both create ./.venv and install what they need on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions

.PHONY: install test test-fast lint format demo clean

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# Everything except the multi-process / DeepSpeed checks.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Lint and import order (ruff, configured in pyproject.toml as TRL does: line length 119, isort).
lint: $(STAMP)
	$(PY) -m ruff check srpo_trl tests recipes benchmarks
	$(PY) -m ruff format --check srpo_trl tests recipes benchmarks

format: $(STAMP)
	$(PY) -m ruff check --fix srpo_trl tests recipes benchmarks
	$(PY) -m ruff format srpo_trl tests recipes benchmarks

demo: $(STAMP)
	$(PY) -m srpo_trl.cli demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .torch_extensions demo_out
