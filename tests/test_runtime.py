"""shards.runtime: how an error, a signal or a lost peer becomes one message and an exit code;
CPU threads. (Real multi-process faults are in test_processes.py.)"""

from __future__ import annotations

import os
import re
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


# --- whose OMP_NUM_THREADS: the user's, or a launcher's default ----------------------------------

ACCEL = ("/venv/bin/python3", "/venv/bin/accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m", "train",
         "--cache", "c")


def _parent(argv, **environ):
    from shards.launcher import Parent

    return Parent(argv=tuple(argv), environ={"PATH": "/usr/bin", **environ})


def test_launchers_are_recognised_from_their_command_lines():
    from shards.launcher import ACCELERATE, TORCHRUN

    for argv, want in [
        (ACCEL, ACCELERATE),
        (("/usr/bin/python", "-m", "accelerate.commands.launch", "--cpu", "x.py"), ACCELERATE),
        (("/venv/bin/python", "/venv/bin/accelerate-launch", "x.py"), ACCELERATE),
        (("/venv/bin/python", "/venv/bin/torchrun", "--nproc_per_node", "2", "x.py"), TORCHRUN),
        (("python", "-m", "torch.distributed.run", "x.py"), TORCHRUN),
        (("/bin/bash", "-c", "accelerate launch x.py"), None),
        (("make", "train"), None),
        (("python", "-m", "pytest", "-q"), None),
        (("/venv/bin/python", "/venv/bin/accelerate", "config"), None),
    ]:
        assert _parent(argv).launcher == want, argv
    assert _parent(ACCEL).launcher_args == ACCEL[3:]
    options = _parent(ACCEL[:3] + ("--num-cpu-threads-per-process", "4", "--mixed-precision", "bf16", "x.py")
                      ).accelerate_options()
    assert (options.num_cpu_threads_per_process, options.mixed_precision) == (4, "bf16")  # its own spellings
    assert _parent(ACCEL[:3] + ("--no-such-flag",)).accelerate_options() is None


def test_whose_omp_num_threads():
    from shards.launcher import user_threads

    env = {"OMP_NUM_THREADS": "1", "LOCAL_RANK": "0"}
    assert user_threads({}, None) == (None, "")
    assert user_threads({"OMP_NUM_THREADS": "3"}, None) == ("3", "OMP_NUM_THREADS=3")  # no launcher
    assert user_threads({"OMP_NUM_THREADS": "3"}, _parent(("bash",))) == ("3", "OMP_NUM_THREADS=3")
    # accelerate launch started without it: its default, not the user's.
    assert user_threads(env, _parent(ACCEL)) == (None, "accelerate launch set OMP_NUM_THREADS=1 itself, not you")
    torchrun = ("python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "x.py")
    assert user_threads(env, _parent(torchrun)) == (None, "torchrun set OMP_NUM_THREADS=1 itself, not you")
    # The launcher was started with it (`OMP_NUM_THREADS=1 make train NPROC=2`): the user's.
    assert user_threads(env, _parent(ACCEL, OMP_NUM_THREADS="1")) == ("1", "OMP_NUM_THREADS=1")
    # Or asked for it with accelerate's own flag.
    flagged = ACCEL[:3] + ("--num_cpu_threads_per_process", "4", "-m", "train")
    assert user_threads({"OMP_NUM_THREADS": "4"}, _parent(flagged)) == (
        "4", "accelerate launch --num_cpu_threads_per_process 4")
    # Launched, but the launcher cannot be seen: taken as the user's, and said so.
    assert user_threads(env, None) == (
        "1", "OMP_NUM_THREADS=1: yours or the launcher's default, which cannot be told apart on this system")


def test_a_launchers_default_threads_give_way_to_the_choice(threads):
    env = {"OMP_NUM_THREADS": "1", "LOCAL_RANK": "0"}
    torch.set_num_threads(2)
    n, why = choose_cpu_threads(SMALL_MODEL_PARAMETERS - 1, environ=env, parent=_parent(ACCEL))
    assert n == 1 == torch.get_num_threads()
    assert why == ("a small model (50.0M parameters): more threads only wait on each other; accelerate launch set "
                   "OMP_NUM_THREADS=1 itself, not you; set OMP_NUM_THREADS to choose")
    cores = len(os.sched_getaffinity(0))
    n, why = choose_cpu_threads(10**9, 1, environ=env, parent=_parent(ACCEL))
    assert n == cores == torch.get_num_threads() and why.startswith(f"{cores} core(s) shared by 1 process(es)")
    # The user's value is kept as torch has it, whatever the model.
    torch.set_num_threads(1)
    assert choose_cpu_threads(10**9, environ=env, parent=_parent(ACCEL, OMP_NUM_THREADS="1")) == (
        1, "OMP_NUM_THREADS=1")


def _precompute(tiny_model, fill_data, cache, *launch, env=None) -> subprocess.CompletedProcess:
    """A 2-image precompute of the tiny model, plainly or under `launch`, OMP/MKL unset."""
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    environ.update(env or {})
    command = [sys.executable, *(launch or ("-m",)), "precompute", "--model", str(tiny_model), "--data",
               str(fill_data), "--cache", str(cache), "--resolution", "64", "--max-samples", "2", "--num-workers",
               "0", "--device", "cpu"]
    proc = subprocess.run(command, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=environ,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _threads_line(stderr: str) -> str:
    lines = [line.split(": ", 1)[1] for line in stderr.splitlines() if "CPU threads per process" in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_precompute_chooses_its_threads_when_nobody_did(tiny_model, fill_data, tmp_path):
    """conftest pins OMP_NUM_THREADS=1 for the suite; here it is unset, as for a user, and the
    start-up log states the count chosen and why: plainly, and under accelerate launch, which
    exports OMP_NUM_THREADS by itself (with --cpu: the physical cores, else 1)."""
    line = _threads_line(_precompute(tiny_model, fill_data, tmp_path / "plain").stderr)
    assert re.fullmatch(r"CPU threads per process: 1 \(a small model \(\d+\.\dM parameters\): more threads only "
                        r"wait on each other; set OMP_NUM_THREADS to choose\)", line), line
    launched = _precompute(tiny_model, fill_data, tmp_path / "launched", "-m", "accelerate.commands.launch", "--cpu",
                           "--num_processes", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                           env={"HF_HOME": str(tmp_path / "hf")})
    assert re.fullmatch(r"CPU threads per process: 1 \(a small model \(\d+\.\dM parameters\): more threads only "
                        r"wait on each other; accelerate launch set OMP_NUM_THREADS=\d+ itself, not you; set "
                        r"OMP_NUM_THREADS to choose\)", _threads_line(launched.stderr))
    # The user's own setting under a launcher (it wins, and the log says it is theirs): the decision
    # is test_whose_omp_num_threads's, on the same launcher records.


def test_what_destructors_raise_after_the_message_is_not_printed():
    """A survivor of a peer's failure frees its DataLoader iterator after deciding its message;
    shutting down workers the failure already broke may raise in __del__. The message stands
    alone (a real interpreter: pytest would catch the unraisable error itself)."""
    code = textwrap.dedent("""
        from shards.errors import ShardError
        from shards.runtime import run_command

        class Noisy:
            def __del__(self):
                raise RuntimeError("shutting down loader workers failed")

        def work():
            holder = Noisy()
            raise ShardError("the message")

        run_command(work, user_errors=(ShardError,), continue_hint="re-run")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 1 and proc.stderr == "error: the message\n", proc.stderr


def test_a_loader_worker_gone_mid_hand_over_leaves_no_thread_traceback():
    """multiprocessing's resource sharer thread raises ConnectionResetError when a DataLoader
    worker dies mid-handshake (every worker does as a stopped rank shuts its loader down): no
    traceback of it reaches stderr. Any other thread's error still does."""
    import threading

    from shards.runtime import quiet_thread_errors

    namespace: dict = {}
    exec(compile("def _serve():\n    raise ConnectionResetError(104, 'Connection reset by peer')\n",
                 os.path.join("lib", "multiprocessing", "resource_sharer.py"), "exec"), namespace)
    shown: list[str] = []
    hook = quiet_thread_errors(lambda args: shown.append(f"{args.exc_type.__name__}: {args.exc_value}"))

    def bug() -> None:
        raise ValueError("a real bug")

    previous = threading.excepthook
    threading.excepthook = hook
    try:
        for target in (namespace["_serve"], bug):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join()
    finally:
        threading.excepthook = previous
    assert shown == ["ValueError: a real bug"]
    assert quiet_thread_errors(previous).quiets_resource_sharer
