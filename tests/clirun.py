"""Run `python -m <module> ARGS` as a fork of the test process: the real command, without paying
torch's, diffusers' and transformers' imports again in every test.

A fresh interpreter spends about 3 s of CPU importing those before `python -m train` or
`python -m precompute` does anything; the suite runs such commands dozens of times. `run_cli`
imports them once in the test process (`_COMMAND_IMPORTS`), then forks it and runs the module as
`__main__` in the child (`runpy`, with `sys.argv` as the command line gives it), its stdout and
stderr on files of their own, the environment and working folder as given, and the root logger
reset so the command configures its own logging, and accelerate's process-wide state reset (the
test process may have trained in another precision). The child ends with the command's exit
status (os._exit: nothing of the test process runs at its exit). What a user sees (the exit
status, every line on stdout and stderr, tracebacks included) is what a test sees.

What a library reads from the environment when it is imported (an environment variable read at
import time) comes from the test process, which imported it before the fork: `env` reaches only
what is read when the command runs.

Use a real subprocess instead where the interpreter itself is what is tested: imports
(packaging), launchers (accelerate launch, torchrun, make), signals sent to the process, or a
changed thread count (torch's thread pool is inherited).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]


def run_cli(module: str, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | str = REPO,
            timeout: float = 600, preexec: Callable[[], Any] | None = None) -> subprocess.CompletedProcess:
    """`python -m module *args` in a forked child; a CompletedProcess with text stdout/stderr.
    `preexec` runs in the child before the command, as subprocess's preexec_fn does (a umask, a
    resource limit: process state the command inherits as a fresh interpreter would)."""
    args = [str(a) for a in args]
    _import_once()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            _child(module, args, env, cwd, out.fileno(), err.fileno(), preexec)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired([module, *args], timeout)
            time.sleep(0.02)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess([sys.executable, "-m", module, *args], code,
                                           out.read().decode("utf-8", "replace"),
                                           err.read().decode("utf-8", "replace"))


# What the commands import (the libraries' lazy attributes load their modules when read).
_COMMAND_IMPORTS = {"accelerate": (), "diffusers": ("AutoencoderKL", "T2IAdapter", "UNet2DConditionModel"),
                    "transformers": ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer"),
                    "matplotlib.pyplot": ()}  # train's loss curve


def _import_once() -> None:
    """Import, in the test process, what the commands import: every fork then starts with it."""
    import importlib

    import matplotlib

    matplotlib.use("Agg")  # as train.card sets it, before pyplot is imported: no display here
    for name, attributes in _COMMAND_IMPORTS.items():
        library = importlib.import_module(name)
        for attribute in attributes:
            getattr(library, attribute)


def _child(module: str, args: list[str], env: dict[str, str] | None, cwd, out_fd: int, err_fd: int,
           preexec: Callable[[], Any] | None) -> None:
    code = 1
    try:
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        sys.stdin = open(os.devnull)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        os.chdir(cwd)
        for handler in list(logging.root.handlers):  # pytest's capture handlers: the command logs itself
            logging.root.removeHandler(handler)
        logging.root.setLevel(logging.WARNING)
        state = sys.modules.get("accelerate.state")
        if state is not None:  # accelerate's process-wide singletons, as a fresh interpreter has them
            state.AcceleratorState._reset_state(reset_partial_state=True)
            state.GradientState._reset_state()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        if preexec is not None:
            preexec()
        sys.argv = [module, *args]
        import runpy

        # A test may have imported the package's __main__; runpy then warns on stderr, which a
        # command's output must not carry (it runs a fresh copy either way).
        sys.modules.pop(f"{module}.__main__", None)
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:  # as the interpreter does: print the message, exit 1
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class TimeoutExpiredWithStacks(subprocess.TimeoutExpired):
    """A launched command still running at its timeout; its message carries the end of its output,
    with the Python stacks of every process it had started."""

    def __str__(self) -> str:
        return f"{super().__str__()}; the end of its output, stacks included:\n{self.output}"


def _parents() -> dict[int, int]:
    """{pid: parent pid} of every live process, from /proc (Linux)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return parents


def children(pid: int) -> list[int]:
    """The live direct children of `pid` (a launcher's ranks), sorted."""
    return sorted(child for child, parent in _parents().items() if parent == pid)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children, ...), from /proc (Linux):
    launchers start their ranks in sessions of their own, so a process group does not reach them."""
    parents = _parents()
    found, frontier = [], [pid]
    while frontier:
        below = [child for child, parent in parents.items() if parent in frontier]
        found += below
        frontier = below
    return found


def signal_all(pids: list[int], sig: int) -> None:
    """Send `sig` to each of `pids` that is still alive."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def run_launched(cmd: list[str], *, env: dict[str, str], cwd: Path | str = REPO,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """`cmd` (a launcher and the processes it starts), as `subprocess.run` with captured text
    output. If it is still running at `timeout`, every process below it gets SIGABRT first, so
    that each Python process (faulthandler on) prints the stacks of all its threads into the
    output, then the launcher, then SIGKILL for whatever is left; `TimeoutExpiredWithStacks`
    reports that output. A rare hang of a multi-process run leaves the evidence of where each
    process waited (and make test's one rerun still matches it as a TimeoutExpired)."""
    import resource

    def no_core_files() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    cmd = [str(c) for c in cmd]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=out, stderr=err,
                                preexec_fn=no_core_files)
        try:
            proc.wait(timeout)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            below = descendants(proc.pid)
            signal_all(below, signal.SIGABRT)  # faulthandler writes the stacks, then the process aborts
            time.sleep(3)
            signal_all([proc.pid], signal.SIGABRT)
            time.sleep(2)
            signal_all([proc.pid, *below], signal.SIGKILL)
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = (f.read().decode("utf-8", "replace") for f in (out, err))
    if hung:
        raise TimeoutExpiredWithStacks(cmd, timeout, output=(stdout + stderr)[-20000:])
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def config_args(cfg: Any) -> list[str]:
    """The command-line arguments that give exactly the config dataclass `cfg`: every field that
    differs from its default, as its option (`--max-steps 4`; a flag for True; a repeatable option
    once per value; a number pair as "LOW,HIGH")."""
    import dataclasses

    from shards.options import NUMBER_PAIR

    args: list[str] = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), f"--{f.name.replace('_', '-')}"
        if value == f.default:
            continue
        if isinstance(value, bool):
            args.append(flag)
        elif f.metadata.get("click_type") is NUMBER_PAIR:
            args += [flag, ",".join(str(v) for v in value)]
        elif isinstance(value, tuple):
            args += [a for v in value for a in (flag, str(v))]
        else:
            args += [flag, str(value)]
    return args
