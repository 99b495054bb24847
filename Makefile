# Every target sets up its own virtualenv: `make test` / `make demo` work on a fresh machine.
#   1. python3 -m venv .venv                (if missing)
#   2. pip install torch==2.13.0            (FIRST: the pinned CPU wheel; an unpinned torch would pull
#                                            a multi-GB CUDA build; override with TORCH_SPEC=...)
#   3. pip install -e ".[test]"
# A stamp file skips steps 2-3 on later runs until setup.cfg changes.
# `make bench-gpu` uses its own venv (.venv-gpu, created with --system-site-packages) and never installs the
# pinned CPU torch: it keeps a CUDA torch it can import (system-wide or already in the venv), and only when
# there is none installs GPU_TORCH_SPEC (plain `torch` from PyPI: the CUDA build on Linux x86_64).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.hf-performer-installed
BENCH_STAMP := $(VENV)/.hf-performer-bench-installed
# performer-pytorch is a peer compared in the benchmark, never a dependency: installed with --no-deps.
BENCH_PEERS ?= performer-pytorch==1.1.4 einops==0.8.2 local-attention==1.11.2 \
	axial-positional-embedding==0.3.12 hyper-connections==0.4.11
BENCH_ARGS ?=
GPU_VENV ?= .venv-gpu
GPU_PY := $(GPU_VENV)/bin/python
GPU_STAMP := $(GPU_VENV)/.hf-performer-gpu-installed
GPU_TORCH_SPEC ?= torch
BENCH_GPU_ARGS ?=

# Everything here runs offline: never wait on the Hugging Face hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: help venv test lint pytest demo bench bench-quick bench-gpu bench-gpu-quick clean-venv

help:
	@echo "make demo         offline demo (sets up $(VENV) first)"
	@echo "make test         ruff check + pytest (one worker per core), all tests including slow ones (sets up $(VENV) first)"
	@echo "make bench        full attention benchmark -> benchmarks/results/attention.{json,md} (long)"
	@echo "make bench-quick  tiny smoke run of the benchmark"
	@echo "make bench-gpu    GPU benchmark on CUDA (<= 8 min) -> benchmarks/results/gpu.{json,md} (own venv $(GPU_VENV))"
	@echo "make bench-gpu-quick  CPU smoke run of the GPU benchmark -> benchmarks/results/gpu-quick.*"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg | $(PY)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[test]"
	touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# pytest exit code 5 ("no tests collected") is a failure too: make stops on any non-zero status.
# pytest-xdist runs one worker per core (at most PYTEST_WORKERS), each with one torch thread, and keeps each test
# file on one worker (--dist loadfile: module fixtures are built once); the suite is mostly small models, where a
# core per process beats two threads per op.
PYTEST_WORKERS ?= 4
pytest: $(STAMP)
	@set +e; OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --maxprocesses $(PYTEST_WORKERS) --dist loadfile; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests: failing" >&2; fi; \
	exit $$rc

test: lint pytest

demo: $(STAMP)
	$(PY) examples/demo.py $(DEMO_ARGS)

$(BENCH_STAMP): $(STAMP)
	$(PIP) install -e ".[bench]"
	$(PIP) install --no-deps $(BENCH_PEERS) || echo "make bench: performer-pytorch not installed; its rows will say unavailable" >&2
	touch $@

bench: $(BENCH_STAMP)
	$(PY) benchmarks/bench_attention.py $(BENCH_ARGS)

bench-quick: $(BENCH_STAMP)
	$(PY) benchmarks/bench_attention.py --quick $(BENCH_ARGS)

# bench-gpu: a venv that sees the system's packages; a CUDA torch it can import is kept as it is.
$(GPU_PY):
	$(PYTHON) -m venv --system-site-packages $(GPU_VENV)

$(GPU_STAMP): setup.cfg | $(GPU_PY)
	@if $(GPU_PY) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		echo "make bench-gpu: keeping the installed CUDA torch $$($(GPU_PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "make bench-gpu: no CUDA torch importable; installing $(GPU_TORCH_SPEC)"; \
		$(GPU_PY) -m pip install $(GPU_TORCH_SPEC); \
	fi
	$(GPU_PY) -m pip install -e ".[test]"
	touch $@

bench-gpu: $(GPU_STAMP)
	$(GPU_PY) benchmarks/bench_gpu.py --device cuda $(BENCH_GPU_ARGS)

bench-gpu-quick: $(STAMP)
	$(PY) benchmarks/bench_gpu.py --device cpu --quick $(BENCH_GPU_ARGS)

clean-venv:
	rm -rf $(VENV) $(GPU_VENV)
