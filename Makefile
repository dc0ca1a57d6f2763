# Two commands do everything on a fresh machine:  make figures  and  make test.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0

.PHONY: figures test lint venv tofu-mini bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin torch first: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[full,dev,notebooks]"
	touch $(STAMP)

venv: $(STAMP)

figures: $(STAMP)
	$(BIN)/npo-sim figures --out figures

# 2 pytest-xdist workers, one torch thread each (tests/conftest.py); whole files per worker, so module
# fixtures are built once. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .

# TOFU data: ../shared/tofu/data unless NPO_TOFU_DIR is set. The preset's defaults: tiny-llama 5M fine-tuned for 30
# epochs, every registered method tuned on mini-forget10's validation questions, 3 seeds on mini-forget10 and
# mini-forget50, SGD law runs (README "The tofu-mini study" has the measured wall time).
NPO_TOFU_DIR ?= $(abspath ../shared/tofu/data)
export NPO_TOFU_DIR

tofu-mini: $(STAMP)
	$(BIN)/npo-tofu study --preset mini --jobs 2 --threads 1 --out runs/tofu-mini --figures figures
	$(BIN)/npo-sim figures --out figures

bench: $(STAMP)
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
