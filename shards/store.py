"""Where a cache lives: the Store abstraction and its local-folder backend.

A Store is a root URL plus '/'-separated relative paths under it. Everything the cache code does
to storage goes through these few calls, so an object-store backend (s3://, read-only https://)
slots in later without touching the writer, reader or CLI. The calls are chosen so that each has
an atomic implementation on object storage too:

- `write_bytes` and `put_file` publish a complete object or nothing (local: temp name in the same
  folder, fsync, `os.replace`, fsync of the folder; S3: a single PUT or a completed multipart
  upload). A reader never sees a partial file under a final name, whatever kills the writer.
- `open_read` streams; nothing needs random access, so a plain HTTP GET body is enough.
- `list` and `cleanup_incomplete` exist only for cleanup tools (`python -m shards gc`); training
  and resume never list (the manifest and the per-shard records name every file).

Backends, chosen by `open_store(url)`:
- a path or file:// URL -> LocalStore (here);
- s3://bucket/prefix -> shards.s3.S3Store (boto3; endpoint and credentials from the standard AWS
  variables and profiles; resumable reads, atomic conditional uploads);
- http(s)://host/prefix -> shards.http.HttpStore, read-only (public buckets, static servers).
Remote failures that outlast the retry budget raise shards.remote.StoreError, a ShardError.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

# Prefix of every temporary file a LocalStore (or a writer staging beside it) creates. Hidden, so
# globbing `shards/*.tar` never picks one up; `list()` skips them unless asked.
TEMP_PREFIX = ".tmp-"


class Store(ABC):
    """A cache root. Paths are relative, '/'-separated, and never contain '..'."""

    url: str

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """Whole file; FileNotFoundError if missing."""

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic: afterwards `rel` holds exactly `data` (or, after a crash, its old content)."""

    @abstractmethod
    def put_file(self, rel: str, local_path: str | Path) -> None:
        """Atomically publish a finished local file under `rel`, replacing any old one.

        Takes ownership of `local_path`: it no longer exists when this returns successfully.
        """

    @abstractmethod
    def open_read(self, rel: str) -> BinaryIO:
        """A streaming binary reader (use as a context manager); FileNotFoundError if missing."""

    @abstractmethod
    def size(self, rel: str) -> int:
        """Size in bytes; FileNotFoundError if missing."""

    @abstractmethod
    def delete(self, rel: str) -> None:
        """Remove `rel`; no error if it is already gone."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted relative paths of the files under folder `prefix` (for gc/cleanup only)."""

    def cleanup_incomplete(self, *, dry_run: bool = False) -> list[str]:
        """Remove what killed writers left behind that is not a file of the cache (temp files,
        unfinished multipart uploads); return what was (or, with dry_run, would be) removed.

        Only safe while no writer is using this store: it removes in-flight writes too.
        """
        return []

    def staging_dir(self, rel: str) -> Path:
        """A local folder in which to build the file that will become `rel`.

        Local stores answer the destination's own folder, so that publishing is a rename on
        the same filesystem; remote stores answer the system temp folder.
        """
        return Path(tempfile.gettempdir())

    def display(self, rel: str) -> str:
        """`rel` as a full location, for messages."""
        return f"{self.url.rstrip('/')}/{rel}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def check_rel(rel: str) -> str:
    """Reject paths that could escape the root or differ between backends."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if (
        not isinstance(rel, str)
        or not rel
        or rel.startswith("/")
        or "\\" in rel
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ValueError(f"invalid cache path {rel!r}: expected a relative 'a/b/c' path without '.' or '..'")
    return rel


def new_temp_path(folder: Path, final_name: str) -> Path:
    """A fresh hidden path in `folder` for building `final_name`, created empty (O_EXCL).

    Created with mode 0o666 so the umask applies as for any ordinary file: a published shard is
    readable by whoever could read a normally written file (mkstemp's 0o600 would not be).
    """
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        path = folder / f"{TEMP_PREFIX}{final_name}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable. Some filesystems refuse fsync on a folder; the rename
    is still atomic there, only its durability across power loss is up to the filesystem."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalStore(Store):
    """A folder on a local (or network-mounted POSIX) filesystem."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)

    def path(self, rel: str) -> Path:
        return self.root / check_rel(rel)

    def exists(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        dest = self.path(rel)
        tmp = new_temp_path(dest.parent, dest.name)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(dest.parent)

    def put_file(self, rel: str, local_path: str | Path) -> None:
        dest = self.path(rel)
        src = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # The data must be on disk before the rename makes it visible, or a power loss could
        # leave a complete-looking name over missing blocks. Cheap if the caller already did it.
        fsync_file(src)
        if os.stat(src).st_dev != os.stat(dest.parent).st_dev:
            # A rename cannot cross filesystems: copy beside the destination first.
            tmp = new_temp_path(dest.parent, dest.name)
            try:
                shutil.copyfile(src, tmp)
                fsync_file(tmp)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            src.unlink()
            src = tmp
        try:
            os.replace(src, dest)
        except BaseException:
            src.unlink(missing_ok=True)
            raise
        fsync_dir(dest.parent)

    def open_read(self, rel: str) -> BinaryIO:
        return open(self.path(rel), "rb")

    def size(self, rel: str) -> int:
        path = self.path(rel)
        if not path.is_file():
            raise FileNotFoundError(f"{self.display(rel)} does not exist")
        return path.stat().st_size

    def delete(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def list(self, prefix: str = "", *, include_temp: bool = False) -> list[str]:
        base = self.path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for p in base.rglob("*"):
            if p.is_file() and (include_temp or not p.name.startswith(TEMP_PREFIX)):
                out.append(p.relative_to(self.root).as_posix())
        return sorted(out)

    def staging_dir(self, rel: str) -> Path:
        return self.path(rel).parent

    def cleanup_incomplete(self, *, dry_run: bool = False) -> list[str]:
        temps = [rel for rel in self.list(include_temp=True) if rel.rsplit("/", 1)[-1].startswith(TEMP_PREFIX)]
        if not dry_run:
            for rel in temps:
                self.path(rel).unlink(missing_ok=True)
        return temps


def open_store(url: str | Path) -> Store:
    """The Store for a local path, file://, s3:// or (read-only) http(s):// URL.

    Opening does no I/O: a wrong endpoint or missing credentials surface at the first call, as a
    StoreError naming the file and the cause.
    """
    if isinstance(url, Path):
        return LocalStore(url)
    if not isinstance(url, str) or not url:
        raise ValueError(f"invalid cache location {url!r}")
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URL {url!r} names host {parsed.netloc!r}; only local files are supported")
        return LocalStore(unquote(parsed.path))
    if scheme == "s3":
        from .s3 import S3Store  # boto3 is imported only by caches that need it

        return S3Store(url)
    if scheme in ("http", "https"):
        from .http import HttpStore

        return HttpStore(url)
    if scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive letter
        raise ValueError(
            f"cache location {url!r}: unknown URL scheme {scheme!r} (use a local path, file://, s3:// or https://)"
        )
    return LocalStore(url)
