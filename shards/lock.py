"""One writer at a time: an advisory lock file naming its holder.

Two trainings into one OUT, or two precomputes into one cache, each believe they own what they
write: one silently overwrites the other's checkpoints, or deletes its staged shards as "left
over". `WriterLock(folder / LOCK_FILE, what)` is taken by the writer at start and held until it
exits; a second writer fails at once with a message naming the holder (pid, host, since when,
its command line).

It is an flock(2) on the file, so the kernel releases it when the holder dies, however it dies:
there are no stale locks to clean up by hand. The file also records who held it; a lock found
free but still naming a holder means that holder died without releasing it, which is said (the
writer then takes over, and its own start-up cleans what the dead one left). On filesystems
without working flock (some network mounts), taking the lock fails with a message saying so
instead of pretending.

What the lock promises, and what not: it serialises writers that use it, on filesystems where
flock works across the machines involved (local disks; NFSv4 and most cluster filesystems).
Readers never take it: any number of trainings may read a cache while it is written.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
import weakref
from pathlib import Path

from .errors import ShardError

LOCK_FILE = ".lock"


class LockError(ShardError):
    """Another writer holds the lock (or the filesystem cannot lock); the message names it."""


def _holder_text(info: dict) -> str:
    """The holder record, as read back: whatever a stranger wrote into the file, a line of text
    (no value is trusted to have its type or a sane size)."""
    from .runtime import printable

    def field(name: str) -> str:
        value = info.get(name)
        return "?" if value is None else printable(str(value)[:300]).replace("\n", " ")

    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("since", 0))))
    except (TypeError, ValueError, OverflowError, OSError):
        since = "?"
    return (f"pid {field('pid')} on {field('host')} since {since}"
            + (f" ({field('command')})" if info.get("command") else ""))


_HELD: "weakref.WeakSet[WriterLock]" = weakref.WeakSet()


def _drop_in_child() -> None:
    """In a forked child (a DataLoader worker, a multiprocessing pool): close the inherited
    descriptors without unlocking. The lock belongs to the parent: a child holding a copy would
    keep it taken for as long as the child lives after the parent died (a killed training's
    workers linger for seconds), and an immediate restart would be refused."""
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


os.register_at_fork(after_in_child=_drop_in_child)


class WriterLock:
    """An exclusive, non-blocking lock on `path` (created if needed). Use as a context manager
    or call `acquire()` / `release()`; `what` names the locked thing in messages."""

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None
        self.previous: dict | None = None  # holder info a dead holder left behind, if any

    def acquire(self) -> "WriterLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Never through a symlink, never a FIFO or device: the holder record is written into the
        # file and cleared on release, so a planted link would have another file emptied.
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise LockError(f"cannot lock {self.what}: its lock file {self.path} is a symbolic link, which a "
                                "writer never follows; remove it and retry") from None
            raise LockError(f"cannot lock {self.what}: cannot open its lock file {self.path} "
                            f"({e.strerror or e})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise LockError(f"cannot lock {self.what}: its lock file {self.path} is not a regular file (a folder, "
                            "FIFO or device); remove it and retry")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            info = _read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _holder_text(info) if info else "another process"
                if _gone(info):
                    raise LockError(f"{self.what} is still locked by processes of {holder}, which has exited: "
                                    "processes it started still hold it (they end on their own, usually within "
                                    f"seconds). Retry shortly (the lock is {self.path})") from None
                raise LockError(f"{self.what} is in use by {holder}: only one writer at a time. Wait for it "
                                f"to finish or stop it (the lock is {self.path}; it is released when its holder "
                                "exits, however it exits)") from None
            raise LockError(f"cannot lock {self.path} for {self.what}: {e.strerror or e} (this filesystem "
                            "may not support file locks; use a local folder)") from None
        self.previous = _read(fd) or None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": _command()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        _HELD.add(self)
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # released cleanly: the next holder finds no dead predecessor
        except OSError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def describe_previous(self) -> str | None:
        """A line about a holder that died without releasing the lock, or None."""
        return None if not self.previous else (f"{self.what}: the previous writer ({_holder_text(self.previous)}) "
                                                "ended without releasing its lock; taking over")

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _gone(info: dict) -> bool:
    """True when the recorded holder is a process of this machine that no longer exists."""
    pid = info.get("pid") if info else None
    if not isinstance(pid, int) or info.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def _command() -> str:
    """This process's command line for the holder record, without secrets: token values and
    URL credentials redacted (`shards.secrets`)."""
    from .secrets import REDACTED, redact

    out, hide = [], False
    for i, arg in enumerate(sys.argv):
        if hide:
            out.append(REDACTED)
            hide = False
            continue
        name = arg.split("=", 1)[0].lower().replace("_", "-")
        if "token" in name and arg.startswith("--"):
            if "=" in arg:
                out.append(f"{arg.split('=', 1)[0]}={REDACTED}")
            else:
                out.append(arg)
                hide = True
            continue
        out.append(os.path.basename(arg) if i == 0 else redact(arg))
    return " ".join(out)[:300]


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data.decode("utf-8")) if data.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


__all__ = ["LOCK_FILE", "LockError", "WriterLock"]
