#!/usr/bin/env bash
# One command on a GPU machine with no network: the issue's table (train step, precompute, loader).
#
#   bench/gpu.sh                         # SDXL base 1.0 size, 1024 px, bf16, batch 8 and 16 (under 8 min on an H100)
#   bench/gpu.sh --device cpu --model mid --resolution 128 --batches 2 --steps 2 --warmup 1   # the same code on a CPU
#
# The machine needs torch, accelerate, transformers, numpy and safetensors; what else bench/gpu.py
# imports comes from .whl/ (`make gpu-wheels`, run where there is network), installed with
# --no-deps into $GPU_BENCH_SITE (default /tmp/site) and put on PYTHONPATH, unless the packages
# import already. Arguments go to bench/gpu.py (--help lists them). The JSON goes to
# $GPU_BENCH_JSON (default bench/gpu-results.json). PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${GPU_BENCH_SITE:-/tmp/site}
started=$(date +%s)

if ! "$PY" -c "import diffusers, PIL, braceexpand" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "bench/gpu.sh: diffusers, Pillow or braceexpand is missing and there is no .whl/: run 'make gpu-wheels'" \
             "where there is network and bring .whl/ along" >&2
        exit 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "bench/gpu.sh: installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE in $(( $(date +%s) - started )) s"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Nothing may reach a hub: every model is built from configs, every tokenizer generated locally.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false
exec "$PY" bench/gpu.py "$@"
