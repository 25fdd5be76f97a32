# vtprune: `make help` lists the targets. Every target creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv demo sweep test test-slow bench bench-next publish check-gpu lint format clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

# torch first, from the CPU wheel: a plain torch requirement would pull CUDA packages.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP) ## Create .venv (torch CPU wheel, then vtprune in editable mode)

demo: $(STAMP) ## Main job: the seed pruners and the core methods on the embedded default (ARGS= extra flags)
	$(BIN)/python scripts/demo.py $(ARGS)

sweep: $(STAMP) ## Resumable sweep: pruners x budgets x benchmarks (ARGS= YAML, --out, vtprune flags)
	$(BIN)/python scripts/sweep.py $(ARGS)

test: $(STAMP) ## Run the default test suite (< 10 min on 2 cores)
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: $(STAMP) ## Run the slow checks (pytest -m slow)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

bench: $(STAMP) ## Prefill speed/memory of pruners vs none on a LLaVA-1.5-shaped model
	$(BIN)/python scripts/bench_speed.py $(ARGS)

bench-next: $(STAMP) ## The same on a LLaVA-NeXT-shaped model (2,880 visual tokens; ARGS= e.g. --layers 3)
	$(BIN)/python scripts/bench_speed.py --family llava-next $(ARGS)

publish: $(STAMP) ## Learned-pruner run -> checkpoints/<name>/ (ARGS="RUN_FOLDER NAME [--push REPO_ID]")
	$(BIN)/python scripts/publish_checkpoint.py $(ARGS)

check-gpu: $(STAMP) ## A few fit steps with the DDP and DeepSpeed presets where CUDA is present (else says so)
	$(BIN)/python scripts/check_gpu.py $(ARGS)

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .

clean: ## Remove caches and run folders (keeps .venv)
	rm -rf .cache runs lightning_logs .pytest_cache .ruff_cache
