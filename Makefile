# The two commands of the Quickstart: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
PYTEST_ARGS ?=

.PHONY: serve test test-fast lint fmt typecheck bench bench-train bench-serve bench-profile bench-peers bench-decode bench-overload bench-attack-memory bench-fine-tune bench-recipe bench-feedback bench-calibration bench-export bench-memory clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps re-run the install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

serve: $(VENV)/.installed   ## start the service (ALEXNET_HOST / ALEXNET_PORT honoured)
	$(BIN)/alexnet serve

test: $(VENV)/.installed-dev   ## the whole suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.installed-dev   ## everything but slow and e2e tests
	$(BIN)/python -m pytest -m "not slow and not e2e and not docker" $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

fmt: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench-decode: $(VENV)/.installed-dev
	$(BIN)/python bench/decode.py

bench-precision: $(VENV)/.installed-dev
	$(BIN)/python bench/precision.py

bench-calibration: $(VENV)/.installed-dev   ## ECE and NLL before/after temperature scaling
	$(BIN)/python bench/calibration.py

bench-export: $(VENV)/.installed-dev   ## ONNX and .pt2 export time, size, check; runtimes side by side
	$(BIN)/python bench/export.py

bench-train: $(VENV)/.installed-dev
	$(BIN)/python bench/train.py

bench-serve: $(VENV)/.installed-dev
	$(BIN)/python bench/serve.py

bench-profile: $(VENV)/.installed-dev   ## CPU ms per image by stage under wrk -c32 (needs wrk, py-spy with ptrace)
	$(BIN)/python bench/cpu_profile.py

bench-peers: $(VENV)/.installed-dev   ## ours vs LitServe vs batch-1 fp32 at c1 and c32 (needs wrk, LitServe: see bench/peers.py)
	$(BIN)/python bench/peers.py

bench-memory: $(VENV)/.installed-dev   ## server RSS after warm-up and over repeated c32 runs, fp32 and int8 (needs wrk)
	$(BIN)/python bench/memory.py

bench-overload: $(VENV)/.installed-dev   ## 2 minutes at twice the measured capacity
	$(BIN)/python bench/overload.py

bench-attack-memory: $(VENV)/.installed-dev   ## RSS before, at peak and 60 s after a hostile run
	$(BIN)/python bench/attack_memory.py

bench-fine-tune: $(VENV)/.installed-dev   ## scratch vs fine-tuning with each freeze mode, ~6 min on 2 cores
	$(BIN)/python bench/fine_tune.py

bench-recipe: $(VENV)/.installed-dev   ## the training recipe options (warmup, label smoothing, clipping, EMA) against the plain run
	$(BIN)/python bench/recipe.py

bench-feedback: $(VENV)/.installed-dev   ## c1 and c32 with feedback off and on, ~5 min (needs wrk)
	$(BIN)/python bench/feedback.py

bench: bench-decode bench-precision bench-train bench-serve bench-overload bench-attack-memory bench-fine-tune bench-feedback

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
