# Two entry points for a fresh machine with only Python: `make train` and `make test`.
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install train test lint clean-outputs

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

## train: run the main job; pass Hydra overrides with ARGS="model.latent_dim=64 ..."
train: $(STAMP)
	$(BIN)/python -m vae_lightning.train $(ARGS)

## test: run the whole test suite in 2 worker processes; pass pytest options with ARGS="-k math"
## (ARGS="-n 0": in one process)
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 $(ARGS)

lint: $(STAMP)
	$(BIN)/pre-commit run --all-files
