"""The verifying streaming reader: shard bytes -> samples, or a ShardError naming the shard.

Tar shards fail silently with ordinary readers: a shard truncated at a member boundary, a flipped
bit in a tar header (read as end of archive) or a writer that unwound mid-`with` all read as valid,
shorter shards. This reader therefore:

- parses the tar framing itself (512-byte headers validated with the stdlib's `TarInfo.frombuf`,
  which checks the header checksum) and turns every irregularity into an error: a bad header, a
  stream that ends before the end-of-archive marker, data after that marker, a non-file member;
- hashes every raw byte as it streams (sha256), including the end-of-archive padding, and compares
  the sample count, the keys in order, the byte count and the sha256 with the shard's record;
- accepts only the members of `schema.MEMBERS` (never `.pyd`/`.pth`/...: nothing is unpickled),
  each once per key, with a key's members contiguous and every key appearing once;
- yields each sample as soon as its members are read, never holding a whole shard.

The final checks run after the last sample is yielded, so a consumer that iterates to the end
gets either every sample of a shard that matches its record, or a ShardError.
"""

from __future__ import annotations

import hashlib
import tarfile
from contextlib import closing
from typing import TYPE_CHECKING, BinaryIO, Iterator

from . import limits, schema
from .errors import ShardError
from .manifest import ShardRecord
from .store import Store

if TYPE_CHECKING:
    import torch

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_READ_CHUNK = 1 << 20  # raw read size: few syscalls locally, few round trips from object storage
# A 1024 px sample is about 0.5 MB; a member claiming more than this is a damaged or hostile header,
# refused before anything tries to buffer it.
MAX_MEMBER_BYTES = 1 << 30


# Each member kind's size cap (shards.limits), checked from the tar header before its bytes are read.
_MEMBER_CAPS = {schema.TENSOR_MEMBER: "SHARDS_MAX_TENSOR_MEMBER_BYTES", schema.COND_MEMBER: "SHARDS_MAX_PNG_MEMBER_BYTES",
                schema.META_MEMBER: "SHARDS_MAX_JSON_MEMBER_BYTES"}


class _TarFormatError(Exception):
    """Raised by the tar framing parser; wrapped into a ShardError with the shard's context."""


class _HashingReader:
    """Exact-size reads from a raw stream, hashing every byte pulled from it."""

    def __init__(self, raw: BinaryIO, *, hash: bool = True, max_bytes: int | None = None):
        self._raw = raw
        self._sha = hashlib.sha256() if hash else None
        self._buf = b""
        self._pos = 0
        self.offset = 0  # bytes handed out so far = position in the tar
        self.max_bytes = max_bytes

    def _pull(self, n: int) -> bytes:
        chunk = self._raw.read(n)
        if chunk and self._sha is not None:
            self._sha.update(chunk)
        return chunk

    def read(self, n: int) -> bytes:
        """`n` bytes, fewer only at the end of the stream."""
        avail = len(self._buf) - self._pos
        if n <= avail:
            out = self._buf[self._pos : self._pos + n]
            self._pos += n
        else:
            parts = [self._buf[self._pos :]]
            have = avail
            self._buf, self._pos = b"", 0
            while have < n:
                chunk = self._pull(max(_READ_CHUNK, n - have))
                if not chunk:
                    break
                need = n - have
                if len(chunk) > need:
                    parts.append(chunk[:need])
                    self._buf, self._pos = chunk, need
                    have = n
                else:
                    parts.append(chunk)
                    have += len(chunk)
            out = b"".join(parts)
        self.offset += len(out)
        if self.max_bytes is not None and self.offset > self.max_bytes:
            # Stopped here, not at the end: a shard grown past its record (appended to, or a
            # huge file in its place) is never read or hashed whole.
            raise _TarFormatError(f"longer than the {self.max_bytes} bytes its record lists (replaced or appended "
                                  "to?)")
        return out

    def hexdigest(self) -> str | None:
        return self._sha.hexdigest() if self._sha is not None else None


def _iter_tar(reader: _HashingReader) -> Iterator[tuple[str, bytes]]:
    """(member name, data) for each member, strictly; consumes the stream to its last byte."""
    while True:
        at = reader.offset
        header = reader.read(BLOCK)
        if len(header) < BLOCK:
            where = "where a tar header should start" if not header else f"inside the tar header at byte {at}"
            raise _TarFormatError(f"truncated: the stream ends at byte {reader.offset}, {where}")
        if header == _ZERO_BLOCK:
            break
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "strict")
        except (tarfile.HeaderError, UnicodeDecodeError) as e:
            raise _TarFormatError(f"corrupt tar header at byte {at} ({e})") from None
        if info.size > MAX_MEMBER_BYTES:
            raise _TarFormatError(
                f"member {info.name!r} at byte {at} claims {info.size} bytes (limit {MAX_MEMBER_BYTES}): corrupt or hostile"
            )
        variable = _MEMBER_CAPS.get(info.name.partition(".")[2])
        if variable is not None:
            try:
                limits.check_size(info.size, variable, f"member {info.name!r} at byte {at}")
            except limits.LimitError as e:
                raise _TarFormatError(str(e)) from None
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise _TarFormatError(
                f"member {info.name!r} at byte {at} has tar type {info.type!r}; shards hold only plain "
                "files (USTAR, as shards.writer writes them)"
            )
        data = reader.read(info.size)
        padding = reader.read(-info.size % BLOCK)
        if len(data) < info.size or len(padding) < -info.size % BLOCK:
            raise _TarFormatError(
                f"truncated: the stream ends at byte {reader.offset}, inside member {info.name!r} "
                f"({info.size} bytes from byte {at + BLOCK})"
            )
        yield info.name, data
    # End of archive: a second zero block, then only zero padding up to the end of the stream.
    # Anything else means the "end" we saw is really a damaged header with data behind it.
    end = reader.offset - BLOCK
    at = reader.offset
    chunk = reader.read(BLOCK)
    if len(chunk) < BLOCK:
        raise _TarFormatError(f"truncated: the stream ends at byte {reader.offset}, inside the end-of-archive marker")
    while chunk:
        if chunk.count(0) != len(chunk):
            bad = at + next(i for i, b in enumerate(chunk) if b)
            raise _TarFormatError(f"data at byte {bad} after the end-of-archive marker at byte {end} (a damaged header?)")
        at = reader.offset
        chunk = reader.read(_READ_CHUNK)


def _group(members: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group contiguous members by key; reject unknown, repeated and scattered members."""
    key: str | None = None
    group: dict[str, bytes] = {}
    seen: set[str] = set()

    def complete(k: str, g: dict[str, bytes]) -> tuple[str, dict[str, bytes]]:
        missing = [m for m in schema.MEMBERS if m not in g]
        if missing:
            raise _TarFormatError(f"sample {k} lacks members {['.' + m for m in missing]}")
        return k, g

    for name, data in members:
        try:
            k, suffix = schema.split_member_name(name)
        except schema.SampleError as e:
            raise _TarFormatError(str(e)) from None
        if suffix not in schema.MEMBERS:
            raise _TarFormatError(
                f"unknown member {name!r}: only {['.' + m for m in schema.MEMBERS]} are allowed "
                "(refusing to read anything else; nothing in a cache is ever unpickled)"
            )
        if k != key:
            if key is not None:
                yield complete(key, group)
            if k in seen:
                raise _TarFormatError(f"key {k} appears twice (duplicate key, or its members are not contiguous)")
            seen.add(k)
            key, group = k, {}
        if suffix in group:
            raise _TarFormatError(f"member {name!r} appears twice")
        group[suffix] = data
    if key is not None:
        yield complete(key, group)


class TarSampleStream:
    """(key, members) of one shard stream with structural checks; after the iteration ends,
    `keys`, `bytes` and `sha256` (None if hashing was off) describe what was read.

    `name` only labels errors. Use `iter_shard_members` to also compare with a record.
    """

    def __init__(self, fileobj: BinaryIO, name: str, *, hash: bool = True, expected_samples: int | None = None,
                 max_bytes: int | None = None):
        self.name = name
        self._expected = expected_samples
        self._reader = _HashingReader(fileobj, hash=hash, max_bytes=max_bytes)
        self.keys: list[str] = []
        self.done = False

    @property
    def bytes(self) -> int:
        return self._reader.offset

    @property
    def sha256(self) -> str | None:
        return self._reader.hexdigest()

    def __iter__(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        try:
            for key, members in _group(_iter_tar(self._reader)):
                self.keys.append(key)
                yield key, members
        except _TarFormatError as e:
            context = f"after delivering {len(self.keys)}"
            context += f" of the {self._expected} expected samples" if self._expected is not None else " samples"
            raise ShardError(f"{self.name}: {e} ({context})") from None
        self.done = True


def iter_shard_members(store: Store, record: ShardRecord, *, check: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {member suffix: bytes}) from a shard and hold it to its record.

    Counts, keys (in order) and byte size are always compared with the record; `check=False`
    skips only the sha256 (the one check that costs CPU). A mismatch raises ShardError.
    """
    name = record.name
    try:
        f = store.open_read(name)
    except FileNotFoundError:
        raise ShardError(f"{name}: missing from {store.url} (the manifest lists it)") from None
    with closing(f):
        stream = TarSampleStream(f, name, hash=check, expected_samples=record.samples, max_bytes=record.bytes)
        n = 0
        for key, members in stream:
            if n >= record.samples:
                raise ShardError(f"{name}: holds more samples than the {record.samples} its record lists (extra key {key})")
            if key != record.keys[n]:
                raise ShardError(f"{name}: sample #{n} has key {key}, its record says {record.keys[n]}")
            n += 1
            yield key, members
    if n != record.samples:
        raise ShardError(f"{name}: expected {record.samples} samples, read {n} (truncated?)")
    if stream.bytes != record.bytes:
        raise ShardError(f"{name}: expected {record.bytes} bytes, read {stream.bytes} (truncated or replaced?)")
    if check and stream.sha256 != record.sha256:
        raise ShardError(
            f"{name}: sha256 mismatch: read {stream.sha256}, record says {record.sha256} (corrupted or replaced)"
        )


def iter_shard(store: Store, record: ShardRecord, *, check: bool = True) -> Iterator[schema.Sample]:
    """Decoded samples of one shard, streamed, with every check of `iter_shard_members`."""
    for key, members in iter_shard_members(store, record, check=check):
        try:
            yield schema.decode_sample(key, members)
        except schema.SampleError as e:
            raise ShardError(f"{record.name}: {e}") from None


# --------------------------------------------------------------------------------------------
# The empty-prompt embedding, stored once at the cache root (train swaps it in for caption
# dropout, so dropout is decided per step instead of frozen into the cache).


def write_empty_prompt(
    store: Store, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor, dtype: torch.dtype | str
) -> None:
    """Store the embedding of "" as (1, L, D) and (1, P) tensors in the storage dtype."""
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1 or pooled_prompt_embeds.ndim != 2 or pooled_prompt_embeds.shape[0] != 1:
        raise ValueError(
            f"empty prompt: expected prompt_embeds (1, L, D) and pooled_prompt_embeds (1, P), got "
            f"{tuple(prompt_embeds.shape)} and {tuple(pooled_prompt_embeds.shape)}"
        )
    from safetensors.torch import save as st_save

    dt = schema.dtype_of(dtype)
    tensors = {
        schema.PROMPT_EMBEDS: prompt_embeds.detach().to("cpu", dt).contiguous(),
        schema.POOLED_PROMPT_EMBEDS: pooled_prompt_embeds.detach().to("cpu", dt).contiguous(),
    }
    store.write_bytes(schema.EMPTY_PROMPT_FILE, st_save(tensors, metadata={"format": schema.FORMAT}))


def load_empty_prompt(store: Store) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (1, L, D), pooled_prompt_embeds (1, P)) in the storage dtype."""
    import torch
    from safetensors.torch import load as st_load

    name = schema.EMPTY_PROMPT_FILE
    try:
        data = store.read_capped(name, "SHARDS_MAX_TENSOR_MEMBER_BYTES")
    except FileNotFoundError:
        raise ShardError(f"{name}: missing from {store.url}: run precompute first, or it did not finish") from None
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ShardError(f"{name}: cannot parse ({e})") from None
    missing = [t for t in (schema.PROMPT_EMBEDS, schema.POOLED_PROMPT_EMBEDS) if t not in tensors]
    if missing:
        raise ShardError(f"{name}: lacks tensors {missing}")
    pe, pooled = tensors[schema.PROMPT_EMBEDS], tensors[schema.POOLED_PROMPT_EMBEDS]
    if pe.ndim != 3 or pe.shape[0] != 1 or pooled.ndim != 2 or pooled.shape[0] != 1:
        raise ShardError(f"{name}: expected (1, L, D) and (1, P), got {tuple(pe.shape)} and {tuple(pooled.shape)}")
    for tensor_name, t in ((schema.PROMPT_EMBEDS, pe), (schema.POOLED_PROMPT_EMBEDS, pooled)):
        # Caption dropout feeds it to the step: a NaN here would be blamed on the batch's samples.
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ShardError(f"{store.display(name)}: {tensor_name} is not all finite floating point values "
                             f"({t.dtype}); the file is damaged: re-run precompute into a new cache")
    return pe, pooled
