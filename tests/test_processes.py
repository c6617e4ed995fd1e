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
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clirun import children, run_cli, run_launched
from ports import free_port

pytestmark = pytest.mark.slow  # several processes each: the longest cases (make test runs them)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(fill_cache) -> Path:
    return fill_cache


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(tiny_model, cache, out: Path, log: Path, launcher: str = "accelerate.commands.launch") -> subprocess.Popen:
    """A 2-process training that runs until stopped, started by `python -m launcher`: accelerate
    launch itself, or shards.launch (what `make train NPROC=2` uses)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", launcher, "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()),
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
            ranks = children(launcher.pid)
            assert len(ranks) == 2, ranks
            return ranks
        time.sleep(0.2)
    raise AssertionError("training did not start in time")


def _rank_lines(text: str, rank: int) -> list[str]:
    """Rank `rank`'s error lines (one may follow a progress bar's last, unterminated update)."""
    tag = f"error: [rank {rank}] "
    return [line[line.index(tag):] for line in text.splitlines() if tag in line]


def _no_crash(text: str) -> None:
    assert "SIGABRT" not in text and "Aborted" not in text and "Fatal Python error" not in text
    assert "core dumped" not in text
    # Tracebacks are the launcher's business (torch.distributed.elastic prints its own summary);
    # our ranks print one line each.
    assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text


def test_a_killed_rank_ends_the_other_with_a_clear_error(tiny_model, cache, tmp_path):
    """Started as `make train NPROC=2` starts it (shards.launch): the survivor's line, then the
    launch's one line naming the rank that failed first, and no launcher traceback."""
    out, log = tmp_path / "out", tmp_path / "log.txt"
    launcher = _start(tiny_model, cache, out, log, launcher="shards.launch")
    try:
        ranks = _ranks_training(launcher, out)
        os.kill(ranks[1], signal.SIGKILL)
        assert launcher.wait(timeout=120) == 128 + signal.SIGKILL  # the first failure's status, as a shell says it
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for r in children(launcher.pid):
            os.kill(r, signal.SIGKILL)
    text = log.read_text()
    _no_crash(text)
    survivor = _rank_lines(text, 0)
    assert len(survivor) == 1, text[-3000:]
    assert ("lost contact with another process of this run" in survivor[0]
            or "stopped by SIGTERM" in survivor[0]), survivor
    assert "--resume latest" in survivor[0]
    assert not _alive(ranks[0]) and not _alive(ranks[1])
    assert ("error: the run stopped: rank 1 was killed by SIGKILL (often the kernel's out-of-memory killer: see "
            "`dmesg`), the first to fail (a process killed so leaves no message of its own); the other ranks ended "
            "with it") in text, text[-3000:]
    assert "Traceback" not in text and "ChildFailedError" not in text and "closing signal" not in text


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
    # Each rank ends with one line: stopped by the parent-death SIGTERM, or, when the other rank
    # went first and closed their connection, the lost peer (which of the two is a race).
    # A rank blocked in a collective when the signal came is ended by its watchdog, with a line that
    # says so and how to continue.
    for r in (0, 1):
        lines = _rank_lines(text, r)
        assert len(lines) == 1, text[-3000:]
        assert ("stopped by SIGTERM" in lines[0] or "lost contact with another process" in lines[0]), lines
    assert "stopped by SIGTERM" in text, text[-3000:]  # at least one rank learned it from the signal itself


def _rank_of(pid: int) -> int:
    """The RANK a launcher gave process `pid` (from its environment, /proc on Linux)."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in env if v.startswith(b"RANK=")).split(b"=", 1)[1])


def _precompute(tiny_model, data: Path, cache: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()),
         "-m", "precompute", "--model", str(tiny_model), "--data", str(data), "--cache", str(cache),
         "--resolution", "64", "--samples-per-shard", "1", "--num-workers", "0", "--device", "cpu"],
        cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )


def test_a_killed_precompute_rank_ends_the_other_and_a_rerun_completes_the_cache(tiny_model, tmp_path):
    from precompute.fill import make_fill_dataset
    from shards.manifest import Manifest
    from shards.stores import open_store

    # 64 one-item shards, 32 per rank: the run is still encoding when the first record appears.
    data = make_fill_dataset(tmp_path / "fill", n=64, resolution=64, seed=3)
    cache, log = tmp_path / "cache", tmp_path / "log.txt"
    launcher = _precompute(tiny_model, data, cache, log)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not list((cache / "records").glob("*.json")) if (cache / "records").is_dir() else True:
            assert launcher.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "precompute wrote no record in time"
            time.sleep(0.05)
        ranks = children(launcher.pid)
        assert len(ranks) == 2, ranks
        victim = next(r for r in ranks if _rank_of(r) == 1)
        os.kill(victim, signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0
        deadline = time.monotonic() + 60
        while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for r in ranks:  # never leave orphans behind, whatever failed
            if _alive(r):
                os.kill(r, signal.SIGKILL)
    assert not any(_alive(r) for r in ranks), "a rank kept running after the other was killed"
    text = log.read_text()
    _no_crash(text)
    # The one traceback is the launcher's own summary (ChildFailedError); the ranks print none.
    assert text.count("Traceback (most recent call last)") == text.count("errors.ChildFailedError") == 1, text[-3000:]
    survivor = _rank_lines(text, 0)
    assert len(survivor) == 1, text[-3000:]
    assert ("lost contact with another process of this run" in survivor[0]
            or "stopped by SIGTERM" in survivor[0]), survivor
    assert "re-run the same command" in survivor[0]
    assert not (cache / "manifest.json").exists()  # not called complete
    done_before = len(list((cache / "records").glob("*.json")))
    assert 1 <= done_before < 64

    rerun_log = tmp_path / "rerun.txt"
    rerun = _precompute(tiny_model, data, cache, rerun_log)
    assert rerun.wait(timeout=600) == 0, rerun_log.read_text()[-3000:]
    assert f"64 shard(s) planned from {data}, {done_before} already complete, {64 - done_before} to encode" \
        in rerun_log.read_text()
    manifest = Manifest.load(open_store(cache))
    assert manifest.num_samples == 64 and len(manifest.shards) == 64
    verify = run_cli("shards", ["verify", cache], timeout=300)
    assert verify.returncode == 0 and verify.stdout.startswith("OK: 64 shards, 64 samples"), verify.stderr


def test_the_launch_summary_names_the_first_failure():
    """shards.launch's one line, from torch elastic's own failure record."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from shards.launch import failure_line, how_it_ended

    def failure(rank: int, code: int, at: float) -> ProcessFailure:
        f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="<N/A>")
        f.timestamp = at
        return f

    assert how_it_ended(2) == ("exited with status 2", 2)
    assert how_it_ended(-signal.SIGTERM) == ("was killed by SIGTERM", 143)
    error = ChildFailedError("train", {0: failure(0, -signal.SIGTERM, 20), 1: failure(1, 1, 10)})
    assert failure_line(error) == ("error: the run stopped: rank 1 exited with status 1, the first to fail (its "
                                   "message is above); the other ranks ended with it", 1)
    assert failure_line(ChildFailedError("train", {0: failure(0, 3, 1)}))[0].endswith("(its message is above)")
    assert failure_line(ChildFailedError("train", {0: failure(0, -signal.SIGKILL, 1)})) == (
        "error: the run stopped: rank 0 was killed by SIGKILL (often the kernel's out-of-memory killer: see `dmesg`), "
        "the first to fail (a process killed so leaves no message of its own)", 137)
    assert failure_line(RuntimeError("rendezvous\n  timed out")) == (
        "error: accelerate launch failed: rendezvous timed out", 1)


def test_the_launch_asks_for_cpu_processes_only_where_there_is_no_gpu(monkeypatch):
    """`make NPROC=2` on a CPU-only machine: shards.launch sets ACCELERATE_USE_CPU (accelerate
    starts separate gloo processes only then); a value the user set is kept, and a machine with
    CUDA gets none."""
    import accelerate.commands.launch as accelerate_launch
    import torch

    from shards.launch import main

    seen: list[str | None] = []
    monkeypatch.setattr(accelerate_launch, "launch_command", lambda args: seen.append(os.environ.get("ACCELERATE_USE_CPU")))
    argv = ["--multi_gpu", "--num_processes", "2", "-m", "train"]
    for cuda, preset in ((False, None), (False, "false"), (True, None)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        if preset is None:
            monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
        else:
            monkeypatch.setenv("ACCELERATE_USE_CPU", preset)
        assert main(argv) == 0
    assert seen == ["true", "false", None]


def test_make_with_several_processes_refuses_in_one_line_per_rank(tiny_model, cache, tmp_path):
    """A refusal under `make train NPROC=2`: each rank's message and the launch's line; no
    launcher traceback, no notice about accelerate's defaults."""
    p = run_launched(["make", "-C", str(REPO), "-o", "install", "--no-print-directory", "train", f"VENV={sys.prefix}",
                      "NPROC=2", f"MODEL={tiny_model}", f"CACHE={cache}", f"OUT={tmp_path / 'out'}",
                      f"MASTER_PORT={free_port()}", "ARGS=--max-steps 2 --learning-rate -1"],
                     env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode != 0
    text = p.stdout + p.stderr
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert sorted(errors) == [
        "error: [rank 0] invalid training config: --learning-rate must be > 0, got -1.0",
        "error: [rank 1] invalid training config: --learning-rate must be > 0, got -1.0",
        errors[-1] if errors[-1].startswith("error: the run stopped: rank ") else "(no summary line)",
    ], text
    assert "exited with status 1, the first to fail (its message is above)" in errors[-1]
    assert "Traceback" not in text and "were not passed to `accelerate launch`" not in text, text
    assert not (tmp_path / "out").exists()
