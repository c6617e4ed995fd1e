"""WebDataset input tars (img2dataset output): one unit per tar, members grouped by key.

This module owns reading tars as plain bytes: a tar is a stream (`tarfile` mode "r|*"), nothing in
it is ever unpickled or decoded here. Members are grouped by key as webdataset does: an image
member (`jpg`, `jpeg`, `png`, `webp`), a caption from `txt` or a `json` member's `caption` /
`text`, a conditioning member by suffix (`cond.png`...). A corrupt tar yields the items before the
damage, then one error item naming the tar.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import posixpath
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from precompute.source_base import RawItem, Source, parse_captions

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

_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _split_member(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: key = path up to the first dot of the file name, suffix = the rest
    ('a/000001.cond.png' -> ('a/000001', 'cond.png')). Hidden files (macOS '._x') have no key."""
    base = posixpath.basename(name)
    if base.startswith(".") or "." not in base:
        return None
    dot = name.rfind("/") + 1 + base.index(".")
    return name[:dot], name[dot + 1 :].lower()


class WebDatasetSource(Source):
    """Local WebDataset tars; unit i is the i-th tar in sorted path order."""

    kind = "webdataset"

    def __init__(
        self,
        tars: list[Path],
        names: list[str],
        path: str,
        *,
        image_exts: Sequence[str] = DEFAULT_IMAGE_EXTS,
        cond_suffixes: Sequence[str] = DEFAULT_COND_SUFFIXES,
        caption_keys: Sequence[str] = DEFAULT_CAPTION_KEYS,
        max_samples: int | None = None,
    ):
        # An empty cond_suffixes means conditioning images are computed (--condition): none is read.
        self.tars, self.names, self.path = tars, names, path
        self.image_exts = tuple(e.lower().lstrip(".") for e in image_exts)
        self.cond_suffixes = tuple(s.lower().lstrip(".") for s in cond_suffixes)
        self.caption_keys = tuple(caption_keys)
        self.max_samples = max_samples
        listing = "".join(f"{n}\t{p.stat().st_size}\n" for n, p in zip(names, tars))
        self.listing_sha256 = hashlib.sha256(listing.encode()).hexdigest()
        # Items to take from each tar. Without max_samples every tar is read whole; with it, the
        # tars are counted up front (cheap for the small subsets max_samples is meant for).
        self._limits: list[int | None] = [None] * len(tars)
        if max_samples is not None:
            self._limits, left = [], max_samples
            for i in range(len(tars)):
                n = sum(1 for _ in self._groups(i, load=False))
                self._limits.append(min(n, left))
                left -= self._limits[-1]
                if left == 0:
                    break

    def _wanted(self, suffix: str) -> bool:
        if suffix == "json" or suffix in self.image_exts:
            return True
        return suffix in self.cond_suffixes or suffix in self.caption_keys

    def _groups(self, i: int, *, load: bool = True) -> Iterator[tuple[str, dict[str, bytes], list[str]] | RawItem]:
        """(key, {suffix: bytes}, every suffix found) per sample of tar i, adjacent members grouped
        as webdataset does; a failure ends the tar with one error RawItem. Only the wanted
        members are read; the full list of suffixes is kept for messages."""
        path, name = self.tars[i], self.names[i]
        key, members, found = None, {}, []
        try:
            with open(path, "rb") as f:
                plain = not f.read(6).startswith(_COMPRESSED_MAGIC)
                f.seek(0)
                with tarfile.open(fileobj=f, mode="r|*") as tf:
                    for m in tf:
                        split = _split_member(m.name) if m.isfile() else None
                        if split is None:
                            continue
                        if split[0] != key:
                            if key is not None:
                                yield key, members, found
                            key, members, found = split[0], {}, []
                        suffix = split[1]
                        found.append(suffix)
                        if suffix not in members and self._wanted(suffix):
                            members[suffix] = tf.extractfile(m).read() if load else b""  # type: ignore[union-attr]
                    end = tf.offset
                if plain:
                    # tarfile stops quietly at a damaged header or a file cut at a member
                    # boundary, as if the archive had ended there. A complete tar has only its
                    # zero end-of-archive blocks after the last member; check that it does.
                    # The last sample may have lost members to the damage, so it is dropped
                    # with the rest (the error item stands in for it).
                    self._check_tail(f, end)
                if key is not None:
                    yield key, members, found
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, _TruncatedTar) as e:
            detail = f"{path}: {e or type(e).__name__}; items after this point are lost"
            yield RawItem(name, None, None, None, ("tar_corrupt", detail))
            return
        except OSError as e:
            yield RawItem(name, None, None, None, ("tar_unreadable", f"{path}: {e.strerror or e}"))

    @staticmethod
    def _check_tail(f, end: int) -> None:
        f.seek(end)
        tail = f.read()
        if len(tail) < tarfile.BLOCKSIZE:
            raise _TruncatedTar(f"no end-of-archive marker after byte {end}: the file looks truncated")
        if tail.strip(b"\0"):
            raise _TruncatedTar(f"unreadable tar header at byte {end} (damaged member or garbage)")

    def _item(self, i: int, key: str, members: dict[str, bytes], suffixes: list[str]) -> RawItem:
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
        captions, error = self._captions(sid, members)
        if not self.cond_suffixes:
            return RawItem(sid, image, None, captions, error)
        cond_suffix = next((s for s in self.cond_suffixes if s in members), None)
        if cond_suffix is None:
            looked = ", ".join("." + s for s in self.cond_suffixes)
            detail = (f"{sid}: no conditioning member (looked for {looked}; found {found}); pass "
                      "--conditioning-image-column, or compute it with --condition canny|gray|sketch")
            return RawItem(sid, image, None, captions, ("cond_missing", detail))
        return RawItem(sid, image, members[cond_suffix], captions, error, cond_id=f"{sid}.{cond_suffix}")

    def _captions(self, sid: str, members: dict[str, bytes]) -> tuple[list[str] | None, tuple[str, str] | None]:
        """For each caption key in order: a member with that suffix, else that key of the .json."""
        meta: object = None
        json_error = None
        if "json" in members:
            try:
                meta = json.loads(members["json"])
            except ValueError as e:
                json_error = ("metadata_invalid", f"{sid}.json: not valid JSON: {e}")
        for k in self.caption_keys:
            if k in members and k != "json":
                try:
                    return [members[k].decode("utf-8")], None
                except UnicodeDecodeError:
                    return None, ("caption_invalid", f"{sid}.{k}: not valid UTF-8")
            if isinstance(meta, dict) and k in meta:
                return parse_captions(meta[k], f"{sid}.json", from_csv=False)
        # No caption found: a broken .json is the likelier cause than a missing one.
        return None, json_error

    # --- Source API

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "path": self.path,
            "tars": len(self.tars),
            "tar_listing_sha256": self.listing_sha256,  # names and sizes of the tars
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
            yield group if isinstance(group, RawItem) else self._item(i, *group)


class _TruncatedTar(Exception):
    pass
