"""The epoch plan: which samples every rank and loader worker takes, in which order, and why.

Pure functions of the shard records and the settings; nothing here reads a shard, depends on
timing, process start order or global RNG state. That is what makes resume exact and lets ranks
agree on their step count without talking to each other. `train.data` reads and batches what
this module plans.

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
  an epoch's samples is dropped, and `EpochStats` reports how many and why: leftover partial
  batches (per stream and shape), and full batches cut so every rank takes the same step count.
  With equal shards, the cut is up to about one shard per stream when the shard count is not a
  multiple of world_size * W (3000 shards of 1000 over 64 streams: 1.9%), else under one batch per
  stream. The shuffle differs every epoch, so different samples are dropped each time. Whole
  shards per stream keep reads sequential and each shard read once; many more shards than
  streams keeps the loss small.
* Resume. After `start_batch` batches of an epoch a new DataLoader starts again at worker 0, so
  physical worker `w` plays role `(start_batch + w) % W` and starts at that role's batch
  `(start_batch + w) // W`. The plan is computed on sample *identities* (record keys), not contents.

Policies
--------
* Uneven shards: greedy balancing by sample count, then truncation to the common step count
  (above). Samples are disjoint across ranks and workers within an epoch.
* Partial batches: a stream's leftover partial batch of each shape at the end of the epoch is
  dropped (counted in `EpochStats.samples_in_partial_batches`); never padded, never repeated.
* Buckets: batches never mix latent shapes. When shard records carry per-sample latent shapes
  (`ShardRecord.latent_shapes`, written for bucketed caches), samples are grouped by shape in the
  plan itself, so steps and resume stay exact. A bucket's leftover samples in a stream (fewer
  than a batch) are dropped for the epoch like any partial batch.
* Views: a cache made with precompute's --flip / --crops stores several views of an image, under
  keys `<sample key>-v<n>` (`shards.views`). The plan takes exactly one view per image per epoch,
  chosen from the keys alone (`view_choice`): views rotate, epoch e taking view (o + e) mod n with
  a seeded per-image offset o, so over n epochs every view is used once. Counts, steps and
  max_samples are in images.
* max_samples: the first `max_samples` images in manifest order (shard index, then tar order), the
  same subset every epoch, as the reference's `max_train_samples`.

Randomness
----------
Every random draw comes from a generator seeded with (seed, epoch, `Draw` tag, ...): the tag keeps
the draws independent of each other for the same (seed, epoch). Per-sample draws (caption choice
and dropout here, the soft threshold in `train.augment`) use `key_rng`, keyed by the sample's
record key, so they do not depend on where the sample lands in the stream.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from shards.manifest import Manifest, ShardRecord
from shards.reader import ShardError
from shards.views import group_views, has_views


class Draw(IntEnum):
    """Tags of the independent random draws of an epoch. The values are part of every seeded
    sequence: changing one changes every run's samples (and breaks resuming older checkpoints)."""

    SHARD_SHUFFLE = 0  # shard order, then dealt to streams
    SAMPLE_BUFFER = 1  # a stream's shuffle buffer, per (rank, role)
    CAPTION = 2  # per sample: caption pick and caption dropout (`sample_choice`)
    SOFT_THRESHOLD = 3  # per sample: binarisation threshold of soft maps (`train.augment`)


def key_rng(*, seed: int, epoch: int, draw: Draw, key: str) -> np.random.Generator:
    """A generator that is a pure function of (seed, epoch, draw, sample key), the same in every
    process (blake2b, not Python's salted hash()). One per sample per draw."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng([seed, epoch, int(draw), int.from_bytes(digest, "little")])


def sample_choice(*, seed: int, epoch: int, key: str, num_captions: int, caption_dropout: float) -> tuple[int, bool]:
    """(caption index, dropped) of one sample in one epoch: a pure function of (seed, epoch, key).

    Both draws are always made, in this order, so the dropout rate never shifts the caption pick.
    """
    rng = key_rng(seed=seed, epoch=epoch, draw=Draw.CAPTION, key=key)
    dropped = bool(rng.random() < caption_dropout)
    return int(rng.integers(num_captions)), dropped


# --------------------------------------------------------------------------------------------
# Slices of shards


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
    """Per-sample latent (h, w) from a record that lists them (bucketed caches), else None."""
    shapes = record.latent_shapes
    if shapes is None:
        return None
    if len(shapes) != len(record.keys):
        raise ShardError(
            f"{record.name}: record lists {len(shapes)} latent shapes for {len(record.keys)} keys"
        )
    return [(int(s[0]), int(s[1])) for s in shapes]


def as_records(records: Manifest | Sequence[ShardRecord]) -> list[ShardRecord]:
    if isinstance(records, Manifest):
        return list(records.shards)
    return list(records)


# --------------------------------------------------------------------------------------------
# What an epoch does with the cache


@dataclass(frozen=True)
class EpochStats:
    """What one epoch's plan does with the cache; the same on every rank.

    Every planned sample is used or dropped, and every dropped one is counted under one reason:
    `samples == samples_used + samples_in_partial_batches + samples_cut_for_equal_steps`.
    """

    epoch: int
    steps: int  # batches per rank in this epoch (steps_per_epoch)
    batch_size: int
    world_size: int
    num_workers: int
    shards: int  # shards with at least one used sample
    samples: int  # samples (images) in the plan, after max_samples
    samples_in_partial_batches: int  # a stream's leftover of each shape, fewer than a batch

    @property
    def samples_used(self) -> int:
        return self.steps * self.batch_size * self.world_size

    @property
    def samples_dropped(self) -> int:
        return self.samples - self.samples_used

    @property
    def samples_cut_for_equal_steps(self) -> int:
        """Samples in full batches left untaken so that every rank runs the same step count."""
        return self.samples_dropped - self.samples_in_partial_batches

    def describe(self) -> str:
        """One log line: what the epoch uses and what it drops, and why."""
        dropped = self.samples_dropped
        line = (
            f"epoch {self.epoch}: {self.steps} batches of {self.batch_size} per rank x {self.world_size} rank(s) "
            f"from {self.samples} samples in {self.shards} shards ({max(1, self.num_workers)} stream(s) per rank): "
            f"{self.samples_used} used, {dropped} dropped this epoch"
        )
        if dropped:
            line += (
                f" ({100 * dropped / self.samples:.1f}%: {self.samples_in_partial_batches} in partial batches, "
                f"{self.samples_cut_for_equal_steps} cut so every rank takes the same steps)"
            )
        return line

    def to_dict(self) -> dict[str, int]:
        """Plain JSON: the fields and the derived counts."""
        return {**asdict(self), "samples_used": self.samples_used, "samples_dropped": self.samples_dropped,
                "samples_cut_for_equal_steps": self.samples_cut_for_equal_steps}


def data_summary(stats: Sequence[EpochStats]) -> dict[str, int | float]:
    """Totals over the epochs a run plans, flat, for train_config.json and the model card.

    Counts are what the plans drop; a run that --max-steps stops inside its last epoch also never
    reaches that epoch's remaining batches, which are not counted as dropped.
    """
    if not stats:
        raise ValueError("data_summary needs the stats of at least one epoch")
    planned = sum(s.samples for s in stats)
    dropped = sum(s.samples_dropped for s in stats)
    return {
        "epochs_planned": len(stats),
        "samples_per_epoch": max(s.samples for s in stats),
        "samples_dropped": dropped,
        "samples_dropped_in_partial_batches": sum(s.samples_in_partial_batches for s in stats),
        "samples_dropped_for_equal_steps": sum(s.samples_cut_for_equal_steps for s in stats),
        "samples_dropped_fraction": round(dropped / planned, 6),
    }


# --------------------------------------------------------------------------------------------
# Arguments


def check_settings(*, extra_problems: Sequence[str] = (), **kw: Any) -> None:
    """Every problem with the plan/stream arguments given, plus `extra_problems`, in one message."""
    problems = []

    def need_int(name: str, lo: int) -> bool:
        v = kw[name]
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            problems.append(f"{name} must be an integer >= {lo}, got {v!r}")
            return False
        return True

    for name, lo in (("seed", 0), ("epoch", 0), ("world_size", 1), ("num_workers", 0), ("batch_size", 1),
                     ("start_batch", 0), ("shuffle_buffer", 0)):
        if name in kw:
            need_int(name, lo)
    if "rank" in kw and need_int("rank", 0) and isinstance(kw.get("world_size"), int):
        if kw["rank"] >= kw["world_size"]:
            problems.append(f"rank must be < world_size ({kw['world_size']}), got {kw['rank']}")
    if "worker" in kw and need_int("worker", 0) and isinstance(kw.get("num_workers"), int):
        if kw["worker"] >= max(1, kw["num_workers"]):
            problems.append(f"worker must be < max(1, num_workers) = {max(1, kw['num_workers'])}, got {kw['worker']}")
    if kw.get("max_samples") is not None:
        need_int("max_samples", 1)
    if "caption_dropout" in kw:
        p = kw["caption_dropout"]
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            problems.append(f"caption_dropout must be a probability in [0, 1], got {p!r}")
    problems += extra_problems
    if problems:
        raise ValueError("invalid data settings:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------------------------
# Views and max_samples


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


def _limit(records: list[ShardRecord], max_samples: int | None, *, seed: int, epoch: int) -> list[ShardSlice]:
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


# --------------------------------------------------------------------------------------------
# Streams and steps


def plan_streams(
    records: Manifest | Sequence[ShardRecord], *, seed: int, epoch: int, world_size: int, num_workers: int,
    max_samples: int | None,
) -> list[list[ShardSlice]]:
    """Shard slices of every stream of the epoch; stream `rank * W + role`, W = max(1, num_workers)."""
    slices = _limit(as_records(records), max_samples, seed=seed, epoch=epoch)
    roles = max(1, num_workers)
    n_streams = world_size * roles
    if not slices:
        raise ValueError("the cache has no samples (every shard is empty, or --max-samples is 0): "
                         "see the skip reasons with `python -m shards stats CACHE`")
    if len(slices) < n_streams:
        fit = len(slices) // world_size
        hint = (
            f"use at most {fit} DataLoader worker(s) per rank"
            if fit >= 1
            else f"use at most {len(slices)} rank(s)"
        )
        raise ValueError(
            f"the cache has {len(slices)} non-empty shard(s) (after max_samples) but {world_size} rank(s) x "
            f"{roles} loader worker stream(s) = {n_streams} streams, and each stream needs at least one "
            f"whole shard: {hint}, or precompute with a smaller samples-per-shard to get more shards"
        )
    rng = np.random.default_rng([seed, epoch, int(Draw.SHARD_SHUFFLE)])
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


def _group_counts(stream: list[ShardSlice]) -> dict[Hashable, int]:
    """Samples of a stream per batching group (latent shape; None for a one-shape cache)."""
    counts: dict[Hashable, int] = {}
    for sl in stream:
        if sl.record.latent_shapes is None:  # the common one-shape cache: no per-sample walk
            counts[None] = counts.get(None, 0) + sl.count
            continue
        for g in sl.groups():
            counts[g] = counts.get(g, 0) + 1
    return counts


def _steps(full_batches: list[int], *, world_size: int, num_workers: int) -> int:
    # Rank position p comes from role p % W; role r of a rank must fill the positions < S that
    # are congruent to r, i.e. ceil((S - r) / W) <= full, i.e. S <= W * full + r.
    roles = max(1, num_workers)
    return min(
        roles * full_batches[rank * roles + role] + role
        for rank in range(world_size)
        for role in range(roles)
    )


def stats_of(
    streams: list[list[ShardSlice]], *, epoch: int, batch_size: int, world_size: int, num_workers: int,
) -> EpochStats:
    """EpochStats of planned streams; ValueError when a stream cannot make one full batch."""
    counts = [_group_counts(s) for s in streams]
    full = [sum(n // batch_size for n in c.values()) for c in counts]
    steps = _steps(full, world_size=world_size, num_workers=num_workers)
    if steps < 1:
        smallest = min(sum(sl.count for sl in s) for s in streams)
        raise ValueError(
            f"not one full batch per rank: the smallest of the {len(streams)} shard streams "
            f"({world_size} rank(s) x {max(1, num_workers)} loader stream(s)) holds {smallest} sample(s) for a "
            f"batch of {batch_size}; use a smaller batch size, fewer loader workers or ranks, or more data"
        )
    return EpochStats(
        epoch=epoch, steps=steps, batch_size=batch_size, world_size=world_size, num_workers=num_workers,
        shards=sum(len(s) for s in streams), samples=sum(sl.count for s in streams for sl in s),
        samples_in_partial_batches=sum(n % batch_size for c in counts for n in c.values()),
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
    check_settings(seed=seed, epoch=epoch, world_size=world_size, rank=rank, num_workers=num_workers,
                   worker=worker, max_samples=max_samples)
    streams = plan_streams(records, seed=seed, epoch=epoch, world_size=world_size, num_workers=num_workers,
                           max_samples=max_samples)
    return streams[rank * max(1, num_workers) + worker]


def epoch_stats(
    records: Manifest | Sequence[ShardRecord], *, batch_size: int, world_size: int, num_workers: int,
    seed: int, epoch: int, max_samples: int | None = None,
) -> EpochStats:
    """Step count and sample accounting of one epoch (identical on every rank).

    Raises ValueError when a stream cannot make even one full batch.
    """
    check_settings(batch_size=batch_size, world_size=world_size, num_workers=num_workers, seed=seed,
                   epoch=epoch, max_samples=max_samples)
    streams = plan_streams(records, seed=seed, epoch=epoch, world_size=world_size, num_workers=num_workers,
                           max_samples=max_samples)
    return stats_of(streams, epoch=epoch, batch_size=batch_size, world_size=world_size, num_workers=num_workers)


def steps_per_epoch(
    records: Manifest | Sequence[ShardRecord], *, batch_size: int, world_size: int, num_workers: int,
    seed: int, epoch: int, max_samples: int | None = None,
) -> int:
    """Batches every rank takes in `epoch`. Computed from the records alone, so all ranks agree.

    Independent of (seed, epoch) unless records carry several latent shapes (buckets).
    """
    return epoch_stats(records, batch_size=batch_size, world_size=world_size, num_workers=num_workers,
                       seed=seed, epoch=epoch, max_samples=max_samples).steps


# --------------------------------------------------------------------------------------------
# Within a stream


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


def stream_batches(
    stream: list[ShardSlice], *, batch_size: int, shuffle_buffer: int, seed: int, epoch: int, rank: int,
    role: int, quota: int,
) -> list[list[int]]:
    """The first `quota` batches of one stream, as lists of read positions (index into the
    concatenated used samples of the stream's slices, in reading order)."""
    if quota <= 0:
        return []
    groups = [g for sl in stream for g in sl.groups()]
    rng = np.random.default_rng([seed, epoch, int(Draw.SAMPLE_BUFFER), rank, role])
    pending: dict[Hashable, list[int]] = {}
    batches: list[list[int]] = []
    for j in _buffer_order(len(groups), shuffle_buffer, rng):
        part = pending.setdefault(groups[j], [])
        part.append(j)
        if len(part) == batch_size:
            batches.append(part)
            pending[groups[j]] = []
            if len(batches) == quota:
                return batches
    raise RuntimeError(
        f"internal: epoch {epoch} stream of rank {rank} loader role {role} (shards "
        f"{', '.join(sl.name for sl in stream)}) makes {len(batches)} batches of {batch_size}, the plan needs {quota}"
    )
