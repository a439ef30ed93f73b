# Two commands do all setup on a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
# torch is installed first, pinned, so that pip takes the local CUDA-capable wheels rather than resolving
# a newer release; the package's own ranges accept it.
TORCH   = torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint install install-dev bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/vqim demo --out runs/demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/tokenizer_speed.py
	$(PY) benchmarks/tokenizer_quality.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
