# Two entry points a newcomer needs: `make demo` and `make test`.
# Both create .venv on first use (torch pinned first, then the project editable).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean gpu-wheels gpu-check bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) numpy
	$(PY) -m pip install --quiet -e '.[eval,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pretrain.demo

# The oldest Triton the project allows, beside the venv's, for the compile check on it
# (tests/test_kernels_triton.py); torch's CPU wheel does not depend on triton.
TRITON_OLDEST ?= 3.6.0
TRITON_OLDEST_DIR := $(VENV)/triton-$(TRITON_OLDEST)

$(TRITON_OLDEST_DIR)/.installed: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --target $(TRITON_OLDEST_DIR) triton==$(TRITON_OLDEST)
	touch $@

test: $(STAMP) $(TRITON_OLDEST_DIR)/.installed
	$(PY) -m ruff check .
	XLSTM_TRITON_OLDEST=$(abspath $(TRITON_OLDEST_DIR)) $(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not multiprocess and not integration" $(PYTEST_ARGS)

# The first GPU: `make gpu-wheels` here (PyPI reachable), then on the GPU machine, which has
# torch and triton but no package index and no .venv: `make gpu-check` with .whl/ carried.
GPU_PYTHON ?= python3
GPU_SITE ?= /tmp/gpu-site
gpu-wheels: $(STAMP)
	$(PY) benchmarks/gpu_wheels.py --dest .whl

gpu-check:
	if [ -d .whl ]; then $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile \
	    --no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl; fi
	PYTHONPATH=$(GPU_SITE) $(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# Every CPU benchmark, sized to finish in about 20-25 minutes on 2 idle cores (one thread
# per process where a script runs several: robust to other load), then
# benchmarks/README.md from the result files. Each run is recorded (command, load, time)
# in benchmarks/results/bench-log.json; a failed one does not stop the rest, and the
# target fails at the end if any did. It rewrites today's result files of the same names
# (regenerated, not appended): commit hand-annotated results under another name.
BENCH_DATE = $(shell date -u +%F)
BENCH = $(PY) benchmarks/report.py run
bench: $(STAMP)
	-$(BENCH) long_context -- $(PY) benchmarks/long_context.py \
	    --contexts 512,1024,2048,4096,8192 --tokens 8192 --rounds 1 --threads 1
	-$(BENCH) generation -- $(PY) benchmarks/generation.py --positions 8192
	-$(BENCH) quality -- $(PY) benchmarks/quality.py --slow-seeds 1
	# one thread: at 2 threads on 2 cores any other process, even at nice 19, stalls every
	# parallel region (a 3-row index of a 12 MB tensor: 6.3 ms, against 6.7 us at one thread)
	-$(BENCH) mlstm_cpu --stdout benchmarks/results/mlstm_cpu-$(BENCH_DATE)-cpu.txt -- \
	    $(PY) benchmarks/mlstm_cpu.py --reps 10 --threads 1
	-$(BENCH) slstm_cpu --stdout benchmarks/results/slstm_cpu-$(BENCH_DATE)-cpu.md -- \
	    $(PY) benchmarks/slstm_cpu.py --reps 3 --threads 1
	# --steps 3: a process's second step still page-faults its heap in; the third is steady
	-$(BENCH) train_throughput -- $(PY) benchmarks/train_throughput.py --steps 3 --rounds 1 --runs ours,official,llama \
	    --seq-len 1024 --out benchmarks/results/train_throughput-$(BENCH_DATE)-cpu.txt
	-$(BENCH) data_throughput -- env OMP_NUM_THREADS=1 $(PY) benchmarks/data_throughput.py \
	    --runs 1 --epochs 2 --workers 0,1,2 --out benchmarks/results/data_throughput-$(BENCH_DATE)-cpu.md
	$(PY) benchmarks/report.py readme --strict

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
