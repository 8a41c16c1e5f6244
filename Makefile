# Two entry points for a fresh machine with only Python: `make train` and `make test`.
# Both create .venv on first use: `make train` installs what training needs (the package and
# PyTorch), `make test` adds the test and lint tools, the launcher plugins and the FID network.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TRAINING := $(VENV)/.installed-train
DEVELOPMENT := $(VENV)/.installed-dev
MUTATION := $(VENV)/.installed-mutants
PIP    := $(BIN)/python -m pip install --progress-bar off --disable-pip-version-check

.PHONY: install train test lint mutants

install: $(DEVELOPMENT)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(TRAINING): pyproject.toml | $(BIN)/python
	@echo "Installing vae_lightning and PyTorch into $(VENV): a few GB, minutes on a first run"
	$(PIP) -e .
	touch $(TRAINING)

$(DEVELOPMENT): pyproject.toml | $(BIN)/python
	@echo "Installing vae_lightning with its test tools into $(VENV): minutes on a first run"
	$(PIP) -e ".[dev]"
	touch $(DEVELOPMENT) $(TRAINING)

## train: run the main job; pass Hydra overrides with ARGS="model.latent_dim=64 ..."
train: $(TRAINING)
	$(BIN)/python -m vae_lightning.train $(ARGS)

## test: run the whole test suite in 2 worker processes; pass pytest options with ARGS="-k math"
## (ARGS="-n 0": in one process)
test: $(DEVELOPMENT)
	$(BIN)/python -m pytest -n 2 $(ARGS)

lint: $(DEVELOPMENT)
	$(BIN)/pre-commit run --all-files

$(MUTATION): pyproject.toml | $(BIN)/python
	$(PIP) -e ".[mutants]"
	touch $(MUTATION) $(DEVELOPMENT) $(TRAINING)

## mutants: mutation testing of the math ([tool.mutmut] in pyproject.toml): one planted bug at a
## time, each against the fast tests that reach it. Fails when a mutant survives that
## tests/mutants_equivalent.txt does not explain. Resumes where it stopped; JOBS=2 processes.
mutants: $(MUTATION)
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(or $(JOBS),2)
	$(BIN)/mutmut results | awk -F': ' '$$2 == "survived" || $$2 == "no tests" {print $$1}' \
		| tr -d ' ' | sort > mutants/survivors.txt
	grep -v '^#' tests/mutants_equivalent.txt | awk 'NF {print $$1}' | sort > mutants/equivalent.txt
	comm -23 mutants/survivors.txt mutants/equivalent.txt > mutants/unexplained.txt
	@echo "$$(wc -l < mutants/survivors.txt) survivors; not explained as equivalent:"
	@cat mutants/unexplained.txt; test ! -s mutants/unexplained.txt
