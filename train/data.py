"""Training data: the epoch plan, the verified shard stream, and batching inside loader workers.

This module owns everything between the cache's shard records and a collated `train.step.Batch`
on the CPU: which shards each rank and loader worker reads in an epoch, in what order the
samples come out, how many batches every rank takes, the per-sample randomness (caption pick,
caption dropout), decoding (safetensors and PNG only, through `shards.schema`; never pickle) and
exact mid-epoch resume.

The whole batch sequence of a rank is a pure function of
(shard records, seed, epoch, world_size, rank, num_workers, batch_size, shuffle_buffer,
max_samples, caption_dropout, soft_threshold) (`stream_identity` lists them for checkpoints).
Nothing depends on timing, process start order or global RNG state, which is what makes resume
exact and ranks agree on their step count without talking to each other.

How an epoch is laid out
------------------------
* Streams. Each rank runs `max(1, num_workers)` *roles* (one per DataLoader worker); every
  (rank, role) pair is one shard stream. Shards are shuffled with a generator seeded from
  (seed, epoch) and then dealt to the streams greedily by sample count: largest shard first, to
  the stream holding the fewest samples so far (ties: lowest stream). A stream reads its shards
  in the shuffled order. Shards with no samples are never opened.
* Samples. A stream passes its samples through a seeded shuffle buffer (seed from
  (seed, epoch, rank, role)) and groups them into batches of one latent shape.
* Ranks. DataLoader takes batches from its workers round-robin, so rank batch `p` comes from role
  `p % W`. Every rank takes the same number of batches, `steps_per_epoch`: the largest S such that
  each role of each rank has enough full batches for its share of positions `< S`. The rest of
  an epoch's samples is dropped, and `EpochStats` reports how many: with equal shards, up to about
  one shard per stream when the shard count is not a multiple of world_size * W (3000 shards of
  1000 over 64 streams: 1.9%), else under one batch per stream. The shuffle differs every epoch,
  so different samples are dropped each time. Whole shards per stream keep reads sequential and
  each shard read once; many more shards than streams keeps the loss small.
* Resume. After `start_batch` batches of this epoch a new DataLoader starts again at worker 0,
  so physical worker `w` plays role `(start_batch + w) % W` and starts at that role's batch
  `(start_batch + w) // W`. The resumed stream yields exactly the remaining batches, in order.
  Skipped batches are not decoded, and a shard none of whose samples is still needed is not
  opened at all. The plan is computed on sample *identities* (record keys), not contents.

Policies
--------
* Uneven shards: greedy balancing by sample count, then truncation to the common step count
  (above). Samples are disjoint across ranks and workers within an epoch.
* Partial batches: a stream's leftover partial batch of each shape at the end of the epoch is
  dropped (counted in `EpochStats.samples_dropped`); never padded, never repeated.
* Buckets: batches never mix latent shapes. When shard records carry per-sample latent shapes
  (`ShardRecord.latent_shapes`, one [h, w] per key, written by `ShardWriter(...,
  record_latent_shapes=True)` for bucketed caches), samples are grouped by shape in the plan
  itself, so steps and resume stay exact. A record without them is taken to hold a single shape,
  and a sample that breaks this is an error naming its shard. A bucket's leftover samples in a
  stream (fewer than a batch) are dropped for the epoch like any partial batch and counted in
  `EpochStats.samples_dropped`; the shuffle differs every epoch, so different ones are dropped.
* Views: a cache made with precompute's --flip / --crops stores several views of an image, under
  keys `<sample key>-v<n>` (`shards.views`). The plan takes exactly one view per image per epoch,
  chosen from the keys alone (`view_choice`): views rotate, epoch e taking view (o + e) mod n with
  a seeded per-image offset o, so over n epochs every view is used once and half of each epoch's
  images are flipped ones. The other views are not decoded (their bytes are still read: views
  multiply an epoch's I/O, not its decode work). Counts, steps and max_samples are in images.
* Soft conditions: for a cache stored with precompute's --condition-soft, each conditioning image
  is binarised at a threshold drawn per (seed, epoch, key) in `soft_threshold` (`train.augment`).
* max_samples: the first `max_samples` samples (images) in manifest order (shard index, then tar
  order), the same subset every epoch, as the reference's `max_train_samples`.
* Errors: a shard that is short, has a sha256 mismatch, a missing or unknown member, or a
  malformed sample raises `shards.reader.ShardError` naming the shard. Every shard a worker opens
  is read to its end (so its count and sha256 are checked) before that worker's last batch is
  handed out.
"""

from __future__ import annotations

import hashlib
import heapq
from bisect import bisect_right
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards import schema
from shards.manifest import Manifest, ShardRecord
from shards.reader import ShardError, iter_shard_members, load_empty_prompt
from shards.store import Store
from shards.views import group_views, has_views
from train.augment import binarize, range_problems, soft_threshold_range_for
from train.augment import soft_threshold as _soft_threshold

if TYPE_CHECKING:
    from train.step import Batch

# A shuffle buffer holds raw sample bytes: about 0.6 MB per sample at 1024 px (REFERENCE.md §2),
# so 256 samples cost about 150 MB per loader worker.
DEFAULT_SHUFFLE_BUFFER = 256

# Distinct streams of randomness drawn from the same (seed, epoch): the tag keeps them independent.
_SHARD_SHUFFLE_TAG = 0
_SAMPLE_BUFFER_TAG = 1
_PER_SAMPLE_TAG = 2


# --------------------------------------------------------------------------------------------
# The plan (pure functions of the records)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSlice:
    """The part of one shard an epoch uses: `count` samples, at record positions `positions`
    (ascending; None means the first `count`, the case of every cache without views)."""

    record: ShardRecord
    count: int
    positions: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        return self.record.name

    def used(self) -> Sequence[int]:
        """Record positions of the used samples, in tar order."""
        return range(self.count) if self.positions is None else self.positions

    @property
    def keys(self) -> list[str]:
        return [self.record.keys[p] for p in self.used()]

    def groups(self) -> list[Hashable]:
        """Batching group of each used sample: its latent (h, w), or None for a one-shape cache."""
        shapes = _latent_shapes(self.record)
        return [None] * self.count if shapes is None else [shapes[p] for p in self.used()]


def _latent_shapes(record: ShardRecord) -> list[tuple[int, int]] | None:
    """Per-sample latent (h, w) from a record that lists them (issue 5's bucketed caches), else None."""
    shapes = record.latent_shapes
    if shapes is None:
        return None
    if len(shapes) != len(record.keys):
        raise ShardError(
            f"{record.name}: record lists {len(shapes)} latent shapes for {len(record.keys)} keys"
        )
    return [(int(s[0]), int(s[1])) for s in shapes]


@dataclass(frozen=True)
class EpochStats:
    """What one epoch's plan does with the cache; the same on every rank."""

    steps: int  # batches per rank in this epoch (steps_per_epoch)
    batch_size: int
    world_size: int
    num_workers: int
    shards: int  # shards with at least one used sample
    samples: int  # samples in the plan (after max_samples)

    @property
    def samples_used(self) -> int:
        return self.steps * self.batch_size * self.world_size

    @property
    def samples_dropped(self) -> int:
        return self.samples - self.samples_used

    def describe(self) -> str:
        return (
            f"{self.steps} batches of {self.batch_size} per rank x {self.world_size} rank(s) from "
            f"{self.samples} samples in {self.shards} shards ({max(1, self.num_workers)} stream(s) per rank): "
            f"{self.samples_used} used, {self.samples_dropped} dropped this epoch"
        )


def _as_records(records: Manifest | Sequence[ShardRecord]) -> list[ShardRecord]:
    if isinstance(records, Manifest):
        return list(records.shards)
    return list(records)


def _check_args(**kw: Any) -> None:
    """Every problem with the plan arguments, in one message."""
    problems = []

    def need_int(name: str, lo: int) -> bool:
        v = kw[name]
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            problems.append(f"{name} must be an integer >= {lo}, got {v!r}")
            return False
        return True

    for name, lo in (("seed", 0), ("epoch", 0), ("world_size", 1), ("num_workers", 0)):
        if name in kw:
            need_int(name, lo)
    if "batch_size" in kw:
        need_int("batch_size", 1)
    if "rank" in kw and need_int("rank", 0) and isinstance(kw.get("world_size"), int):
        if kw["rank"] >= kw["world_size"]:
            problems.append(f"rank must be < world_size ({kw['world_size']}), got {kw['rank']}")
    if "worker" in kw and need_int("worker", 0) and isinstance(kw.get("num_workers"), int):
        if kw["worker"] >= max(1, kw["num_workers"]):
            problems.append(f"worker must be < max(1, num_workers) = {max(1, kw['num_workers'])}, got {kw['worker']}")
    if "start_batch" in kw:
        need_int("start_batch", 0)
    if "shuffle_buffer" in kw:
        need_int("shuffle_buffer", 0)
    if kw.get("max_samples") is not None:
        need_int("max_samples", 1)
    if kw.get("soft_threshold") is not None:
        problems += range_problems(kw["soft_threshold"])
    if "caption_dropout" in kw:
        p = kw["caption_dropout"]
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            problems.append(f"caption_dropout must be a probability in [0, 1], got {p!r}")
    if problems:
        raise ValueError("invalid data settings:\n  - " + "\n  - ".join(problems))


def view_choice(*, seed: int, key: str, epoch: int, num_views: int) -> int:
    """Which of an image's `num_views` views `epoch` uses: (offset + epoch) mod num_views, the
    offset a pure function of (seed, the image's key). Every view once in any num_views epochs."""
    return (_view_offset(seed, key) + epoch) % num_views


def _view_offset(seed: int, key: str) -> int:
    # A hash, not a seeded generator: it runs once per image per plan, millions of times.
    digest = hashlib.blake2b(f"{seed}/{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


# (record name, sha256, seed) -> None (no views) or (view groups, offsets); records are immutable
# once written, and each plan would otherwise re-parse every key of the cache.
_VIEW_TABLES: dict[tuple[str, str, int], tuple[list[list[int]], list[int]] | None] = {}


def _view_table(record: ShardRecord, seed: int) -> tuple[list[list[int]], list[int]] | None:
    k = (record.name, record.sha256, seed)
    if k not in _VIEW_TABLES:
        if not has_views(record.keys):
            _VIEW_TABLES[k] = None
        else:
            try:
                groups = group_views(record.keys)
            except ValueError as e:
                raise ShardError(f"{record.name}: {e}") from None
            _VIEW_TABLES[k] = (groups, [_view_offset(seed, record.keys[g[0]]) for g in groups])
    return _VIEW_TABLES[k]


def _limit(records: list[ShardRecord], max_samples: int | None, *, seed: int = 0, epoch: int = 0) -> list[ShardSlice]:
    """Non-empty slices in manifest order, one view per image (`view_choice`), cut after the
    first `max_samples` images."""
    out, left = [], max_samples
    for rec in sorted(records, key=lambda r: r.index):
        table = _view_table(rec, seed)
        if table is None:
            n = rec.samples if left is None else min(rec.samples, left)
            if n > 0:
                out.append(ShardSlice(rec, n))
        else:
            groups, offsets = table
            chosen = [g[(o + epoch) % len(g)] for g, o in zip(groups, offsets)]
            if left is not None:
                chosen = chosen[:left]
            n = len(chosen)
            if n > 0:
                out.append(ShardSlice(rec, n, tuple(chosen)))
        if left is not None:
            left -= n
            if left == 0:
                break
    return out


def _streams(
    records: Manifest | Sequence[ShardRecord], *, seed: int, epoch: int, world_size: int, num_workers: int,
    max_samples: int | None,
) -> list[list[ShardSlice]]:
    """Shard slices of every stream; stream `rank * W + role`, W = max(1, num_workers)."""
    slices = _limit(_as_records(records), max_samples, seed=seed, epoch=epoch)
    roles = max(1, num_workers)
    n_streams = world_size * roles
    if len(slices) < n_streams:
        fit = len(slices) // world_size
        hint = (
            f"use at most {fit if fit > 1 else 0} DataLoader worker(s) per rank"
            if fit >= 1
            else f"use at most {len(slices)} rank(s)"
        )
        raise ValueError(
            f"the cache has {len(slices)} non-empty shard(s) (after max_samples) but {world_size} rank(s) x "
            f"{roles} loader worker stream(s) = {n_streams} streams, and each stream needs at least one "
            f"whole shard: {hint}, or precompute with a smaller samples-per-shard to get more shards"
        )
    rng = np.random.default_rng([seed, epoch, _SHARD_SHUFFLE_TAG])
    shuffled = [slices[i] for i in rng.permutation(len(slices))]
    # Largest first to the least-loaded stream. sorted() is stable, so equal-sized shards keep
    # their shuffled order, and the loads (hence the step count) do not depend on the shuffle.
    order = sorted(range(len(shuffled)), key=lambda i: -shuffled[i].count)
    heap = [(0, s) for s in range(n_streams)]
    owned: list[list[int]] = [[] for _ in range(n_streams)]
    for i in order:
        load, s = heapq.heappop(heap)
        owned[s].append(i)
        heapq.heappush(heap, (load + shuffled[i].count, s))
    return [[shuffled[i] for i in sorted(idx)] for idx in owned]


def _full_batches(stream: list[ShardSlice], batch_size: int) -> int:
    """Full single-shape batches a stream can make: sum over shapes of floor(count / batch)."""
    counts: dict[Hashable, int] = {}
    for sl in stream:
        if sl.record.latent_shapes is None:  # the common one-shape cache: no per-sample walk
            counts[None] = counts.get(None, 0) + sl.count
            continue
        for g in sl.groups():
            counts[g] = counts.get(g, 0) + 1
    return sum(n // batch_size for n in counts.values())


def _steps(streams: list[list[ShardSlice]], *, batch_size: int, world_size: int, num_workers: int) -> int:
    # Rank position p comes from role p % W; role r of a rank must fill the positions < S that
    # are congruent to r, i.e. ceil((S - r) / W) <= full, i.e. S <= W * full + r.
    roles = max(1, num_workers)
    return min(
        roles * _full_batches(streams[rank * roles + role], batch_size) + role
        for rank in range(world_size)
        for role in range(roles)
    )


def epoch_plan(
    records: Manifest | Sequence[ShardRecord], *, seed: int, epoch: int, world_size: int, rank: int,
    num_workers: int, worker: int, max_samples: int | None = None,
) -> list[ShardSlice]:
    """The shard slices that loader role `worker` of `rank` reads in `epoch`, in reading order.

    `worker` is the role, in `range(max(1, num_workers))`; after a resume DataLoader worker `w`
    plays role `(start_batch + w) % max(1, num_workers)`. Across all (rank, worker) pairs every
    used shard appears exactly once. Raises ValueError when there are fewer non-empty shards than
    `world_size * max(1, num_workers)`.
    """
    _check_args(seed=seed, epoch=epoch, world_size=world_size, rank=rank, num_workers=num_workers,
                worker=worker, max_samples=max_samples)
    streams = _streams(records, seed=seed, epoch=epoch, world_size=world_size, num_workers=num_workers,
                       max_samples=max_samples)
    return streams[rank * max(1, num_workers) + worker]


def epoch_stats(
    records: Manifest | Sequence[ShardRecord], *, batch_size: int, world_size: int, num_workers: int,
    seed: int, epoch: int, max_samples: int | None = None,
) -> EpochStats:
    """Step count and sample accounting of one epoch (identical on every rank).

    Raises ValueError when a stream cannot make even one full batch.
    """
    _check_args(batch_size=batch_size, world_size=world_size, num_workers=num_workers, seed=seed,
                epoch=epoch, max_samples=max_samples)
    streams = _streams(records, seed=seed, epoch=epoch, world_size=world_size, num_workers=num_workers,
                       max_samples=max_samples)
    return _stats(streams, batch_size=batch_size, world_size=world_size, num_workers=num_workers)


def _stats(streams: list[list[ShardSlice]], *, batch_size: int, world_size: int, num_workers: int) -> EpochStats:
    steps = _steps(streams, batch_size=batch_size, world_size=world_size, num_workers=num_workers)
    if steps < 1:
        smallest = min(sum(sl.count for sl in s) for s in streams)
        raise ValueError(
            f"not one full batch per rank: the smallest of the {len(streams)} shard streams "
            f"({world_size} rank(s) x {max(1, num_workers)} loader stream(s)) holds {smallest} sample(s) for a "
            f"batch of {batch_size}; use a smaller batch size, fewer loader workers or ranks, or more data"
        )
    return EpochStats(
        steps=steps, batch_size=batch_size, world_size=world_size, num_workers=num_workers,
        shards=sum(len(s) for s in streams), samples=sum(sl.count for s in streams for sl in s),
    )


def steps_per_epoch(
    records: Manifest | Sequence[ShardRecord], *, batch_size: int, world_size: int, num_workers: int,
    seed: int, epoch: int, max_samples: int | None = None,
) -> int:
    """Batches every rank takes in `epoch`. Computed from the records alone, so all ranks agree.

    Independent of (seed, epoch) unless records carry several latent shapes (buckets).
    """
    return epoch_stats(records, batch_size=batch_size, world_size=world_size, num_workers=num_workers,
                       seed=seed, epoch=epoch, max_samples=max_samples).steps


def stream_identity(
    records: Manifest | Sequence[ShardRecord], *, batch_size: int, seed: int, world_size: int, num_workers: int,
    shuffle_buffer: int, max_samples: int | None, caption_dropout: float,
    soft_threshold: tuple[float, float] | None = None,
) -> dict:
    """Everything besides (epoch, start_batch) that decides every rank's batches, as plain JSON.

    A checkpoint saves it beside its data position; on resume, `shards.manifest.identity_diff(
    saved, current)` lists what changed (world size, loader workers, cache, ...), and any
    difference means the resumed run would not continue the same sample sequence.
    """
    digest = hashlib.sha256()
    for r in sorted(_as_records(records), key=lambda r: r.index):
        digest.update(f"{r.index} {r.samples} {r.sha256}\n".encode())
    return {
        "shards_sha256": digest.hexdigest(), "batch_size": batch_size, "seed": seed, "world_size": world_size,
        "num_workers": num_workers, "shuffle_buffer": shuffle_buffer, "max_samples": max_samples,
        "caption_dropout": float(caption_dropout),
        "soft_threshold": None if soft_threshold is None else [float(v) for v in soft_threshold],
    }


def _buffer_order(n: int, size: int, rng: np.random.Generator) -> list[int]:
    """Emission order of read positions 0..n-1 through a shuffle buffer of `size` samples."""
    if size <= 1:
        return list(range(n))
    buf = list(range(min(n, size)))
    draws = rng.integers(0, size, size=max(0, n - size)).tolist()
    out = []
    for j in range(len(buf), n):
        i = draws[j - size]
        out.append(buf[i])
        buf[i] = j
    out.extend(buf[i] for i in rng.permutation(len(buf)).tolist())
    return out


def _stream_batches(
    stream: list[ShardSlice], *, batch_size: int, shuffle_buffer: int, seed: int, epoch: int, rank: int,
    role: int, quota: int,
) -> list[list[int]]:
    """The first `quota` batches of one stream, as lists of read positions (pure)."""
    groups = [g for sl in stream for g in sl.groups()]
    rng = np.random.default_rng([seed, epoch, _SAMPLE_BUFFER_TAG, rank, role])
    pending: dict[Hashable, list[int]] = {}
    batches: list[list[int]] = []
    if quota <= 0:
        return batches
    for j in _buffer_order(len(groups), shuffle_buffer, rng):
        part = pending.setdefault(groups[j], [])
        part.append(j)
        if len(part) == batch_size:
            batches.append(part)
            pending[groups[j]] = []
            if len(batches) == quota:
                return batches
    raise RuntimeError(f"internal: stream of rank {rank} role {role} made {len(batches)} batches, needs {quota}")


# --------------------------------------------------------------------------------------------
# Per-sample randomness
# --------------------------------------------------------------------------------------------


def sample_choice(*, seed: int, epoch: int, key: str, num_captions: int, caption_dropout: float) -> tuple[int, bool]:
    """(caption index, dropped) of one sample in one epoch: a pure function of (seed, epoch, key).

    Both draws are always made, in this order, so the dropout rate never shifts the caption pick.
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()  # stable across processes
    rng = np.random.default_rng([seed, epoch, _PER_SAMPLE_TAG, int.from_bytes(digest, "little")])
    dropped = bool(rng.random() < caption_dropout)
    return int(rng.integers(num_captions)), dropped


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------


class _Raw(NamedTuple):
    """One sample's undecoded members, held until its batch is complete."""

    shard: str
    key: str
    members: dict[str, bytes]
    shape: Hashable  # planned latent (h, w), or None for a one-shape cache


class CacheStream(IterableDataset):
    """Collated `train.step.Batch`es (CPU) of one rank for one epoch, from `start_batch` on.

    Build one per epoch (and per resume). Iterate it through `make_loader` (batch_size=None,
    `num_workers` workers), or directly: with num_workers > 1 outside a DataLoader it reproduces
    DataLoader's round-robin over the worker streams itself. `len()` is the number of batches
    still to come, `steps_per_epoch - start_batch`.
    """

    def __init__(
        self, store: Store, records: Manifest | Sequence[ShardRecord], *, batch_size: int, seed: int, epoch: int,
        world_size: int = 1, rank: int = 0, num_workers: int = 0, start_batch: int = 0,
        caption_dropout: float = 0.0, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, max_samples: int | None = None,
        soft_threshold: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        _check_args(batch_size=batch_size, seed=seed, epoch=epoch, world_size=world_size, rank=rank,
                    num_workers=num_workers, start_batch=start_batch, caption_dropout=caption_dropout,
                    shuffle_buffer=shuffle_buffer, max_samples=max_samples, soft_threshold=soft_threshold)
        # (low, high): binarise every conditioning image at a per-(seed, epoch, key) threshold.
        self.soft_threshold = None if soft_threshold is None else (float(soft_threshold[0]), float(soft_threshold[1]))
        self.store = store
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.world_size, self.rank, self.num_workers = world_size, rank, num_workers
        self.start_batch, self.shuffle_buffer = start_batch, shuffle_buffer
        self.caption_dropout = float(caption_dropout)
        self._streams = _streams(records, seed=seed, epoch=epoch, world_size=world_size, num_workers=num_workers,
                                 max_samples=max_samples)
        self.stats = _stats(self._streams, batch_size=batch_size, world_size=world_size, num_workers=num_workers)
        self.steps_per_epoch = self.stats.steps
        if start_batch > self.steps_per_epoch:
            raise ValueError(
                f"start_batch {start_batch} is past the end of epoch {epoch}, which has {self.steps_per_epoch} "
                f"batches per rank; the checkpoint does not belong to this cache and settings"
            )
        # Loaded up front so that a cache without its empty-prompt file fails at start.
        self._empty = load_empty_prompt(store) if self.caption_dropout > 0 else None

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[Batch]:
        roles = max(1, self.num_workers)
        info = get_worker_info()
        if info is not None:
            if info.num_workers != roles:
                raise ValueError(
                    f"CacheStream was planned for {self.num_workers} loader workers but runs in a DataLoader "
                    f"with {info.num_workers}; build the DataLoader with make_loader"
                )
            yield from self._worker(info.id)
            return
        # In-process: DataLoader's round-robin, a worker leaving the rotation once exhausted.
        live = [self._worker(w) for w in range(roles)]
        while live:
            for it in list(live):
                try:
                    yield next(it)
                except StopIteration:
                    live.remove(it)

    def _worker(self, worker: int) -> Iterator[Batch]:
        roles = max(1, self.num_workers)
        role = (self.start_batch + worker) % roles
        first = (self.start_batch + worker) // roles
        quota = max(0, -(-(self.steps_per_epoch - role) // roles))  # positions < steps that are == role
        stream = self._streams[self.rank * roles + role]
        batches = _stream_batches(stream, batch_size=self.batch_size, shuffle_buffer=self.shuffle_buffer,
                                  seed=self.seed, epoch=self.epoch, rank=self.rank, role=role, quota=quota)
        yield from self._read(stream, batches[first:])

    def _read(self, stream: list[ShardSlice], batches: list[list[int]]) -> Iterator[Batch]:
        """Read just the shards holding samples of `batches` and hand out the batches in order."""
        if not batches:
            return
        starts = [0]
        for sl in stream:
            starts.append(starts[-1] + sl.count)
        batch_of = {j: b for b, positions in enumerate(batches) for j in positions}
        missing = [len(positions) for positions in batches]
        needed = sorted({bisect_right(starts, j) - 1 for j in batch_of})
        pending: dict[int, _Raw] = {}
        done, last = 0, len(batches) - 1
        for si in needed:
            sl = stream[si]
            shapes = sl.groups()
            local = {p: i for i, p in enumerate(sl.used())}  # record position -> index in the slice
            # The reader holds every key, in order, to the record: position pos is record.keys[pos].
            for pos, (key, members) in enumerate(iter_shard_members(self.store, sl.record)):
                i = local.get(pos)
                j = None if i is None else starts[si] + i
                if j is not None and j in batch_of:
                    pending[j] = _Raw(sl.name, key, members, shapes[i])
                    missing[batch_of[j]] -= 1
                # The last batch waits for the end of the shard, so the reader's count and sha256
                # checks run before this worker's stream can end.
                while done < last and missing[done] == 0:
                    yield self._collate([pending.pop(j) for j in batches[done]])
                    done += 1
            while done <= last and missing[done] == 0:
                yield self._collate([pending.pop(j) for j in batches[done]])
                done += 1
        if done <= last:
            raise RuntimeError(f"internal: {last + 1 - done} planned batches never completed")

    def _collate(self, items: list[_Raw]) -> Batch:
        from train.step import Batch  # the step module is heavier; import where it is needed

        means, stds, embeds, pooled, time_ids, conds, keys = [], [], [], [], [], [], []
        thresholds: list[float] = []
        for shard, key, members, shape in items:
            try:
                sample = schema.decode_sample(key, members)
                cond = sample.cond_image()
            except schema.SampleError as e:
                raise ShardError(f"{shard}: {e}") from e
            self._check_sample(shard, shape, sample, cond, first=(means[0], conds[0], keys[0]) if means else None)
            k = sample.prompt_embeds.shape[0]
            c, dropped = sample_choice(seed=self.seed, epoch=self.epoch, key=key, num_captions=k,
                                       caption_dropout=self.caption_dropout)
            if dropped:
                e, p = self._empty_like(shard, sample)
            else:
                e, p = sample.prompt_embeds[c], sample.pooled_prompt_embeds[c]
            means.append(sample.latent_mean)
            stds.append(sample.latent_std)
            embeds.append(e)
            pooled.append(p)
            time_ids.append(sample.meta.add_time_ids)
            if self.soft_threshold is not None:
                thresholds.append(_soft_threshold(seed=self.seed, epoch=self.epoch, key=key,
                                                  low=self.soft_threshold[0], high=self.soft_threshold[1]))
            conds.append(cond)
            keys.append(key)
        has_std = [s is not None for s in stds]
        if any(has_std) and not all(has_std):
            names = sorted({item.shard for item in items})
            raise ShardError(f"{', '.join(names)}: some samples store latent_std and others do not (keys {keys})")
        cond = torch.from_numpy(np.stack(conds)).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        if thresholds:  # soft maps: one threshold per sample (train.augment)
            cond = binarize(cond, torch.tensor(thresholds, dtype=torch.float32).view(-1, 1, 1, 1))
        return Batch(
            latent_mean=torch.stack(means),
            latent_std=torch.stack(stds) if all(has_std) else None,
            prompt_embeds=torch.stack(embeds),
            pooled_prompt_embeds=torch.stack(pooled),
            add_time_ids=torch.tensor(time_ids, dtype=torch.float32),
            cond=cond.contiguous(),
            keys=keys,
        )

    def _check_sample(self, shard: str, planned: Hashable, sample: schema.Sample, cond: np.ndarray, first) -> None:
        h, w = sample.latent_mean.shape[1:]
        if planned is not None and planned != (h, w):
            raise ShardError(
                f"{shard}: sample {sample.key} has latent {h}x{w}, its record says {planned[0]}x{planned[1]}"
            )
        if first is not None:
            mean0, cond0, key0 = first
            if mean0.shape != sample.latent_mean.shape or cond0.shape != cond.shape:
                raise ShardError(
                    f"{shard}: sample {sample.key} has latent {tuple(sample.latent_mean.shape)} and conditioning "
                    f"image {cond.shape[:2]}, but {key0} in the same batch has {tuple(mean0.shape)} and "
                    f"{cond0.shape[:2]}; a cache with several shapes needs per-sample latent_shapes in its records"
                )

    def _empty_like(self, shard: str, sample: schema.Sample) -> tuple[torch.Tensor, torch.Tensor]:
        empty_embeds, empty_pooled = self._empty
        if (empty_embeds.shape[1:] != sample.prompt_embeds.shape[1:]
                or empty_pooled.shape[1:] != sample.pooled_prompt_embeds.shape[1:]):
            raise ShardError(
                f"{shard}: sample {sample.key} has prompt_embeds {tuple(sample.prompt_embeds.shape[1:])} and pooled "
                f"{tuple(sample.pooled_prompt_embeds.shape[1:])}, but {schema.EMPTY_PROMPT_FILE} has "
                f"{tuple(empty_embeds.shape[1:])} and {tuple(empty_pooled.shape[1:])}"
            )
        return empty_embeds[0].to(sample.prompt_embeds.dtype), empty_pooled[0].to(sample.pooled_prompt_embeds.dtype)


def make_loader(
    store: Store, records: Manifest | Sequence[ShardRecord], *, batch_size: int, seed: int, epoch: int,
    world_size: int = 1, rank: int = 0, num_workers: int = 0, start_batch: int = 0, caption_dropout: float = 0.0,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, max_samples: int | None = None, pin_memory: bool | None = None,
    prefetch_factor: int = 2, soft_threshold: tuple[float, float] | None | str = "auto",
) -> tuple[DataLoader, int]:
    """(DataLoader over this rank's batches of `epoch` from `start_batch` on, steps_per_epoch).

    `soft_threshold` "auto": when `records` is a Manifest of a cache with soft conditions
    (precompute --condition-soft), the default range of `train.augment`; else None. A range given
    for a Manifest without soft conditions is a ValueError.

    Build a new one every epoch and after every resume. Never pass it to `accelerator.prepare`
    (that dispatches from rank 0 and drops data, REFERENCE.md §3): ranks already hold disjoint
    streams of equal length; move each batch to the device with `batch.to(device)`.
    """
    if isinstance(records, Manifest):
        soft_threshold = soft_threshold_range_for(records.identity, None if soft_threshold == "auto" else soft_threshold)
    elif soft_threshold == "auto":
        soft_threshold = None
    dataset = CacheStream(
        store, records, batch_size=batch_size, seed=seed, epoch=epoch, world_size=world_size, rank=rank,
        num_workers=num_workers, start_batch=start_batch, caption_dropout=caption_dropout,
        shuffle_buffer=shuffle_buffer, max_samples=max_samples, soft_threshold=soft_threshold,
    )
    loader = DataLoader(
        dataset,
        batch_size=None,  # batches are made inside the workers, one shape each
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=False,  # the epoch and start position are baked into the dataset
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        # DataLoader hands out worker batches round-robin, in order (its default; in_order=True
        # on torch >= 2.6): the rank's batch sequence, and so exact resume, rests on that.
    )
    return loader, dataset.steps_per_epoch
