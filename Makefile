# Two commands matter: `make test` (sets everything up, then runs the suite) and, later, `make train`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel that lies on this kind of machine's disk: an unpinned `torch`
# resolves to a multi-gigabyte CUDA build. Override on a GPU machine: make install TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -q

.PHONY: install test clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24" "setuptools>=70" wheel
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# --no-build-isolation: build against the torch above, never a second one.
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]" "$(TORCH_SPEC)"
	touch $@

test: install
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
