"""One writer per output: a second training into one OUT, or a second precompute into one cache,
fails at start naming the holder, and touches nothing of the first; a dead holder's lock is free.

Real processes: the first writer is a real `python -m train` / `python -m precompute`, frozen
with SIGSTOP once it holds its lock (so the test does not race its speed), the second one runs
meanwhile; then the first is let go and must finish as if nothing happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards.lock import LockError, WriterLock
from shards.manifest import Manifest
from shards.stores import open_store
from clirun import run_cli

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _wait_for_holder(lock: Path, pid: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else "ended"
        try:
            if json.loads(lock.read_text()).get("pid") == pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{lock} never named pid {pid}")


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root`, hidden ones included (staging, lock), with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_second_training_into_one_output_folder_is_refused(tiny_model, fill_cache, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "train", "--model", str(tiny_model), "--cache", str(fill_cache), "--output-dir",
            str(out), "--batch-size", "2", "--num-workers", "0", "--checkpointing-steps", "2"]
    first = subprocess.Popen([*args, "--max-steps", "6"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_holder(out / ".lock", first.pid, first)
        os.kill(first.pid, signal.SIGSTOP)
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        second = run_cli("train", [*args[3:], "--max-steps", "3", "--resume", "none"], env=ENV, timeout=300)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"the output folder {out} is in use by pid {first.pid} on " in second.stderr
        assert "python -m train" in second.stderr or "__main__.py" in second.stderr or "train" in second.stderr
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # it touched nothing
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stdout.read()[-3000:]
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 6  # the first run's, intact
    assert (out / ".lock").read_text() == ""  # released cleanly


@pytest.mark.slow
def test_a_second_precompute_into_one_cache_is_refused_and_the_first_finishes(tiny_model, fill_data, tmp_path):
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "precompute", "--model", str(tiny_model), "--data", str(fill_data), "--cache",
            str(cache), "--resolution", "64", "--samples-per-shard", "2", "--num-workers", "0", "--device", "cpu"]
    first = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_holder(cache / ".staging" / ".lock", first.pid, first)
        os.kill(first.pid, signal.SIGSTOP)
        before = _files(cache)  # the first writer is frozen: only the second could change anything
        assert ".staging/.lock" in before
        second = run_cli("precompute", args[3:], env=ENV, timeout=300)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"the cache {cache} is in use by pid {first.pid} on " in second.stderr
        assert _files(cache) == before  # refused at start: not a byte of the cache or its staging touched
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stdout.read()[-3000:]
    manifest = Manifest.load(open_store(cache))  # complete: nothing of it was cleaned away
    assert manifest.num_samples == 16 and len(manifest.shards) == 8
    verify = run_cli("shards", ["verify", cache], timeout=300)
    assert verify.returncode == 0, verify.stderr


def test_a_dead_holders_lock_is_free_and_said_so(tmp_path):
    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from shards.lock import WriterLock; "
        "WriterLock(sys.argv[1], 'x').acquire(); print('held', flush=True); time.sleep(60)"), str(lock), str(REPO)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockError, match=rf"x is in use by pid {holder.pid} on "):
        WriterLock(lock, "x").acquire()
    holder.kill()  # SIGKILL: no chance to release
    holder.wait()
    taken = WriterLock(lock, "x").acquire()
    assert taken.describe_previous().startswith(f"x: the previous writer (pid {holder.pid} on ")
    taken.release()
    again = WriterLock(lock, "x").acquire()
    assert again.describe_previous() is None  # a clean release leaves no predecessor behind
    again.release()


@pytest.mark.parametrize("start", ["fork", "torch-dataloader"])
def test_a_killed_holders_forked_children_do_not_keep_its_lock(tmp_path, start):
    """A training killed with SIGKILL leaves its DataLoader workers alive for seconds; they were
    forked while the lock was held and must not hold it, or an immediate restart is refused."""
    lock = tmp_path / ".lock"
    child = ("import os, time\nif os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\n" if start == "fork" else
             "import torch.utils.data as d, time\n"
             "class S(d.Dataset):\n    def __len__(self): return 2\n"
             "    def __getitem__(self, i): time.sleep(60); return i\n"
             "it = iter(d.DataLoader(S(), num_workers=1, multiprocessing_context='fork'))\n"
             "time.sleep(1.0)\n")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys\nsys.path.insert(0, sys.argv[2])\nfrom shards.lock import WriterLock\n"
        "lock = WriterLock(sys.argv[1], 'x').acquire()\n" + child + "print('held', flush=True)\n"
        "import time\ntime.sleep(60)\n"), str(lock), str(REPO)], stdout=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()  # the parent only: its forked child lives on
        holder.wait()
        children = subprocess.run(["pgrep", "-s", str(holder.pid)], capture_output=True, text=True).stdout.split()
        assert children, "the forked child should still be alive for this test to mean anything"
        taken = WriterLock(lock, "x").acquire()  # at once, while the child still runs
        assert taken.describe_previous().startswith(f"x: the previous writer (pid {holder.pid} on ")
        taken.release()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


def test_a_lock_still_held_after_its_holder_exited_says_so(tmp_path):
    """Processes the holder started without the fork hook (here: a duplicated descriptor handed
    to a child) can keep the lock after it exited: the message says so instead of naming a dead
    process as the writer."""
    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\nsys.path.insert(0, sys.argv[2])\nfrom shards.lock import WriterLock\n"
        "lock = WriterLock(sys.argv[1], 'x').acquire()\nfd = os.dup(lock._fd)\n"
        "subprocess.Popen(['sleep', '60'], pass_fds=[fd], start_new_session=False)\n"
        "print('held', flush=True)\ntime.sleep(60)\n"), str(lock), str(REPO)], stdout=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()
        holder.wait()
        with pytest.raises(LockError, match=rf"x is still locked by processes of pid {holder.pid} on .*, which has "
                                            "exited: .* Retry shortly"):
            WriterLock(lock, "x").acquire()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


def test_the_holder_record_never_carries_a_token(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train", "--hub-token", "hf_SECRET", "--hub_token=hf_OTHER",
                                      "--cache", "https://h/c?sig=s3cr3t"])
    with WriterLock(tmp_path / ".lock", "x"):
        text = (tmp_path / ".lock").read_text()
    assert "hf_SECRET" not in text and "hf_OTHER" not in text and "s3cr3t" not in text
    assert "--hub-token REDACTED" in text and "sig=REDACTED" in text


def test_a_lock_file_that_is_a_link_fifo_or_folder_is_refused_and_nothing_is_written_through_it(tmp_path):
    """The holder record is written into the lock file and cleared on release: a symlink planted
    as the lock (in a shared cache or OUT) would have its target emptied."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "a").mkdir()
    os.symlink(victim, tmp_path / "a" / ".lock")
    with pytest.raises(LockError, match=rf"cannot lock x: its lock file {tmp_path}/a/.lock is a symbolic link"):
        WriterLock(tmp_path / "a" / ".lock", "x").acquire()
    assert victim.read_text() == "precious"
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.lock")
    with pytest.raises(LockError, match="is a symbolic link"):
        WriterLock(tmp_path / "dangling.lock", "x").acquire()
    assert not (tmp_path / "nowhere").exists()  # not created through the link either
    os.mkfifo(tmp_path / "fifo.lock")
    with pytest.raises(LockError, match=rf"its lock file {tmp_path}/fifo.lock is not a regular file"):
        WriterLock(tmp_path / "fifo.lock", "x").acquire()
    (tmp_path / "dir.lock").mkdir()
    with pytest.raises(LockError, match=rf"cannot open its lock file {tmp_path}/dir.lock \(Is a directory\)"):
        WriterLock(tmp_path / "dir.lock", "x").acquire()


@pytest.mark.parametrize("record", [
    {"pid": 999999999, "host": "elsewhere", "since": 1e300},
    {"pid": "x", "host": ["a"], "since": "yesterday", "command": "\x1b[2Jrm -rf"},
    {"pid": 1, "since": float("nan")},
])
def test_a_strangers_holder_record_is_shown_as_text_whatever_it_holds(tmp_path, record):
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps(record))
    with WriterLock(lock, "x") as taken:  # free: the record's writer is gone
        line = taken.describe_previous()
    assert line.startswith("x: the previous writer (pid ") and "\x1b" not in line
    holder = subprocess.Popen(  # now held: the second writer's message quotes the same record
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(60)", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        lock.write_text(json.dumps(record))
        with pytest.raises(LockError, match=r"x is in use by pid .* only one writer at a time"):
            WriterLock(lock, "x").acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_staging_folder_planted_as_a_link_is_refused_and_not_cleaned(tmp_path):
    """On a shared machine anyone may create /tmp/shards-staging/<digest>: precompute and gc
    refuse a link there instead of cleaning (deleting .tmp- files) where it points."""
    from shards.errors import ShardError

    store = open_store("s3://bucket/cache")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / ".tmp-keep").write_text("mine")
    staging = store.staging_dir(tmp_dir=tmp_path / "shared")
    staging.parent.mkdir(parents=True)
    os.symlink(victim, staging)
    with pytest.raises(ShardError, match=rf"the staging folder {staging} is a symbolic link"):
        store.prepare_staging(tmp_dir=tmp_path / "shared")
    with pytest.raises(ShardError, match="is a symbolic link"):
        store.cleanup_staging(tmp_dir=tmp_path / "shared")
    assert (victim / ".tmp-keep").read_text() == "mine"
