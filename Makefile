# dmd2 — make install, then make test   (the torch/torchvision pair below; CPU-only or GPU builds: see README)
VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.14.1 torchvision==0.29.1
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-all test-install test-multinode lint demo bench-quality reliability bench bench-scale

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The one install path; the stamp lets `make demo` install only when needed. A torch that already
# imports with its torchvision in the venv (the CPU or a CUDA build installed by hand, README) is kept.
# constraints.txt: the versions the test suite last passed with (scripts/constraints.py writes it),
# so a clean checkout installs those and not whatever the index holds that day.
STAMP := $(VENV)/.dmd2-installed
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

install:
	rm -f $(STAMP)
	$(MAKE) $(STAMP)

# Two pytest-xdist workers: the suite's tests are mostly one-core subprocesses, so two at once
# use both of CI's 2 cores (README "Set up and test"). TEST_WORKERS=0 runs them one at a time.
TEST_WORKERS ?= 2
test: $(PY)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-all: $(PY)
	$(PY) -m pytest -q -m ""

# `pip install .` (a wheel, not editable) into a fresh venv, then `dmd2 train` from another folder.
test-install: $(PY)
	$(PY) -m pytest -q -m slow tests/test_install.py

# Multi-node on one machine: `dmd2 train` as two nodes (two deepspeed launchers, --no_ssh,
# --node_rank 0 and 1), resumed, both ranks' shards in the checkpoint (README "Multi-node").
test-multinode: $(PY)
	$(PY) -m pytest -q -m slow tests/test_multinode.py

lint: $(PY)
	$(VENV)/bin/ruff check dmd2 tests scripts benchmarks

# The main job on the embedded default: distill the digits teacher on CPU, compare in one table
# (runs/demo/report.json). bench-quality: the same pipeline, longer, eight students on three benchmarks
# (runs/bench-quality/; python -m dmd2.digits.demo --bench --only digits-flow: one benchmark).
demo: $(STAMP)
	$(PY) -m dmd2.digits.demo

bench-quality: $(STAMP)
	$(PY) -m dmd2.digits.demo --bench

# Reliability: the fault-injection tests plus the slow ones (random kill -9 soak, hung rank, a full
# disk at every save point).
reliability: $(PY)
	$(PY) -m pytest -q -m "" tests/test_reliability.py tests/test_bad_input.py tests/test_first_hour.py

# Speed and memory, side by side on CPU: every ratio with its goal, runs/bench/results.json.
# (On a GPU: python benchmarks/gpu.py, see README "Performance".)
bench: $(STAMP)
	$(PY) -W ignore::FutureWarning -m benchmarks.cpu

# Data at scale (docs/data.md): dmd2 prepare of 100k synthetic images at 1 and 2 ranks, training's
# peak RSS with a 10k and a 100k cache, time to step 1 with and without prepare; runs/bench-scale/.
bench-scale: $(STAMP)
	$(PY) -W ignore::FutureWarning -m benchmarks.scale
