# dmd2 — make install test   (CPU machine: the torch/torchvision pair below; GPU: see README)
VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.14.1 torchvision==0.29.1
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-all lint

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"

test: $(PY)
	$(PY) -m pytest -q

test-all: $(PY)
	$(PY) -m pytest -q -m ""

lint: $(PY)
	$(VENV)/bin/ruff check dmd2 tests scripts
