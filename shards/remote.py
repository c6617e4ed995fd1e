"""Talking to remote storage without hanging and without silent damage: retries and resumable reads.

Everything the object-store backends (`shards.s3`, `shards.http`) share lives here:

- `RetryPolicy`: connect and read timeouts plus a retry budget (a count *and* seconds), from
  parameters or the `SHARDS_*` environment variables. Every remote call goes through `retry_call`,
  so no operation waits forever (a read timeout notices a server that accepts connections but
  never answers, e.g. one stopped with SIGSTOP) and none gives up on the first dropped connection
  (a server restarting mid-epoch is normal at scale).
- `ResumableReader`: a streaming body that, when the connection fails mid-object, reopens the
  object at the byte offset already consumed (an HTTP Range request, pinned to the same object
  version with If-Match on its ETag) after an exponential backoff. The consumer sees one
  uninterrupted byte stream, so the shard reader's sha256 over the bytes stays valid across
  reopens and every sample is delivered exactly once, in order. A server that cuts the body short
  without an error is treated like a dropped connection (the size is known from the first
  response), never as a short shard.
- `StoreError`: what a remote operation raises when the budget is spent or the failure is
  permanent (bad credentials, no such bucket, object replaced while reading). The message starts
  with the location and says what to check. It is a `shards.errors.ShardError` (so train reports
  it as a data error, without a traceback) and an `OSError`.

Bound on time: a failure streak starts at the first failed attempt; no new attempt starts once
`budget_s` seconds have passed since then, or after `attempts` retries. The last attempt can take
up to one connect plus one read timeout, and noticing a stall takes one read timeout, so the error
arrives at most `budget_s + connect_timeout_s + 2 * read_timeout_s` after the stream stalled.
A stall is silence for `read_timeout_s`, or a body that delivers less than `min_rate` bytes a
second over `read_timeout_s` of reading (a server trickling a byte at a time never hits a read
timeout; measured only while the reader waits on the network, so a consumer that pauses between
reads is never taken for a slow server). Real progress ends a streak: `PROGRESS_BYTES` received
since the last failure (or the rest of the object), or any bytes and then no failure for
`worst_case_s()` (a consumer that paused, a server that recovered), so a long stream survives any
number of separate blips, while a server that cuts every response after a few bytes, or trickles,
runs out of attempts.
"""

from __future__ import annotations

import errno
import http.client
import io
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, fields
from typing import BinaryIO, Callable, Mapping, TypeVar

from .errors import StoreError
from .units import parse_size

log = logging.getLogger(__name__)

T = TypeVar("T")

# Environment variables, with the RetryPolicy field each sets.
ENV = {
    "SHARDS_RETRY_ATTEMPTS": "attempts",
    "SHARDS_RETRY_SECONDS": "budget_s",
    "SHARDS_CONNECT_TIMEOUT": "connect_timeout_s",
    "SHARDS_READ_TIMEOUT": "read_timeout_s",
    "SHARDS_MIN_RATE": "min_rate",
}

# Bytes an attempt must deliver after a failure before the failure streak is forgiven.
PROGRESS_BYTES = 1 << 20
# Most bytes asked of the network in one call: each call returns within a read timeout.
_CHUNK = 1 << 20


_NETWORK_ERRNOS = {
    errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN,
}


class Permanent(Exception):
    """Raised by a classifier: this failure will not go away by retrying (wraps the message)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Timeouts and the retry budget of every remote call and stream (see the module docstring)."""

    attempts: int = 10  # retries in one failure streak (0: fail on the first error)
    budget_s: float = 120.0  # seconds one failure streak may last before giving up
    backoff_s: float = 0.5  # first pause; doubles per retry, with +-25% jitter
    max_backoff_s: float = 10.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0  # longest silence while waiting for response bytes
    min_rate: float = 1024.0  # bytes/s a body must sustain over read_timeout_s of reading (0: any)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.attempts, int) or isinstance(self.attempts, bool) or self.attempts < 0:
            problems.append(f"attempts must be an integer >= 0, got {self.attempts!r}")
        for f in fields(self):
            if f.name == "attempts":
                continue
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                problems.append(f"{f.name} must be a number >= 0, got {v!r}")
            elif f.name.endswith("timeout_s") and v == 0:
                problems.append(f"{f.name} must be > 0 (0 would mean no timeout: a stalled server would hang the reader)")
        if problems:
            raise ValueError("invalid retry policy:\n  - " + "\n  - ".join(problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "RetryPolicy":
        """Defaults, then SHARDS_RETRY_ATTEMPTS / _SECONDS, SHARDS_CONNECT_TIMEOUT / READ_TIMEOUT,
        SHARDS_MIN_RATE, then overrides."""
        environ = os.environ if environ is None else environ
        values: dict = {}
        problems = []
        for var, name in ENV.items():
            raw = environ.get(var)
            if raw is None or raw.strip() == "":
                continue
            if name == "min_rate":  # bytes a second, as a size: 1024, 64KiB, 1MB
                try:
                    values[name] = float(parse_size(raw, var))
                except ValueError as e:
                    problems.append(f"{e} (bytes a second, e.g. 64KiB; 0 for any rate)")
                continue
            try:
                values[name] = int(raw) if name == "attempts" else float(raw)
            except ValueError:
                problems.append(f"{var}={raw!r} is not a {'whole ' if name == 'attempts' else ''}number")
        if problems:
            raise ValueError("invalid retry settings in the environment:\n  - " + "\n  - ".join(problems))
        values.update(overrides)
        return cls(**values)

    def worst_case_s(self) -> float:
        """Upper bound from a stall to the error that reports it (module docstring)."""
        return self.budget_s + self.connect_timeout_s + 2 * self.read_timeout_s


class _Streak:
    """One run of consecutive failures: decides whether and how long to wait before the next try."""

    def __init__(self, policy: RetryPolicy):
        self.policy = policy
        self.failures = 0
        self.started: float | None = None
        self.last: BaseException | str | None = None

    def reset(self) -> None:
        self.failures, self.started, self.last = 0, None, None

    def fail(self, what: str, cause: BaseException | str) -> float | None:
        """Record a failure; the pause before the next attempt, or None when the budget is spent."""
        now = time.monotonic()
        if self.started is None:
            self.started = now
        self.failures += 1
        self.last = cause
        p = self.policy
        elapsed = now - self.started
        if self.failures > p.attempts or elapsed >= p.budget_s:
            return None
        pause = min(p.max_backoff_s, p.backoff_s * 2 ** min(self.failures - 1, 30))
        pause *= random.uniform(0.75, 1.25)
        pause = min(pause, max(0.0, p.budget_s - elapsed))  # never sleep past the budget
        log.warning("%s: %s; retry %d/%d in %.1fs", what, describe(cause), self.failures, p.attempts, pause)
        return pause

    def summary(self) -> str:
        elapsed = time.monotonic() - self.started if self.started is not None else 0.0
        tries = f"{self.failures} attempt{'s' if self.failures != 1 else ''}"
        return f"gave up after {tries} over {elapsed:.1f}s (last error: {describe(self.last)})"


def describe(cause: BaseException | str | None) -> str:
    if cause is None or isinstance(cause, str):
        return str(cause)
    text = str(cause) or type(cause).__name__
    return text if type(cause).__name__ in text else f"{type(cause).__name__}: {text}"


def is_network_error(e: BaseException) -> bool:
    """A failure of the connection itself (refused, reset, timed out, DNS), as opposed to a local
    file error such as a missing file or a full disk, which retrying cannot fix."""
    if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror, http.client.HTTPException)):
        return True
    return isinstance(e, OSError) and e.errno in _NETWORK_ERRNOS


def unresolvable_host(e: BaseException) -> bool:
    """The host name does not exist (DNS: EAI_NONAME, "Name or service not known"): at a
    process's first contact, a typo in a URL or endpoint, which waiting does not fix. A resolver
    that is down or slow says EAI_AGAIN ("Temporary failure in name resolution"), retried."""
    seen: BaseException | None = e
    for _ in range(8):  # the chain a client library wraps it in (botocore -> urllib3 -> socket)
        if seen is None:
            return False
        if isinstance(seen, socket.gaierror):
            return seen.errno in _NO_SUCH_HOST
        kwargs = getattr(seen, "kwargs", None)
        inner = (kwargs.get("error") if isinstance(kwargs, dict) else None, getattr(seen, "reason", None),
                 seen.__cause__, seen.__context__)
        seen = next((x for x in inner if isinstance(x, BaseException)), None)
    return False


# Whether any remote call of this process (or of the process it was forked from) has succeeded.
# Until one has, a name that does not resolve is a typo, said at once; after, it may be a passing
# resolver hiccup in a long run (some resolvers answer "no such name" briefly), and is retried.
_REACHED = False
_NO_SUCH_HOST = tuple(getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name))


def retry_call(
    fn: Callable[[], T],
    *,
    what: str,
    policy: RetryPolicy,
    classify: Callable[[BaseException], None],
    hint: str = "",
) -> T:
    """Call `fn` until it succeeds, retrying what `classify` lets through (it raises for the rest).

    `classify(exc)` returns normally for a transient failure, raises `Permanent(message)` for one
    that retrying cannot fix, or raises any other exception (FileNotFoundError...) to pass it on.
    On a spent budget: StoreError("{what}: {summary}{hint}").
    """
    global _REACHED
    streak = _Streak(policy)
    while True:
        try:
            result = fn()
            _REACHED = True
            return result
        except Permanent as e:  # fn may classify its own failures too
            raise StoreError(f"{what}: {e}{hint}") from None
        except Exception as e:
            if unresolvable_host(e) and not _REACHED:
                raise StoreError(f"{what}: {describe(e)}: no host of that name (check the URL or the endpoint)"
                                 f"{hint}") from None
            try:
                classify(e)
            except Permanent as p:
                raise StoreError(f"{what}: {p}{hint}") from None
            pause = streak.fail(what, e)
            if pause is None:
                raise StoreError(f"{what}: {streak.summary()}{hint}") from None
            time.sleep(pause)


class ResumableReader(io.RawIOBase):
    """A read-only byte stream over a remote object that survives dropped connections.

    `open_at(offset)` must return a fresh body positioned at byte `offset` of the *same* object
    version as the first open (the backends send Range + If-Match) and raise for failures as
    `classify` expects. `size` is the object's full length, known from the first response;
    `first_body` that response's body (None: the first read opens the object at byte 0).
    """

    def __init__(
        self,
        *,
        what: str,
        open_at: Callable[[int], BinaryIO],
        size: int,
        first_body: BinaryIO | None,
        policy: RetryPolicy,
        classify: Callable[[BaseException], None],
        hint: str = "",
    ):
        super().__init__()
        self.what = what
        self.size = size
        self.offset = 0
        self.reopens = 0  # how often the object was reopened after a failure (for tests and logs)
        self._open_at = open_at
        self._body: BinaryIO | None = first_body
        self._policy = policy
        self._classify = classify
        self._hint = hint
        self._streak = _Streak(policy)
        self._since_failure = 0  # bytes received since the last failure
        self._failed_at = 0.0  # when it happened (time.monotonic)
        self._opened = first_body is not None  # False: the first read opens the object, no reopen
        self._window_s, self._window_bytes = 0.0, 0  # time spent reading, and bytes, this rate window

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        """`n` bytes (fewer only at the end of the object); all of the rest for n < 0."""
        if self.closed:
            raise ValueError(f"{self.what}: read from a closed stream")
        if n is None or n < 0:
            n = self.size - self.offset
        n = min(n, self.size - self.offset)
        if n <= 0:
            return b""
        parts, got = [], 0
        while got < n:
            chunk = self._read_chunk(min(n - got, _CHUNK))
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_chunk(self, n: int) -> bytes:
        """Some bytes (1..n) at the current offset, reopening the object after failures."""
        while True:
            try:
                if self._body is None:
                    self._body = self._open_at(self.offset)
                    self.reopens += self._opened
                    self._opened = True
                    self._window_s, self._window_bytes = 0.0, 0
                started = time.monotonic()
                data = self._body.read(n)
                self._window_s += time.monotonic() - started
                if not data:
                    # The server ended the body early without an error (a proxy or a crashing
                    # server can do that): as bad as a reset, and resumable the same way.
                    raise ConnectionError(f"the response ended at byte {self.offset} of {self.size}")
                self._window_bytes += len(data)
                self._check_rate()
            except Permanent as e:
                self._drop_body()
                raise StoreError(f"{self.what}: {e} (at byte {self.offset} of {self.size}){self._hint}") from None
            except Exception as e:
                self._drop_body()
                try:
                    self._classify(e)
                except Permanent as p:
                    raise StoreError(f"{self.what}: {p} (at byte {self.offset} of {self.size}){self._hint}") from None
                pause = self._streak.fail(f"{self.what} at byte {self.offset}", e)
                self._since_failure, self._failed_at = 0, time.monotonic()
                if pause is None:
                    raise StoreError(
                        f"{self.what}: reading failed at byte {self.offset} of {self.size}: {self._streak.summary()}"
                        f"{self._hint}"
                    ) from None
                time.sleep(pause)
                continue
            self.offset += len(data)
            self._since_failure += len(data)
            if (self._since_failure >= PROGRESS_BYTES or self.offset >= self.size
                    or time.monotonic() - self._failed_at > self._policy.worst_case_s()):
                self._streak.reset()
            return data

    def _check_rate(self) -> None:
        """After each read: over every `read_timeout_s` spent reading, at least `min_rate` bytes a
        second must have arrived, else the body counts as stalled (TimeoutError, retried)."""
        p = self._policy
        if self._window_s < p.read_timeout_s:
            return
        rate = self._window_bytes / self._window_s
        if rate < p.min_rate:
            raise TimeoutError(f"the server sends too slowly ({self._window_bytes} bytes in {self._window_s:.1f}s of "
                               f"reading, under SHARDS_MIN_RATE {p.min_rate:.0f} bytes/s)")
        self._window_s, self._window_bytes = 0.0, 0

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # the connection is already broken; closing is only hygiene
                pass

    def close(self) -> None:
        if not self.closed:
            self._drop_body()
        super().close()
