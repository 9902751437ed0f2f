# pipemlaan: `make run` sets up and runs the main job, `make test` sets up and runs the tests.
PY := .venv/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
NPROC ?= 2

.PHONY: setup data run test test-fast bench bench-gpus soak profile gpu-check clean

# pyproject.toml accepts a range of torch releases; the tests run on this one, installed first
# so that `pip install -e` keeps it (already there: pip changes nothing, offline).
TORCH_TESTED := torch==2.14.1 torchvision==0.29.1

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_TESTED)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

setup: .venv/.installed

data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is missing: install the Debian package dataset-fashion-mnist, or put the four IDX files in a folder and pass --data.root=FOLDER"; exit 1; \
	fi

# The main job: MLAAN on Fashion-MNIST, pipelined over $(NPROC) CPU ranks (one thread each).
run: setup data
	OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node=$(NPROC) \
	  -m pipemlaan.train --config configs/fmnist_mlaan_cpu.toml $(ARGS)

# Test modules run TEST_JOBS at a time (pytest-xdist), each module whole on one worker: many
# tests wait on launches, heartbeats and timeouts, so one worker left a core idle a third of
# the time (7:07 -> 3:36-4:33 on 2 cores; 6:14 with 2026-12-04's 643 tests, 5:00 with 650 once
# a ViT's torchvision import was lazy, inductor's kernel cache warm: a fresh machine adds ~50 s).
TEST_JOBS ?= 2
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile $(ARGS)

# The tests that start no process and train no whole pipeline (under a minute), for day-to-day
# work; `make test` runs every test.
test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" --durations=5 $(ARGS)

# Throughput (CPU set, < 15 min on 2 cores): results land in benchmarks/results/.
bench: setup
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.throughput $(ARGS)

# 20 short 4-rank runs back to back: no hang, no process left behind.
soak: setup
	PIPEMLAAN_SOAK_RUNS=20 OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/test_soak.py

# "Benchmark on my N GPUs": every configuration (pipemlaan's methods, BP alone, BP DDP, BP
# through torch.pipelining) at 1, 2, 4, ... ranks up to the GPUs this machine shows, ResNet-110
# K=55 at batch 1024, each at its device's defaults (runs with the machine's torch: no .venv).
# SMOKE=1: the same benchmark on CPU at tiny sizes (about 3 minutes on 2 cores).
bench-gpus:
	@if [ -n "$(SMOKE)" ]; then $(MAKE) -s setup && OMP_NUM_THREADS=1 $(PY) -m benchmarks.throughput \
	  --device cpu --ranks 1,2 --batch 32 --steps 12 --warmup 4 --log-every 4 --repeats 1 \
	  --name smoke $(ARGS); \
	else python3 -m benchmarks.throughput --device cuda --ranks auto --model resnet110 --K 55 \
	  --batch 1024 --image 3,32,32 --steps 100 --warmup 30 --log-every 10 --name gpus $(ARGS); fi

# Memory per device in the paper's Table 3 shape (on the GPU when one is visible).
profile: setup
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.table3 --ranks 4 --device auto $(ARGS)

# On a machine with one GPU (no .venv needed: runs from the tree with the machine's torch):
# torch.compile vs eager, Table 3 per rank, 4 ranks sharing the GPU, projections, GPU tests;
# at most 8 min on one H100 or H200 (BUDGET=seconds). SMOKE=1 make gpu-check: the same steps on
# CPU, tiny sizes, to check the script (about a minute).
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf runs .pytest_cache
