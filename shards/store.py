"""Where a cache lives: the Store abstraction and its local-folder backend.

A Store is a root URL plus '/'-separated relative paths under it. Everything the cache code does
to storage goes through these few calls, so an object-store backend (s3://, read-only https://)
slots in later without touching the writer, reader or CLI. The calls are chosen so that each has
an atomic implementation on object storage too:

- `write_bytes` and `put_file` publish a complete object or nothing (local: temp name in the same
  folder, fsync, `os.replace` / `os.link`, fsync of the folder; S3: a single PUT or a completed
  multipart upload). A reader never sees a partial file under a final name, whatever kills the
  writer.
- `put_file` (shards) is a create-if-absent: it never replaces a published file. If the name is
  taken by the same bytes, it succeeds (a resumed, byte-reproducible writer re-publishing an
  orphan shard); by other bytes, it raises PublishConflictError naming both. So two writers of
  one cache can never publish a shard under another writer's record. `write_bytes` (records,
  identity, manifest) replaces.
- Staging: writers build files in `staging_dir(tmp_dir=...)`, a folder per cache (a hidden
  `.staging` folder of a local cache's root without tmp_dir, else a per-cache subfolder of the
  user's tmp_dir or of the system temp folder). Every temp file is named TEMP_PREFIX + ..., and `cleanup_incomplete(tmp_dir=...)`
  is the one clean-up of what killed writers left: temp files in the cache and in its staging
  folder, and (S3) unfinished multipart uploads.
- `open_read` streams; nothing needs random access, so a plain HTTP GET body is enough.
- `list` and `cleanup_incomplete` exist only for clean-up (`python -m shards gc`, and a precompute
  at start); training and resume never list (the manifest and the per-shard records name every
  file).

Backends, chosen by `open_store(url)`:
- a path or file:// URL -> LocalStore (here);
- s3://bucket/prefix -> shards.s3.S3Store (boto3; endpoint and credentials from the standard AWS
  variables and profiles; resumable reads, atomic conditional uploads);
- http(s)://host/prefix -> shards.http.HttpStore, read-only (public buckets, static servers).
Remote failures that outlast the retry budget raise shards.remote.StoreError, a ShardError.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import shutil
import stat
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

from .errors import PublishConflictError, ShardError

# Prefix of every temporary file a LocalStore (or a writer staging beside it) creates. Hidden, so
# globbing `shards/*.tar` never picks one up; `list()` skips them unless asked.
TEMP_PREFIX = ".tmp-"
# A local cache stages its shards in this hidden folder of its root (same filesystem: publishing
# is a link, never a copy). With a tmp_dir, and for remote caches, the staging folder is
# <tmp_dir or system temp>/STAGING_FOLDER/<16 hex digits of sha256(cache URL)>.
LOCAL_STAGING = ".staging"
STAGING_FOLDER = "shards-staging"
_HASH_CHUNK = 4 << 20

log = logging.getLogger(__name__)


def conflict_message(where: str, cache_url: str, theirs: str, ours: str) -> str:
    """The one wording of a publish conflict, for every backend: both sides, and the way out."""
    return (
        f"{where}: already exists with other content ({theirs}; this upload: {ours}). Another process is "
        f"writing this cache, or an earlier run left this shard without its record. Never run two precomputes "
        f"on one cache; if none is running, delete the leftover with `python -m shards gc --orphans {cache_url}` "
        f"and re-run"
    )


def stream_sha256(f: BinaryIO) -> str:
    """Hex sha256 of what is left to read in binary stream `f`, read in 4 MiB chunks."""
    h = hashlib.sha256()
    while chunk := f.read(_HASH_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a local file."""
    with open(path, "rb") as f:
        return stream_sha256(f)


def cache_digest(url: str) -> str:
    """16 hex digits naming a cache in shared local folders (staging): sha256 of its staging key."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]


class Store(ABC):
    """A cache root. Paths are relative, '/'-separated, and never contain '..'."""

    url: str

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """Whole file; FileNotFoundError if missing."""

    def read_capped(self, rel: str, variable: str) -> bytes:
        """Whole file, or LimitError (naming it, the cap and `variable`, see `shards.limits`) when
        it is larger than the cap: a remote object's declared length is checked before its body
        is read, and never more than cap + 1 bytes are read, whatever a server or a file holds.
        FileNotFoundError if missing."""
        from . import limits

        limit = limits.cap(variable)
        where = self.display(rel)
        with self.open_read(rel) as f:
            declared = getattr(f, "size", None)  # a remote reader knows it from the response
            if declared is None:
                try:
                    declared = os.fstat(f.fileno()).st_size  # a local file
                except (OSError, ValueError):  # no file descriptor (io.UnsupportedOperation is an OSError)
                    pass
            if isinstance(declared, int):
                limits.check_size(declared, variable, where)
            parts, got = [], 0
            while chunk := f.read(min(1 << 20, limit + 1 - got)):
                parts.append(chunk)
                got += len(chunk)
                if got > limit:
                    raise limits.too_big(where, variable)
        return b"".join(parts)

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic: afterwards `rel` holds exactly `data` (or, after a crash, its old content)."""

    @abstractmethod
    def put_file(self, rel: str, local_path: str | Path) -> None:
        """Atomically publish a finished local file under `rel`, if `rel` does not exist yet.

        If `rel` exists with the same bytes, this is a success that changes nothing (logged);
        with other bytes, PublishConflictError naming both. Takes ownership of `local_path`: it
        no longer exists when this returns successfully (after an error it is the caller's).
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

    def staging_dir(self, *, tmp_dir: str | Path | None = None) -> Path:
        """The local folder in which writers build this cache's files before publishing them.

        `<tmp_dir>/shards-staging/<cache_digest(staging_key())>`, with the system temp folder when tmp_dir
        is None (a local cache without tmp_dir overrides this: a hidden folder of its root). One
        folder per cache, so cleaning it never touches another cache's (or anyone else's) files
        in a shared temp folder. Not created here.
        """
        base = Path(tmp_dir).expanduser() if tmp_dir is not None else Path(tempfile.gettempdir())
        return base.absolute() / STAGING_FOLDER / cache_digest(self.staging_key())

    def prepare_staging(self, *, tmp_dir: str | Path | None = None) -> Path:
        """`staging_dir(tmp_dir=tmp_dir)`, created, and checked to be this writer's own: a real
        folder reached through no symbolic link of the staging layout (in a shared temp folder
        another user could plant one, and clean-up would then delete files where it points) and,
        outside a local cache's root, owned by this user. ShardError otherwise."""
        folder = self.staging_dir(tmp_dir=tmp_dir)
        folder.mkdir(parents=True, exist_ok=True)
        check_staging(folder)
        if os.stat(folder).st_uid != os.getuid() and folder.parent.name == STAGING_FOLDER:
            raise ShardError(f"the staging folder {folder} belongs to another user: use --tmp-dir with a folder "
                             "of your own")
        return folder

    def layout_problems(self, folders: tuple[str, ...], files: tuple[str, ...]) -> list[str]:
        """What stands in the way of writing the cache's `folders` and `files` (a writer asks
        before it starts, instead of failing after its work): default none (an object store
        has no folders, and any key can be written)."""
        return []

    def why_missing(self) -> str | None:
        """Asked after a file was not found: why nothing at all can be found here (the folder or
        bucket does not exist), said instead of "no such file"; None when the store itself is
        there. Default: None (a store that cannot tell)."""
        return None

    def staging_key(self) -> str:
        """What names this cache among the staging folders of one machine: its URL (a store whose
        URL alone does not say which server it is on adds that)."""
        return self.url

    def cleanup_staging(self, *, tmp_dir: str | Path | None = None, dry_run: bool = False) -> list[str]:
        """Remove the temp files in `staging_dir(tmp_dir=tmp_dir)`; return their absolute paths.

        The staging folder is per machine: on several machines, each one's first process calls
        this (before any writer starts), while one process calls `cleanup_incomplete`.
        """
        folder = self.staging_dir(tmp_dir=tmp_dir)
        if not folder.is_dir():
            check_staging(folder)  # a dangling link is refused as well
            return []
        check_staging(folder)
        temps = sorted(p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX) and not p.is_dir())
        if not dry_run:
            for p in temps:
                p.unlink(missing_ok=True)
        return [str(p) for p in temps]

    def cleanup_incomplete(self, *, tmp_dir: str | Path | None = None, dry_run: bool = False) -> list[str]:
        """Remove everything killed writers left behind that is not a file of the cache: temp files
        in the cache and in its staging folder for `tmp_dir` (the same tmp_dir the writers were
        given), and unfinished multipart uploads (S3). Returns what was (with dry_run: would be)
        removed: cache-relative paths for what is in the cache (temp files of a local cache,
        uploads on S3), absolute paths for staged files outside it.

        Only safe while no writer is using this cache: it removes in-flight writes too. A
        precompute calls it once, on its first process, before any writer starts.
        """
        return self.cleanup_staging(tmp_dir=tmp_dir, dry_run=dry_run)

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


def _linked_folder(path: Path) -> str:
    return (f"{path}: a symbolic link inside the cache, which is never followed (writers would write, and gc "
            "delete, where it points): make it a real folder")


def check_staging(folder: Path) -> None:
    """ShardError when the staging folder `folder`, or the shared STAGING_FOLDER above it, is a
    symbolic link: writers and clean-up never follow one out of the layout they own."""
    for path in (folder, folder.parent) if folder.parent.name == STAGING_FOLDER else (folder,):
        if path.is_symlink():
            raise ShardError(f"the staging folder {path} is a symbolic link, which writers and clean-up never "
                             "follow: remove it (or use --tmp-dir with a folder of your own)")


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


def nearest_existing(path: str | Path) -> Path:
    """`path`, or its nearest ancestor that exists: where a folder that is not there yet would be
    created, to be probed without creating anything (a refused run leaves nothing behind)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def writable_problem(folder: str | Path) -> str | None:
    """Why files cannot be created in `folder`, or None; found by trying (a probe file written and
    removed), because permission bits say nothing for root or for read-only mounts."""
    folder = Path(folder)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=TEMP_PREFIX + "write-test-"):
            pass
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) and str(e.filename) != str(folder) else ""
        return f"cannot write there{where}: {e.strerror or e}"
    return None


def apply_umask(folder: str | Path) -> None:
    """Give `folder` and everything in it the permissions a new file gets under the user's umask
    (0755 / 0644 with the usual 022). For trees built with tools that write private files
    (mkdtemp's 0700, save_pretrained's 0600 temp files) before they are published."""
    mask = os.umask(0)
    os.umask(mask)
    folder = Path(folder)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


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
        self._warned_no_links = False

    def why_missing(self) -> str | None:
        if not self.root.exists():
            return f"{self.url}: no such folder (a cache is a folder, or s3:// or https://)"
        if not self.root.is_dir():
            return f"{self.url}: is a file, not a cache folder"
        return None

    def layout_problems(self, folders: tuple[str, ...], files: tuple[str, ...]) -> list[str]:
        problems = []
        for name in (*folders, LOCAL_STAGING):  # the staging folder writers build files in, too
            p = self.root / name
            if p.is_symlink():
                problems.append(_linked_folder(p))
            elif p.exists() and not p.is_dir():
                problems.append(f"{p}: not a folder, where the cache keeps its {name}: move it away")
        for name in files:
            p = self.root / name
            if p.is_symlink() or (p.exists() and not p.is_file()):
                problems.append(f"{p}: not a regular file, where the cache writes its {name}: move it away")
        return problems

    def path(self, rel: str) -> Path:
        """`rel` under the root. Its folders inside the cache (`shards/`, `records/`) must be real
        folders: one that is a symbolic link would have writers overwrite, and gc delete, files
        outside the cache, so it is a ShardError (the root itself may be a link)."""
        path = self.root / check_rel(rel)
        folder = self.root
        for part in Path(rel).parts[:-1]:
            folder = folder / part
            if folder.is_symlink():
                raise ShardError(_linked_folder(folder))
        return path

    def exists(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def read_bytes(self, rel: str) -> bytes:
        with self.open_read(rel) as f:
            return f.read()

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
        # The data must be on disk before a link makes it visible, or a power loss could leave a
        # complete-looking name over missing blocks. Cheap if the caller already did it.
        fsync_file(src)
        staged = src
        if os.stat(src).st_dev != os.stat(dest.parent).st_dev:
            # A link cannot cross filesystems: copy beside the destination first.
            staged = new_temp_path(dest.parent, dest.name)
            try:
                shutil.copyfile(src, staged)
                fsync_file(staged)
            except BaseException:
                staged.unlink(missing_ok=True)
                raise
        try:
            created = self._publish_if_absent(rel, staged, dest, origin=src)
        finally:
            if staged != src:
                staged.unlink(missing_ok=True)
        src.unlink(missing_ok=True)
        if created:
            fsync_dir(dest.parent)

    def _publish_if_absent(self, rel: str, staged: Path, dest: Path, *, origin: Path) -> bool:
        """Give `staged` the name `dest` unless that name exists: True if published, False if
        `dest` already held the same bytes; PublishConflictError (naming `origin`, the caller's
        file) if it held other bytes.

        `os.link` is the create-if-absent primitive (atomic, fails with EEXIST); on a filesystem
        without hard links (some FUSE/SMB mounts) an existence check then `os.replace` is the
        fallback, whose window between the two lets a concurrent writer slip through (warned once).
        """
        try:
            os.link(staged, dest)
            return True
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
            if not self._warned_no_links:
                self._warned_no_links = True
                log.warning("%s: the filesystem has no hard links (%s); publishing shards by check-then-rename, "
                            "which cannot detect two writers racing for one shard", self.url, e)
            if not dest.exists():
                os.replace(staged, dest)
                return True
        self._check_same(rel, staged, dest, origin)
        return False

    def _check_same(self, rel: str, staged: Path, dest: Path, origin: Path) -> None:
        ours_size, theirs_size = staged.stat().st_size, dest.stat().st_size
        ours = file_sha256(staged)
        theirs = file_sha256(dest) if theirs_size == ours_size else None
        if theirs == ours:
            log.info("%s: already present with the same content (sha256 %s...); kept", self.display(rel), ours[:12])
            return
        raise PublishConflictError(conflict_message(
            self.display(rel), self.url,
            theirs=f"{theirs_size} bytes, sha256 {theirs or file_sha256(dest)}",
            ours=f"{origin} with {ours_size} bytes, sha256 {ours}",
        ))

    def open_read(self, rel: str) -> BinaryIO:
        # Opened without blocking and checked: a FIFO or device planted in a shared cache folder
        # is refused, never waited on or read without end.
        try:
            fd = os.open(self.path(rel), os.O_RDONLY | os.O_NONBLOCK)
        except NotADirectoryError:  # a file where a folder of the path should be: no such file
            raise FileNotFoundError(f"{self.display(rel)} does not exist") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ShardError(f"{self.display(rel)}: not a regular file (a cache holds only files)")
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def size(self, rel: str) -> int:
        path = self.path(rel)
        if not path.is_file():
            raise FileNotFoundError(f"{self.display(rel)} does not exist")
        return path.stat().st_size

    def delete(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def list(self, prefix: str = "", *, include_temp: bool = False) -> list[str]:
        base = self.path(f"{prefix.rstrip('/')}/x").parent if prefix else self.root  # its folders checked too
        if not base.is_dir():
            return []
        out = []
        for folder, dirs, files in os.walk(base):  # never into a linked folder (os.walk does not follow)
            for name in files:
                p = Path(folder) / name
                if p.is_file() and (include_temp or not name.startswith(TEMP_PREFIX)):
                    out.append(p.relative_to(self.root).as_posix())
        return sorted(out)

    def staging_dir(self, *, tmp_dir: str | Path | None = None) -> Path:
        """Without tmp_dir: `<root>/.staging` (same filesystem, so publishing is a link)."""
        if tmp_dir is None:
            return self.root / LOCAL_STAGING
        return super().staging_dir(tmp_dir=tmp_dir)

    def cleanup_incomplete(self, *, tmp_dir: str | Path | None = None, dry_run: bool = False) -> list[str]:
        # Temp files anywhere in the cache: staged shards (<root>/.staging) and the temp names of
        # write_bytes and cross-filesystem copies beside their destinations.
        temps = [rel for rel in self.list(include_temp=True) if rel.rsplit("/", 1)[-1].startswith(TEMP_PREFIX)]
        if not dry_run:
            for rel in temps:
                self.path(rel).unlink(missing_ok=True)
        staged = self.cleanup_staging(tmp_dir=tmp_dir, dry_run=dry_run) if tmp_dir is not None else []
        return temps + staged
