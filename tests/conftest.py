"""Session fixtures every test file shares: a tiny SDXL and a small fill dataset, built once.

Both are built offline from the project's own generators (`precompute.tiny`, `precompute.fill`),
so the suite needs no network and no model download.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the suite may reach a hub: make every HF library fail fast instead of trying.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# One intra-op thread (before torch is first imported; an explicit setting wins). Tiny-model ops
# last microseconds, so a second thread buys nothing, while on a shared, oversubscribed box its
# OpenMP spin-waits stall every op: measured here, 2 denoising steps at 64 px took 11 s with the
# default 2 threads under load and 0.15 s with 1. Subprocesses (NPROC=2 tests) inherit it.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

FILL_N = 16
FILL_RESOLUTION = 64


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SDXL folder (diffusers format), seed 0. Treat it as read-only."""
    from precompute.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def fill_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fill50k-layout dataset of 16 items at 64 px, seed 0. Treat it as read-only."""
    from precompute.fill import make_fill_dataset

    return make_fill_dataset(
        tmp_path_factory.mktemp("fill") / "fill", n=FILL_N, resolution=FILL_RESOLUTION, seed=0
    )


@pytest.fixture(scope="session")
def fill_cache(tiny_model, fill_data, tmp_path_factory) -> Path:
    """`fill_data` encoded by the real precompute CLI with the tiny model: 16 samples at 64 px in
    4 shards of 4, one process. Treat it as read-only."""
    from clirun import run_cli

    out = tmp_path_factory.mktemp("fill-cache") / "cache"
    result = run_cli("precompute", ["--model", tiny_model, "--data", fill_data, "--cache", out, "--resolution", "64",
                                    "--samples-per-shard", "4", "--num-workers", "0", "--device", "cpu"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out
