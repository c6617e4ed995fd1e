"""What every command of the tool does the same way as a process: exit codes, signals, orphans.

The three entry points (`python -m precompute`, `python -m train`, `python -m shards`) run their
work through `run_command`, which gives them one policy:

- exit 0: done. Exit 1 (`EXIT_USER_ERROR`): a problem the user can act on (settings, inputs, a
  cache or checkpoint that does not fit, storage that refuses or fails past its retries, a lost
  peer process); one message on stderr starting with "error:", no traceback. Exit 2: the command
  line itself is wrong (click's usage errors). Exit 128 + N: stopped by signal N (SIGTERM,
  SIGHUP) or 130 for Ctrl-C, with a message saying what was kept and how to continue.
- SIGTERM and SIGHUP raise `Terminated` in the main thread, so the work unwinds through its
  `finally` blocks and context managers (a shard being written is discarded, never published
  half; a checkpoint is either complete or not there) instead of dying mid-write.
- A process started by a launcher (`accelerate launch`, `torchrun`: RANK / LOCAL_RANK set) asks
  the kernel for SIGTERM when its parent dies (Linux `PR_SET_PDEATHSIG`), so killing the
  launcher, even with SIGKILL, stops every rank instead of leaving orphans that keep writing
  checkpoints or shards.
- A collective that fails because another process died or its machine went away (gloo's
  "Connection closed by peer", NCCL errors, timeouts) is reported as such, naming this rank.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

EXIT_USER_ERROR = 1
# OSErrors that mean "the storage refuses" (full, read-only, over quota, too large, not allowed),
# not "the code is wrong": reported as a message, like any other user error.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM}
_PR_SET_PDEATHSIG = 1
_HANDLED = (signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """The process received SIGTERM or SIGHUP (a BaseException: nothing catches it by accident)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def rank_tag() -> str:
    """'[rank R] ' in a multi-process run (from the launcher's RANK), else ''."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    return f"[rank {rank}] " if rank is not None and world not in (None, "1") else ""


_terminating = False


# The first stop signal received (SIGINT, SIGTERM, SIGHUP), kept: its exception may be raised where
# Python swallows it (inside a __del__, e.g. a DataLoader iterator's as an epoch ends, it only
# prints "Exception ignored"), and `raise_if_stopped` raises it again where the work can unwind.
_stopped: int | None = None


def _raise_terminated(signum: int, frame: Any) -> None:
    # Once: a rank of a launcher often gets two stop signals (the launcher's, and the kernel's
    # parent-death signal when the launcher is gone). A second `Terminated` raised inside the
    # clean-up the first one started (a logging lock, a loader's __del__) would only print
    # "Exception ignored" tracebacks; the watchdog still bounds how long the clean-up may take.
    global _terminating, _stopped
    if _terminating:
        return
    _terminating = True
    _stopped = _stopped or signum
    raise Terminated(signum)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGINT (Ctrl-C): KeyboardInterrupt, as Python's own handler, remembered."""
    global _stopped
    _stopped = _stopped or signum
    raise KeyboardInterrupt


def raise_if_stopped() -> None:
    """Raise the stop a signal asked for, if one came and its exception was swallowed. Loops call
    this once per step: Ctrl-C or SIGTERM always ends the work, whenever it arrives."""
    if _stopped == signal.SIGINT:
        raise KeyboardInterrupt
    if _stopped is not None:
        raise Terminated(_stopped)


def die_with_parent() -> bool:
    """Ask the kernel to send SIGTERM to this process when its parent exits (Linux only).
    Returns True when set. Called by ranks of a launcher, whose parent is the launcher."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # The parent may have died before the request: then we were re-parented already.
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return True


# Seconds a process that received SIGTERM/SIGHUP is given to unwind through `Terminated` before
# the watchdog ends it: Python runs signal handlers only between bytecodes of the main thread, and
# a rank blocked in a collective (waiting for a peer that is also stopping) never gets there.
STOP_GRACE_SECONDS = 10.0
_continue_hint = ""  # how to pick up after an interruption (run_command's), for the watchdog's line


def _watchdog(fd: int) -> None:
    """Reads the signal numbers Python's C-level handler writes to the wakeup fd (it does so even
    while the main thread is blocked in C); after a stop signal, gives the main thread
    STOP_GRACE_SECONDS to unwind, then exits the process itself."""
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            return
        stops = [b for b in data if b in _HANDLED]
        if not stops:
            continue
        time.sleep(STOP_GRACE_SECONDS)
        name = signal.Signals(stops[0]).name
        sys.stderr.write(f"error: {rank_tag()}stopped by {name} while blocked (e.g. waiting in a collective for "
                         "another process that is gone): exiting without unwinding. Nothing partial was published"
                         + (f"; {_continue_hint}.\n" if _continue_hint else ".\n"))
        sys.stderr.flush()
        os._exit(128 + stops[0])


def _from_resource_sharer(tb: Any) -> bool:
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "resource_sharer.py")):
            return True
        tb = tb.tb_next
    return False


def quiet_thread_errors(previous: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A threading.excepthook that drops what multiprocessing's resource sharer raises when the
    process at the other end of a hand-over is gone (ConnectionResetError, BrokenPipeError), and
    passes every other thread's error to `previous`. That thread hands file descriptors (tensors'
    shared memory) between a rank and its DataLoader workers; when one side dies mid-handshake (a
    stopped rank shuts its workers down; a worker outlives its rank) the other printed a
    traceback next to the one line that says what happened. A rank installs it with its process
    guards, a loader worker in `worker_init`."""
    def hook(args: Any) -> None:
        if issubclass(args.exc_type, OSError) and _from_resource_sharer(args.exc_traceback):
            return
        previous(args)

    hook.quiets_resource_sharer = True  # type: ignore[attr-defined]
    return hook


def install_process_guards() -> None:
    """SIGTERM/SIGHUP -> `Terminated` (and, if the main thread cannot take it, the watchdog);
    under a launcher, die with it; background threads' errors as `quiet_thread_errors` says.
    Call once, from the main thread, first thing."""
    if not getattr(threading.excepthook, "quiets_resource_sharer", False):
        threading.excepthook = quiet_thread_errors(threading.excepthook)
    for sig in _HANDLED:
        signal.signal(sig, _raise_terminated)
    signal.signal(signal.SIGINT, _interrupt)
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    threading.Thread(target=_watchdog, args=(read,), name="signal-watchdog", daemon=True).start()
    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()


def is_io_failure(error: BaseException) -> bool:
    """An I/O failure of the storage: an OSError, or safetensors' own error type wrapping one
    ("I/O error: No space left on device (os error 28)")."""
    if isinstance(error, OSError):
        return True
    text = str(error)
    return type(error).__name__ == "SafetensorError" and ("I/O error" in text or "IoError" in text or "os error" in text)


def io_reason(error: BaseException) -> str:
    """The human part of an I/O failure: 'No space left on device'."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    m = re.search(r"(?:I/O error: |IoError\(Os \{[^}]*message: \")([^\"(]+)", str(error))
    return m.group(1).strip() if m else str(error)[:200]


def is_peer_failure(error: BaseException) -> bool:
    """A collective failed because another process of the run is gone (or unreachable)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"DistBackendError", "DistNetworkError", "DistStoreError"}:
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "[c10d]", "gloo/transport", "NCCL error",
        "ProcessGroupGloo", "ProcessGroupNCCL", "Socket Timeout"))


def fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print `error: <message>` (with the rank in a multi-process run) and exit with `code`."""
    sys.stderr.write(f"error: {rank_tag()}{printable(message.rstrip())}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def printable(text: str) -> str:
    """`text` with control characters (other than newline and tab) escaped: a message may quote
    names from a hostile cache or dataset, and a terminal must show them, not obey them."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def exception_chain(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions it was raised from or while handling, outermost first."""
    out, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        out.append(error)
        error = error.__cause__ or error.__context__
    return out


def _loader_worker_killed(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and "DataLoader worker" in str(error) and "killed by signal" in str(error)


def explain(error: BaseException, *, user_errors: tuple[type[BaseException], ...],
            message: Callable[[BaseException], str], continue_hint: str) -> tuple[str, int] | None:
    """(message, exit code) for an error the policy explains, or None for a bug (a traceback).

    The whole chain counts: a rank whose collective fails because a peer died is then usually
    sent SIGTERM by its launcher while handling that failure; the lost peer is the cause to name.
    """
    chain = exception_chain(error)
    peer = next((e for e in chain if isinstance(e, Exception) and is_peer_failure(e)), None)
    if peer is not None:
        first = str(peer).strip().splitlines()[0] if str(peer).strip() else type(peer).__name__
        return (f"lost contact with another process of this run (it died, was killed, or its machine is "
                f"unreachable): {first[:300]}. Once every process can run again, {continue_hint}.", EXIT_USER_ERROR)
    term = next((e for e in chain if isinstance(e, Terminated)), None)
    if term is not None:
        return (f"stopped by {signal.Signals(term.signum).name}: another process of this run failed, its launcher "
                f"was stopped, or the job was cancelled. Nothing partial was published; {continue_hint}.",
                128 + term.signum)
    if any(isinstance(e, KeyboardInterrupt) for e in chain):
        return f"interrupted. Nothing partial was published; {continue_hint}.", 130
    storage = chain[0] if isinstance(chain[0], OSError) and chain[0].errno in _STORAGE_ERRNOS else None
    if storage is not None:
        where = f"{storage.filename}: " if storage.filename else ""
        return (f"{where}{storage.strerror or storage}. Nothing partial was published; free space (or fix the "
                f"permissions / mount), then {continue_hint}.", EXIT_USER_ERROR)
    user = next((e for e in chain if isinstance(e, user_errors)), None)
    if user is not None and user is chain[0]:
        return message(user), EXIT_USER_ERROR
    if _loader_worker_killed(chain[0]):
        return (f"{chain[0]}: a data loader worker was killed (out of memory? see the system log). Nothing partial "
                f"was published; {continue_hint}.", EXIT_USER_ERROR)
    return None


def run_command(work: Callable[[], Any], *, user_errors: tuple[type[BaseException], ...],
                message: Callable[[BaseException], str] = str, continue_hint: str) -> Any:
    """Run `work()` under the policy above. `user_errors` become exit 1 with `message(error)`;
    `continue_hint` says how to pick up after an interruption (e.g. "re-run the same command")."""
    global _continue_hint
    _continue_hint = continue_hint
    install_process_guards()
    try:
        return work()
    except SystemExit:
        raise
    except BaseException as e:
        explained = explain(e, user_errors=user_errors, message=message, continue_hint=continue_hint)
        if explained is None:
            raise
        # The message is decided and the process ends with it: what destructors raise from here
        # on (a DataLoader iterator shutting down workers a peer's failure already broke) would only
        # print a traceback after it.
        sys.unraisablehook = lambda unraisable: None
        _release_frames(e)
        del e
        fail(*explained)
    finally:
        close_process_group()


def _release_frames(error: BaseException) -> None:
    """Free what the failed work still holds through the error's tracebacks, now, while the
    process is whole: a DataLoader iterator in a finished frame shuts its worker processes down
    when collected. Left to the interpreter's exit, multiprocessing terminates those workers
    first and torch's SIGCHLD handler reports each as killed, a traceback after the message."""
    seen: set[int] = set()
    chain: BaseException | None = error
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if chain.__traceback__ is not None:
            traceback.clear_frames(chain.__traceback__)
        chain = chain.__cause__ or chain.__context__
    gc.collect()


def close_process_group() -> None:
    """Destroy torch.distributed's default process group, if this process made one. Left to the
    interpreter's exit, gloo's threads can outlive it and abort the process ("terminate called
    without an active exception", SIGABRT) after the work itself succeeded or failed cleanly.
    Local only (no collective), so it is safe whatever happened to the other processes."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # a group whose peers are gone may fail to tear down; the exit is what matters
        pass


def raise_recompile_limit(at_least: int) -> int:
    """Let torch.compile keep at least `at_least` graphs per function before it falls back to
    eager (batch sizes and bucket shapes each make one); never lowers the limit. Returns it.
    (torch >= 2.6 calls the setting recompile_limit, older ones cache_size_limit.)"""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    limit = max(getattr(dynamo_config, name), at_least)
    setattr(dynamo_config, name, limit)
    return limit


# Below this many parameters a model's ops last microseconds on a CPU: a second OpenMP thread
# only adds spin-waits and handoffs (measured on the 2-core build machine, tiny SDXL, 40 steps of
# batch 8: 89 samples/s with 1 thread, 16 with OMP_NUM_THREADS=2; a busy machine makes it worse).
SMALL_MODEL_PARAMETERS = 50_000_000


_DETECT: Any = object()  # choose_cpu_threads: look at the real parent process


def choose_cpu_threads(num_parameters: int, local_processes: int = 1, *, environ: dict | None = None,
                       parent: Any = _DETECT) -> tuple[int, str]:
    """Set torch's intra-op threads for a CPU run and return (threads, why).

    The user's OMP_NUM_THREADS wins. A launcher's is not the user's: `accelerate launch` always
    exports OMP_NUM_THREADS (1 unless told otherwise) and torchrun sets 1 for several processes,
    so under a launcher the value counts as the user's only when the launcher was itself started
    with it, or given `--num_cpu_threads_per_process` (`shards.launcher.user_threads`, which
    looks at the launcher: this process's parent). Otherwise: 1 for a small model (see
    SMALL_MODEL_PARAMETERS), else this machine's cores shared among the processes on it, and
    `why` says what the launcher had set.

    `environ` and `parent` (a `shards.launcher.Parent`, or None for "cannot be seen") are for
    tests; by default os.environ and the real parent process.
    """
    import torch

    from shards import launcher

    environ = os.environ if environ is None else environ
    if parent is _DETECT:
        parent = launcher.parent_process()
    chosen, note = launcher.user_threads(environ, parent)
    if chosen is not None:
        return torch.get_num_threads(), note
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if num_parameters < SMALL_MODEL_PARAMETERS:
        threads, why = 1, f"a small model ({num_parameters / 1e6:.1f}M parameters): more threads only wait on each other"
    else:
        threads = max(1, cores // max(1, local_processes))
        why = f"{cores} core(s) shared by {local_processes} process(es) on this machine"
    torch.set_num_threads(threads)
    if note:  # the launcher's own value, replaced
        why += f"; {note}"
    return threads, why + "; set OMP_NUM_THREADS to choose"


def worker_init(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a loader worker dies quietly on SIGTERM (its parent, the rank,
    reports what happened) instead of raising `Terminated` in its own Python. Likewise a connection
    error of multiprocessing's resource sharer, once the rank is gone, is not printed as a
    traceback (`quiet_thread_errors`): the rank, not its worker, says what happened. Errors of
    the worker's own work reach the rank through the loader and are reported there."""
    signal.set_wakeup_fd(-1)  # the pipe is the parent's: its watchdog must not see our signals
    for sig in _HANDLED:
        signal.signal(sig, signal.SIG_DFL)
    threading.excepthook = quiet_thread_errors(threading.__excepthook__)


__all__ = ["EXIT_USER_ERROR", "SMALL_MODEL_PARAMETERS", "Terminated", "choose_cpu_threads", "close_process_group",
           "die_with_parent", "exception_chain", "explain",
           "fail", "install_process_guards", "quiet_thread_errors",
           "is_peer_failure", "printable", "rank_tag", "run_command", "worker_init"]
