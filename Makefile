# Everything runs from the virtual environment in .venv/ (created on first use).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch first, pinned: a bare `torch` requirement would pull the newest CUDA build.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
OUT    ?= out

.PHONY: venv demo test test-fast lint bench validate clean up down

$(STAMP): services/reward/pyproject.toml services/trainer/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e 'services/reward[dev,triton]' -e services/trainer
	touch $@

venv: $(STAMP)

## The main job on the embedded default (no GPU, no downloaded weights).
demo: $(STAMP)
	$(BIN)/mrc demo --out $(OUT)/demo
	$(BIN)/carve3d-train demo --out $(OUT)/rl-demo

## Lint and the whole test suite.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

## The quick loop while developing: lint and every test not marked slow (under 2 minutes on 2 cores).
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -m "not slow"

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

## The reward service on 127.0.0.1 without Docker (MRC_PORT, default 8080; logs and pidfiles in $(OUT)/local):
## starts it, waits for /readyz, scores an example grid, checks the metrics scrape, starts the trainer if
## installed. `make down` stops all of it. See docs/deploy.md.
up: $(STAMP)
	LOCAL_DIR=$(OUT)/local VENV_BIN=$(abspath $(BIN)) bash deploy/local/up.sh

down:
	LOCAL_DIR=$(OUT)/local VENV_BIN=$(abspath $(BIN)) bash deploy/local/down.sh
