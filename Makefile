# Two commands on a fresh machine with Python 3.11:  make train   |   make test
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/default
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train test lint format clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

## Train + evaluate the default config (U-Net on the built-in synthetic data); resumes if WORKDIR has a run.
train: $(VENV)/.runtime
	$(BIN)/python -m segjax.main --config=configs/default.py --workdir=$(WORKDIR) $(ARGS)

## Lint (ruff) and run the test suite (slow tests excluded; `make test PYTEST_ARGS="-m slow"` runs them).
test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -m "not slow" -n 2 $(PYTEST_ARGS)

format: $(VENV)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
