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
# A Hugging Face dataset by name (hub id or dataset folder), instead of DATA.
DATASET    ?=
DEFAULT_CACHE := cache/fill
CACHE      ?= $(DEFAULT_CACHE)
OUT        ?= runs/fill
# The settings of each stage come from configs/$(PRESET)/{precompute,train}.toml: tiny (the
# offline demo model) without MODEL, sdxl with it. The variables below override single settings.
PRESET     ?= $(if $(MODEL),sdxl,tiny)
RESOLUTION ?=
STEPS      ?=
BATCH      ?=
LR         ?=
CKPT_EVERY ?=
RESUME     ?=
ARGS       ?=
PRECOMPUTE_ARGS ?=
# --- processes: NPROC per machine, NNODES machines (run the same command on each, NODE_RANK 0..N-1)
NPROC       ?= 1
NNODES      ?= 1
NODE_RANK   ?= 0
MASTER_ADDR ?= 127.0.0.1
PORT        ?= 29511
MASTER_PORT ?= $(PORT)
# Counts are whole numbers, said here rather than as a launcher's traceback.
$(foreach v,NPROC NNODES,$(if $(shell [ "$($(v))" -ge 1 ] 2>/dev/null && echo ok),,\
	$(error $(v)=$($(v)) is not a whole number >= 1)))
$(if $(shell [ "$(NODE_RANK)" -ge 0 ] 2>/dev/null && [ "$(NODE_RANK)" -lt "$(NNODES)" ] && echo ok),,\
	$(error NODE_RANK=$(NODE_RANK) is not one of 0 .. NNODES-1 ($(NNODES) node(s))))

# --- the offline demo assets --------------------------------------------------------------------
TINY      := cache/tiny-sdxl
FILL      := cache/fill-data
FILL_N    ?= 128

MODEL_ARG := $(if $(MODEL),$(MODEL),$(TINY))
# q: one shell word in single quotes, whatever the value holds (a ' becomes '\'').
q = '$(subst ','\'',$(1))'
# Paths are quoted in the commands: a brace pattern ('{00000..00099}.tar') reaches precompute as
# written, and a path may hold spaces.
# Both DATA and DATASET given: both are passed, and precompute refuses the pair (never one dropped).
DATA_ARG  := $(if $(DATASET),--dataset-name $(call q,$(DATASET))) \
	$(if $(DATA)$(if $(DATASET),,x),--data $(call q,$(if $(DATA),$(DATA),$(FILL))))
DEPS      := $(if $(MODEL),,$(TINY)/model_index.json) $(if $(DATA)$(DATASET),,$(FILL)/prompt.json)

# One process: plain python. Several (NPROC x NNODES): accelerate launch, through shards.launch
# (the same launch; a failed run ends in one line instead of the launcher's traceback; NCCL on
# GPUs, gloo processes on a CPU-only machine).
WORLD   = $(shell echo $$(( $(NPROC) * $(NNODES) )))
LAUNCH  = $(if $(filter 1,$(WORLD)),$(PY) -m,$(PY) -m shards.launch --multi_gpu \
	--num_processes $(WORLD) --num_machines $(NNODES) --machine_rank $(NODE_RANK) \
	--main_process_ip $(MASTER_ADDR) --main_process_port $(MASTER_PORT) -m)

PRECOMPUTE = $(LAUNCH) precompute --config configs/$(PRESET)/precompute.toml --model $(call q,$(MODEL_ARG)) \
	$(DATA_ARG) --cache $(call q,$(CACHE)) $(if $(RESOLUTION),--resolution $(RESOLUTION)) $(PRECOMPUTE_ARGS)

.PHONY: help install install-check test test-fast demo precompute train tiny fill verify bench bench-gpu gpu-wheels clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  variables: MODEL DATA DATASET CACHE OUT PRESET RESOLUTION STEPS BATCH LR CKPT_EVERY RESUME ARGS PRECOMPUTE_ARGS"
	@echo "             NPROC NNODES NODE_RANK MASTER_ADDR MASTER_PORT (or PORT) TEST_WORKERS TEST_ARGS"

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed ## create the venv and install the project with test extras

# Two pytest workers on the 2-core build machine, each taking whole test files (a file's module
# fixtures are built once), the files with `slow` tests first (tests/conftest.py orders them), so
# the multi-process cases start early and the run ends on short files. A third worker was
# measured slower: the CPU-bound cases then share the cores and each costs ~15% more CPU time.
# TEST_WORKERS=0 runs everything in one process; TEST_ARGS passes pytest options (e.g. a file,
# or -k NAME).
# A test whose subprocesses hang past its timeout (TimeoutExpired; seen rarely for two-process
# gloo runs on a loaded machine, cause still open) runs once more; pytest's summary counts it
# as "rerun" and shows the first attempt's report (for a launched multi-process run, with the
# Python stacks of every process: tests/clirun.py run_launched); any other failure fails at once.
TEST_WORKERS ?= 2
TEST_ARGS    ?=
RERUN        := --reruns 1 --only-rerun TimeoutExpired --rerun-show-tracebacks
test: install ## run the test suite (offline, CPU)
	$(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) $(RERUN) $(TEST_ARGS)

test-fast: install ## the test suite without the multi-process and make-driven cases (marked slow)
	$(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) -m "not slow" $(RERUN) \
		$(TEST_ARGS)

# A second venv with nothing but `pip install .` (torch chosen as above): the tool must run in it,
# model card and loss curve included, without any test extra.
PLAIN := /tmp/sdxl-adapter-cache-plain-venv
install-check: ## prove a plain `pip install .` runs precompute, train and validation
	rm -rf $(PLAIN) && python3 -m venv $(PLAIN)
	$(PLAIN)/bin/pip install -q --upgrade pip
	$(PLAIN)/bin/pip install -q "$(TORCH)"
	$(PLAIN)/bin/pip install -q .
	cd /tmp && rm -rf plain-check && mkdir plain-check && cd plain-check && \
	$(PLAIN)/bin/python -m precompute.tiny tiny >/dev/null && \
	$(PLAIN)/bin/python -m precompute.fill fill --n 16 --resolution 64 >/dev/null && \
	$(PLAIN)/bin/python -m precompute --model tiny --data fill --cache cache --resolution 64 --samples-per-shard 8 && \
	$(PLAIN)/bin/python -m train --model tiny --cache cache --output-dir out --max-steps 2 --batch-size 2 \
		--num-workers 0 --validation-image fill/source/0.png --validation-prompt "red circle" \
		--validation-steps 2 --num-validation-images 1 --validation-inference-steps 2 && \
	test -s out/README.md && test -s out/loss_curve.png && test -s out/diffusion_pytorch_model.safetensors && \
	ls out/validation/*.png >/dev/null && echo "install-check: plain pip install . runs precompute, train, validation"

$(TINY)/model_index.json: | install
	$(PY) -m precompute.tiny $(TINY)

$(FILL)/prompt.json: | install
	$(PY) -m precompute.fill $(FILL) --n $(FILL_N) --resolution 64

tiny: $(TINY)/model_index.json ## build the tiny offline SDXL (random weights) into cache/tiny-sdxl

fill: $(FILL)/prompt.json ## generate the synthetic fill dataset into cache/fill-data

precompute: install $(DEPS) ## encode DATA with MODEL into CACHE (defaults: tiny model, fill data)
	$(PRECOMPUTE) $(ARGS)

# train runs precompute first when CACHE has no manifest yet (so `make train DATA=... CACHE=...`
# is one command; that precompute takes PRECOMPUTE_ARGS, ARGS are train's); an existing cache is
# never re-encoded, whatever the train settings (a cache that holds no sample, every item
# skipped, is precomputed again with the settings given). A CACHE given without DATA or DATASET must exist
# (a typo would otherwise fill it with the demo data); only the default CACHE builds the demo's.
# Settings that make a cache, given to make train when CACHE is one already: said, not silently dropped.
UNUSED_NOTE = echo "make train: $(CACHE) is a cache already, so DATA, DATASET, RESOLUTION and PRECOMPUTE_ARGS \
	(which make one) are not used; a new CACHE uses them"
train: install $(if $(MODEL),,$(TINY)/model_index.json) ## train an adapter on CACHE into OUT (precomputes a missing CACHE first)
	@if why=$$($(PY) -m shards ls $(call q,$(CACHE)) 2>&1); then \
		case "$$why" in *", 0 samples, "*) \
			$(if $(DATA)$(DATASET),,echo "make train: $(CACHE) holds no samples (its precompute skipped every \
			item): give DATA=... or DATASET=... (and PRECOMPUTE_ARGS with the fixed settings) to precompute it \
			again" >&2; exit 1;) \
			echo "make train: $(CACHE) holds no samples (its precompute skipped every item): running precompute again"; \
			$(MAKE) --no-print-directory precompute ARGS= || exit $$?;; \
		*) $(if $(DATA)$(DATASET)$(RESOLUTION)$(PRECOMPUTE_ARGS),$(UNUSED_NOTE);) true;; \
		esac; \
	else case "$$why" in \
		*"no manifest.json in"*|*": no such folder"*) \
			$(if $(DATA)$(DATASET)$(filter $(DEFAULT_CACHE),$(CACHE)),,echo "make train: $(CACHE) has no manifest, and \
			neither DATA nor DATASET says what to precompute into it (a typo in CACHE?): give DATA=... or \
			DATASET=... to build it" >&2; exit 1;) \
			echo "make train: $(CACHE) has no manifest yet: running precompute first"; \
			$(MAKE) --no-print-directory precompute ARGS= || exit $$?;; \
		*) echo "$$why" >&2; \
			echo "make train: cannot read $(CACHE) (above), so precompute is not started into it" >&2; exit 1;; \
	esac; fi
	$(LAUNCH) train --config configs/$(PRESET)/train.toml --model $(call q,$(MODEL_ARG)) --cache $(call q,$(CACHE)) \
		--output-dir $(call q,$(OUT)) $(if $(STEPS),--max-steps $(STEPS)) $(if $(BATCH),--batch-size $(BATCH)) \
		$(if $(LR),--learning-rate $(LR)) $(if $(CKPT_EVERY),--checkpointing-steps $(CKPT_EVERY)) \
		$(if $(RESUME),--resume $(call q,$(RESUME))) $(ARGS)

verify: install ## re-read every shard of CACHE and check it against the manifest
	$(PY) -m shards verify $(call q,$(CACHE))

DEMO_CACHE := cache/demo
DEMO_OUT   := runs/demo
DEMO_DATA  := cache/fill-mixed
DEMO_PROMPT = $$(head -n 1 $(DEMO_DATA)/prompt.json | $(PY) -c "import json,sys; print(json.load(sys.stdin)['prompt'])")

$(DEMO_DATA)/prompt.json: | install
	$(PY) -m precompute.fill $(DEMO_DATA) --n $(FILL_N) --resolution 64 --aspect mixed

# The demo exercises aspect buckets and flipped views (mixed 64x64, 64x96, 96x64, 64x128 images),
# canny conditions, the validation loss on held-out images and the validation images' condition
# adherence (its summary ends with both).
demo: install $(TINY)/model_index.json $(DEMO_DATA)/prompt.json ## tiny model + fill data -> precompute -> train -> validation grid (offline, CPU)
	$(PY) -m precompute --config configs/demo/precompute.toml --model $(TINY) --data $(DEMO_DATA) --cache $(DEMO_CACHE)
	$(PY) -m shards stats $(DEMO_CACHE)
	rm -rf $(DEMO_OUT)
	$(PY) -m train --config configs/demo/train.toml --model $(TINY) --cache $(DEMO_CACHE) --output-dir $(DEMO_OUT) \
		--validation-image $(DEMO_DATA)/source/0.png --validation-prompt "$(DEMO_PROMPT)"
	@echo
	@echo "demo done:"
	@echo "  tiny SDXL model       $(TINY)"
	@echo "  fill dataset          $(DEMO_DATA)"
	@echo "  cache                 $(DEMO_CACHE)   (python -m shards ls $(DEMO_CACHE))"
	@echo "  adapter + model card  $(DEMO_OUT)/"
	@echo "  validation grids      $(DEMO_OUT)/validation/   (labelled: step-NNNNNN.png)"
	@echo "  loss curve            $(DEMO_OUT)/loss_curve.png"
	@$(PY) -m train summary $(DEMO_OUT)

bench: install ## precompute and train-step benchmarks on the tiny model
	$(PY) bench/precompute.py
	$(PY) bench/train_step.py --model tiny

# What bench/gpu.py needs on a GPU machine that has torch, accelerate, transformers, numpy and
# safetensors (and their requirements) but no network: found by `python bench/gpu_deps.py`, which
# runs the benchmark with only those and adds what is missing until it runs. Pinned to the versions
# installed here (the ones the tests ran with); x86_64 CPython 3.12 wheels, into .whl/ (git-ignored).
# idna is beyond that minimal set: requests (which diffusers imports) imports it unconditionally and
# the machine has it only through huggingface_hub's httpx; a 70 KB insurance.
GPU_WHEELS := diffusers pillow requests certifi charset-normalizer urllib3 importlib-metadata zipp lazy-importer \
	braceexpand idna
WHEEL_PLATFORM := --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

gpu-wheels: ## download, here, the wheels bench/gpu.sh installs on a GPU machine with no network (into .whl/)
	rm -rf .whl && mkdir -p .whl
	for p in $(GPU_WHEELS); do \
		v=$$($(PY) -c "import importlib.metadata as m; print(m.version('$$p'))") || exit 1; \
		python3 -m pip download -q --no-deps $(WHEEL_PLATFORM) -d .whl "$$p==$$v" || exit 1; \
	done
	@ls -1 .whl; du -sh .whl

# Runs on the GPU machine itself (no venv there): bench/gpu.sh installs .whl/ if the packages are
# missing and prints one table (and JSON); ARGS go to bench/gpu.py (e.g. ARGS="--batches 8").
bench-gpu: ## train step (reference vs ours, eager and compiled), precompute and loader speed on a GPU: one table
	bash bench/gpu.sh $(ARGS)

clean: ## remove caches and runs (keeps the venv)
	rm -rf cache runs
