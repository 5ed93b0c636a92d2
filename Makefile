# Everything runs from the virtual environment in .venv/ (created on first use).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch first, pinned: a bare `torch` requirement would pull the newest CUDA build.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
OUT    ?= out

.PHONY: venv demo test lint bench validate clean

$(STAMP): services/reward/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e 'services/reward[dev]'
	touch $@

venv: $(STAMP)

## The main job on the embedded default (no GPU, no downloaded weights).
demo: $(STAMP)
	$(BIN)/mrc demo --out $(OUT)/demo

## Lint and the whole test suite.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## The metric's Sec. 3.3 validation experiment (monotonicity table and plot).
validate: $(STAMP)
	$(BIN)/mrc validate --out $(OUT)/validate

bench: $(STAMP)
	$(BIN)/python bench/bench_metric.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
