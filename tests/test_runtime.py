"""shards.runtime: how an error, a signal or a lost peer becomes one message and an exit code;
CPU threads. (Real multi-process faults are in test_processes.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from shards.runtime import (
    SMALL_MODEL_PARAMETERS,
    Terminated,
    choose_cpu_threads,
    explain,
)

KW = dict(user_errors=(ValueError,), message=str, continue_hint="re-run it")


def _raised(make):
    try:
        make()
    except BaseException as e:  # noqa: BLE001 - the point is to look at any of them
        return e
    raise AssertionError("nothing raised")


def test_errors_are_explained_by_their_cause():
    assert explain(ValueError("bad setting"), **KW) == ("bad setting", 1)
    assert explain(RuntimeError("a bug"), **KW) is None  # a bug keeps its traceback

    def lost_then_terminated():
        try:
            raise RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
        except RuntimeError:
            raise Terminated(signal.SIGTERM)

    # The launcher's SIGTERM came because a peer died: the peer is the cause named.
    msg, code = explain(_raised(lost_then_terminated), **KW)
    assert msg.startswith("lost contact with another process of this run") and "Connection reset by peer" in msg
    assert msg.endswith("Once every process can run again, re-run it.") and code == 1
    msg, code = explain(Terminated(signal.SIGHUP), **KW)
    assert msg.startswith("stopped by SIGHUP") and msg.endswith("re-run it.") and code == 128 + signal.SIGHUP
    assert explain(KeyboardInterrupt(), **KW)[1] == 130

    def user_error_while_unwinding():
        try:
            raise ValueError("not the cause")
        except ValueError:
            raise RuntimeError("DataLoader worker (pid 12) is killed by signal: Killed.")

    msg, code = explain(_raised(user_error_while_unwinding), **KW)
    assert "a data loader worker was killed" in msg and code == 1


def test_a_sigterm_unwinds_with_one_line_and_its_exit_code(tmp_path):
    script = textwrap.dedent("""
        import os, signal, sys, time
        from shards.runtime import run_command
        def work():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                open(sys.argv[1], "w").write("cleaned up")
        run_command(work, user_errors=(ValueError,), continue_hint="re-run the same command")
    """)
    marker = tmp_path / "marker"
    proc = subprocess.run([sys.executable, "-c", script, str(marker)], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 128 + signal.SIGTERM
    assert proc.stderr.strip().splitlines() == [
        "error: stopped by SIGTERM: another process of this run failed, its launcher was stopped, or the job was "
        "cancelled. Nothing partial was published; re-run the same command."]
    assert marker.read_text() == "cleaned up"  # finally blocks ran


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_threads_follow_the_model_size_unless_the_user_chose(monkeypatch, threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert choose_cpu_threads(10**9) == (1, "OMP_NUM_THREADS=1")
    monkeypatch.delenv("OMP_NUM_THREADS")
    n, why = choose_cpu_threads(SMALL_MODEL_PARAMETERS - 1)
    assert n == 1 == torch.get_num_threads() and why.startswith("a small model")
    cores = len(os.sched_getaffinity(0))
    n, why = choose_cpu_threads(10**9, local_processes=1)
    assert n == cores == torch.get_num_threads() and f"{cores} core(s) shared by 1 process(es)" in why
    n, _ = choose_cpu_threads(10**9, local_processes=cores * 4)
    assert n == 1
