"""The epoch plan: which samples every rank and loader worker takes, in which order, and why.

Pure functions of the shard records and a `DataSpec`; nothing here reads a shard, depends on
timing, process start order or global RNG state. That is what makes resume exact and lets ranks
agree on their step count without talking to each other. `train.data` reads and batches what
this module plans.

How an epoch is laid out
------------------------
* Read order. The epoch's shards are shuffled with a generator seeded from (seed, epoch); their
  used samples, in tar order, make one global read sequence of N samples.
* Batches. That sequence passes through one seeded shuffle buffer of `shuffle_buffer` samples
  (a pure simulation), and global batches are formed in emission order, one latent shape each:
  a batch is complete when its shape has `batch_size` samples. At the end each shape may hold a
  last, partial batch of fewer than `batch_size` samples. Of these, the one with the fewest
  samples is dropped (counted in `EpochStats.samples_in_partial_batches`); every other one is
  completed with seeded repeats of its own shape (`samples_repeated`, see "Completed batches")
  and appended after the complete batches, those with more of their own samples first. A
  one-shape cache has one partial batch at most: it is dropped, nothing is repeated.
* Equal steps. With T batches, every rank takes `steps = T // world_size`; the last
  `T mod world_size` batches are cut (`samples_cut_for_equal_steps`; completed batches come
  last, so they are cut first, the ones with the fewest own samples before the others). So an
  epoch drops less than one global batch (`batch_size * world_size` samples), whatever the
  shard sizes, however few shards there are (a single 14-sample shard trains on 2 ranks x 2
  workers) and however many latent shapes it has: one partial batch (< batch_size) plus at
  most world_size - 1 cut batches.
* Streams. Each rank runs `max(1, num_workers)` *roles* (one per DataLoader worker); DataLoader
  takes batches from its workers round-robin, so rank position `p` comes from role `p % W`.
  Stream (rank, role) takes a contiguous run of the global batches, as many as its positions
  `< steps` that are `== role mod W`, runs in (rank, role) order. A contiguous run of batches is
  a contiguous stretch of the read sequence (plus the few samples the buffer held back from just
  before it), so a stream reads about N / streams samples of neighbouring shards: reads stay
  sequential, and a shard is split between streams only at run boundaries. A stream reads every
  shard it touches to its end, so the reader's count and sha256 checks cover it.
* Resume. After `start_batch` batches of an epoch a new DataLoader starts again at worker 0, so
  physical worker `w` plays role `(start_batch + w) % W` and starts at that role's batch
  `(start_batch + w) // W`. The plan is computed on sample *identities* (record keys), not contents.

Policies
--------
* Buckets: batches never mix latent shapes. When shard records carry per-sample latent shapes
  (`ShardRecord.latent_shapes`, written for bucketed caches), samples are grouped by shape in the
  plan itself, so steps and resume stay exact.
* Views: a cache made with precompute's --flip / --crops stores several views of an image, under
  keys `<sample key>-v<n>` (`shards.views`). The plan takes exactly one view per image per epoch,
  chosen from the keys alone (`view_choice`): views rotate, epoch e taking view (o + e) mod n with
  a seeded per-image offset o, so over n epochs every view is used once. Counts, steps and
  max_samples are in images.
* Held-out images (`validation_split`): a fraction of the cache's *images* (every view of each)
  never enters an epoch plan; `train.evaluate` measures the validation loss on them. Which
  images is a pure function of the record keys and the fraction (`held_out_images`): not of the
  seed, world size or any other setting, so every run on one cache holds out the same images and
  their validation losses compare. Unset (or 0), the plans are exactly those of a run without it.
* max_samples: the first `max_samples` images in manifest order (shard index, then tar order), the
  same subset every epoch, as the reference's `max_train_samples` (counted after the held-out
  images are taken out).
* Completed batches. Without them a cache with K latent shapes would drop up to K partial
  batches an epoch (a bucketed cache at batch 16 with 9 buckets: up to 135 samples). A shape's
  partial batch is filled up with samples of the same shape from the shards its own samples are
  in (so no stream reads a shard more for it), chosen by a generator seeded from (seed, epoch,
  `Draw.REPEAT`, its place in the completion order) and not already in the batch; a shape with
  too few such samples cycles through what it has (a bucket smaller than a batch repeats its
  own images). A repeated sample is the same sample twice in the epoch, with the same
  per-sample draws. The shuffle differs every epoch, so different samples are dropped and
  repeated each time. Nothing is carried into the next epoch: each epoch's plan stands alone.

Randomness
----------
Every random draw comes from a generator seeded with (seed, epoch, `Draw` tag, ...): the tag keeps
the draws independent of each other for the same (seed, epoch). Per-sample draws (caption choice
and dropout here, the soft threshold in `train.augment`) use `key_rng`, keyed by the sample's
record key, so they do not depend on where the sample lands in the stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from enum import IntEnum

import numpy as np

from shards.errors import ShardError
from shards.manifest import Manifest, ShardRecord
from shards.views import group_views, has_views, split_view_key

# A shuffle buffer holds raw sample bytes: about 0.6 MB per sample at 1024 px in bf16, so 256
# samples cost about 150 MB per loader worker.
DEFAULT_SHUFFLE_BUFFER = 256


@dataclass(frozen=True)
class DataSpec:
    """Every setting that decides which samples each rank takes, in which order, with which
    per-sample randomness: with (the shard records, epoch, rank, start_batch) the whole batch
    sequence. Validated once, here; `train.data.stream_identity` saves it in checkpoints.

    `soft_threshold`: the binarisation range of a cache with soft conditioning maps (resolved from
    the manifest by `train.augment.soft_threshold_range_for`), None otherwise.
    `validation_split`: the fraction of images held out of every epoch (`held_out_images`); None
    (0 is normalised to None) holds out nothing, and is left out of `to_dict`, so the stream
    identity of a run without it is the one older checkpoints saved.
    """

    batch_size: int
    seed: int
    world_size: int = 1
    num_workers: int = 0
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    max_samples: int | None = None
    caption_dropout: float = 0.0
    soft_threshold: tuple[float, float] | None = None
    validation_split: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.validation_split is not None:
            f = self.validation_split
            if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0.0 <= f < 1.0:
                problems.append(f"validation_split must be a fraction in [0, 1), got {f!r}")
        for name, low in (("batch_size", 1), ("seed", 0), ("world_size", 1), ("num_workers", 0),
                          ("shuffle_buffer", 0)):
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                problems.append(f"{name} must be an integer >= {low}, got {v!r}")
        if self.max_samples is not None and (not _is_int(self.max_samples) or self.max_samples < 1):
            problems.append(f"max_samples must be None or an integer >= 1, got {self.max_samples!r}")
        p = self.caption_dropout
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            problems.append(f"caption_dropout must be a probability in [0, 1], got {p!r}")
        if self.soft_threshold is not None:
            problems += range_problems(self.soft_threshold)
        if problems:
            raise ValueError("invalid data settings:\n  - " + "\n  - ".join(problems))
        if self.soft_threshold is not None:  # plain floats, as the JSON of a checkpoint gives them back
            object.__setattr__(self, "soft_threshold", tuple(float(v) for v in self.soft_threshold))
        object.__setattr__(self, "caption_dropout", float(self.caption_dropout))
        split = self.validation_split
        object.__setattr__(self, "validation_split", float(split) if split else None)

    @property
    def roles(self) -> int:
        """Loader streams per rank: one per DataLoader worker, one when reading in-process."""
        return max(1, self.num_workers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["soft_threshold"] = None if self.soft_threshold is None else list(self.soft_threshold)
        if d["validation_split"] is None:  # absent, as in checkpoints saved before the option existed
            del d["validation_split"]
        return d


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def range_problems(value: object) -> list[str]:
    """Problems with a soft-threshold range (low, high); empty when 0 <= low <= high <= 1. The one
    check of a range, whether it comes from the command line, a config file or a checkpoint."""
    try:
        low, high = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return [f"the soft threshold range must be two numbers (low, high), got {value!r}"]
    if not 0.0 <= low <= high <= 1.0:
        return [f"the soft threshold range must satisfy 0 <= low <= high <= 1, got ({low:g}, {high:g})"]
    return []


class Draw(IntEnum):
    """Tags of the independent random draws of an epoch. The values are part of every seeded
    sequence: changing one changes every run's samples (and breaks resuming older checkpoints)."""

    SHARD_SHUFFLE = 0  # shard order, then dealt to streams
    SAMPLE_BUFFER = 1  # a stream's shuffle buffer, per (rank, role)
    CAPTION = 2  # per sample: caption pick and caption dropout (`sample_choice`)
    SOFT_THRESHOLD = 3  # per sample: binarisation threshold of soft maps (`train.augment`)
    REPEAT = 4  # the samples that complete a shape's last partial batch


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

    Every planned sample is used or dropped, every dropped one is counted under one reason, and
    the repeats that complete partial batches are counted apart: `samples + samples_repeated ==
    samples_used + samples_in_partial_batches + samples_cut_for_equal_steps`. `samples_used`
    counts batch slots (steps x batch x ranks), so it includes the repeats; the samples dropped
    are fewer than one global batch (`batch_size * world_size`).
    """

    epoch: int
    steps: int  # batches per rank in this epoch (steps_per_epoch)
    batch_size: int
    world_size: int
    num_workers: int
    shards: int  # shards with at least one used sample
    samples: int  # samples (images) in the plan, after max_samples
    samples_in_partial_batches: int  # the one partial batch dropped (of the shape with the fewest left over)
    samples_repeated: int = 0  # slots of used batches filled with repeats to complete a shape's last batch

    @property
    def samples_used(self) -> int:
        return self.steps * self.batch_size * self.world_size

    @property
    def samples_dropped(self) -> int:
        return self.samples + self.samples_repeated - self.samples_used

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
            f"{self.samples_used} used"
        )
        if self.samples_repeated:
            line += f" ({self.samples_repeated} of them repeats completing a latent shape's last batch)"
        line += f", {dropped} dropped this epoch"
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
        "samples_repeated": sum(s.samples_repeated for s in stats),
    }


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


# --------------------------------------------------------------------------------------------
# Held-out images


def holdout_rank(image_key: str) -> bytes:
    """An image's place in the held-out order: a hash of its key alone (no seed, no setting), so
    the choice is the same for every run on the cache, and a larger fraction holds out a superset."""
    return hashlib.blake2b(f"validation-split/{image_key}".encode("utf-8"), digest_size=16).digest()


def count_held_out(images: int, fraction: float | None) -> int:
    """How many of `images` images a fraction holds out: round(fraction x images), at least one
    for any fraction > 0."""
    if not fraction or images <= 0:
        return 0
    return min(images, max(1, round(fraction * images)))


# (record (name, sha256) list, fraction) -> held-out image keys; records are immutable once written.
_HELD_OUT: dict[tuple[tuple[tuple[str, str], ...], float], frozenset[str]] = {}


def held_out_images(records: Manifest | Sequence[ShardRecord], fraction: float | None) -> frozenset[str]:
    """The image keys (view 0's key, `shards.views.split_view_key`) a `fraction` of the cache's
    images holds out: the `count_held_out` images of smallest `holdout_rank`. A pure function of the
    record keys and the fraction; empty for None or 0."""
    recs = as_records(records)
    if not fraction:
        return frozenset()
    k = (tuple((r.name, r.sha256) for r in sorted(recs, key=lambda r: r.index)), float(fraction))
    if k not in _HELD_OUT:
        images = sorted({split_view_key(key)[0] for r in recs for key in r.keys}, key=holdout_rank)
        _HELD_OUT[k] = frozenset(images[:count_held_out(len(images), fraction)])
    return _HELD_OUT[k]


def image_positions(record: ShardRecord, images: frozenset[str] | set[str] | None = None) -> list[tuple[int, str]]:
    """(record position, key) of view 0 of every image of `record` (of those in `images` when given),
    in tar order: the samples a validation loss evaluates."""
    out = []
    for pos, key in enumerate(record.keys):
        base, view = split_view_key(key)
        if view == 0 and (images is None or base in images):
            out.append((pos, key))
    return out


def _limit(records: list[ShardRecord], max_samples: int | None, *, seed: int, epoch: int,
           exclude: frozenset[str] = frozenset()) -> list[ShardSlice]:
    """Non-empty slices in manifest order, one view per image (`view_choice`), without the images
    in `exclude` (held out), cut after the first `max_samples` images."""
    out, left = [], max_samples
    for rec in sorted(records, key=lambda r: r.index):
        table = _view_table(rec, seed)
        if table is None and exclude and not exclude.isdisjoint(rec.keys):
            kept = [p for p, key in enumerate(rec.keys) if key not in exclude]
            if left is not None:
                kept = kept[:left]
            n = len(kept)
            if n > 0:
                out.append(ShardSlice(rec, n, tuple(kept)))
        elif table is None:
            n = rec.samples if left is None else min(rec.samples, left)
            if n > 0:
                out.append(ShardSlice(rec, n))
        else:
            groups, offsets = table
            chosen = [g[(o + epoch) % len(g)] for g, o in zip(groups, offsets)
                      if not exclude or split_view_key(rec.keys[g[0]])[0] not in exclude]
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
# The plan of one epoch


@dataclass(frozen=True)
class StreamPlan:
    """What one (rank, role) stream reads and hands out in an epoch.

    `slices`: the shards it reads, in reading order (each read to its end). `batches`: its
    batches in order, each a tuple of indices into the concatenated used samples of `slices`.
    """

    slices: tuple[ShardSlice, ...]
    batches: tuple[tuple[int, ...], ...]


class EpochPlan:
    """The plan of epoch `epoch` for `records` under `spec` (see the module docstring).

    `stats` (counts only) is cheap; `stream(rank, role)` simulates the shuffle buffer over the
    read sequence up to the end of that stream's run (O(N) at most, once per plan object).
    Raises ValueError when the epoch cannot give every rank one full batch.
    """

    def __init__(self, records: Manifest | Sequence[ShardRecord], spec: DataSpec, epoch: int):
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.spec, self.epoch = spec, int(epoch)
        recs = as_records(records)
        held_out = held_out_images(recs, spec.validation_split)
        slices = _limit(recs, spec.max_samples, seed=spec.seed, epoch=self.epoch, exclude=held_out)
        if not slices and held_out:
            raise ValueError(f"--validation-split {spec.validation_split:g} holds out all {len(held_out)} image(s) of "
                             "the cache: nothing is left to train on; lower it")
        if not slices:
            raise ValueError("the cache has no samples (every shard is empty, or --max-samples is 0): "
                             "see the skip reasons with `python -m shards stats CACHE`")
        rng = np.random.default_rng([spec.seed, self.epoch, int(Draw.SHARD_SHUFFLE)])
        self.read_order: list[ShardSlice] = [slices[i] for i in rng.permutation(len(slices))]
        counts: dict[Hashable, int] = {}
        for sl in slices:
            if sl.record.latent_shapes is None:  # the common one-shape cache: no per-sample walk
                counts[None] = counts.get(None, 0) + sl.count
            else:
                for g in sl.groups():
                    counts[g] = counts.get(g, 0) + 1
        b, world, roles = spec.batch_size, spec.world_size, spec.roles
        # Partial batches, most own samples first: the last is dropped, the others completed.
        partial = sorted((g for g, n in counts.items() if n % b), key=lambda g: (-(counts[g] % b), str(g)))
        self._completed: list[Hashable] = partial[:-1]
        complete = sum(n // b for n in counts.values())
        total = complete + len(self._completed)
        steps = total // world
        samples = sum(counts.values())
        if steps < 1:
            shapes = "" if list(counts) == [None] else " (per latent shape: " + ", ".join(
                f"{h}x{w} {n}" for (h, w), n in sorted(counts.items())) + ")"
            kept, fixes = "", ["a smaller batch size (--batch-size; make train: BATCH=)", "fewer ranks"]
            if held_out:
                kept = f" (after --validation-split {spec.validation_split:g} held out {len(held_out)} image(s))"
                fixes.append("a smaller --validation-split (or --validation-cache)")
            if spec.max_samples is not None:
                kept += f" (--max-samples {spec.max_samples})"
                fixes.append("a larger --max-samples")
            raise ValueError(
                f"not one full batch per rank in epoch {self.epoch}: {samples} sample(s){kept}{shapes} make {total} "
                f"batch(es) of {b} for {world} rank(s); use {', '.join(fixes)}, or more data"
            )
        # The last `total - steps * world` batches are cut: completed ones first (they are last).
        cut = total - steps * world
        taken = self._completed[:max(0, len(self._completed) - cut)]
        self.stats = EpochStats(
            epoch=self.epoch, steps=steps, batch_size=b, world_size=world, num_workers=spec.num_workers,
            shards=len(slices), samples=samples,
            samples_in_partial_batches=counts[partial[-1]] % b if partial else 0,
            samples_repeated=sum(b - counts[g] % b for g in taken),
        )
        # Stream s = rank * W + role takes the global batches [starts[s], starts[s + 1]).
        quotas = [max(0, -(-(steps - s % roles) // roles)) for s in range(world * roles)]
        self._starts = [0]
        for q in quotas:
            self._starts.append(self._starts[-1] + q)
        self._batches: list[list[int]] | None = None

    @property
    def steps(self) -> int:
        return self.stats.steps

    def stream(self, rank: int, role: int) -> StreamPlan:
        spec = self.spec
        if not (_is_int(rank) and 0 <= rank < spec.world_size and _is_int(role) and 0 <= role < spec.roles):
            raise ValueError(f"no stream (rank {rank!r}, role {role!r}) with world_size {spec.world_size} and "
                             f"{spec.roles} loader stream(s) per rank")
        s = rank * spec.roles + role
        lo, hi = self._starts[s], self._starts[s + 1]
        batches = self._global_batches(hi)[lo:hi]
        offsets = [0]
        for sl in self.read_order:
            offsets.append(offsets[-1] + sl.count)
        owner = np.searchsorted(np.asarray(offsets), [j for batch in batches for j in batch], side="right") - 1
        needed = sorted(set(owner.tolist()))
        local_start, n = {}, 0
        for si in needed:
            local_start[si] = n
            n += self.read_order[si].count
        flat = iter(owner.tolist())
        local = tuple(tuple(local_start[si] + j - offsets[si] for j, si in zip(batch, flat)) for batch in batches)
        return StreamPlan(slices=tuple(self.read_order[si] for si in needed), batches=local)

    def _global_batches(self, limit: int) -> list[list[int]]:
        """The first `limit` global batches in completion order, as read positions (indices into
        the concatenated used samples of `read_order`)."""
        if self._batches is None or len(self._batches) < limit:
            self._batches = self._form_batches(limit)
        return self._batches

    def _form_batches(self, limit: int) -> list[list[int]]:
        spec = self.spec
        if limit <= 0:
            return []
        groups = [g for sl in self.read_order for g in sl.groups()]
        rng = np.random.default_rng([spec.seed, self.epoch, int(Draw.SAMPLE_BUFFER)])
        pending: dict[Hashable, list[int]] = {}
        batches: list[list[int]] = []
        for j in _buffer_order(len(groups), spec.shuffle_buffer, rng):
            part = pending.setdefault(groups[j], [])
            part.append(j)
            if len(part) == spec.batch_size:
                batches.append(part)
                pending[groups[j]] = []
                if len(batches) == limit:
                    return batches
        for order, g in enumerate(self._completed):
            batches.append(pending[g] + self._repeats(groups, pending[g], order))
            if len(batches) == limit:
                return batches
        raise RuntimeError(f"internal: epoch {self.epoch} forms {len(batches)} batches of {spec.batch_size}, the plan "
                           f"needs {limit}")

    def _repeats(self, groups: list[Hashable], own: list[int], order: int) -> list[int]:
        """The read positions that complete the partial batch `own` (the `order`-th completed one):
        samples of its shape from the slices its own samples are in, seeded, not in `own` while
        there are enough; then cycling through all of them (own first)."""
        need = self.spec.batch_size - len(own)
        offsets = np.cumsum([0] + [sl.count for sl in self.read_order])
        shape, mine = groups[own[0]], set(own)
        slices = sorted({int(np.searchsorted(offsets, j, side="right")) - 1 for j in own})
        others = [j for si in slices for j in range(int(offsets[si]), int(offsets[si + 1]))
                  if groups[j] == shape and j not in mine]
        rng = np.random.default_rng([self.spec.seed, self.epoch, int(Draw.REPEAT), order])
        if len(others) >= need:
            return [others[i] for i in rng.choice(len(others), size=need, replace=False).tolist()]
        pool = own + others
        return [others[i] for i in rng.permutation(len(others)).tolist()] + \
            [pool[i % len(pool)] for i in range(need - len(others))]


def _buffer_order(n: int, size: int, rng: np.random.Generator) -> list[int]:
    """Emission order of read positions 0..n-1 through a shuffle buffer of `size` samples."""
    if size <= 1:
        return list(range(n))
    buf = list(range(min(n, size)))
    draws = rng.integers(0, size, size=max(0, n - size)).tolist()
    out = []
    append = out.append
    for j in range(len(buf), n):
        i = draws[j - size]
        append(buf[i])
        buf[i] = j
    out.extend(buf[i] for i in rng.permutation(len(buf)).tolist())
    return out
