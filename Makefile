# The two commands of the README: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-dev browser redis serve test lint bench bench-gpu

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch first, the build this machine needs (scripts/install_torch.py says which; TORCH_VARIANT overrides).
# A stamp in the venv records each install, so pip runs again only when a requirements file has changed.
install: $(VENV)/.installed-requirements

install-dev: $(VENV)/.installed-requirements-dev

$(VENV)/.installed-requirements: requirements.txt | $(BIN)/python
	$(BIN)/python scripts/install_torch.py
	$(BIN)/pip install -r requirements.txt
	touch $@

$(VENV)/.installed-requirements-dev: requirements-dev.txt requirements.txt | $(BIN)/python
	$(BIN)/python scripts/install_torch.py
	$(BIN)/pip install -r requirements-dev.txt
	touch $@

serve: install
	$(BIN)/python app.py

# The browser tests drive Debian's chromium through its chromedriver; the QUEUE_BACKEND=celery tests start
# Debian's redis-server.
browser:
	scripts/install_chromium.sh

redis:
	scripts/install_redis.sh

test: install-dev browser redis
	$(BIN)/python -m pytest

lint: install-dev
	$(BIN)/ruff check .

bench: install-dev
	$(BIN)/python -m bench.benchmark --mode cpu

# On a CUDA/ROCm machine: the service against plain diffusers, full-size SD 1.5 with random weights.
bench-gpu: install-dev
	$(BIN)/python -m bench.benchmark --mode gpu
