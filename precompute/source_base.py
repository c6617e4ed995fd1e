"""The source contract every dataset reader implements: `RawItem`, `Source` (errors: `precompute.errors.SourceError`).

This module owns what all sources share: the item type (raw encoded bytes plus captions, never
decoded here), the unit contract (output shard i of the cache is made from unit i, so units must
be deterministic and independent of each other), the one error type for a dataset that cannot be
read at all, and the small helpers every reader uses to turn a bad row into an error item
(reading a file named by a row, parsing a caption cell) and the bounds on what a reader may
take in (`ReadLimits`). The readers live beside it:
`precompute.sources` (folders with a metadata file, and `open_source`, which picks a reader),
`precompute.wds_source` (WebDataset tars, local or remote) and `precompute.hf_source` (Hugging
Face datasets).

Bounded reading: inputs come from people and scrapers, so nothing a row names may block, read
forever or exhaust memory or the stack. `read_file` reads only regular files (opened with
O_NONBLOCK, checked with fstat on the opened descriptor: a FIFO, a device such as /dev/zero, a
socket or a folder is refused without a byte read), only inside the dataset folder unless
`follow_symlinks` (a symlink pointing out, a `../` escape or an absolute path elsewhere is
`*_outside_root`), and at most `max_file_bytes` (read in chunks, so an over-size file is never
read whole; `*_too_large`). JSON from rows and tar members is size- and depth-checked before
`json.loads` (`json_problem`; `ReadLimits.max_json_bytes` / `max_json_depth`, --max-json-bytes and
--max-json-depth), so a 200,000-deep `[[[[...` is one invalid row, never a RecursionError, and a
JSON line is read at most that far (`bounded_lines`), never whole.

Fingerprints: every item carries `fingerprint`, for noticing later which inputs were edited.
"content" mode (the default) is `"sha256:" + hex` over the image bytes, the conditioning bytes and
the captions (canonical JSON of the list), in that order, each with a length prefix (and, for an
error item, its reason). "stat" mode (`"stat:..."`) is, for file-backed items, the size and
mtime_ns of the image and conditioning files plus a hash of the captions, computed from the
metadata and os.stat alone: `Source.unit_fingerprints(i)` then lists a unit's fingerprints
without reading a single image. Tars in stat mode use the tar's size and mtime plus each
member's offset and size; Hugging Face datasets (and remote tars, which have no mtime) always
use content mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Source items per output shard (folder datasets): ~256 x 1024 px samples is a few hundred MB.
DEFAULT_SAMPLES_PER_SHARD = 256
# Largest input file or tar member read: far above any real training image (a 100 MP PNG is
# ~100-300 MB), far below what would exhaust a decode worker's memory.
DEFAULT_MAX_FILE_BYTES = 256 << 20
# A metadata row or a tar .json member: real ones are a few KB.
MAX_JSON_BYTES = 1 << 20
# Nesting of a metadata row / .json member: real ones are 2-3 deep; CPython's parser recurses
# per level and dies near 1000 (RecursionError), so the cap sits far below that.
MAX_JSON_DEPTH = 64
_READ_CHUNK = 1 << 20
FINGERPRINT_MODES = ("content", "stat")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


@dataclass(frozen=True)
class ReadLimits:
    """What a source may take in from one file or member (module docstring). precompute sets
    them from --max-input-bytes, --follow-symlinks, --max-json-bytes and --max-json-depth."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    follow_symlinks: bool = False  # read files whose real path is outside the dataset folder
    max_json_bytes: int = MAX_JSON_BYTES  # a metadata row (JSON line), a tar .json or text member
    max_json_depth: int = MAX_JSON_DEPTH  # nesting of any JSON read from the dataset

    def problems(self) -> list[str]:
        p = []
        for name in ("max_file_bytes", "max_json_bytes", "max_json_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                p.append(f"{name} must be an integer >= 1, got {value!r}")
        return p


@dataclass
class RawItem:
    source_id: str  # human name: the image path as the metadata gives it, or "<tar>:<key>"
    image: bytes | None  # raw encoded bytes (None when missing)
    cond: bytes | None
    captions: list[str] | None
    error: tuple[str, str] | None = None  # (reason slug, detail) when the source knows it is bad
    cond_id: str | None = None  # human name of the conditioning image, for messages
    # "sha256:<hex>" of the item's content, or "stat:..." (module docstring). Sources fill it.
    fingerprint: str | None = None


def captions_json(captions: list[str] | None) -> bytes:
    """The canonical encoding of a caption list that fingerprints hash."""
    return json.dumps(captions, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def content_fingerprint(item: RawItem) -> str:
    """"sha256:" + hex over image, conditioning image and captions, each length-prefixed (8 bytes,
    big-endian; all ones for a missing part), then an error item's reason slug."""
    h = hashlib.sha256()
    for part in (item.image, item.cond, captions_json(item.captions),
                 item.error[0].encode() if item.error else None):
        if part is None:
            h.update(b"\xff" * 8)
        else:
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
    return "sha256:" + h.hexdigest()


def with_content_fingerprint(item: RawItem) -> RawItem:
    item.fingerprint = content_fingerprint(item)
    return item


def captions_hash(captions: list[str] | None) -> str:
    return hashlib.sha256(captions_json(captions)).hexdigest()[:16]


def stat_part(path: str | Path | None) -> str:
    """"size:mtime_ns" of a file (symlinks followed), "-" when there is none or it cannot be stat'ed."""
    if path is None:
        return "-"
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return "-"
    return f"{st.st_size}:{st.st_mtime_ns}"


class Source(ABC):
    """A dataset split into deterministic units; output shard i of the cache comes from unit i."""

    kind: str

    @abstractmethod
    def describe(self) -> dict:
        """What identifies this input in the cache identity: kind, resolved path, columns, counts,
        a content fingerprint where one is cheap. Never modification times."""

    @abstractmethod
    def num_units(self) -> int: ...

    @abstractmethod
    def iter_unit(self, i: int) -> Iterator[RawItem]:
        """The items of unit i, always in the same order, one per row / tar sample."""

    @abstractmethod
    def unit_name(self, i: int) -> str:
        """A human name for unit i (for logs and errors)."""

    def num_items(self) -> int | None:
        """Total number of items, when known without reading the data (None otherwise)."""
        return None

    def unit_size(self, i: int) -> int | None:
        """Number of items in unit i, when known without reading it (None otherwise)."""
        return None

    def unit_fingerprints(self, i: int) -> list[str]:
        """The fingerprint of every position of unit i (error items included), equal to those the
        items of `iter_unit(i)` carry. This default reads the unit; sources in stat mode override
        it with a metadata-and-stat-only listing."""
        return [it.fingerprint or content_fingerprint(it) for it in self.iter_unit(i)]

    def _check_unit(self, i: int) -> None:
        if not 0 <= i < self.num_units():
            d = self.describe()
            raise IndexError(f"unit {i} out of range: {d.get('path') or d.get('dataset')} has {self.num_units()} units")



# ----------------------------------------------------------------------------------- helpers


_FILE_TYPES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_type(mode: int) -> str:
    return next((name for test, name in _FILE_TYPES if test(mode)), "not a regular file")


def too_large(what: str, location: str, size: int, cap: int) -> tuple[str, str]:
    return (f"{what}_too_large", f"{location}: {size:,} bytes, over the {cap:,}-byte cap per input file "
                                 "(--max-input-bytes); raise it to keep such files")


def outside_root(root: Path, path: Path) -> str | None:
    """The real path of `path` when it lies outside the real `root` (symlinks resolved), else None."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return None if real == base or real.startswith(base.rstrip(os.sep) + os.sep) else real


def links_out(root: Path, paths) -> list[str]:
    """'PATH -> REAL' for each of `paths` whose real path lies outside `root` (symlinks resolved)."""
    out = []
    for path in paths:
        real = outside_root(root, path)
        if real is not None:
            out.append(f"{path} -> {real}")
    return out


def outside_problem(root: Path, links: list[str], what: str) -> str:
    """The message for `links` (from `links_out`) found under the dataset folder `root`."""
    shown = "; ".join(links[:5]) + (f"; and {len(links) - 5} more" if len(links) > 5 else "")
    return (f"{len(links)} {what} resolve{'s' if len(links) == 1 else ''} outside the dataset folder "
            f"{os.path.realpath(root)} (symbolic links pointing out): {shown}. Nothing outside it is read unless "
            "--follow-symlinks is given: pass it if the links are yours, or remove them")


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def file_url_path(url: str) -> str | None:
    """The local path of a file:// URL (percent-escapes decoded, as Path.as_uri() writes them);
    None for one that names another host."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    parts = urlparse(url)
    if parts.netloc not in ("", "localhost"):
        return None
    return url2pathname(parts.path)


def read_file(
    root: Path, rel: str, what: str, where: str, limits: ReadLimits = ReadLimits()
) -> tuple[bytes | None, tuple[str, str] | None]:
    """Read a file named by the metadata row at `where`; a failure becomes (None, (reason, detail)).

    Bounded as the module docstring says (regular files only, inside `root` unless
    `limits.follow_symlinks`, at most `limits.max_file_bytes`). Never raises for a bad row: a path
    the OS cannot even take (an embedded NUL byte) is the row's `metadata_invalid`, not the end
    of the run. A `file://` URL is its path; any other URL is the row's `metadata_invalid`."""
    scheme = _URL.match(rel)
    if scheme and scheme.group(1).lower() == "file":
        local = file_url_path(rel)
        if local is None:
            return None, ("metadata_invalid", f"{where}: {what} {rel!r:.120} is a file:// URL of another host")
        rel = local
    elif scheme:
        return None, ("metadata_invalid", f"{where}: {what} {rel!r:.120} is a URL: a dataset folder's rows name files "
                                          "on this machine (download them first; WebDataset tars, e.g. img2dataset's "
                                          "output, are read from s3:// and https:// as they are)")
    try:
        path = Path(rel) if os.path.isabs(rel) else root / rel
        if not limits.follow_symlinks:
            real = outside_root(root, path)
            if real is not None:
                return None, (f"{what}_outside_root", f"{path}: resolves to {real}, outside the dataset folder "
                                                      f"{os.path.realpath(root)}; --follow-symlinks reads it anyway")
        # O_NONBLOCK: opening a FIFO must not wait for a writer; the type check below refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except ValueError as e:  # "embedded null byte", or a path the platform rejects outright
        return None, ("metadata_invalid", f"{where}: {what} path {rel!r:.120} is not a valid file path ({e})")
    except FileNotFoundError:
        return None, (f"{what}_missing", f"{path}: file not found")
    except OSError as e:  # no permission, a socket (ENXIO), an I/O error
        return None, (f"{what}_unreadable", f"{path}: {e.strerror or e}")
    try:
        st = os.fstat(fd)  # of what was opened, not of the name (which may have been swapped since)
        if not stat.S_ISREG(st.st_mode):
            return None, (f"{what}_unreadable", f"{path}: not a regular file ({file_type(st.st_mode)})")
        cap = limits.max_file_bytes
        if st.st_size > cap:
            return None, too_large(what, str(path), st.st_size, cap)
        parts, total = [], 0
        while total <= cap:  # a file growing while read stops one chunk past the cap
            chunk = os.read(fd, min(_READ_CHUNK, cap + 1 - total))
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
        if total > cap:
            return None, too_large(what, str(path), total, cap)
        return b"".join(parts), None
    except OSError as e:
        return None, (f"{what}_unreadable", f"{path}: {e.strerror or e}")
    finally:
        os.close(fd)


def json_depth(raw: bytes) -> int:
    """Deepest nesting of [ and { in a JSON text, without parsing it (strings are skipped)."""
    if raw.count(b"[") + raw.count(b"{") <= 1:
        return int(b"[" in raw or b"{" in raw)
    a = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    step = np.isin(a, (ord("["), ord("{"))).astype(np.int32) - np.isin(a, (ord("]"), ord("}"))).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


def json_too_big(size: int, cap: int) -> str:
    return f"{size:,} bytes of JSON, over the {cap:,}-byte cap (--max-json-bytes)"


def json_problem(raw: bytes | str, *, max_bytes: int | None = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why `raw` must not be handed to json.loads (too big, nested too deep), or None."""
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    if max_bytes is not None and len(data) > max_bytes:
        return json_too_big(len(data), max_bytes)
    if data.count(b"[") + data.count(b"{") > max_depth:
        depth = json_depth(data)
        if depth > max_depth:
            return f"JSON nested {depth} levels deep, over the cap of {max_depth} (--max-json-depth)"
    return None


def bounded_lines(f, cap: int) -> Iterator[tuple[bytes | None, int]]:
    """(line, its length in bytes) for every line of the binary file `f` from where it stands. A
    line longer than `cap` bytes (newline included) is read on in chunks and dropped, never held
    whole: (None, its length). So one endless line costs a chunk of memory, not the file."""
    while True:
        raw = f.readline(cap + 1)
        if not raw:
            return
        if len(raw) <= cap:
            yield raw, len(raw)
            continue
        n = len(raw)
        while not raw.endswith(b"\n"):
            raw = f.readline(_READ_CHUNK)
            if not raw:
                break
            n += len(raw)
        yield None, n


def parse_captions(value: object, where: str, *, from_csv: bool,
                   limits: ReadLimits = ReadLimits()) -> tuple[list[str] | None, tuple[str, str] | None]:
    """A caption cell -> list of captions. A string is one caption; a list is several (kept in
    order, None entries dropped). In CSV a cell holding a JSON list of strings is a list."""
    if value is None:
        return None, None
    if isinstance(value, str):
        if from_csv and value.lstrip().startswith("["):
            try:
                if json_problem(value, max_bytes=limits.max_json_bytes, max_depth=limits.max_json_depth) is not None:
                    raise ValueError("not a caption list")  # kept as one (odd) caption string
                parsed = json.loads(value)
            except ValueError:
                parsed = None  # a caption that merely starts with "[" stays a string
            if isinstance(parsed, list) and all(isinstance(c, str) for c in parsed):
                return parsed, None
        return [value], None
    if isinstance(value, list) and all(c is None or isinstance(c, str) for c in value):
        return [c for c in value if c is not None], None
    return None, ("caption_invalid", f"{where}: caption must be a string or a list of strings, got {value!r:.80}")


def is_utf8_clean(values: Sequence[str]) -> bool:
    """False when a value carries undecodable bytes (kept as lone surrogates by surrogateescape)."""
    try:
        for v in values:
            v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
