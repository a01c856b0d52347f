# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
# A virtual environment is created in .venv; torch is installed first from TORCH_SPEC
# so that pip resolves the CPU wheel available locally instead of a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: demo test bench lint
demo: $(VENV)/.installed
	$(PY) -m peft_orthomerge demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/run.py --quick

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
