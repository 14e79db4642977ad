# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The CPU build of PyTorch is installed first: an unpinned `torch` pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
export SDL_VIDEODRIVER ?= dummy

.PHONY: demo test test-fast lint typecheck pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(PIP) install --quiet "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e ".[dev,all]"
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/worldmodel pipeline --config configs/quickstart.yaml --out runs/quickstart

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

pytest: $(VENV)/.installed-dev
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# The quick loop: the linters and every test but those marked `slow` (end-to-end runs).
test-fast: lint
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.installed-dev
	@for m in envs collect vae memory agents; do echo "== bench/$$m.py"; $(BIN)/python -m bench.$$m || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
