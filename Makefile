# Precompute SDXL latents and text embeddings once, train T2I-Adapters from the cache many times.
# `make help` lists the targets. Every variable below can be set on the command line.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
# torch==2.13.0 resolves to the CPU wheel on this project's build machines and to PyPI's CUDA
# build elsewhere. Set TORCH=torch (or a CUDA index pin) to choose yourself.
TORCH   ?= torch==2.13.0

# --- what to run on ---------------------------------------------------------------------------
# MODEL empty = build the tiny offline SDXL (random weights) into $(TINY) and use it.
MODEL      ?=
DATA       ?=
CACHE      ?= cache/fill
OUT        ?= runs/fill
RESOLUTION ?= $(if $(MODEL),1024,64)
NPROC      ?= 1
PORT       ?= 29511
ARGS       ?=
# train (demo-sized for the tiny model; the reference's defaults once MODEL is set)
STEPS      ?= $(if $(MODEL),20000,40)
BATCH      ?= $(if $(MODEL),4,8)
LR         ?= $(if $(MODEL),1e-5,1e-4)
RESUME     ?=
CKPT_EVERY ?= $(if $(MODEL),500,20)

# --- the offline demo assets --------------------------------------------------------------------
TINY      := cache/tiny-sdxl
FILL      := cache/fill-data
FILL_N    ?= 128

MODEL_ARG := $(if $(MODEL),$(MODEL),$(TINY))
DATA_ARG  := $(if $(DATA),$(DATA),$(FILL))
DEPS      := $(if $(MODEL),,$(TINY)/model_index.json) $(if $(DATA),,$(FILL)/prompt.json)

# One process: plain python. Several: accelerate launch (NCCL on GPUs; gloo on a CPU-only
# machine, where accelerate needs ACCELERATE_USE_CPU to start real separate processes).
HAS_GPU = $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
LAUNCH = $(if $(filter 1,$(NPROC)),$(PY) -m,\
	$(if $(filter 1,$(HAS_GPU)),,ACCELERATE_USE_CPU=true) $(VENV)/bin/accelerate launch \
	--multi_gpu --num_processes $(NPROC) --num_machines 1 --main_process_port $(PORT) -m)

.PHONY: help install test demo precompute train tiny fill verify bench clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  variables: MODEL DATA CACHE OUT RESOLUTION NPROC PORT STEPS BATCH LR RESUME CKPT_EVERY ARGS"

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed ## create the venv and install the project with test extras

test: install ## run the test suite (offline, CPU)
	$(PY) -m pytest -q

$(TINY)/model_index.json: | install
	$(PY) -m precompute.tiny $(TINY)

$(FILL)/prompt.json: | install
	$(PY) -m precompute.fill $(FILL) --n $(FILL_N) --resolution $(RESOLUTION)

tiny: $(TINY)/model_index.json ## build the tiny offline SDXL (random weights) into cache/tiny-sdxl

fill: $(FILL)/prompt.json ## generate the synthetic fill dataset into cache/fill-data

# The fill data (no DATA) is 128 images: 16 per shard gives 8 shards, enough for train's
# NPROC x --num-workers loader streams (each needs a whole shard). ARGS can override it.
precompute: install $(DEPS) ## encode DATA with MODEL into CACHE (defaults: tiny model, fill data)
	$(LAUNCH) precompute --model $(MODEL_ARG) --data $(DATA_ARG) --cache $(CACHE) \
		--resolution $(RESOLUTION) $(if $(DATA),,--samples-per-shard 16) $(ARGS)

train: install $(if $(MODEL),,$(TINY)/model_index.json) ## train an adapter on CACHE into OUT
	$(LAUNCH) train --model $(MODEL_ARG) --cache $(CACHE) --output-dir $(OUT) \
		--max-steps $(STEPS) --batch-size $(BATCH) --learning-rate $(LR) \
		--checkpointing-steps $(CKPT_EVERY) $(if $(RESUME),--resume $(RESUME)) $(ARGS)

verify: install ## re-read every shard of CACHE and check it against the manifest
	$(PY) -m shards verify $(CACHE)

DEMO_CACHE := cache/demo
DEMO_OUT   := runs/demo
DEMO_DATA  := cache/fill-mixed
DEMO_PROMPT = $$(head -n 1 $(DEMO_DATA)/prompt.json | $(PY) -c "import json,sys; print(json.load(sys.stdin)['prompt'])")

$(DEMO_DATA)/prompt.json: | install
	$(PY) -m precompute.fill $(DEMO_DATA) --n $(FILL_N) --resolution 64 --aspect mixed

# The demo exercises aspect buckets and flipped views (mixed 64x64, 64x96, 96x64, 64x128 images).
# Tiny-model ops take microseconds: a second OpenMP thread only adds spin-waits (several times
# slower on a busy 2-core machine). An explicit OMP_NUM_THREADS in the environment wins.
demo: export OMP_NUM_THREADS ?= 1
demo: install $(TINY)/model_index.json $(DEMO_DATA)/prompt.json ## tiny model + fill data -> precompute -> train -> validation grid (offline, CPU)
	$(PY) -m precompute --model $(TINY) --data $(DEMO_DATA) --cache $(DEMO_CACHE) --resolution 64 \
		--samples-per-shard 16 --buckets sdxl --flip
	$(PY) -m shards stats $(DEMO_CACHE)
	rm -rf $(DEMO_OUT)
	$(PY) -m train --model $(TINY) --cache $(DEMO_CACHE) --output-dir $(DEMO_OUT) \
		--max-steps 40 --batch-size 8 --learning-rate 1e-3 --lr-warmup-steps 0 --num-workers 1 \
		--checkpointing-steps 20 --validation-steps 20 --num-validation-images 2 \
		--validation-inference-steps 10 --validation-image $(DEMO_DATA)/source/0.png \
		--validation-prompt "$(DEMO_PROMPT)"
	@echo
	@echo "demo done:"
	@echo "  tiny SDXL model       $(TINY)"
	@echo "  fill dataset          $(DEMO_DATA)"
	@echo "  cache                 $(DEMO_CACHE)   (python -m shards ls $(DEMO_CACHE))"
	@echo "  adapter + model card  $(DEMO_OUT)/"
	@echo "  validation grids      $(DEMO_OUT)/validation/"
	@echo "  loss curve            $(DEMO_OUT)/loss_curve.png"

bench: install ## precompute and train-step benchmarks on the tiny model
	$(PY) bench/precompute.py
	$(PY) bench/train_step.py --model tiny

clean: ## remove caches and runs (keeps the venv)
	rm -rf cache runs
