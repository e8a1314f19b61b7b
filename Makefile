# The two commands that set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch lies on this machine's disk; installing it first keeps pip from
# pulling a multi-GB CUDA build to satisfy `torch>=2.5`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,dev,train,viz,interop

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	# OpenFlamingo's own helpers.py, the reference for `load_open_flamingo` in the tests. Its
	# wheel pins torch==2.0.1 and imports open_clip at the top, so it is installed without
	# dependencies and the test loads only helpers.py (torch + einops) from it.
	$(PIP) install --quiet --no-deps "open-flamingo==2.0.1"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/xmodal demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/xmodal bench --quick

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
