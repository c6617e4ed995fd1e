"""Hugging Face datasets as precompute inputs, read through the `datasets` library.

This module owns turning a `datasets.Dataset` into units of `RawItem`s:

- **what can be opened** (`open_hf_source`): a hub id or a local dataset folder by name
  (`--dataset-name`, loaded with `datasets.load_dataset(name, config, revision=, split=,
  cache_dir=)`), or with `--data` a `save_to_disk` folder (`dataset_info.json` + `state.json`, or
  `dataset_dict.json` for a DatasetDict, whose split is then picked), a `.parquet` / `.arrow` file,
  or a folder of them (the hub's `data/train-00000-of-00001.parquet` layout).
- **columns**: `image`, `conditioning_image` and `text` by default (the diffusers reference
  script's), overridable. An `Image` feature is cast to `Image(decode=False)`, so a cell is the
  encoded file as stored (`{"bytes", "path"}`; with no bytes the path is read); plain binary
  columns and string path columns work too. Nothing is decoded here.
- **units**: fixed row ranges, unit i = rows [i * samples_per_shard, (i + 1) * samples_per_shard),
  read in small slices of the memory-mapped Arrow data, so no unit (let alone the dataset) is held
  in memory, any process can read any unit, and resume and byte-reproducibility behave exactly as
  for folder sources. `max_samples` keeps the first N rows.
- **identity** (`describe`): kind, dataset name or resolved local path, config, split, revision,
  columns, row count, features, and for local inputs the names and sizes of the data files. Never
  modification times or the download cache's absolute paths, which differ between machines.
- **fingerprints**: always content fingerprints (`source_base`), whatever fingerprint_mode says:
  rows have no file of their own to stat; `describe()["fingerprint_mode"]` says so.

Every row yields exactly one RawItem; a bad row (no bytes, no caption, an unreadable path) is an
error item named like `fusing/fill50k[train] row 17` (the row's index in the split), never an
exception.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from precompute.errors import SourceError
from precompute.source_base import (
    RawItem,
    ReadLimits,
    Source,
    links_out,
    outside_problem,
    parse_captions,
    read_file,
    too_large,
    with_content_fingerprint,
)

# Markers of a `save_to_disk` folder: a Dataset, or a DatasetDict (one subfolder per split).
DATASET_MARKERS = ("dataset_info.json", "state.json")
DATASET_DICT_MARKER = "dataset_dict.json"
TABLE_SUFFIXES = (".parquet", ".arrow")
DEFAULT_SPLIT = "train"
# The diffusers reference script's column names (fusing/fill50k has exactly these).
DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_COND_COLUMN = "conditioning_image"
DEFAULT_CAPTION_COLUMN = "text"
# Rows per slice read from Arrow: a unit is read in slices so that only a few images are
# materialised as Python bytes at a time (a 256-row unit of 1 MB images would be 256 MB).
READ_ROWS = 16
OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def table_files(folder: Path) -> list[Path]:
    """The .parquet / .arrow files anywhere under `folder`, sorted (hidden folders skipped)."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).parts
        if p.is_file() and p.name.lower().endswith(TABLE_SUFFIXES) and not any(s.startswith(".") for s in rel):
            out.append(p)
    return sorted(out)


def _links_in(folder: Path) -> list[Path]:
    """Every symbolic link under `folder` that `datasets` could read through (hidden entries
    skipped, as `datasets` skips them), without following any: the data files, a save_to_disk
    folder's json markers, a linked sub-folder."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_symlink():
                out.append(path)
    return out


def is_saved_dataset(folder: Path) -> bool:
    return (folder / DATASET_DICT_MARKER).is_file() or all((folder / m).is_file() for m in DATASET_MARKERS)


def looks_like_hf(path: Path) -> bool:
    """Whether `--data path` is something `datasets` reads (kind "auto")."""
    if path.is_file():
        return path.name.lower().endswith(TABLE_SUFFIXES)
    return path.is_dir() and (is_saved_dataset(path) or bool(table_files(path)))


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


def _load_error(what: str, e: BaseException, cache_dir: str | None) -> SourceError:
    """One clear message for a dataset `datasets` could not load (never its traceback)."""
    text = str(e).strip() or type(e).__name__
    from shards.runtime import exception_chain

    cause = exception_chain(e)[-1]  # the library's wrapper hides what went wrong
    if cause is not e:
        lines = (str(cause).strip() or "?").splitlines()
        said = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"  # e.g. a schema dump between
        text += f" (because {type(cause).__name__}: {said[:500]})"
    hint = ""
    if "corresponds to no data" in text:
        hint = "; the dataset has no rows (an empty file or split)"
    if _offline() and isinstance(e, (ConnectionError, FileNotFoundError, OSError)):
        where = f"--cache-dir {cache_dir}" if cache_dir else "the default datasets cache"
        hint = (f"; offline mode is on ({', '.join(v for v in OFFLINE_VARS if os.environ.get(v))}) and the dataset is "
                f"not in {where}: download it once online, or pass a local folder")
    return SourceError(f"{what}: cannot load the dataset: {type(e).__name__}: {text}{hint}")


def _no_data_files(folder: Path) -> bool:
    """A save_to_disk folder of a Dataset with no rows: its state.json lists no data files (which
    `load_from_disk` answers with an IndexError)."""
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _pick_split(loaded: Any, split: str, what: str) -> Any:
    import datasets

    if isinstance(loaded, datasets.DatasetDict) and split not in loaded and "[" in split:
        # A sliced split ("train[:1000]", "train[10%:20%]"), as load_dataset takes it: the same
        # rows of the saved splits, in order.
        try:
            parts = datasets.ReadInstruction.from_spec(split).to_absolute(
                {name: ds.num_rows for name, ds in loaded.items()})
        except (ValueError, KeyError, AssertionError) as e:
            raise SourceError(f"{what}: cannot read the split {split!r}: {e} (splits: "
                              f"{', '.join(map(repr, loaded)) or 'none'})") from None
        pieces = [loaded[p.splitname].select(range(p.from_, p.to)) for p in parts]
        return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SourceError(f"{what}: no split {split!r} (splits: {', '.join(map(repr, loaded)) or 'none'}); "
                              "pass --dataset-split")
        return loaded[split]
    if not isinstance(loaded, datasets.Dataset):
        raise SourceError(f"{what}: expected a dataset with rows, got {type(loaded).__name__}")
    return loaded


def _load(
    data: str | None, name: str | None, config: str | None, revision: str | None, split: str, cache_dir: str | None
) -> tuple[Any, str, Path | None, dict]:
    """(dataset, label for ids, local root for relative paths, identity fields)."""
    import datasets

    if name is not None:
        local = Path(name).expanduser()
        label = str(local.resolve()) if local.is_dir() else name
        what = f"--dataset-name {name}"
        if local.is_dir() and ((local / DATASET_DICT_MARKER).is_file() or all(
                (local / m).is_file() for m in DATASET_MARKERS)):
            raise SourceError(f"{what}: a save_to_disk folder, which load_dataset cannot read: give it with --data "
                              f"{name}")
        if local.is_file():
            raise SourceError(f"{what}: a file, not a dataset name or folder: give a .parquet / .arrow file (or a "
                              f"tar, or a metadata file's folder) with --data {name}")
        try:
            loaded = datasets.load_dataset(name, config, revision=revision, split=split, cache_dir=cache_dir)
        except SourceError:
            raise
        except ValueError as e:
            if "split" in str(e).lower():
                raise SourceError(f"{what}: no split {split!r}: {e}; pass --dataset-split") from None
            raise _load_error(what, e, cache_dir) from None
        except Exception as e:  # ConnectionError (offline, not found), FileNotFoundError, DatasetNotFoundError...
            raise _load_error(what, e, cache_dir) from None
        ident = {"dataset": label, "config": config, "revision": revision, "split": split}
        return _pick_split(loaded, split, what), label, (local.resolve() if local.is_dir() else None), ident

    assert data is not None
    path = Path(data).expanduser().resolve()
    what = f"--data {data}"
    root = path if path.is_dir() else path.parent
    try:
        if path.is_dir() and is_saved_dataset(path):
            if _no_data_files(path):
                raise SourceError(f"{what}: a save_to_disk folder of an empty dataset (no rows)")
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                ds = _pick_split(loaded, split, what)
                return ds, path.name, root, {"dataset": str(path), "format": "save_to_disk", "split": split}
            return loaded, path.name, root, {"dataset": str(path), "format": "save_to_disk", "split": None}
        if path.is_file() and path.name.lower().endswith(".arrow"):
            import pyarrow

            try:
                ds = datasets.Dataset.from_file(str(path))  # memory-mapped in place, nothing copied
            except pyarrow.ArrowInvalid:  # the IPC file format (Feather v2), not the stream format
                ds = datasets.load_dataset("arrow", data_files=[str(path)], split="train", cache_dir=cache_dir)
            return ds, path.name, root, {"dataset": str(path), "format": "arrow", "split": None}
        if path.is_file():
            loaded = datasets.load_dataset("parquet", data_files=[str(path)], split="train", cache_dir=cache_dir)
            return loaded, path.name, root, {"dataset": str(path), "format": "parquet", "split": None}
        files = table_files(path)
        if not files:
            raise SourceError(f"{what}: no .parquet or .arrow files and no save_to_disk folder")
        # A folder of tables: `datasets` infers the splits from the file names (the hub layout,
        # data/train-00000-of-00001.parquet), everything else is one "train" split.
        loaded = datasets.load_dataset(str(path), split=split, cache_dir=cache_dir)
        fmt = "parquet" if all(p.suffix.lower() == ".parquet" for p in files) else "tables"
        return loaded, path.name, root, {"dataset": str(path), "format": fmt, "split": split}
    except SourceError:
        raise
    except ValueError as e:
        if "split" in str(e).lower():
            raise SourceError(f"{what}: no split {split!r}: {e}; pass --dataset-split") from None
        raise _load_error(what, e, cache_dir) from None
    except Exception as e:
        raise _load_error(what, e, cache_dir) from None


class HFSource(Source):
    """A `datasets.Dataset` split; unit i is rows [i * samples_per_shard, (i + 1) * samples_per_shard)."""

    kind = "hf"

    def __init__(
        self,
        dataset: Any,
        *,
        label: str,
        root: Path | None,
        ident: dict,
        image_column: str | None = None,
        conditioning_image_column: str | None = None,
        caption_column: str | None = None,
        samples_per_shard: int,
        max_samples: int | None = None,
        require_conditioning: bool = True,
        limits: ReadLimits = ReadLimits(),
    ):
        import datasets

        self.limits = limits
        self.label, self.root, self.ident = label, root, ident
        self.samples_per_shard, self.max_samples = samples_per_shard, max_samples
        self.image_column = image_column or DEFAULT_IMAGE_COLUMN
        self.cond_column = (conditioning_image_column or DEFAULT_COND_COLUMN) if require_conditioning else None
        self.caption_column = caption_column or DEFAULT_CAPTION_COLUMN
        split = ident.get("split") or (str(dataset.split) if getattr(dataset, "split", None) else None)
        self._prefix = f"{label}[{split}]" if split else label
        columns = list(dataset.column_names)
        have = ", ".join(map(repr, columns)) or "none"
        problems = []
        if self.image_column not in columns:
            problems.append(f"no image column {self.image_column!r} (columns found: {have}); pass --image-column")
        if self.cond_column is not None and self.cond_column not in columns:
            problems.append(f"no conditioning image column {self.cond_column!r} (columns found: {have}); pass "
                            "--conditioning-image-column, or compute the conditioning image from the image with "
                            "--condition canny|gray|sketch")
        if self.caption_column not in columns:
            problems.append(f"no caption column {self.caption_column!r} (columns found: {have}); pass --caption-column")
        if problems:
            raise SourceError(f"{self._prefix}:\n  - " + "\n  - ".join(problems))
        self.features = dataset.features.to_dict()
        wanted = [c for c in (self.image_column, self.cond_column, self.caption_column) if c is not None]
        ds = dataset.select_columns(list(dict.fromkeys(wanted)))
        for c in (self.image_column, self.cond_column):
            # The encoded file as stored, never a decoded PIL image: decoding is preprocess's job
            # (with its own checks), and decoding here would cost a decode + re-encode per row.
            if c is not None and isinstance(ds.features[c], datasets.Image) and ds.features[c].decode:
                ds = ds.cast_column(c, datasets.Image(decode=False))
        self.dataset = ds
        self.rows = len(ds) if max_samples is None else min(len(ds), max_samples)
        if self.rows == 0:
            raise SourceError(f"{self._prefix}: no rows")

    # --- reading rows

    def _cell_bytes(self, value: object, what: str, column: str, where: str) -> tuple[bytes | None, tuple[str, str] | None]:
        """An image cell -> its encoded bytes: Image(decode=False) {"bytes", "path"}, plain bytes,
        or a path (relative to the local dataset folder, or absolute)."""
        path = None
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if isinstance(data, (bytes, bytearray, memoryview)):
                return self._capped(bytes(data), what, where, column)
            if data is not None:
                return None, ("metadata_invalid", f"{where}: column {column!r} holds {type(data).__name__} bytes")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            return self._capped(bytes(value), what, where, column)
        elif isinstance(value, str):
            path = value
        elif value is not None:
            return None, ("metadata_invalid", f"{where}: column {column!r} must hold image bytes or a path, "
                                              f"got {type(value).__name__}")
        if not isinstance(path, str) or not path.strip():
            return None, (f"{what}_missing", f"{where}: column {column!r} has no bytes and no path")
        if not os.path.isabs(path) and self.root is None:
            return None, (f"{what}_missing", f"{where}: column {column!r} has no bytes, only the relative path "
                                             f"{path!r:.120}, and the dataset has no local folder to resolve it in")
        # A hub dataset has no folder of its own: an absolute path is taken as it is.
        limits = self.limits if self.root is not None else replace(self.limits, follow_symlinks=True)
        return read_file(self.root or Path("/"), path, what, where, limits)

    def _capped(self, data: bytes, what: str, where: str, column: str) -> tuple[bytes | None, tuple[str, str] | None]:
        if len(data) > self.limits.max_file_bytes:
            return None, too_large(what, f"{where} ({column})", len(data), self.limits.max_file_bytes)
        return data, None

    def _item(self, row: dict, index: int) -> RawItem:
        where = f"{self._prefix} row {index}"
        image, error = self._cell_bytes(row.get(self.image_column), "image", self.image_column, where)
        if error:
            return RawItem(where, None, None, None, error)
        captions, caption_error = parse_captions(row.get(self.caption_column), where, from_csv=False)
        if self.cond_column is None:
            return RawItem(where, image, None, captions, caption_error)
        cond, error = self._cell_bytes(row.get(self.cond_column), "cond", self.cond_column, where)
        return RawItem(where, image, cond, captions, error or caption_error, cond_id=f"{where} ({self.cond_column})")

    # --- Source API

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            **self.ident,
            "columns": {"image": self.image_column, "conditioning_image": self.cond_column,
                        "caption": self.caption_column},
            "features": self.features,
            "fingerprint_mode": "content",  # always, for Hugging Face datasets
            "max_samples": self.max_samples,
        }

    def num_units(self) -> int:
        return -(-self.rows // self.samples_per_shard)

    def num_items(self) -> int:
        return self.rows

    def unit_size(self, i: int) -> int:
        self._check_unit(i)
        return min(self.samples_per_shard, self.rows - i * self.samples_per_shard)

    def unit_name(self, i: int) -> str:
        self._check_unit(i)
        first = i * self.samples_per_shard
        return f"{self._prefix} rows {first}-{first + self.unit_size(i) - 1}"

    def iter_unit(self, i: int) -> Iterator[RawItem]:
        self._check_unit(i)
        first = i * self.samples_per_shard
        end = first + self.unit_size(i)
        for start in range(first, end, READ_ROWS):
            stop = min(end, start + READ_ROWS)
            batch = self.dataset[start:stop]  # a dict of columns; Arrow is memory-mapped
            for k in range(stop - start):
                yield with_content_fingerprint(self._item({c: v[k] for c, v in batch.items()}, start + k))


def open_hf_source(
    data: str | None = None,
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    dataset_revision: str | None = None,
    dataset_split: str = DEFAULT_SPLIT,
    cache_dir: str | None = None,
    **kw,
) -> HFSource:
    """Load `dataset_name` (hub id or local folder) or the local `data`; raise SourceError naming
    the dataset when it cannot be loaded. `kw` goes to HFSource (columns, units, max_samples)."""
    if (data is None) == (dataset_name is None):
        raise SourceError("pass exactly one of a --data path and a --dataset-name")
    limits = kw.get("limits") or ReadLimits()
    if data is not None and Path(data).expanduser().is_dir() and not limits.follow_symlinks:
        folder = Path(data).expanduser()
        out = links_out(folder, _links_in(folder))
        if out:
            raise SourceError(f"--data {data}: " + outside_problem(folder, out, "file(s) or folder(s)"))
    ds, label, root, ident = _load(data, dataset_name, dataset_config_name, dataset_revision, dataset_split,
                                   cache_dir)
    return HFSource(ds, label=label, root=root, ident=ident, **kw)
