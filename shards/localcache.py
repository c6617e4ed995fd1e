"""`--local-cache DIR`: keep the shards a run streams on local disk, for the next run on this node.

`CachingStore(remote, dir, max_bytes=..., records=manifest.shards)` is a Store that behaves exactly
like `remote`, except that opening a shard the manifest lists (`open_read(record.name)`) is served
from DIR when DIR holds a verified copy, and otherwise streams from `remote` while saving the
bytes it hands out:

    remote stream --> consumer (the shard reader: its own count + sha256 checks are unchanged)
                 \\--> DIR/objects/ab/<sha256>.tar.<tmp>  --at the end: size + sha256 match? rename

- Keyed by content: a copy is named by the record's sha256, so a shard is reused by any cache
  holding the same bytes, and a changed shard can never be served from a stale copy.
- Nothing waits for a download: the first run streams from its first step, exactly as without
  the cache. Only a stream read to its end with the right size and sha256 is kept; anything else
  (a shard abandoned half way, a full disk, a mismatch) deletes its temp file and is not an error
  of the cache (the reader itself reports a bad shard).
- Verified before use: a local copy is hashed before it is served (local disk at >1 GB/s against a
  loader that needs a few MB/s per GPU); a copy that does not match (bit rot, a truncated file,
  tampering) is deleted with a warning and the shard streams from `remote` again. The reader's
  own sha256 check still runs on what it reads, so damage between the check and the read is an
  error, never silent.
- Bounded: after each new copy, least recently used copies (by mtime, which every hit refreshes;
  atime is unreliable under noatime mounts) are deleted until the total is within `max_bytes`.
  A shard larger than `max_bytes` is streamed without being saved.
- Shared safely: several processes (loader workers, ranks, concurrent runs) may use one DIR. Temp
  names are unique, publishing is an atomic rename of identical content, and a copy deleted by a
  concurrent eviction after we opened it stays readable through our open file.
- Never led outside DIR: symbolic links inside it (a folder `objects/ab` or a copy planted as a
  link by someone else sharing the folder) are never followed: eviction, publishing and
  verification skip them, and a copy is opened with O_NOFOLLOW | O_NONBLOCK and used only if it
  is a regular file (a FIFO or device never blocks or streams forever). DIR itself may be a link
  (the user's choice of disk).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
import time
from collections import deque
from pathlib import Path
from typing import BinaryIO, Iterable

from .errors import ShardError
from .manifest import ShardRecord
from .store import TEMP_PREFIX, Store, new_temp_path, stream_sha256

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A temp file untouched for this long belongs to a dead process (a live stream writes as it reads).
STALE_TEMP_SECONDS = 6 * 3600


class CachingStore(Store):
    """`remote`, with the shards named by `records` kept in a local, size-bounded, verified cache."""

    def __init__(self, remote: Store, cache_dir: str | Path, *, max_bytes: int | None = None,
                 records: Iterable[ShardRecord] = ()):
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"local cache size limit must be a whole number of bytes >= 0, got {max_bytes!r}")
        self.remote = remote
        self.url = remote.url
        self.dir = Path(cache_dir).expanduser().absolute()
        self.objects = self.dir / "objects"
        self.max_bytes = max_bytes
        self._shards: dict[str, tuple[str, int]] = {}
        self.register(records)
        if self.objects.is_symlink():
            raise ShardError(f"local cache {self.dir}: {self.objects} is a symbolic link; refusing to follow it "
                             "(it could point anywhere). Remove it, or use another --local-cache")
        if self.objects.exists() and not self.objects.is_dir():
            raise ShardError(f"local cache {self.dir}: {self.objects} is not a folder. Remove it, or use another "
                             "--local-cache")
        try:
            self.objects.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ShardError(f"local cache {self.dir}: cannot create {self.objects} ({e.strerror or e})") from None
        if not os.access(self.objects, os.W_OK | os.X_OK):
            raise ShardError(f"local cache {self.dir}: {self.objects} is not writable")
        self._remove_stale_temps()
        # What happened to recent opens (rel, hit | fetched | corrupt | too_big | passthrough), for
        # logs and tests; bounded, a run opens every shard once per epoch.
        self.events: deque[tuple[str, str]] = deque(maxlen=100_000)

    def register(self, records: Iterable[ShardRecord]) -> None:
        """Shards (name -> sha256, bytes) that may be served from the local cache."""
        for r in records:
            if not _SHA256.match(r.sha256):
                raise ValueError(f"{r.name}: record sha256 {r.sha256!r} is not a sha256 hex digest")
            self._shards[r.name] = (r.sha256, r.bytes)

    def path_for(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / f"{sha256}.tar"

    # -- the cached read -------------------------------------------------------------------------
    def open_read(self, rel: str) -> BinaryIO:
        known = self._shards.get(rel)
        if known is None:
            self.events.append((rel, "passthrough"))
            return self.remote.open_read(rel)
        sha, size = known
        path = self.path_for(sha)
        local = self._open_verified(rel, path, sha, size)
        if local is not None:
            self.events.append((rel, "hit"))
            return local
        src = self.remote.open_read(rel)
        if self.max_bytes is not None and size > self.max_bytes:
            self.events.append((rel, "too_big"))
            return src
        self.events.append((rel, "fetched"))
        return _TeeReader(src, self, rel, path, sha, size)

    def _bucket_ok(self, folder: Path) -> bool:
        """`objects/ab`: a real folder directly in `objects`, never a link to somewhere else."""
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            return True  # not there yet: created as a real folder when needed
        return stat.S_ISDIR(st.st_mode)

    def _open_verified(self, rel: str, path: Path, sha: str, size: int) -> BinaryIO | None:
        if not self._bucket_ok(path.parent):
            log.warning("local cache %s: %s is not a plain folder (a symbolic link?); not used", self.dir, path.parent)
            return None
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            return None
        except OSError as e:  # ELOOP: a symbolic link planted under a copy's name
            log.warning("local cache %s: %s cannot be opened as a plain file (%s); ignored", self.dir, path,
                        e.strerror or e)
            self.events.append((rel, "corrupt"))
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder or FIFO under a copy's name: left alone, unused
            os.close(fd)
            log.warning("local cache %s: %s is not a regular file; ignored, streaming it from %s", self.dir, path,
                        self.remote.url)
            self.events.append((rel, "corrupt"))
            return None
        f = os.fdopen(fd, "rb")
        try:
            st = os.fstat(f.fileno())
            problem = None
            if st.st_size != size:
                problem = f"{st.st_size} bytes, the record says {size}"
            else:
                got = stream_sha256(f)
                if got != sha:
                    problem = f"sha256 {got}, the record says {sha}"
            if problem is not None:
                f.close()
                log.warning("%s: local copy %s is damaged (%s); deleted, streaming it from %s again",
                            rel, path, problem, self.remote.url)
                self.events.append((rel, "corrupt"))
                path.unlink(missing_ok=True)
                return None
            f.seek(0)
            now = time.time()
            try:
                os.utime(path, (now, now))  # most recently used
            except OSError:
                pass  # evicted meanwhile: our open file still reads
            return f
        except BaseException:
            f.close()
            raise

    def _publish(self, tmp: Path, path: Path) -> None:
        if not self._bucket_ok(path.parent):
            raise OSError(f"{path.parent} is not a plain folder (a symbolic link?)")
        os.replace(tmp, path)
        self._evict(keep=path)

    def _buckets(self) -> list[Path]:
        """The real `objects/ab` folders (links skipped)."""
        out = []
        with os.scandir(self.objects) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    out.append(Path(e.path))
        return out

    # -- size bound ------------------------------------------------------------------------------
    def entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, bytes, path) of every complete local copy, least recently used first."""
        out = []
        for bucket in self._buckets():
            with os.scandir(bucket) as it:
                for e in it:
                    if not e.name.endswith(".tar") or not e.is_file(follow_symlinks=False):
                        continue
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    out.append((st.st_mtime, st.st_size, Path(e.path)))
        return sorted(out)

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def _evict(self, keep: Path) -> None:
        if self.max_bytes is None:
            return
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for _, size, p in entries:
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size
            log.info("local cache %s: evicted %s (%d bytes) to stay within %d bytes", self.dir, p.name, size,
                     self.max_bytes)

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TEMP_SECONDS
        for bucket in self._buckets():
            with os.scandir(bucket) as it:
                for e in it:
                    try:
                        if (e.name.startswith(TEMP_PREFIX) and not e.is_dir(follow_symlinks=False)
                                and e.stat(follow_symlinks=False).st_mtime < cutoff):
                            os.unlink(e.path)
                    except FileNotFoundError:
                        pass

    # -- everything else is the remote's --------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.remote.exists(rel)

    def read_bytes(self, rel: str) -> bytes:
        return self.remote.read_bytes(rel)

    def read_capped(self, rel: str, variable: str) -> bytes:
        return self.remote.read_capped(rel, variable)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.remote.write_bytes(rel, data)

    def put_file(self, rel: str, local_path) -> None:
        self.remote.put_file(rel, local_path)

    def size(self, rel: str) -> int:
        return self.remote.size(rel)

    def delete(self, rel: str) -> None:
        self.remote.delete(rel)

    def list(self, prefix: str = "") -> list[str]:
        return self.remote.list(prefix)

    def staging_dir(self, *, tmp_dir: str | Path | None = None) -> Path:
        return self.remote.staging_dir(tmp_dir=tmp_dir)

    def cleanup_staging(self, *, tmp_dir: str | Path | None = None, dry_run: bool = False) -> list[str]:
        return self.remote.cleanup_staging(tmp_dir=tmp_dir, dry_run=dry_run)

    def cleanup_incomplete(self, *, tmp_dir: str | Path | None = None, dry_run: bool = False) -> list[str]:
        return self.remote.cleanup_incomplete(tmp_dir=tmp_dir, dry_run=dry_run)

    def display(self, rel: str) -> str:
        return self.remote.display(rel)

    def why_missing(self) -> str | None:
        return self.remote.why_missing()

    def __repr__(self) -> str:
        return f"CachingStore({self.remote!r}, {str(self.dir)!r}, max_bytes={self.max_bytes})"


class _TeeReader(io.RawIOBase):
    """Hands the remote stream to the consumer unchanged while writing it to a temp file; publishes
    the file under its content name when the stream ends with the expected size and sha256."""

    def __init__(self, src: BinaryIO, owner: CachingStore, rel: str, path: Path, sha: str, size: int):
        super().__init__()
        self._src = src
        self._owner, self._rel, self._path, self._sha, self._size = owner, rel, path, sha, size
        self._hash = hashlib.sha256()
        self._n = 0
        self._tmp: Path | None = None
        self._file = None
        try:
            if not owner._bucket_ok(path.parent):
                raise OSError(f"{path.parent} is not a plain folder (a symbolic link?)")
            self._tmp = new_temp_path(path.parent, path.name)
            self._file = open(self._tmp, "wb")
        except OSError as e:
            log.warning("%s: cannot save a local copy in %s (%s); streaming only", rel, owner.dir, e)
            self._discard()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        if self._file is not None:
            if data:
                try:
                    self._file.write(data)
                except OSError as e:  # a full disk must not stop training
                    log.warning("%s: saving the local copy failed (%s); streaming only", self._rel, e)
                    self._discard()
                else:
                    self._hash.update(data)
                    self._n += len(data)
            elif n != 0:
                self._finish()
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def _finish(self) -> None:
        ok = self._n == self._size and self._hash.hexdigest() == self._sha
        if not ok:
            # The reader raises its own error for a bad shard; the cache just keeps nothing.
            self._discard()
            return
        try:
            self._file.close()
            self._file = None
            self._owner._publish(self._tmp, self._path)
            self._tmp = None
        except OSError as e:
            log.warning("%s: could not keep the local copy (%s)", self._rel, e)
            self._discard()

    def _discard(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        if not self.closed:
            self._discard()  # a stream closed before its end keeps nothing
            try:
                self._src.close()
            finally:
                super().close()
