# Fresh machine: `make demo` (set up + main job) and `make test` (set up + tests).
# Everything installs into $(VENV) from requirements/ci.txt (torch pinned to the CPU build).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.megalora-installed
NPROC ?= 2
CONFIG ?= launch/configs/umm_tiny.yaml

.PHONY: setup demo demo-gpt test test-fast lint emojicap gpu-wheels gpu-check clean

$(STAMP): requirements/ci.txt setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements/ci.txt
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .  # builds megalora._C from csrc/
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/torchrun --nproc_per_node=$(NPROC) -m megalora train --config $(CONFIG) train.resume=false

demo-gpt: $(STAMP)
	$(BIN)/torchrun --nproc_per_node=$(NPROC) launch/examples/gpt_plugin.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The inner loop: everything not marked slow (pytest.ini), a few minutes on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# ruff, configured in ruff.toml (checks only; nothing is reformatted).
lint: $(STAMP)
	$(BIN)/ruff check .

# EmojiCap, real image-text data from three Debian packages (docs/emojicap.md): data/emojicap
emojicap: $(STAMP)
	$(BIN)/megalora emojicap --out data/emojicap

# The GPU check (docs/gpu-check.md). gpu-wheels, here (PyPI reachable): the cp312 wheels the GPU
# image lacks (launch/gpu_wheels.txt) into .whl/ (git-ignored; carry it to the GPU machine).
gpu-wheels: $(STAMP)
	$(BIN)/python -m megalora.bench.wheels .whl

# On the GPU machine, from its bare image: make gpu-check OUT=folder. DRY=1: the CPU dry run
# (CI): the wheel list resolves, every step is wired, the summary says which need a GPU.
OUT ?= out/gpu-check
ifeq ($(DRY),1)
gpu-check: $(STAMP)
	DRY=1 PYTHON=$(BIN)/python bash launch/gpu_check.sh $(OUT)
else
gpu-check:
	bash launch/gpu_check.sh $(OUT)
endif

clean:
	rm -rf $(VENV) out .pytest_cache
