"""WebDataset input tars (img2dataset output): one unit per tar, members grouped by key.

This module owns reading tars as plain bytes: a tar is a stream (`tarfile` mode "r|*"), nothing in
it is ever unpickled or decoded here. Members are grouped by key as webdataset does: an image
member (`jpg`, `jpeg`, `png`, `webp`), a caption from `txt` or a `json` member's `caption` /
`text`, a conditioning member by suffix (`cond.png`...). A corrupt tar yields the items before the
damage, then one error item naming the tar.

Where the tars are (`find_tars`): local files (a folder of them, one tar, a brace pattern), or
remote objects — `s3://bucket/prefix/` (every .tar / .tar.gz / .tgz under the prefix), one
`s3://.../x.tar`, `s3://bucket/data/{00000..00009}.tar`, and over http(s) a single URL or a brace
pattern (http has no listing). Remote tars are read through the cache's own stores
(`shards.stores.open_store`): timeouts, bounded retries and a dropped connection resumed at the
byte reached (Range, pinned to the object's ETag), so a server restart mid-tar loses and repeats
nothing. Credentials and endpoint come from the standard AWS variables, as for caches.

Every tar, local or remote, is read as a non-seekable stream through `_TailStream`, which counts
the bytes handed to tarfile and keeps the last few of them: tarfile stops quietly at a damaged
header or a file cut at a member boundary, as if the archive had ended there, so after it stops
the bytes past its offset (recovered from that buffer plus the rest of the stream) must be the
zero end-of-archive blocks, at least one 512-byte block, or the tar is reported as corrupt.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import posixpath
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import braceexpand  # ships with webdataset; the same brace syntax webdataset URLs use

from precompute.source_base import (
    RawItem,
    ReadLimits,
    Source,
    captions_hash,
    json_problem,
    json_too_big,
    links_out,
    outside_problem,
    parse_captions,
    too_large,
    with_content_fingerprint,
)
from shards.errors import StoreError
from shards.secrets import redact
from shards.store import Store
from shards.stores import open_store

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# WebDataset defaults: member suffixes (everything after the key's first dot), lower case.
DEFAULT_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_COND_SUFFIXES = (
    "cond.png",
    "cond.jpg",
    "conditioning.png",
    "conditioning.jpg",
    "conditioning_image.png",
    "conditioning_image.jpg",
    "source.png",
    "source.jpg",
    "control.png",
    "control.jpg",
)
# Tried in order: a member with this suffix, else this key of the sample's .json member.
DEFAULT_CAPTION_KEYS = ("txt", "caption", "text")
REMOTE_SCHEMES = ("s3", "http", "https")
# Bytes of a tar stream kept behind tarfile's position: tarfile reads ahead in records of
# 10 KiB, so the end-of-archive check needs at most that much of what it already consumed.
TAIL_KEEP = 64 << 10
# Read buffer over a remote stream (tarfile asks for 10 KiB at a time).
REMOTE_BUFFER = 1 << 20
# Concurrent HEAD requests when sizing remote tars.
SIZE_THREADS = 16

_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _split_member(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: key = path up to the first dot of the file name, suffix = the rest
    ('a/000001.cond.png' -> ('a/000001', 'cond.png')). Hidden files (macOS '._x') have no key."""
    base = posixpath.basename(name)
    if base.startswith(".") or "." not in base:
        return None
    dot = name.rfind("/") + 1 + base.index(".")
    return name[:dot], name[dot + 1 :].lower()


def decode_caption(raw: bytes) -> str:
    """A caption file's text: UTF-8, or UTF-16 when a byte order mark says so (what Windows
    editors save as "Unicode"); the mark is no part of the caption."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    return raw.decode("utf-8").removeprefix("\ufeff")


class WebDatasetSource(Source):
    """Local WebDataset tars; unit i is the i-th tar in sorted path order."""

    kind = "webdataset"

    def __init__(
        self,
        tars: list[TarRef],
        path: str,
        *,
        image_exts: Sequence[str] = DEFAULT_IMAGE_EXTS,
        cond_suffixes: Sequence[str] = DEFAULT_COND_SUFFIXES,
        caption_keys: Sequence[str] = DEFAULT_CAPTION_KEYS,
        max_samples: int | None = None,
        limits: ReadLimits = ReadLimits(),
        fingerprint_mode: str = "content",
    ):
        self.limits = limits
        # Stat fingerprints need an mtime: remote tars have none and are fingerprinted by content.
        self.fingerprint_mode = fingerprint_mode
        # An empty cond_suffixes means conditioning images are computed (--condition): none is read.
        self.tars, self.path = tars, path
        self.names = [t.name for t in tars]
        self.image_exts = tuple(e.lower().lstrip(".") for e in image_exts)
        self.cond_suffixes = tuple(s.lower().lstrip(".") for s in cond_suffixes)
        self.caption_keys = tuple(caption_keys)
        self.max_samples = max_samples
        # Items to take from each tar. Without max_samples every tar is read whole; with it, the
        # tars are counted up front (cheap for the small subsets max_samples is meant for; a
        # remote tar is streamed once for it, and only the tars needed are).
        self._limits: list[int | None] = [None] * len(tars)
        if max_samples is not None:
            self._limits, left = [], max_samples
            for i in range(len(tars)):
                n = sum(1 for _ in self._groups(i, load="none"))
                self._limits.append(min(n, left))
                left -= self._limits[-1]
                if left == 0:
                    break

    def _wanted(self, suffix: str) -> bool:
        if suffix == "json" or suffix in self.image_exts:
            return True
        return suffix in self.cond_suffixes or suffix in self.caption_keys

    def _groups(self, i: int, *, load: str = "all") -> Iterator[tuple | RawItem]:
        """(key, {suffix: bytes}, every suffix found, {suffix: (data offset, size)}) per sample of
        tar i, adjacent members grouped as webdataset does; a failure ends the tar with one error
        RawItem. Only the wanted members are read ("all"), or only the caption / .json members
        ("text", for stat fingerprints), or none ("none", for counting); the full list of
        suffixes is kept for messages."""
        ref = self.tars[i]
        path, name = ref.location, ref.name
        key, members, found, spans = None, {}, [], {}
        try:
            with ref.open() as raw:
                f = _TailStream(raw)
                plain = not f.peek(6).startswith(_COMPRESSED_MAGIC)
                with tarfile.open(fileobj=f, mode="r|*") as tf:  # type: ignore[call-overload]
                    for m in tf:
                        split = _split_member(m.name) if m.isfile() else None
                        if split is None:
                            continue
                        if split[0] != key:
                            if key is not None:
                                yield key, members, found, spans
                            key, members, found, spans = split[0], {}, [], {}
                        suffix = split[1]
                        found.append(suffix)
                        if suffix not in members and self._wanted(suffix):
                            # Text members (json, captions) are small; images get the file cap.
                            text = suffix == "json" or suffix in self.caption_keys
                            cap = self.limits.max_json_bytes if text else self.limits.max_file_bytes
                            spans[suffix] = (m.offset_data, m.size)
                            if m.size > cap:  # never read: noted by its size (tarfile skips the data)
                                members[suffix] = _Oversize(m.size, cap)
                            elif load == "all" or (load == "text" and text):
                                members[suffix] = tf.extractfile(m).read()  # type: ignore[union-attr]
                            else:
                                members[suffix] = b""
                    end = tf.offset
                if plain:
                    # A complete tar has only its zero end-of-archive blocks after the last
                    # member (module docstring). The last sample may have lost members to the
                    # damage, so it is dropped with the rest (the error item stands in for it).
                    f.check_end(end)
                if key is not None:
                    yield key, members, found, spans
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, _TruncatedTar) as e:
            detail = f"{path}: {e or type(e).__name__}; items after this point are lost"
            yield RawItem(name, None, None, None, ("tar_corrupt", detail))
            return
        except StoreError:
            # A remote store that failed past its retry budget: the run stops with the store's
            # message (a re-run resumes), rather than caching a shard that silently lacks a tar.
            raise
        except OSError as e:
            yield RawItem(name, None, None, None, ("tar_unreadable", f"{path}: {e.strerror or e}"))

    def _item(self, i: int, key: str, members: dict[str, bytes | _Oversize], suffixes: list[str],
              spans: dict[str, tuple[int, int]] | None = None) -> RawItem:
        sid = f"{self.names[i]}:{key}"
        # Every member of the sample, read or not: a conditioning image under an unexpected
        # suffix (key.hint.png) is then visible in the message, with the flag that picks it.
        found = ", ".join("." + s for s in dict.fromkeys(suffixes)) or "no members"
        image_ext = next((e for e in self.image_exts if e in members), None)
        if image_ext is None:
            looked = ", ".join("." + e for e in self.image_exts)
            detail = f"{sid}: no image member (looked for {looked}; found {found}); pass --image-column"
            return RawItem(sid, None, None, None, ("image_missing", detail))
        image = members[image_ext]
        if isinstance(image, _Oversize):
            return RawItem(sid, None, None, None, too_large("image", f"{sid}.{image_ext}", image.size, image.cap))
        captions, error = self._captions(sid, members)
        if not self.cond_suffixes:
            return RawItem(sid, image, None, captions, error)
        cond_suffix = next((s for s in self.cond_suffixes if s in members), None)
        if cond_suffix is None:
            looked = ", ".join("." + s for s in self.cond_suffixes)
            detail = (f"{sid}: no conditioning member (looked for {looked}; found {found}); pass "
                      "--conditioning-image-column, or compute it with --condition canny|gray|sketch")
            return RawItem(sid, image, None, captions, ("cond_missing", detail))
        cond = members[cond_suffix]
        if isinstance(cond, _Oversize):
            detail = too_large("cond", f"{sid}.{cond_suffix}", cond.size, cond.cap)
            return RawItem(sid, image, None, captions, detail, cond_id=f"{sid}.{cond_suffix}")
        return RawItem(sid, image, cond, captions, error, cond_id=f"{sid}.{cond_suffix}")

    def _captions(self, sid: str, members: dict[str, bytes | _Oversize]) -> tuple[list[str] | None, tuple[str, str] | None]:
        """For each caption key in order: a member with that suffix, else that key of the .json."""
        meta: object = None
        json_error = None
        if "json" in members:
            raw = members["json"]
            # Size and depth checked before parsing: a huge or 200,000-deep member is one invalid
            # sample, never a RecursionError or a memory blow-up.
            problem = (json_too_big(raw.size, raw.cap) if isinstance(raw, _Oversize)
                       else json_problem(raw, max_bytes=self.limits.max_json_bytes,
                                         max_depth=self.limits.max_json_depth))
            try:
                if problem:
                    raise ValueError(f"{problem} (checked before parsing)")
                meta = json.loads(raw)  # type: ignore[arg-type]
            except ValueError as e:
                json_error = ("metadata_invalid", f"{sid}.json: not valid JSON: {e}")
        for k in self.caption_keys:
            if k in members and k != "json":
                value = members[k]
                if isinstance(value, _Oversize):
                    return None, ("caption_invalid", f"{sid}.{k}: {value.size:,} bytes, over the {value.cap:,}-byte cap")
                try:
                    return [decode_caption(value)], None
                except UnicodeDecodeError:
                    return None, ("caption_invalid", f"{sid}.{k}: not valid UTF-8 (nor UTF-16 with a byte order mark)")
            if isinstance(meta, dict) and k in meta:
                return parse_captions(meta[k], f"{sid}.json", from_csv=False, limits=self.limits)
        # No caption found: a broken .json is the likelier cause than a missing one.
        return None, json_error

    # --- Source API

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "path": self.path,
            "columns": {
                "image": list(self.image_exts),
                "conditioning_image": list(self.cond_suffixes) or None,
                "caption": list(self.caption_keys),
            },
            "max_samples": self.max_samples,
        }

    def num_units(self) -> int:
        return len(self._limits)

    def num_items(self) -> int | None:
        return None if self.max_samples is None else sum(n or 0 for n in self._limits)

    def unit_size(self, i: int) -> int | None:
        self._check_unit(i)
        return self._limits[i]  # counted up front only with max_samples

    def unit_name(self, i: int) -> str:
        self._check_unit(i)
        return self.names[i]

    def iter_unit(self, i: int) -> Iterator[RawItem]:
        self._check_unit(i)
        limit = self._limits[i]
        for n, group in enumerate(self._groups(i)):
            if limit is not None and n >= limit:
                return
            item = group if isinstance(group, RawItem) else self._item(i, *group)
            yield self._fingerprinted(i, item, None if isinstance(group, RawItem) else group[3])

    def unit_fingerprints(self, i: int) -> list[str]:
        self._check_unit(i)
        if not self._stat(i):
            return super().unit_fingerprints(i)
        # Member headers and the small text members only: image members are skipped unread.
        limit, out = self._limits[i], []
        for n, group in enumerate(self._groups(i, load="text")):
            if limit is not None and n >= limit:
                break
            item = group if isinstance(group, RawItem) else self._item(i, *group)
            out.append(self._fingerprinted(i, item, None if isinstance(group, RawItem) else group[3]).fingerprint)
        return out  # type: ignore[return-value]

    def _stat(self, i: int) -> bool:
        return self.fingerprint_mode == "stat" and self.tars[i].mtime_ns is not None

    def _fingerprinted(self, i: int, item: RawItem, spans: dict[str, tuple[int, int]] | None) -> RawItem:
        """The item with its fingerprint: content, or in stat mode "stat:tar:<size>:<mtime_ns>:"
        + the image and conditioning members' offset:size + a hash of the captions."""
        if not self._stat(i):
            return with_content_fingerprint(item)
        ref = self.tars[i]
        head = f"stat:tar:{ref.size}:{ref.mtime_ns}"
        if spans is None:  # the tar's own error item
            item.fingerprint = f"{head}:{item.error[0] if item.error else '-'}"
            return item

        def span(suffixes: Sequence[str]) -> str:
            found = next((s for s in suffixes if s in spans), None)
            return "-" if found is None else "{}:{}".format(*spans[found])

        item.fingerprint = f"{head}:{span(self.image_exts)}/{span(self.cond_suffixes)}/{captions_hash(item.captions)}"
        return item


class _TruncatedTar(Exception):
    pass


class _Oversize:
    """Stands in for a member over the size cap (its bytes are never read)."""

    def __init__(self, size: int, cap: int):
        self.size, self.cap = size, cap


class _TailStream:
    """A read-only stream over `raw` that counts the bytes it hands out and keeps the last
    TAIL_KEEP of them, so that the bytes after a position tarfile has already read past can be
    recovered without seeking (remote bodies cannot seek)."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.pos = 0  # bytes handed out so far
        self._ahead = b""  # peeked, not handed out yet
        self._tail = bytearray()

    def peek(self, n: int) -> bytes:
        while len(self._ahead) < n:
            chunk = self.raw.read(n - len(self._ahead))
            if not chunk:
                break
            self._ahead += chunk
        return self._ahead[:n]

    def read(self, n: int = -1) -> bytes:
        if self._ahead:
            data = self._ahead if n < 0 else self._ahead[:n]
            self._ahead = self._ahead[len(data):]
        else:
            data = self.raw.read() if n < 0 else self.raw.read(n)
        self.pos += len(data)
        self._tail += data
        if len(self._tail) > TAIL_KEEP:
            del self._tail[: len(self._tail) - TAIL_KEEP]
        return data

    def check_end(self, end: int) -> None:
        """Everything from byte `end` to the end of the stream must be zeros, one block at least."""
        kept_from = self.pos - len(self._tail)
        if end < kept_from:  # tarfile read further ahead than we keep: a programming error
            raise RuntimeError(f"tar end check: byte {end} is no longer buffered (kept from {kept_from})")
        zeros = 0
        chunk = bytes(self._tail[end - kept_from :])
        while chunk:
            if chunk.strip(b"\0"):
                raise _TruncatedTar(f"unreadable tar header at byte {end} (damaged member or garbage)")
            zeros += len(chunk)
            chunk = self.read(TAIL_KEEP)
        if zeros < tarfile.BLOCKSIZE:
            raise _TruncatedTar(f"no end-of-archive marker after byte {end}: the file looks truncated")


@dataclass(frozen=True)
class TarRef:
    """One input tar: a local file (`store` None, `rel` its path) or an object of a remote store."""

    name: str  # unit name and item id prefix ("00000.tar", or the tar's path / URL for a brace pattern)
    location: str  # full path or URL, for messages
    size: int
    rel: str
    store: Store | None = None
    mtime_ns: int | None = None  # local tars only (stat fingerprints)

    def open(self) -> BinaryIO:
        if self.store is None:
            return open(self.rel, "rb")
        return io.BufferedReader(self.store.open_read(self.rel), REMOTE_BUFFER)  # type: ignore[arg-type]


def local_tars(folder: Path) -> list[Path]:
    """The tars of a local folder, sorted: its own, or when it has none, those of its `data/`
    subfolder (where a dataset repository on the hub keeps them)."""
    def tars_in(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.name.lower().endswith(TAR_SUFFIXES))

    tars = tars_in(folder)
    if not tars and (folder / "data").is_dir():
        tars = tars_in(folder / "data")
    return tars


def _local_ref(path: Path, name: str) -> TarRef:
    path = path.resolve()
    st = path.stat()
    return TarRef(name, str(path), st.st_size, str(path), mtime_ns=st.st_mtime_ns)


def _missing(spec: str, missing: list[str], total: int) -> str:
    shown = ", ".join(redact(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return f"{redact(spec)}: {len(missing)} of {total} tars do not exist: {shown}"


def is_remote(spec: str) -> bool:
    return urlparse(spec).scheme.lower() in REMOTE_SCHEMES


def _sized(pairs: list[tuple[Store, str]], urls: list[str], names: list[str], spec: str,
           problems: list[str]) -> list[TarRef]:
    """TarRefs for (store, rel) objects, sized by concurrent HEAD requests; a missing one is a problem."""

    def size(pair: tuple[Store, str]) -> int | None:
        try:
            return pair[0].size(pair[1])
        except FileNotFoundError:
            return None

    with ThreadPoolExecutor(min(SIZE_THREADS, max(1, len(pairs)))) as pool:
        sizes = list(pool.map(size, pairs))
    missing = [u for u, n in zip(urls, sizes) if n is None]
    if missing:
        problems.append(_missing(spec, missing, len(urls)))
        return []
    return [TarRef(n, u, sz, rel, store) for n, u, sz, (store, rel) in zip(names, urls, sizes, pairs)]  # type: ignore[misc]


def _shown(url: str) -> str:
    """A remote location as messages, item ids and the identity name it: no query string (access
    tokens) and no password (`shards.secrets.redact`)."""
    return redact(urlparse(url)._replace(query="", fragment="").geturl())


def _remote_refs(spec: str, problems: list[str]) -> tuple[list[TarRef], str]:
    """The tars of a remote spec (listing, one URL, or a brace pattern); problems appended."""
    parsed = urlparse(spec)
    where = _shown(spec)  # no access tokens in the identity
    stores: dict[str, Store] = {}

    def split(url: str) -> tuple[Store, str]:
        # The tar's folder is the store; a query string (a container-level token) stays on the
        # store, which appends it to every object URL, not on the object's name.
        u = urlparse(url)
        folder, base = u.path.rsplit("/", 1)
        parent = u._replace(path=folder, fragment="").geturl()
        if parent not in stores:
            stores[parent] = open_store(parent)
        return stores[parent], base

    try:
        if "{" in parsed.path and "}" in parsed.path:
            urls = sorted(braceexpand.braceexpand(spec))
            names = [_shown(u) for u in urls]
            return _sized([split(u) for u in urls], names, names, spec, problems), where
        if parsed.path.lower().endswith(TAR_SUFFIXES):
            return _sized([split(spec)], [where], [posixpath.basename(parsed.path)], spec, problems), where
        if parsed.scheme.lower() != "s3":
            problems.append(f"{redact(spec)}: http(s) has no listing: name the tars, one URL or a brace pattern such "
                            f"as {where.rstrip('/')}/{{00000..00003}}.tar")
            return [], where
        store = open_store(spec.rstrip("/"))
        rels = [r for r in store.list() if r.lower().endswith(TAR_SUFFIXES)]
        urls = [store.display(r) for r in rels]
        return _sized([(store, r) for r in rels], urls, rels, spec, problems), where
    except StoreError as e:  # unreachable, refused: the message starts with the location
        problems.append(str(e))
        return [], where
    except ValueError as e:  # a malformed URL
        problems.append(f"{redact(spec)}: {str(e).replace(spec, redact(spec))}")
        return [], where


def find_tars(spec: str, path: Path | None, problems: list[str], *,
              follow_symlinks: bool = False) -> tuple[list[TarRef], str]:
    """The input tars of `spec` in unit order and the location recorded in describe()["path"]:
    a local folder (its tars, sorted), one tar, a local brace pattern (`path` None), or a remote
    spec (module docstring). Problems (missing tars, none found) are appended to `problems`.

    Tars obey the rule images do: in a folder (or the folder part of a brace pattern), a tar
    whose real path lies outside it (a symbolic link pointing out) is a problem unless
    `follow_symlinks`. A single tar named on its own is the user's explicit choice, like a
    metadata file, and is read wherever it lives."""
    if is_remote(spec):
        refs, where = _remote_refs(spec, problems)
    elif path is None:  # a local brace pattern
        expanded = sorted(braceexpand.braceexpand(spec))
        missing = [p for p in expanded if not os.path.isfile(p)]
        if missing:
            problems.append(_missing(spec, missing, len(expanded)))
            return [], spec
        root = Path(os.path.dirname(spec[: spec.index("{")]) or ".")
        out = [] if follow_symlinks else links_out(root, [Path(p) for p in expanded])
        if out:
            problems.append(f"{spec}: " + outside_problem(root, out, "tar(s)"))
            return [], spec
        refs, where = [_local_ref(Path(p), p) for p in expanded], os.path.abspath(spec)
    elif path.is_dir():
        tars = local_tars(path)
        out = [] if follow_symlinks else links_out(path, tars)
        if out:
            problems.append(f"{spec}: " + outside_problem(path, out, "tar(s)"))
            return [], str(path.resolve())
        refs, where = [_local_ref(p, p.relative_to(path).as_posix()) for p in tars], str(path.resolve())
    else:
        refs, where = [_local_ref(path, path.name)], str(path.resolve())
    if not refs and not problems:
        problems.append(f"{spec}: no .tar files found")
    return refs, where
