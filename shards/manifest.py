"""What a cache says about itself: per-shard records, the manifest, and the identity check.

- `ShardRecord` (`records/shard-NNNNNN.json`) is written right after its shard is published and is
  the shard's "done" marker: sample count, bytes, sha256 and keys, plus what was skipped and why.
- `Manifest` (`manifest.json`, written last) collects every record with the facts train needs
  before it loads any weights: the cache identity (`shards.identity.CacheIdentity`: encoder,
  latent, text, geometry, dtypes, condition, typed and validated once), the resolved precompute
  config and the totals. Each fact is stored once. It names every shard, so nothing ever has to
  list a bucket.
- `identity.json` (written first) holds the same identity; a re-run with another model or other
  byte-changing settings is refused with `identity_diff`'s list of differences.

All files are JSON with sorted keys and nothing time-dependent. The manifest's `created` is
whatever the writer passes: precompute passes "" so a resumed or multi-process run gives a
byte-identical manifest; other callers get the current time (or SOURCE_DATE_EPOCH's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from . import limits, schema
from .errors import ManifestError
from .identity import CacheIdentity, Dtypes, Geometry, Latent, Text
from .secrets import redact

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .store import Store

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _json_normalise(obj: Any) -> Any:
    """Tuples -> lists etc., so an in-memory object equals what loading it back gives."""
    return json.loads(json.dumps(obj))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------
# ShardRecord


@dataclass
class ShardRecord:
    index: int
    name: str
    samples: int
    bytes: int
    sha256: str
    keys: list[str]  # in tar order
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped_items: list[dict] = field(default_factory=list)  # {"source_id", "reason", "detail"}
    # Latent [h, w] of each sample, parallel to `keys`. Written for bucketed caches, so train can
    # group samples by shape in its plan without opening shards; None means "one shape per cache".
    latent_shapes: list[list[int]] | None = None
    # Items kept but altered, by reason -> count (e.g. caption_truncated: over the text encoders'
    # 77 tokens, cut as SDXL does; cond_resized). Left out of the JSON when empty.
    notes: dict[str, int] = field(default_factory=dict)
    # What the shard was made from, per position of its source unit (every item read, skipped or
    # not): `sources` the item's input fingerprint (content sha256, or file size + mtime), and
    # `source_keys` 16 hex digits of sha256(source id). A re-run compares them with the inputs
    # (edited inputs -> stale shard) and counts repeated items. Kept in the per-shard record files
    # only: the manifest's copy leaves them out (train needs neither), so it stays small.
    sources: list[str] | None = None
    source_keys: list[str] | None = None

    def problems(self) -> list[str]:
        p = []
        if not _is_int(self.index) or self.index < 0:
            p.append(f"index must be an integer >= 0, got {self.index!r}")
        elif self.name != schema.shard_name(self.index):
            p.append(f"name {self.name!r} does not match index {self.index} ({schema.shard_name(self.index)!r})")
        if not _is_int(self.samples) or self.samples < 0:
            p.append(f"samples must be an integer >= 0, got {self.samples!r}")
        if not _is_int(self.bytes) or self.bytes < 0:
            p.append(f"bytes must be an integer >= 0, got {self.bytes!r}")
        if not isinstance(self.sha256, str) or not _SHA256.match(self.sha256):
            p.append(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if not isinstance(self.keys, list) or not all(isinstance(k, str) and k and k.isprintable() for k in self.keys):
            p.append("keys must be a list of non-empty strings of printable characters")
        else:
            if _is_int(self.samples) and len(self.keys) != self.samples:
                p.append(f"{len(self.keys)} keys for {self.samples} samples")
            if len(set(self.keys)) != len(self.keys):
                p.append("keys are not unique")
        if not isinstance(self.skipped, dict) or not all(
            isinstance(k, str) and _is_int(v) and v >= 0 for k, v in self.skipped.items()
        ):
            p.append("skipped must map reason strings to counts >= 0")
        if not isinstance(self.notes, dict) or not all(
            isinstance(k, str) and _is_int(v) and v >= 0 for k, v in self.notes.items()
        ):
            p.append("notes must map reason strings to counts >= 0")
        if not isinstance(self.skipped_items, list) or not all(isinstance(i, dict) for i in self.skipped_items):
            p.append("skipped_items must be a list of objects")
        for name in ("sources", "source_keys"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
                p.append(f"{name} must be null or a list of strings")
        if isinstance(self.sources, list) and isinstance(self.source_keys, list) and \
                len(self.sources) != len(self.source_keys):
            p.append(f"{len(self.sources)} sources for {len(self.source_keys)} source_keys")
        if self.latent_shapes is not None:
            shapes = self.latent_shapes
            if not isinstance(shapes, list) or not all(
                isinstance(s, (list, tuple)) and len(s) == 2 and all(_is_int(x) and x > 0 for x in s) for s in shapes
            ):
                p.append("latent_shapes must be null or a list of [h, w]")
            elif isinstance(self.keys, list) and len(shapes) != len(self.keys):
                p.append(f"{len(shapes)} latent_shapes for {len(self.keys)} keys")
        return p

    def to_dict(self) -> dict:
        d = _json_normalise(asdict(self))
        if d["latent_shapes"] is None:
            del d["latent_shapes"]  # keep records of one-shape caches lean
        if not d["notes"]:
            del d["notes"]
        for name in ("sources", "source_keys"):
            if d[name] is None:
                del d[name]
        return d

    def without_sources(self) -> "ShardRecord":
        """The record as the manifest lists it (no per-item source fingerprints)."""
        return replace(self, sources=None, source_keys=None)

    def to_json(self) -> bytes:
        return _dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any, where: str = "shard record") -> "ShardRecord":
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}")
        required = ("index", "name", "samples", "bytes", "sha256", "keys")
        missing = [k for k in required if k not in d]
        if missing:
            raise ManifestError(f"{where}: missing fields {missing}")
        rec = cls(
            index=d["index"],
            name=d["name"],
            samples=d["samples"],
            bytes=d["bytes"],
            sha256=d["sha256"],
            keys=d["keys"],
            skipped=d.get("skipped", {}),
            skipped_items=d.get("skipped_items", []),
            latent_shapes=d.get("latent_shapes"),
            notes=d.get("notes", {}),
            sources=d.get("sources"),
            source_keys=d.get("source_keys"),
        )
        problems = rec.problems()
        if problems:
            raise ManifestError(f"{where}: " + "; ".join(problems))
        return rec

    @classmethod
    def from_json(cls, data: bytes, where: str = "shard record") -> "ShardRecord":
        try:
            d = limits.loads(data, where, "SHARDS_MAX_RECORD_BYTES")
        except limits.LimitError as e:
            raise ManifestError(str(e)) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{where}: not valid JSON ({e})") from e
        return cls.from_dict(d, where)


def read_record(store: "Store", index: int) -> ShardRecord:
    """The per-shard record of shard `index`; FileNotFoundError if absent, ManifestError if bad."""
    rel = schema.record_name(index)
    try:
        data = store.read_capped(rel, "SHARDS_MAX_RECORD_BYTES")
    except limits.LimitError as e:
        raise ManifestError(str(e)) from None
    rec = ShardRecord.from_json(data, where=store.display(rel))
    if rec.index != index:
        raise ManifestError(f"{store.display(rel)}: says index {rec.index}, expected {index}")
    return rec


# --------------------------------------------------------------------------------------------
# Manifest

# The manifest's own sections (v2); v1 also repeated these identity sections at the top level.
_V1_COPIES = ("latent", "text", "geometry", "dtypes")


def _created_now() -> str:
    """ISO-8601 UTC time; SOURCE_DATE_EPOCH (reproducible-builds convention) pins it."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return t.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def default_code_version() -> str:
    try:
        from importlib.metadata import version

        return version("sdxl-adapter-cache")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


# The totals every manifest writer now records (compute_totals); older ones may lack some.
_ALWAYS_TOTALLED = {"shards", "samples", "bytes", "skipped", "notes"}


@dataclass
class Manifest:
    format: str
    format_version: int
    code_version: str
    created: str
    identity: CacheIdentity  # encoder, latent, text, geometry, dtypes, condition and the rest
    config: dict
    shards: list[ShardRecord]
    totals: dict  # shards, samples, bytes, skipped {reason: n}

    # -- the identity's facts, typed ----------------------------------------------------------
    @property
    def latent(self) -> Latent:
        return self.identity.latent

    @property
    def text(self) -> Text:
        return self.identity.text

    @property
    def geometry(self) -> Geometry:
        return self.identity.geometry

    @property
    def dtypes(self) -> Dtypes:
        return self.identity.dtypes

    @property
    def storage_dtype(self):
        return self.identity.dtypes.storage_dtype

    @property
    def has_latent_std(self) -> bool:
        return self.identity.latent.has_std

    @property
    def num_samples(self) -> int:
        return self.totals["samples"]

    def record(self, index: int) -> ShardRecord:
        for r in self.shards:
            if r.index == index:
                return r
        raise KeyError(f"no shard {index} in the manifest")

    # -- building ----------------------------------------------------------------------------
    @staticmethod
    def compute_totals(records: list[ShardRecord], vae_scale_factor: int | None = None) -> dict:
        """shards, samples, bytes, skipped {reason: n}; for a cache with views also `sources`
        (distinct source images; samples / sources = views per image), and for a bucketed cache
        (records with latent_shapes) `buckets` {"HxW" in pixels: samples}."""
        from .views import count_sources, has_views

        skipped: dict[str, int] = {}
        notes: dict[str, int] = {}
        for r in records:
            for reason, n in r.skipped.items():
                skipped[reason] = skipped.get(reason, 0) + n
            for reason, n in r.notes.items():
                notes[reason] = notes.get(reason, 0) + n
        totals: dict[str, Any] = {
            "shards": len(records),
            "samples": sum(r.samples for r in records),
            "bytes": sum(r.bytes for r in records),
            "skipped": dict(sorted(skipped.items())),
            "notes": dict(sorted(notes.items())),  # kept but altered (e.g. caption_truncated)
        }
        if any(has_views(r.keys) for r in records):
            # Views of one image always share its shard (keys carry the shard index).
            totals["sources"] = sum(count_sources(r.keys) for r in records)
        if any(r.latent_shapes is not None for r in records):
            f = vae_scale_factor or 1
            counts: dict[tuple[int, int], int] = {}
            for r in records:
                for h, w in r.latent_shapes or []:
                    counts[(h * f, w * f)] = counts.get((h * f, w * f), 0) + 1
            totals["buckets"] = {f"{h}x{w}": n for (h, w), n in sorted(counts.items())}  # "HxW" (pixels)
        return totals

    @classmethod
    def build(
        cls,
        identity: CacheIdentity,
        records: list[ShardRecord],
        config: dict,
        code_version: str | None = None,
        created: str | None = None,
        extra_totals: dict | None = None,
    ) -> "Manifest":
        """A manifest from the identity and the records of every shard; totals are computed here,
        records sorted by index."""
        if not isinstance(identity, CacheIdentity):
            raise TypeError(f"identity must be a CacheIdentity (CacheIdentity.from_dict), got {type(identity).__name__}")
        records = sorted((r.without_sources() for r in records), key=lambda r: r.index)
        m = cls(
            format=schema.FORMAT,
            format_version=schema.MANIFEST_VERSION,
            code_version=code_version if code_version is not None else default_code_version(),
            created=created if created is not None else _created_now(),
            identity=identity,
            config=_json_normalise(config),
            shards=list(records),
            totals={**cls.compute_totals(records, identity.latent.vae_scale_factor), **(extra_totals or {})},
        )
        problems = m.problems()
        if problems:
            raise ManifestError("cannot build manifest: " + "; ".join(problems))
        return m

    # -- checking ---------------------------------------------------------------------------
    def problems(self) -> list[str]:
        p: list[str] = []
        if self.format != schema.FORMAT:
            p.append(f"format is {self.format!r}, expected {schema.FORMAT!r}")
        if self.format_version not in schema.MANIFEST_VERSIONS_READ:
            p.append(f"format_version {self.format_version!r} is not supported (this code reads "
                     f"{', '.join(map(str, schema.MANIFEST_VERSIONS_READ))})")
        if not isinstance(self.identity, CacheIdentity):
            p.append(f"identity must be a CacheIdentity, got {type(self.identity).__name__}")
        for name in ("config", "totals"):
            if not isinstance(getattr(self, name), dict):
                p.append(f"{name} must be an object, got {type(getattr(self, name)).__name__}")
        indices = [r.index for r in self.shards]
        if indices != sorted(set(indices)):
            p.append("shards must be sorted by index without duplicates")
        record_problems = [f"shard {r.index}: {q}" for r in self.shards for q in r.problems()]
        p += record_problems
        if isinstance(self.totals, dict) and not record_problems:
            # Every total is the sum of the records: one that says otherwise is damage or a lie.
            expected = self.expected_totals()
            for k, v in expected.items():
                if (k in self.totals or k in ("samples", "bytes")) and _json_normalise(self.totals.get(k)) != v:
                    p.append(f"totals.{k} is {self.totals.get(k)!r} but the shards add up to {v!r}")
            repeated = self.totals.get("repeated_items", 0)
            if not _is_int(repeated) or repeated < 0:
                p.append(f"totals.repeated_items must be an integer >= 0, got {repeated!r}")
        return p

    def expected_totals(self) -> dict:
        """The totals the shard records add up to (`compute_totals` with this cache's VAE factor)."""
        factor = self.identity.latent.vae_scale_factor if isinstance(self.identity, CacheIdentity) else None
        return self.compute_totals(self.shards, factor)

    # -- I/O ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("shards", "identity")}
        d["identity"] = self.identity.to_dict()
        d["shards"] = [r.to_dict() for r in self.shards]
        return _json_normalise(d)

    def to_json(self) -> bytes:
        return _dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any, where: str = schema.MANIFEST_FILE) -> "Manifest":
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != schema.FORMAT:
            raise ManifestError(f"{where}: not a {schema.FORMAT} manifest (format={d.get('format')!r})")
        version = d.get("format_version")
        if version not in schema.MANIFEST_VERSIONS_READ:
            hint = (
                "written by a newer version of this tool: upgrade"
                if _is_int(version) and version > schema.MANIFEST_VERSION
                else "re-run precompute to rebuild the cache"
            )
            raise ManifestError(
                f"{where}: format_version {version!r} is not supported (this code reads "
                f"{', '.join(map(str, schema.MANIFEST_VERSIONS_READ))}); {hint}"
            )
        missing = [k for k in cls.__dataclass_fields__ if k not in d]
        if missing:
            raise ManifestError(f"{where}: missing fields {missing}")
        if not isinstance(d["shards"], list):
            raise ManifestError(f"{where}: shards must be a list")
        identity = CacheIdentity.from_dict(d["identity"], f"{where}: identity")
        if version == 1:  # the identity's sections were repeated at the top level: they must agree
            stored = identity.to_dict()
            differ = [k for k in _V1_COPIES if k in d and _json_normalise(d[k]) != stored.get(k)]
            if differ:
                raise ManifestError(f"{where}: sections {differ} disagree with the identity's")
        elif any(k in d for k in _V1_COPIES):
            raise ManifestError(f"{where}: format_version 2 keeps {list(_V1_COPIES)} in the identity only, "
                                f"found {[k for k in _V1_COPIES if k in d]} at the top level")
        shards = [ShardRecord.from_dict(s, where=f"{where}: shards[{i}]") for i, s in enumerate(d["shards"])]
        m = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k not in ("shards", "identity")},
                identity=identity, shards=shards)
        problems = m.problems()
        if problems:
            raise ManifestError(f"{where}: " + "; ".join(problems))
        if not _ALWAYS_TOTALLED <= m.totals.keys():  # what an older writer left out, summed here (once:
            m.totals = {**m.expected_totals(), **m.totals}  # problems() summed them already for any other)
        return m

    @classmethod
    def load(cls, store: "Store | str | os.PathLike") -> "Manifest":
        return cls.load_with_id(store)[0]

    @classmethod
    def load_with_id(cls, store: "Store | str | os.PathLike") -> tuple["Manifest", str]:
        """The manifest and its id, the sha256 of the bytes read: which cache (and which shards)
        exactly, from the one read."""
        from .store import Store
        from .stores import open_store

        if not isinstance(store, Store):
            store = open_store(store)
        where = store.display(schema.MANIFEST_FILE)
        try:
            # Its size first (a missing manifest, or bucket, is a FileNotFoundError here), then
            # capped as it is read: a hostile or damaged manifest is never read into memory whole,
            # whatever length the read's response declares.
            limits.check_size(store.size(schema.MANIFEST_FILE), "SHARDS_MAX_MANIFEST_BYTES", where)
            data = store.read_capped(schema.MANIFEST_FILE, "SHARDS_MAX_MANIFEST_BYTES")
            d = limits.loads(data, where, "SHARDS_MAX_MANIFEST_BYTES")
        except FileNotFoundError:
            why = store.why_missing()
            if why:
                raise ManifestError(why) from None
            raise ManifestError(
                f"no {schema.MANIFEST_FILE} in {store.url}: run precompute first, or it did not finish"
            ) from None
        except limits.LimitError as e:
            raise ManifestError(str(e)) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{where} is not valid JSON ({e}): the file is damaged; re-run precompute") from e
        return cls.from_dict(d, where), hashlib.sha256(data).hexdigest()

    def save(self, store: "Store") -> None:
        problems = self.problems()
        if problems:
            raise ManifestError("refusing to save an invalid manifest: " + "; ".join(problems))
        store.write_bytes(schema.MANIFEST_FILE, self.to_json())


# --------------------------------------------------------------------------------------------
# Identity

_ABSENT = object()


def identity_diff(old: dict, new: dict) -> list[str]:
    """Every difference between two identity dicts as 'dotted.path: old != new', sorted by path.

    Dicts recurse by key, lists of equal length by index (`source.columns[1]`); tuples and lists
    compare equal (identity is compared after a JSON round trip).
    """
    out: list[str] = []

    def fmt(v: Any) -> str:
        # Messages carry these lines: a location's secrets (an older cache may have recorded one)
        # are redacted here too (`shards.secrets`).
        return "(absent)" if v is _ABSENT else repr(redact(v) if isinstance(v, str) else v)

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{path}.{k}" if path else str(k))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{i}]")
        elif a is _ABSENT or b is _ABSENT or a != b or (type(a) is bool) != (type(b) is bool):
            out.append(f"{path or '(root)'}: {fmt(a)} != {fmt(b)}")

    walk(_json_normalise(old), _json_normalise(new), "")
    return out


def read_identity(store: "Store") -> dict | None:
    """The cache's identity.json, or None if there is none yet."""
    where = store.display(schema.IDENTITY_FILE)
    try:
        data = store.read_capped(schema.IDENTITY_FILE, "SHARDS_MAX_RECORD_BYTES")
    except FileNotFoundError:
        return None
    except limits.LimitError as e:
        raise ManifestError(str(e)) from None
    try:
        d = limits.loads(data, where, "SHARDS_MAX_RECORD_BYTES")
    except limits.LimitError as e:
        raise ManifestError(str(e)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{where} is not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ManifestError(f"{store.display(schema.IDENTITY_FILE)}: expected a JSON object")
    return d


def write_identity(store: "Store", identity: CacheIdentity) -> None:
    store.write_bytes(schema.IDENTITY_FILE, _dumps(identity.to_dict()))


# The encoder's names (a folder or a hub id, spelled as the user typed it): with every fingerprint
# equal, another spelling of the same weights (a relative path, a local snapshot of a hub id) is the
# same cache.
_ENCODER_NAMES = ("model", "revision", "vae")
_ENCODER_FINGERPRINTS = ("vae_fingerprint", "text_encoder_fingerprint", "text_encoder_2_fingerprint",
                         "tokenizer_fingerprint", "tokenizer_2_fingerprint")


def _shards_of_no_samples(store: "Store") -> list[int] | None:
    """The indices of the cache's shards when each has a valid record of 0 samples (none at all:
    []), else None: a shard with samples, a shard without a record or an unreadable record may
    hold work, and nothing is replaced."""
    indices = [schema.index_of(rel, schema.RECORD_DIR) for rel in store.list(schema.RECORD_DIR)]
    if None in indices:
        return None
    for index in indices:
        try:
            if read_record(store, index).samples != 0:
                return None
        except (FileNotFoundError, ManifestError):
            return None
    recorded = {schema.shard_name(i) for i in indices}
    if any(rel not in recorded for rel in store.list(schema.SHARD_DIR)):
        return None  # a shard without a record: it may hold samples
    return indices


def ensure_identity(store: "Store", identity: CacheIdentity) -> tuple[CacheIdentity, bool]:
    """Write identity.json if the cache has none; refuse (listing every difference) if it differs,
    except in what names the same encoder weights (the stored names are kept), and unless no
    sample was built yet (an identity alone, left by a run stopped before its first shard, or
    shards of no samples, left by one that skipped every item): then the new identity replaces the
    old, and those empty shards and their records go, so that the new settings build them.
    Returns the identity in effect and whether an old one was replaced. One writer only (rank 0)."""
    old = read_identity(store)
    if old is None:
        write_identity(store, identity)
        return identity, False
    new = identity.to_dict()
    diff = identity_diff(old, new)
    old_enc, new_enc = old.get("encoder") or {}, new.get("encoder") or {}
    if all(old_enc.get(k) and old_enc.get(k) == new_enc.get(k) for k in _ENCODER_FINGERPRINTS):
        named = [d for d in diff if d.startswith(tuple(f"encoder.{k}:" for k in _ENCODER_NAMES))]
        if named:
            diff = [d for d in diff if d not in named]
            identity = CacheIdentity.from_dict({**new, "encoder": {**new_enc, **{k: old_enc.get(k)
                                                                                   for k in _ENCODER_NAMES}}})
    empty = _shards_of_no_samples(store) if diff else None
    if empty is not None:
        log.warning(
            "%s: no sample was built with its earlier settings (%d shard(s) of 0 samples): its identity is replaced by "
            "this run's, which differs in: %s", store.url, len(empty), "; ".join(diff))
        store.delete(schema.MANIFEST_FILE)  # the record of a run that built nothing
        for index in empty:
            store.delete(schema.record_name(index))  # records first: a shard without one is "not done"
            store.delete(schema.shard_name(index))
        write_identity(store, identity)
        return identity, True
    if diff:
        raise ManifestError(
            f"{store.url} was built with different settings or encoders; refusing to mix them "
            f"(use another cache folder, or delete this one to rebuild it):\n  " + "\n  ".join(diff)
        )
    return identity, False
