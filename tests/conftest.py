"""Session fixtures every test file shares: a tiny SDXL and a small fill dataset, built once per
test run (shared by the pytest-xdist workers).

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


def _built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:
    """`build(folder)` run once for the whole test run, whatever the number of pytest-xdist
    workers: the first worker to ask builds it under a file lock in the run's shared temp root,
    the others wait for it and reuse it. Returns the folder (read-only for every test)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp is a folder of the run's
        root = root.parent
    folder, done = root / "shared" / name, root / "shared" / f"{name}.done"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / "shared" / f"{name}.lock")):
        if not done.is_file():
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SDXL folder (diffusers format), seed 0. Treat it as read-only."""
    from precompute.tiny import build_tiny_sdxl

    return _built_once(tmp_path_factory, "tiny-sdxl", lambda folder: build_tiny_sdxl(folder, seed=0))


@pytest.fixture(scope="session")
def fill_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fill50k-layout dataset of 16 items at 64 px, seed 0. Treat it as read-only."""
    from precompute.fill import make_fill_dataset

    return _built_once(tmp_path_factory, "fill",
                       lambda folder: make_fill_dataset(folder, n=FILL_N, resolution=FILL_RESOLUTION, seed=0))


@pytest.fixture(scope="session")
def fill_cache(tiny_model, fill_data, tmp_path_factory) -> Path:
    """`fill_data` encoded by the real precompute CLI with the tiny model: 16 samples at 64 px in
    4 shards of 4, one process. Treat it as read-only."""
    from clirun import run_cli

    def build(out: Path) -> None:
        result = run_cli("precompute", ["--model", tiny_model, "--data", fill_data, "--cache", out, "--resolution",
                                        "64", "--samples-per-shard", "4", "--num-workers", "0", "--device", "cpu"])
        assert result.returncode == 0, result.stderr[-3000:]

    return _built_once(tmp_path_factory, "fill-cache", build)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The order `make test` hands whole files to its workers (--dist loadfile): the files with
    `slow` tests first, the most slow tests first, each followed by a file of S3 tests (which
    mostly wait on their server, so that the wait overlaps another file's CPU work instead of
    ending the run), then the rest; each file's tests in their own order. The multi-process
    cases start early, a file's module fixtures are built once, and the run ends on short files."""
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    slow = {f: sum(bool(i.get_closest_marker("slow")) for i in tests) for f, tests in files.items()}
    # s3server.bucket_fixtures: an autouse fixture of every S3 test module
    waiting = [f for f, tests in files.items() if any("aws_env" in i.fixturenames for i in tests)]
    heavy = sorted((f for f in files if slow[f] and f not in waiting), key=lambda f: -slow[f])
    order: list[str] = []
    for k in range(max(len(heavy), len(waiting))):
        order += heavy[k:k + 1] + waiting[k:k + 1]
    order += [f for f in files if f not in order]
    items[:] = [item for f in order for item in files[f]]
