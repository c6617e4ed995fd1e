"""Sources: where raw training items come from, as encoded bytes plus captions.

This module owns reading a dataset, not decoding it: a `Source` yields `RawItem`s (image and
conditioning image as raw file bytes, captions as strings) grouped into *units*; output shard i of
the cache is made from unit i, so units must be deterministic and independent of each other (any
process can read any unit without reading the others). Decoding and geometry live in
`precompute.preprocess`.

The readers, each in its own module beside this one (their shared contract is
`precompute.source_base`):

- **folder** (here): a folder with a metadata file (HF imagefolder convention) — `metadata.jsonl`,
  `metadata.json` (a JSON list of objects, or JSON lines) or `metadata.csv` — whose image /
  conditioning image / caption columns are configurable (defaults `image` then `file_name`,
  `conditioning_image`, `text`); paths are relative to the folder or absolute. A folder with the
  fill50k `prompt.json` (JSON lines of `source`/`target`/`prompt`) is the **fill50k** preset:
  image = target, conditioning image = source, caption = prompt. Units are consecutive chunks of
  `samples_per_shard` rows in file order. A folder with fusing/fill50k's downloaded `train.jsonl`
  (`image` / `conditioning_image` / `text` paths) is a folder dataset with the default columns.
- **hf** (`precompute.hf_source`): a Hugging Face dataset read through `datasets`: a hub id or
  local folder by name (`--dataset-name`), a `save_to_disk` folder, or .parquet / .arrow files.
  Units are fixed row ranges, as for folders.
- **webdataset** (`precompute.wds_source`): tar shards (a folder of them, one tar, or a brace
  pattern such as `data/{00000..00009}.tar`), e.g. as img2dataset writes them. One unit per input
  tar, sorted by path.

`open_source` (here) decides which reader a path is for and opens it.

Every row / tar sample yields exactly one RawItem, even a broken one (its `error` says why), so
an item's position in its unit — and therefore its cache key — never depends on which items are
bad. A corrupt tar yields the items before the damage, then one error item naming the tar.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from precompute.hf_source import (
    DEFAULT_SPLIT,
    TABLE_SUFFIXES,
    HFSource,
    is_saved_dataset,
    looks_like_hf,
    open_hf_source,
)
from precompute.errors import SourceError
from precompute.source_base import (
    DEFAULT_SAMPLES_PER_SHARD,
    FINGERPRINT_MODES,
    RawItem,
    ReadLimits,
    Source,
    bounded_lines,
    captions_hash,
    file_url_path,
    file_type,
    is_utf8_clean,
    json_problem,
    json_too_big,
    parse_captions,
    read_file,
    stat_part,
    with_content_fingerprint,
)
from precompute.wds_source import (
    DEFAULT_CAPTION_KEYS,
    DEFAULT_COND_SUFFIXES,
    DEFAULT_IMAGE_EXTS,
    TAR_SUFFIXES,
    WebDatasetSource,
    find_tars,
    local_tars,
    is_remote,
)
from shards.store import file_sha256

__all__ = [
    "DEFAULT_SAMPLES_PER_SHARD", "KINDS", "FolderSource", "HFSource", "ReadLimits", "RawItem", "Source", "SourceError", "WebDatasetSource",
    "open_source",
]

METADATA_FILES = ("metadata.jsonl", "metadata.json", "metadata.csv")
FILL50K_FILE = "prompt.json"
# fusing/fill50k's own download layout: train.jsonl beside images/ and conditioning_images/.
FILL50K_DOWNLOAD_FILE = "train.jsonl"
KINDS = ("auto", "folder", "fill50k", "webdataset", "hf")

# Folder defaults follow the diffusers reference script and HF imagefolder ("file_name").
DEFAULT_IMAGE_COLUMNS = ("image", "file_name")
# HF imagefolder names a further image column "<name>_file_name" in metadata.jsonl.
DEFAULT_COND_COLUMNS = ("conditioning_image", "conditioning_image_file_name")
DEFAULT_CAPTION_COLUMN = "text"
FILL50K_COLUMNS = {"image": "target", "conditioning_image": "source", "caption": "prompt"}
# Columns are discovered from the first rows of a JSON metadata file (CSV has a header).
_SCHEMA_ROWS = 100


class _Lines:
    """Binary lines of a file decoded as text, tracking the byte offset and line number of the next
    line: csv.reader pulls one line at a time, so before each row these mark where the row starts.
    A line longer than `cap` bytes stops the file with a SourceError naming it (csv cannot
    resynchronise past it); it is never read whole."""

    def __init__(self, f, offset: int, lineno: int, cap: int, name: Path):
        self.f, self.offset, self.lineno, self.cap, self.name = f, offset, lineno, cap, name

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        raw = self.f.readline(self.cap + 1)
        if len(raw) > self.cap:
            raise SourceError(f"{self.name} line {self.lineno + 1}: longer than {self.cap:,} bytes (--max-json-bytes, "
                              "the cap of a metadata row): damaged, or not a metadata file; fix that line or raise "
                              "--max-json-bytes")
        if not raw:
            raise StopIteration
        if self.offset == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 BOM (Excel writes one); it is not part of the first column name
            self.offset = 3
        self.offset += len(raw)
        self.lineno += 1
        # surrogateescape never fails: a bad byte becomes a marker that _is_utf8_clean reports
        # for that row only, instead of one bad row making the whole file unreadable.
        return raw.decode("utf-8", "surrogateescape")


# ----------------------------------------------------------------------------------- folder


@dataclass(frozen=True)
class _Unit:
    offset: int  # byte offset of the unit's first row (JSON lines / CSV)
    lineno: int  # line number before that row
    first_row: int  # global index of the unit's first row
    count: int


class FolderSource(Source):
    """A folder + metadata file (JSON lines, JSON list or CSV), or the fill50k `prompt.json`."""

    def __init__(
        self,
        metadata: Path,
        *,
        preset: str | None = None,
        image_column: str | None = None,
        conditioning_image_column: str | None = None,
        caption_column: str | None = None,
        samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
        max_samples: int | None = None,
        require_conditioning: bool = True,
        limits: ReadLimits = ReadLimits(),
        fingerprint_mode: str = "content",
    ):
        self.kind = "fill50k" if preset == "fill50k" else "folder"
        self.limits = limits
        self.fingerprint_mode = fingerprint_mode
        # False when precompute computes the conditioning images (--condition): the column is
        # then neither required nor read.
        self.require_conditioning = require_conditioning
        self.metadata = metadata.resolve()
        self.root = self.metadata.parent
        self.samples_per_shard = samples_per_shard
        self.max_samples = max_samples
        self._display = self.metadata.name
        self.format = self._detect_format()
        self.sha256 = file_sha256(self.metadata)
        self._rows: list | None = None  # the parsed document, JSON list format only
        self._header: list[str] = []  # CSV only
        self._units: list[_Unit] = []
        columns = self._index()  # fills _units (and _rows / _header)
        self.image_column, self.cond_column, self.caption_column = self._resolve_columns(
            columns, preset, image_column, conditioning_image_column, caption_column
        )

    # --- reading the metadata file

    def _detect_format(self) -> str:
        suffix = self.metadata.suffix.lower()
        if suffix == ".jsonl":
            return "jsonl"
        if suffix == ".csv":
            return "csv"
        if suffix == ".json":
            # A .json file is a JSON list when it starts with "[", else JSON lines (fill50k's
            # prompt.json is JSON lines despite its name; so are many hand-made metadata.json).
            with open(self.metadata, "rb") as f:
                head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            if head.startswith(b"{"):
                self._refuse_one_object()
            return "json" if head.startswith(b"[") else "jsonl"
        raise SourceError(f"{self.metadata}: unknown metadata format {suffix!r}; use .jsonl, .json or .csv")

    def _refuse_one_object(self) -> None:
        """A .json file that is one object of columns or of keyed rows (pandas' `to_json()`
        default, or {"id": row, ...}) has no rows to read: said, rather than read as one odd row.
        JSON lines (a first line that is a whole object, then more) are not read further."""
        with open(self.metadata, "rb") as f:
            first, rest = f.readline(1 << 20), f.read(1 << 16).strip()
        if rest and not self._json_problem(first):
            try:
                json.loads(first)
                return
            except ValueError:
                pass  # a first line that is no whole object: perhaps one object over many lines
        if os.stat(self.metadata).st_size > self.limits.max_file_bytes:
            return
        raw = Path(self.metadata).read_bytes()
        if json_problem(raw, max_bytes=None, max_depth=self.limits.max_json_depth + 1):
            return  # too deep for one object of rows; the rows are judged one by one
        try:
            doc = json.loads(raw.decode("utf-8-sig"))
        except ValueError:
            return  # JSON lines whose first row is damaged: each row is judged alone
        if isinstance(doc, dict) and doc and all(isinstance(v, (dict, list)) for v in doc.values()):
            raise SourceError(f"{self.metadata}: one JSON object of {len(doc)} columns or keyed rows "
                              f"({', '.join(list(map(str, doc))[:3])}...), not rows: write one object per row (JSON "
                              "lines, e.g. pandas' to_json(orient='records', lines=True)) or a JSON list of objects")

    def _index(self) -> list[str]:
        """One pass over the metadata: count rows, note where each unit starts, collect columns."""
        if self.format == "json":
            return self._index_json_list()
        if self.format == "csv":
            return self._index_csv()
        return self._index_jsonl()

    def _add_row(self, units: list[_Unit], n: int, offset: int, lineno: int) -> None:
        """Count row n (starting at `offset`, after `lineno` lines) into its unit."""
        if n % self.samples_per_shard == 0:
            units.append(_Unit(offset, lineno, n, 1))
        else:
            units[-1] = replace(units[-1], count=units[-1].count + 1)

    def _limit_reached(self, n: int) -> bool:
        return self.max_samples is not None and n >= self.max_samples

    def _index_jsonl(self) -> list[str]:
        units: list[_Unit] = []
        columns: dict[str, None] = {}  # insertion-ordered set
        n = seen = offset = lineno = 0
        with open(self.metadata, "rb") as f:
            for raw, length in bounded_lines(f, self.limits.max_json_bytes):
                if self._limit_reached(n):
                    break
                if raw is None or raw.strip():  # a line over the cap is a row (an invalid one)
                    self._add_row(units, n, offset, lineno)
                    n += 1
                    if raw is not None and seen < _SCHEMA_ROWS:
                        try:
                            row = None if self._json_problem(raw) else json.loads(raw)
                        except ValueError:
                            row = None
                        if isinstance(row, dict):
                            columns.update(dict.fromkeys(row))
                            seen += 1
                offset += length
                lineno += 1
        self._units = units
        return list(columns)

    def _json_problem(self, raw: bytes) -> str | None:
        return json_problem(raw, max_bytes=self.limits.max_json_bytes, max_depth=self.limits.max_json_depth)

    def _index_json_list(self) -> list[str]:
        # A JSON list is parsed whole: it is held to the cap of any input file (--max-input-bytes),
        # and one pathological row stops the file. Say which way out.
        cap = self.limits.max_file_bytes
        with open(self.metadata, "rb") as f:
            raw = f.read(cap + 1)  # a file growing while read stops one byte past the cap
        if len(raw) > cap:
            size = max(len(raw), os.stat(self.metadata).st_size)
            raise SourceError(f"{self.metadata}: {size:,} bytes, over the {cap:,}-byte cap of an input file "
                              "(--max-input-bytes); a JSON list is parsed whole: write the metadata as JSON lines "
                              "(metadata.jsonl), read a row at a time, or raise --max-input-bytes")
        problem = json_problem(raw, max_bytes=None, max_depth=self.limits.max_json_depth + 1)
        if problem:
            raise SourceError(f"{self.metadata}: {problem}; write the metadata as JSON lines (metadata.jsonl), "
                              "where such a row is skipped alone")
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise SourceError(f"{self.metadata}: not valid JSON: {e}") from None
        if not isinstance(doc, list):
            raise SourceError(f"{self.metadata}: expected a JSON list of objects (or JSON lines)")
        if self.max_samples is not None:
            doc = doc[: self.max_samples]
        self._rows = doc
        sps = self.samples_per_shard
        self._units = [_Unit(0, 0, s, min(sps, len(doc) - s)) for s in range(0, len(doc), sps)]
        columns: dict[str, None] = {}
        for row in [r for r in doc if isinstance(r, dict)][:_SCHEMA_ROWS]:
            columns.update(dict.fromkeys(row))
        return list(columns)

    def _csv_rows(self, f, offset: int, lineno: int) -> Iterator[tuple[int, int, list[str]]]:
        """(offset, line number) where each non-blank record starts, and its fields."""
        lines = _Lines(f, offset, lineno, self.limits.max_json_bytes, self.metadata)
        reader = csv.reader(lines)
        while True:
            start, start_line = lines.offset, lines.lineno
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                # The csv module cannot resynchronise after a structural error, so the rows
                # after it have no reliable boundaries: this one stops the whole source.
                raise SourceError(f"{self.metadata} line {lines.lineno}: malformed CSV: {e}") from None
            if fields:  # csv yields [] for blank lines; they are not rows
                yield start, start_line, fields

    def _index_csv(self) -> list[str]:
        units: list[_Unit] = []
        n = 0
        with open(self.metadata, "rb") as f:
            rows = self._csv_rows(f, 0, 0)
            header = next(rows, None)
            if header is None:
                raise SourceError(f"{self.metadata}: empty CSV (no header row)")
            self._header = header[2]
            if not is_utf8_clean(self._header):
                raise SourceError(f"{self.metadata}: the header row is not valid UTF-8")
            dupes = sorted({c for c in self._header if self._header.count(c) > 1})
            if dupes:
                raise SourceError(f"{self.metadata}: duplicate column names {dupes}")
            for offset, lineno, _ in rows:
                if self._limit_reached(n):
                    break
                self._add_row(units, n, offset, lineno)
                n += 1
        self._units = units
        return list(self._header)

    def _resolve_columns(
        self,
        columns: list[str],
        preset: str | None,
        image_column: str | None,
        cond_column: str | None,
        caption_column: str | None,
    ) -> tuple[str, str | None, str]:
        if not self._units:
            raise SourceError(f"{self.metadata}: no rows")
        defaults = FILL50K_COLUMNS if preset == "fill50k" else None
        problems: list[str] = []
        have = ", ".join(repr(c) for c in columns) or "none"

        def pick(what: str, given: str | None, candidates: tuple[str, ...], fix: str) -> str | None:
            """`given` if it is a column, else the first of `candidates` that is; a problem if none."""
            if given is not None:
                if given not in columns:
                    problems.append(f"no {what} column {given!r} (columns found: {have}); {fix}")
                return given
            found = next((c for c in candidates if c in columns), None)
            if found is None:
                problems.append(f"no {what} column: looked for {' or '.join(repr(c) for c in candidates)} "
                                f"(columns found: {have}); {fix}")
            return found

        image_column = pick("image", image_column, (defaults["image"],) if defaults else DEFAULT_IMAGE_COLUMNS,
                            "pass --image-column")
        cond_column = pick("conditioning image", cond_column,
                           (defaults["conditioning_image"],) if defaults else DEFAULT_COND_COLUMNS,
                           "pass --conditioning-image-column, or compute the conditioning image from the image "
                           "with --condition canny|gray|sketch") if self.require_conditioning else None
        caption_column = pick("caption", caption_column or (defaults["caption"] if defaults else DEFAULT_CAPTION_COLUMN),
                              (), "pass --caption-column")
        if problems:
            raise SourceError(f"{self.metadata}:\n  - " + "\n  - ".join(problems))
        assert image_column is not None
        return image_column, cond_column, caption_column

    # --- Source API

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "path": str(self.root),
            "metadata": self.metadata.name,
            "format": self.format,
            "columns": {
                "image": self.image_column,
                "conditioning_image": self.cond_column,
                "caption": self.caption_column,
            },
            "max_samples": self.max_samples,
        }

    def num_units(self) -> int:
        return len(self._units)

    def num_items(self) -> int:
        return sum(u.count for u in self._units)

    def unit_size(self, i: int) -> int:
        self._check_unit(i)
        return self._units[i].count

    def unit_name(self, i: int) -> str:
        self._check_unit(i)
        u = self._units[i]
        return f"{self.metadata.name} rows {u.first_row + 1}-{u.first_row + u.count}"

    def iter_unit(self, i: int) -> Iterator[RawItem]:
        self._check_unit(i)
        for row, where, from_csv, bad in self._unit_rows(self._units[i]):
            item = bad if bad is not None else self._item(row, where, from_csv=from_csv)
            if self.fingerprint_mode == "stat":
                item.fingerprint = self._stat_fingerprint(row, where, from_csv)
            else:
                with_content_fingerprint(item)
            yield item

    def unit_fingerprints(self, i: int) -> list[str]:
        self._check_unit(i)
        if self.fingerprint_mode != "stat":
            return super().unit_fingerprints(i)
        # The metadata rows and os.stat only: not one image file is opened.
        return [self._stat_fingerprint(row, where, from_csv) for row, where, from_csv, _ in
                self._unit_rows(self._units[i])]

    def _stat_fingerprint(self, row: object, where: str, from_csv: bool) -> str:
        """"stat:" + size:mtime_ns of the image and the conditioning image + a hash of the captions."""
        if not isinstance(row, dict):
            return f"stat:-/-/{captions_hash(None)}"

        def part(column: str | None) -> str:
            rel = row.get(column) if column is not None else None
            if not isinstance(rel, str) or not rel.strip():
                return "-"
            return stat_part(rel if os.path.isabs(rel) else self.root / rel)

        captions, _ = parse_captions(row.get(self.caption_column), where, from_csv=from_csv, limits=self.limits)
        return f"stat:{part(self.image_column)}/{part(self.cond_column)}/{captions_hash(captions)}"

    def _unit_rows(self, u: _Unit) -> Iterator[tuple[object, str, bool, RawItem | None]]:
        """(row, where, from_csv, None) per row of unit u, or (None, where, from_csv, error item)
        for a row that is not even a record (bad JSON, wrong field count, not UTF-8)."""
        if self.format == "json":
            assert self._rows is not None
            for k, row in enumerate(self._rows[u.first_row : u.first_row + u.count]):
                yield row, f"{self._display} row {u.first_row + k + 1}", False, None
        elif self.format == "jsonl":
            yield from self._iter_jsonl(u)
        else:
            yield from self._iter_csv(u)

    def _iter_jsonl(self, u: _Unit) -> Iterator[tuple[object, str, bool, RawItem | None]]:
        with open(self.metadata, "rb") as f:
            f.seek(u.offset)
            n, lineno = 0, u.lineno
            for raw, length in bounded_lines(f, self.limits.max_json_bytes):
                lineno += 1
                if raw is not None and not raw.strip():
                    continue
                where = f"{self._display} row {u.first_row + n + 1} (line {lineno})"
                problem = json_too_big(length, self.limits.max_json_bytes) if raw is None else self._json_problem(raw)
                try:
                    if problem:
                        raise ValueError(f"{problem} (checked before parsing)")
                    row = json.loads(raw.decode("utf-8").lstrip("\ufeff"))
                except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                    yield None, where, False, RawItem(where, None, None, None,
                                                      ("metadata_invalid", f"{where}: not valid JSON: {e}"))
                else:
                    yield row, where, False, None
                n += 1
                if n == u.count:
                    return
        raise SourceError(f"{self.metadata}: changed while reading (expected {u.count} rows from line {u.lineno + 1})")

    def _iter_csv(self, u: _Unit) -> Iterator[tuple[object, str, bool, RawItem | None]]:
        with open(self.metadata, "rb") as f:
            f.seek(u.offset)
            n = 0
            for _, lineno, fields in self._csv_rows(f, u.offset, u.lineno):
                where = f"{self._display} row {u.first_row + n + 1} (line {lineno + 1})"
                if len(fields) != len(self._header):
                    detail = f"{where}: {len(fields)} fields, the header has {len(self._header)}"
                    yield None, where, True, RawItem(where, None, None, None, ("metadata_invalid", detail))
                elif not is_utf8_clean(fields):
                    yield None, where, True, RawItem(where, None, None, None,
                                                     ("metadata_invalid", f"{where}: not valid UTF-8"))
                else:
                    yield dict(zip(self._header, fields)), where, True, None
                n += 1
                if n == u.count:
                    return
        raise SourceError(f"{self.metadata}: changed while reading (expected {u.count} rows from line {u.lineno + 1})")

    def _item(self, row: object, where: str, *, from_csv: bool) -> RawItem:
        """One metadata row -> RawItem; every problem becomes the item's error, never an exception."""
        if not isinstance(row, dict):
            detail = f"{where}: expected an object, got {row!r:.80}"
            return RawItem(where, None, None, None, ("metadata_invalid", detail))
        image_rel = row.get(self.image_column)
        if not isinstance(image_rel, str) or not image_rel.strip():
            detail = f"{where}: no path in column {self.image_column!r} (got {image_rel!r:.80})"
            return RawItem(where, None, None, None, ("metadata_invalid", detail))
        image, error = read_file(self.root, image_rel, "image", where, self.limits)
        if error:
            return RawItem(image_rel, None, None, None, error)
        captions, caption_error = parse_captions(row.get(self.caption_column), where, from_csv=from_csv,
                                                 limits=self.limits)
        if self.cond_column is None:  # conditioning images are computed, not read
            return RawItem(image_rel, image, None, captions, caption_error)
        cond_rel = row.get(self.cond_column)
        if not isinstance(cond_rel, str) or not cond_rel.strip():
            detail = f"{where} ({image_rel}): no path in column {self.cond_column!r} (got {cond_rel!r:.80})"
            return RawItem(image_rel, image, None, captions, ("cond_missing", detail))
        cond, error = read_file(self.root, cond_rel, "cond", where, self.limits)
        return RawItem(image_rel, image, cond, captions, error or caption_error, cond_id=cond_rel)



# ----------------------------------------------------------------------------------- opening


def _as_list(value: str | Sequence[str] | None, default: Sequence[str]) -> tuple[str, ...]:
    if value is None:
        return tuple(default)
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


def _open_webdataset(spec: str, path: Path | None, problems: list[str], **kw) -> WebDatasetSource | None:
    tars, where = find_tars(spec, path, problems, follow_symlinks=kw["limits"].follow_symlinks)
    return WebDatasetSource(tars, where, **kw) if tars and not problems else None


def _folder_metadata(folder: Path, kind: str, problems: list[str]) -> tuple[Path, str | None] | None:
    """The metadata file of a dataset folder and its preset."""
    found = [folder / n for n in METADATA_FILES if (folder / n).is_file()]
    fill = folder / FILL50K_FILE
    if kind == "fill50k":
        if fill.is_file():
            return fill, "fill50k"
        problems.append(f"{folder}: no {FILL50K_FILE} (the fill50k layout: prompt.json, source/, target/)")
        return None
    if len(found) > 1:
        problems.append(f"{folder}: several metadata files ({', '.join(p.name for p in found)}); pass the one to use")
        return None
    if found:
        return found[0], None
    if fill.is_file():
        return fill, "fill50k"
    if (folder / FILL50K_DOWNLOAD_FILE).is_file():
        # fusing/fill50k as downloaded: train.jsonl rows with image / conditioning_image / text
        # paths (images/, conditioning_images/): the default columns, nothing to rename.
        return folder / FILL50K_DOWNLOAD_FILE, None
    odd = [folder / n for n in (*METADATA_FILES, FILL50K_FILE, FILL50K_DOWNLOAD_FILE) if os.path.lexists(folder / n)]
    if odd:  # named as a metadata file, but a folder, FIFO, device or dangling link: never read
        problems += [f"{p}: not a regular file ({_file_kind(p)}), so it is not read as the dataset's metadata"
                     for p in odd]
        return None
    problems.append(
        f"{folder}: no metadata file: expected one of {', '.join(METADATA_FILES)}, "
        f"{FILL50K_FILE} (fill50k), {FILL50K_DOWNLOAD_FILE} (fill50k as downloaded), .tar shards, "
        "or a Hugging Face dataset (save_to_disk folder, .parquet / .arrow files)" + _split_hint(folder)
    )
    return None


def _split_hint(folder: Path) -> str:
    """Where a folder's metadata files lie one level down (an imagefolder with split folders such
    as train/ and validation/): the ways to read one of them; "" when there are none."""
    try:
        subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))[:1000]
    except OSError:
        return ""
    splits = [p.name for p in subfolders if any((p / n).is_file() for n in METADATA_FILES)]
    if not splits:
        return ""
    return (f". Its subfolders {', '.join(s + '/' for s in splits[:5])} hold metadata files (dataset splits?): pass "
            f"--data {folder / splits[0]}, or --dataset-name {folder} --dataset-split {splits[0]}")


def _file_kind(path: Path) -> str:
    """What a path that is not a regular file is, in words."""
    try:
        return file_type(os.stat(path).st_mode)
    except OSError:
        return "a link to nothing"


def _detect_kind(path: Path) -> str:
    """What kind="auto" reads `path` as: a metadata file wins, then a save_to_disk folder, then
    tars, then parquet / arrow tables (a folder may hold several of these side by side)."""
    if path.is_file():
        if path.name.lower().endswith(TAR_SUFFIXES):
            return "webdataset"
        return "hf" if path.name.lower().endswith(TABLE_SUFFIXES) else "folder"
    if any((path / n).is_file() for n in (*METADATA_FILES, FILL50K_FILE, FILL50K_DOWNLOAD_FILE)):
        return "folder"
    if is_saved_dataset(path):
        return "hf"
    if local_tars(path):
        return "webdataset"
    return "hf" if looks_like_hf(path) else "folder"  # folder: its error lists what was expected


def _fail(problems: list[str]) -> SourceError:
    return SourceError("cannot open dataset:\n  - " + "\n  - ".join(problems))


def open_source(
    path_or_url: str | Path | None,
    *,
    kind: str = "auto",
    image_column: str | Sequence[str] | None = None,
    conditioning_image_column: str | Sequence[str] | None = None,
    caption_column: str | Sequence[str] | None = None,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    max_samples: int | None = None,
    require_conditioning: bool = True,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    dataset_revision: str | None = None,
    dataset_split: str = DEFAULT_SPLIT,
    cache_dir: str | None = None,
    limits: ReadLimits = ReadLimits(),
    fingerprint_mode: str = "content",
) -> Source:
    """Open a dataset; raise SourceError listing every problem when it cannot be read.

    `path_or_url`: a dataset folder, a metadata file inside one, a .tar, a folder of .tar files, a
    brace pattern (`data/{00000..00009}.tar`), a `save_to_disk` folder, or .parquet / .arrow files
    (or a folder of them). Or None with `dataset_name`: a hub id or local folder loaded with
    `datasets.load_dataset(dataset_name, dataset_config_name, revision=, split=, cache_dir=)`.
    `kind` "auto" decides from what is there. Columns left None take the format's defaults. For
    a folder or a Hugging Face dataset they are column names; for webdataset they are member
    suffixes / .json keys, and may be lists (or comma-separated) tried in order: image_column the
    image extensions, conditioning_image_column the conditioning member suffixes, caption_column
    the caption suffixes / json keys. `samples_per_shard` sizes folder and dataset units (a tar is
    always one unit); `max_samples` keeps only the first N items in unit order.
    `require_conditioning=False` (conditioning images computed by precompute) neither requires nor
    reads a conditioning column or member. `limits` bounds what is read from one file or tar
    member (`source_base.ReadLimits`). `fingerprint_mode` ("content" or "stat") is how items are
    fingerprinted (`source_base`; Hugging Face datasets always use content). `dataset_split` picks the split of a DatasetDict or of
    a folder in the hub layout; `cache_dir` is the datasets download / conversion cache.
    """
    problems = []
    if kind not in KINDS:
        problems.append(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        problems.append(f"samples_per_shard must be an integer >= 1, got {samples_per_shard!r}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        problems.append(f"max_samples must be an integer >= 1 or None, got {max_samples!r}")
    problems += limits.problems()
    if fingerprint_mode not in FINGERPRINT_MODES:
        problems.append(f"fingerprint_mode must be one of {list(FINGERPRINT_MODES)}, got {fingerprint_mode!r}")
    if (path_or_url is None) == (dataset_name is None):
        problems.append("pass exactly one of a dataset path (--data) and a dataset name (--dataset-name)")
    if dataset_name is not None and kind not in ("auto", "hf"):
        problems.append(f"--dataset-name is a Hugging Face dataset, but kind={kind!r}")
    columns = {
        "image_column": image_column,
        "conditioning_image_column": conditioning_image_column,
        "caption_column": caption_column,
    }
    spec = "" if path_or_url is None else str(path_or_url)
    if spec.startswith("file://"):
        spec = file_url_path(spec) or spec  # another host's stays a URL, refused below
    remote = is_remote(spec)
    if "://" in spec and not remote:
        problems.append(f"{spec}: unknown URL scheme; remote inputs are WebDataset tars on s3:// or http(s)://")
    elif remote and kind not in ("auto", "webdataset"):
        problems.append(f"{spec}: remote inputs are WebDataset tars (s3://, http(s)://), but kind={kind!r}; copy "
                        "other datasets to a local folder")
    if problems:
        raise _fail(problems)

    if dataset_name is not None or kind == "hf" or (kind == "auto" and os.path.exists(spec)
                                                    and _detect_kind(Path(spec)) == "hf"):
        if dataset_name is None and not os.path.exists(spec):
            raise _fail([f"{spec} does not exist"])
        for what, value in columns.items():
            if value is not None and not isinstance(value, str):
                problems.append(f"{what} must be a single column name for a Hugging Face dataset, got {value!r}")
        if problems:
            raise _fail(problems)
        hf = open_hf_source(
            spec or None, dataset_name=dataset_name, dataset_config_name=dataset_config_name,
            dataset_revision=dataset_revision, dataset_split=dataset_split, cache_dir=cache_dir,
            image_column=image_column, conditioning_image_column=conditioning_image_column,  # type: ignore[arg-type]
            caption_column=caption_column, samples_per_shard=samples_per_shard,  # type: ignore[arg-type]
            max_samples=max_samples, require_conditioning=require_conditioning, limits=limits,
        )
        if dataset_split != DEFAULT_SPLIT and hf.ident.get("split") is None:
            raise _fail([f"--dataset-split {dataset_split}: {spec} is one table ({hf.ident.get('format')}), without "
                         "splits; leave --dataset-split out"])
        return hf
    if dataset_split != DEFAULT_SPLIT:  # a split is never silently not taken
        raise _fail([f"--dataset-split {dataset_split}: {spec} is a folder or tar dataset, without splits (splits are "
                     "Hugging Face datasets'); leave --dataset-split out"])

    is_pattern = remote or ("{" in spec and "}" in spec and not os.path.exists(spec))
    path = None if is_pattern else Path(spec)
    if path is not None and not path.exists():
        raise SourceError(f"cannot open dataset: {spec} does not exist")
    tarlike = is_pattern or (path is not None and _detect_kind(path) == "webdataset")
    if path is not None and path.is_dir() and kind == "webdataset":
        tarlike = True
    if kind == "webdataset" or (kind == "auto" and tarlike):
        if path is not None and path.is_file() and not tarlike:
            raise SourceError(f"cannot open dataset: {spec} is not a .tar file")
        wds_kw = dict(
            image_exts=_as_list(image_column, DEFAULT_IMAGE_EXTS),
            cond_suffixes=_as_list(conditioning_image_column, DEFAULT_COND_SUFFIXES) if require_conditioning else (),
            caption_keys=_as_list(caption_column, DEFAULT_CAPTION_KEYS),
            max_samples=max_samples,
            limits=limits,
            fingerprint_mode=fingerprint_mode,
        )
        for what, value in wds_kw.items():
            if what not in ("max_samples", "cond_suffixes", "limits", "fingerprint_mode") and not value:
                problems.append(f"{what} is empty")
            if what == "cond_suffixes" and require_conditioning and not value:
                problems.append(f"{what} is empty")
        source = None if problems else _open_webdataset(spec, path, problems, **wds_kw)
        if source is None:
            raise _fail(problems)
        return source

    if tarlike:
        raise SourceError(f"cannot open dataset: {spec} is a tar shard, but kind={kind!r}")
    assert path is not None
    for what, value in columns.items():
        if value is not None and not isinstance(value, str):
            problems.append(f"{what} must be a single column name for a folder dataset, got {value!r}")
    if path.is_dir():
        found = _folder_metadata(path, kind, problems)
        metadata, preset = found if found else (None, None)
    else:
        metadata, preset = path, "fill50k" if (kind == "fill50k" or path.name == FILL50K_FILE) else None
    if problems or metadata is None:
        raise _fail(problems)
    return FolderSource(
        metadata,
        preset=preset,
        image_column=image_column,  # type: ignore[arg-type]
        conditioning_image_column=conditioning_image_column,  # type: ignore[arg-type]
        caption_column=caption_column,  # type: ignore[arg-type]
        samples_per_shard=samples_per_shard,
        max_samples=max_samples,
        require_conditioning=require_conditioning,
        limits=limits,
        fingerprint_mode=fingerprint_mode,
    )
