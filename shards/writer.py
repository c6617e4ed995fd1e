"""The shard writer: reproducible tars, published whole or not at all.

A shard is built in a hidden temporary file in the cache's staging folder,
`store.staging_dir(tmp_dir=tmp_dir)` (for a local cache without tmp_dir a folder of its root, so
publishing is a link), then on `commit()`:

    close the tar -> fsync -> re-read and decode every sample, check the count and keys
    -> sha256 + size -> store.put_file (atomic create-if-absent) -> store.write_bytes(record)

The record is the shard's "done" marker and is written only after the shard is in place, so a
process killed at any moment leaves either nothing under the shard's name, or a complete shard
(with or without its record). `completed_record` treats a shard without a valid record as not
done; a re-run rebuilds it, and since shards are byte-reproducible its publish finds the same
bytes already there and succeeds (other bytes are a PublishConflictError, never an overwrite).

An exception inside `with ShardWriter(...)` aborts: the temporary file is removed and nothing is
published. (Ordinary tar sinks commit a short-but-valid tar when an exception unwinds through
them; see docs/background.md section 3.) A writer only ever removes its own temp file; what a killed
writer left is removed by `store.cleanup_incomplete(tmp_dir=...)` (a precompute at start,
`python -m shards gc`), the one clean-up of temp files and unfinished uploads.

Tars are byte-reproducible: USTAR headers with mtime 0, uid/gid 0, empty user/group names,
mode 0444, and each sample's members in `schema.MEMBERS` order. We drive `tarfile` directly
rather than webdataset's TarWriter because the latter orders members alphabetically and stamps
its own user/group names; here every header field is pinned.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import schema
from .errors import ShardError
from .manifest import ManifestError, ShardRecord, read_record
from .reader import TarSampleStream
from .store import Store, new_temp_path

log = logging.getLogger(__name__)

MEMBER_MODE = 0o444


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class ShardWriter:
    """Write one shard; use as a context manager and finish with `commit()`.

    `tmp_dir`: a local folder to stage in instead of the default (the shard is built in this
    cache's subfolder of it, `store.staging_dir(tmp_dir=tmp_dir)`); pass the same value to
    `store.cleanup_incomplete(tmp_dir=...)`.
    """

    def __init__(
        self,
        store: Store,
        index: int,
        *,
        storage_dtype: torch.dtype | str = torch.bfloat16,
        tmp_dir: str | Path | None = None,
        record_latent_shapes: bool = False,
    ):
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"shard index must be an integer >= 0, got {index!r}")
        self.store = store
        self.index = index
        self.name = schema.shard_name(index)
        self.storage_dtype = schema.dtype_of(storage_dtype)
        self.tmp_path = new_temp_path(store.staging_dir(tmp_dir=tmp_dir), Path(self.name).name)
        self._keys: list[str] = []
        self._key_set: set[str] = set()
        # Per-sample latent [h, w] for the record (bucketed caches; see ShardRecord.latent_shapes).
        self._shapes: list[list[int]] | None = [] if record_latent_shapes else None
        # open -> (broken) -> committed | aborted | failed
        self._state = "open"
        try:
            self._file = open(self.tmp_path, "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT, encoding="utf-8")
        except BaseException:
            self._state = "failed"
            self.tmp_path.unlink(missing_ok=True)
            raise

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abort()
            return False
        if self._state in ("open", "broken"):
            self.abort()
            raise RuntimeError(f"{self.name}: the `with` block ended without commit(); nothing was published")
        return False

    def __del__(self):
        # A writer dropped without commit/abort must not leave its temp file behind.
        try:
            if self._state in ("open", "broken"):
                self.abort()
        except Exception:
            pass

    # -- writing -----------------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    @property
    def num_samples(self) -> int:
        return len(self._keys)

    def write(self, sample: schema.Sample) -> None:
        """Append one sample. A SampleError (bad shapes) leaves the writer usable."""
        if self._state != "open":
            raise RuntimeError(f"{self.name}: write() on a writer that is {self._state}")
        key = sample.key
        if not key or "." in key or "/" in key:
            raise ValueError(f"{self.name}: invalid key {key!r} (keys are non-empty, without '.' or '/')")
        if key in self._key_set:
            raise ValueError(f"{self.name}: duplicate key {key}")
        # Encode everything before touching the tar, so a bad sample writes nothing.
        members = schema.encode_sample(sample, self.storage_dtype)
        try:
            for suffix in schema.MEMBERS:
                data = members[suffix]
                self._tar.addfile(_tarinfo(f"{key}.{suffix}", len(data)), io.BytesIO(data))
        except BaseException:
            self._state = "broken"  # a partial member may be in the tar: only abort() is left
            raise
        self._keys.append(key)
        self._key_set.add(key)
        if self._shapes is not None:
            self._shapes.append([int(sample.latent_mean.shape[1]), int(sample.latent_mean.shape[2])])

    # -- finishing -----------------------------------------------------------------------------
    def commit(
        self,
        skipped: dict[str, int] | None = None,
        skipped_items: list[dict] | None = None,
        notes: dict[str, int] | None = None,
        sources: list[str] | None = None,
        source_keys: list[str] | None = None,
    ) -> ShardRecord:
        """Validate, publish the shard, then write its record. Returns the record.

        `skipped` counts source items left out by reason; `notes` counts items kept but altered;
        `sources` / `source_keys` describe every item of the source unit (`ShardRecord`).
        """
        if self._state != "open":
            raise RuntimeError(f"{self.name}: commit() on a writer that is {self._state}")
        try:
            skipped = dict(sorted((skipped or {}).items()))
            skipped_items = json.loads(json.dumps(list(skipped_items or [])))
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            sha256, size = self._validate()
            record = ShardRecord(
                index=self.index,
                name=self.name,
                samples=len(self._keys),
                bytes=size,
                sha256=sha256,
                keys=list(self._keys),
                skipped=skipped,
                skipped_items=skipped_items,
                latent_shapes=list(self._shapes) if self._shapes is not None else None,
                notes=dict(sorted((notes or {}).items())),
                sources=list(sources) if sources is not None else None,
                source_keys=list(source_keys) if source_keys is not None else None,
            )
            problems = record.problems()
            if problems:
                raise ValueError(f"{self.name}: bad record: " + "; ".join(problems))
            self.store.put_file(self.name, self.tmp_path)
        except BaseException:
            self._discard()
            self._state = "failed"
            raise
        # The shard is visible now. If writing the record fails, the shard is an orphan without a
        # "done" marker, which a re-run rebuilds and re-publishes (same bytes): nothing to undo.
        self._state = "failed"
        try:
            self.store.write_bytes(schema.record_name(self.index), record.to_json())
        except Exception as e:
            raise ShardError(
                f"{self.name}: published to {self.store.display(self.name)}, but writing its record "
                f"{schema.record_name(self.index)} failed ({type(e).__name__}: {e}); the shard counts as not done "
                "and a re-run rebuilds it"
            ) from e
        self._state = "committed"
        return record

    def _validate(self) -> tuple[str, int]:
        """Re-read the finished temp file exactly as a reader would; return (sha256, size)."""
        with open(self.tmp_path, "rb") as f:
            stream = TarSampleStream(f, self.name, expected_samples=len(self._keys))
            for key, members in stream:
                try:
                    sample = schema.decode_sample(key, members)
                except schema.SampleError as e:
                    raise ShardError(f"{self.name}: re-read failed: {e}") from None
                tensors = [sample.latent_mean, sample.latent_std, sample.prompt_embeds, sample.pooled_prompt_embeds]
                if any(t is not None and t.dtype != self.storage_dtype for t in tensors):
                    raise ShardError(f"{self.name}: re-read failed: sample {key} is not {self.storage_dtype}")
                i = len(stream.keys) - 1
                if self._shapes is not None and list(sample.latent_mean.shape[1:]) != self._shapes[i]:
                    raise ShardError(f"{self.name}: re-read failed: sample {key} has another latent shape")
        if stream.keys != self._keys:
            raise ShardError(
                f"{self.name}: re-read failed: wrote {len(self._keys)} samples, read back {len(stream.keys)}"
            )
        size = os.path.getsize(self.tmp_path)
        if size != stream.bytes:
            raise ShardError(f"{self.name}: re-read failed: file has {size} bytes, the tar stream {stream.bytes}")
        return stream.sha256, size

    def _discard(self) -> None:
        for close in (self._tar.close, self._file.close):
            try:
                close()
            except Exception:  # already closed, or the disk is the problem: removal still matters
                pass
        self.tmp_path.unlink(missing_ok=True)

    def abort(self) -> None:
        """Drop the shard: remove the temp file, publish nothing. No-op once committed."""
        if self._state in ("open", "broken"):
            # Closing the tar would append end-of-archive blocks to a file we are deleting.
            self._tar.closed = True
            self._discard()
            self._state = "aborted"


@dataclass(frozen=True)
class ShardState:
    """What a re-run finds of shard `index`: its record when the shard is done; else, when a
    published shard contradicts its valid record (another size) or stands beside a damaged record,
    what is wrong with it."""

    record: ShardRecord | None
    damage: str | None = None


def shard_state(store: Store, index: int) -> ShardState:
    """Done means a valid record and the shard present with the record's byte size. Anything else
    (no record, a damaged record, a missing or different-sized shard) means "not done": the caller
    rebuilds the shard. A different size beside a valid record, or any shard beside a damaged record
    (records come after their shards, so that shard was complete, but nothing says what it holds),
    is damage after publishing, said in `damage`: the rebuild must first remove it (else its
    bytes, if they differ from the rebuilt ones, would refuse the publish)."""
    try:
        record = read_record(store, index)
    except FileNotFoundError:
        return ShardState(None)
    except ManifestError as e:
        if store.exists(schema.shard_name(index)):
            return ShardState(None, f"its record is damaged ({e})")
        log.warning("%s: ignoring a damaged record, the shard will be built: %s", schema.record_name(index), e)
        return ShardState(None)
    try:
        size = store.size(record.name)
    except FileNotFoundError:
        return ShardState(None)
    if size != record.bytes:
        return ShardState(None, f"it has {size} bytes, its record says {record.bytes} (damaged after it was written)")
    return ShardState(record)


def completed_record(store: Store, index: int) -> ShardRecord | None:
    """The record of shard `index` if that shard is done (`shard_state`), else None."""
    return shard_state(store, index).record


def is_complete(store: Store, index: int) -> bool:
    return completed_record(store, index) is not None
