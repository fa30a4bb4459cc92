# Every target bootstraps .venv first. The bootstrap installs the CPU torch wheel before anything else so that
# no dependency can pull a multi-GB CUDA build by accident; it reruns only when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bootstrapped
TORCH  ?= torch==2.13.0

DATA        ?= data/synth
CKPT_DIR    ?= checkpoints
DEMO_N      ?= 6000
SEED        ?= 0
CONNECTORS  ?= linear mlp qformer perceiver
TOWER       ?= clip
LLM         ?= llama

.PHONY: help bootstrap demo data base test lint format clean

help:
	@echo "make demo    synthetic data + tiny base checkpoints (all connectors) + token budget"
	@echo "make test    the test suite (CPU, a few minutes)"
	@echo "make lint    ruff"
	@echo "make clean   remove generated data, checkpoints and the venv"

bootstrap: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)" numpy
	@$(BIN)/python -c "import torch, shutil, sys; gpu = shutil.which('nvidia-smi'); \
	  sys.exit(0 if gpu or torch.version.cuda is None else 'a CUDA torch was installed on a machine without a GPU: set TORCH to a CPU wheel')"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

data: $(STAMP)
	$(BIN)/vlm data synth --out $(DATA) --n $(DEMO_N) --seed $(SEED)

base: $(STAMP)
	@for c in $(CONNECTORS); do \
	  $(BIN)/vlm init --tower $(TOWER) --llm $(LLM) --connector $$c --seed $(SEED) --out $(CKPT_DIR)/base-$$c || exit 1; \
	done

demo: data base
	$(BIN)/vlm tokens --tower $(TOWER) --llm $(LLM)
	$(BIN)/vlm tokens --tower clip-vit-l-14-336 --llm llama-7b

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check vlm tests
	$(BIN)/ruff format --check vlm tests

format: $(STAMP)
	$(BIN)/ruff format vlm tests
	$(BIN)/ruff check --fix vlm tests

clean:
	rm -rf $(DATA) $(CKPT_DIR) $(VENV)
