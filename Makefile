# Fresh machine: `make demo` (set up + main job) and `make test` (set up + tests).
# Everything installs into $(VENV) from requirements/ci.txt (torch pinned to the CPU build).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.megalora-installed
NPROC ?= 2
CONFIG ?= launch/configs/umm_tiny.yaml

.PHONY: setup demo demo-gpt test clean

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

clean:
	rm -rf $(VENV) out .pytest_cache
