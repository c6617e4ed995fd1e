"""Multi-process runs under faults: a rank killed mid-run, the launcher killed mid-run.

Real `accelerate launch` runs of 2 gloo processes on the CPU, faults injected with SIGKILL from
outside, as an out-of-memory killer or a cluster scheduler would. What must hold: every process
ends (no orphan keeps training or writing checkpoints), each says why in one line naming its
rank, nothing aborts (SIGABRT) or dumps a Python traceback of ours, and the run's checkpoints stay
complete.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(fill_cache) -> Path:
    return fill_cache


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return sorted(out)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(tiny_model, cache, out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(_free_port()),
         "-m", "train", "--model", str(tiny_model), "--cache", str(cache), "--output-dir", str(out),
         "--max-steps", "100000", "--batch-size", "2", "--num-workers", "1", "--checkpointing-steps", "5",
         "--log-every", "1"],
        cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )


def _ranks_training(launcher: subprocess.Popen, out: Path, timeout: float = 240.0) -> list[int]:
    """The two rank pids, once the run has taken a few steps past its first checkpoint (step 5)."""
    metrics = out / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert launcher.poll() is None, "the launcher ended before training started"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 7:
            ranks = _children(launcher.pid)
            assert len(ranks) == 2, ranks
            return ranks
        time.sleep(0.2)
    raise AssertionError("training did not start in time")


def _no_crash(text: str) -> None:
    assert "SIGABRT" not in text and "Aborted" not in text and "Fatal Python error" not in text
    assert "core dumped" not in text
    # Tracebacks are the launcher's business (torch.distributed.elastic prints its own summary);
    # our ranks print one line each.
    assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text


def test_a_killed_rank_ends_the_other_with_a_clear_error(tiny_model, cache, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log.txt"
    launcher = _start(tiny_model, cache, out, log)
    try:
        ranks = _ranks_training(launcher, out)
        os.kill(ranks[1], signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for r in _children(launcher.pid):
            os.kill(r, signal.SIGKILL)
    text = log.read_text()
    _no_crash(text)
    survivor = [line for line in text.splitlines() if line.startswith("error: [rank 0] ")]
    assert len(survivor) == 1, text[-3000:]
    assert ("lost contact with another process of this run" in survivor[0]
            or "stopped by SIGTERM" in survivor[0]), survivor
    assert "--resume latest" in survivor[0]
    assert not _alive(ranks[0]) and not _alive(ranks[1])


def test_killing_the_launcher_stops_every_rank(tiny_model, cache, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log.txt"
    launcher = _start(tiny_model, cache, out, log)
    ranks: list[int] = []
    try:
        ranks = _ranks_training(launcher, out)
        launcher.kill()  # SIGKILL: the launcher cannot pass anything on to its ranks
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 60
        while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(r) for r in ranks), "ranks kept running after their launcher died"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for r in ranks:  # never leave orphans behind, whatever failed
            if _alive(r):
                os.kill(r, signal.SIGKILL)
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() else []
    time.sleep(2)
    after = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() else []
    assert after == checkpoints  # nobody is writing any more
    published = [c for c in after if c.startswith("step-")]
    assert published and all((out / "checkpoints" / c / "COMPLETE").is_file() for c in published)
    text = log.read_text()
    _no_crash(text)
    for r in (0, 1):
        assert f"error: [rank {r}] stopped by SIGTERM" in text, text[-3000:]
