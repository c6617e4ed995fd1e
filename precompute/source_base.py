"""The source contract every dataset reader implements: `RawItem`, `Source`, `SourceError`.

This module owns what all sources share: the item type (raw encoded bytes plus captions, never
decoded here), the unit contract (output shard i of the cache is made from unit i, so units must
be deterministic and independent of each other), the one error type for a dataset that cannot be
read at all, and the small helpers every reader uses to turn a bad row into an error item
(reading a file named by a row, parsing a caption cell). The readers live beside it:
`precompute.sources` (folders with a metadata file, and `open_source`, which picks a reader),
`precompute.wds_source` (WebDataset tars, local or remote) and `precompute.hf_source` (Hugging
Face datasets).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Source items per output shard (folder datasets): ~256 x 1024 px samples is a few hundred MB.
DEFAULT_SAMPLES_PER_SHARD = 256

@dataclass
class RawItem:
    source_id: str  # human name: the image path as the metadata gives it, or "<tar>:<key>"
    image: bytes | None  # raw encoded bytes (None when missing)
    cond: bytes | None
    captions: list[str] | None
    error: tuple[str, str] | None = None  # (reason slug, detail) when the source knows it is bad
    cond_id: str | None = None  # human name of the conditioning image, for messages


class SourceError(ValueError):
    """The dataset cannot be read at all (missing, unrecognised, wrong columns). Lists every problem."""


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

    def _check_unit(self, i: int) -> None:
        if not 0 <= i < self.num_units():
            d = self.describe()
            raise IndexError(f"unit {i} out of range: {d.get('path') or d.get('dataset')} has {self.num_units()} units")



# ----------------------------------------------------------------------------------- helpers


def read_file(root: Path, rel: str, what: str, where: str) -> tuple[bytes | None, tuple[str, str] | None]:
    """Read a file named by the metadata row at `where`; a failure becomes (None, (reason, detail)).

    Never raises for a bad row: a path the OS cannot even take (an embedded NUL byte) is the
    row's `metadata_invalid`, not the end of the run."""
    try:
        path = Path(rel) if os.path.isabs(rel) else root / rel
        return path.read_bytes(), None
    except ValueError as e:  # "embedded null byte", or a path the platform rejects outright
        return None, ("metadata_invalid", f"{where}: {what} path {rel!r:.120} is not a valid file path ({e})")
    except FileNotFoundError:
        return None, (f"{what}_missing", f"{path}: file not found")
    except OSError as e:  # a directory, no permission, an I/O error
        return None, (f"{what}_unreadable", f"{path}: {e.strerror or e}")


def parse_captions(value: object, where: str, *, from_csv: bool) -> tuple[list[str] | None, tuple[str, str] | None]:
    """A caption cell -> list of captions. A string is one caption; a list is several (kept in
    order, None entries dropped). In CSV a cell holding a JSON list of strings is a list."""
    if value is None:
        return None, None
    if isinstance(value, str):
        if from_csv and value.lstrip().startswith("["):
            try:
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
