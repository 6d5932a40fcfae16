# Two commands matter: `make train` (the main job) and `make test`; each does all set-up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel that lies on this kind of machine's disk: an unpinned `torch`
# resolves to a multi-gigabyte CUDA build. Override on a GPU machine: make install TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -q

.PHONY: install test train bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml Makefile CMakeLists.txt $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24" "setuptools>=70" wheel
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# --no-build-isolation: build against the torch above, never a second one.
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[train,test]" "$(TORCH_SPEC)"
	touch $@

test: install
	# One thread per process: the test models are tiny, and the tests that start several processes
	# (DDP, kill-and-resume) would otherwise oversubscribe the two cores.
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests $(PYTEST_ARGS)
	# The Triton kernels on the CPU, through Triton's interpreter: a process of their own, because
	# TRITON_INTERPRET must be set before Triton is imported.
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/triton_interp $(PYTEST_ARGS)

# The main job: prepare the embedded default dataset if needed (idempotent), then train on it.
# CONFIG=path/to/your.yaml trains your model instead; ARGS passes more flags (e.g. ARGS="--resume").
CONFIG ?= python/configs/default.yaml
ARGS ?=
train: install
	$(BIN)/galore-train --config $(CONFIG) --prepare-data
	$(BIN)/galore-train --config $(CONFIG) $(ARGS)

# Benchmarks (pytest-benchmark): timings are machine-specific; see benchmarks/RESULTS.md.
# On a CPU the step benchmarks run small smoke cases (GPU figures: benchmarks/gpu_check.sh on a GPU).
bench: install
	$(BIN)/python -m pytest benchmarks/bench_refresh.py benchmarks/bench_step.py benchmarks/bench_model_step.py \
		--benchmark-only -s --benchmark-columns=min,median,max --benchmark-sort=name

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
