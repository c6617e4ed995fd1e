"""Training data: the verified shard stream of a rank, and batching inside loader workers.

`train.plan` decides which samples each rank and loader worker takes and in which order (pure);
this module reads them: it opens just the shards a stream needs, checks them, decodes samples
(safetensors and PNG only, through `shards.schema`; never pickle), applies the per-sample
randomness (caption pick, caption dropout, soft-threshold level) and collates `HostBatch`es,
with exact mid-epoch resume.

The whole batch sequence of a rank is a pure function of the shard records, (epoch, rank,
start_batch) and the `train.plan.DataSpec`, which checkpoints save (`stream_identity`): a resume
must match it exactly.

The wire format
---------------
Loader workers hand out `HostBatch`es: every tensor of `train.step.Batch` except that the
conditioning images stay uint8 (`cond_u8`, with one uint8 threshold level per sample for soft
maps). That is 4x fewer bytes than fp32 through worker shared memory, pinning and the
host-to-device copy. `HostBatch.to(device)` is the only way to a `train.step.Batch`: it moves the
uint8 tensors and builds the float image there (`train.augment.prepare_cond`).

Reading
-------
* Resume. After `start_batch` batches of an epoch physical worker `w` plays role
  `(start_batch + w) % W` from that role's batch `(start_batch + w) // W` (`train.plan`). The
  resumed stream yields exactly the remaining batches, in order. Skipped batches are not decoded,
  and a shard none of whose samples is still needed is not opened at all.
* A stream may take only some samples of a shard (`train.plan`: streams split the epoch at
  sample granularity); it still reads the whole shard, so its count and sha256 are checked.
  A sample may be in two batches, or twice in one (a latent shape's last batch completed with
  repeats, `train.plan`): it is read once and held until its last batch is handed out.
* Views: of an image's stored views only the one the plan picks is decoded (the others' bytes are
  still read: views multiply an epoch's I/O, not its decode work).
* Soft conditions: for a cache stored with precompute's --condition-soft, each conditioning image
  is binarised at a threshold drawn per (seed, epoch, key) in `soft_threshold` (`train.augment`).
* Errors: a shard that is short, has a sha256 mismatch, a missing or unknown member, or a
  malformed sample raises `shards.errors.ShardError` naming the shard. Every shard a worker opens
  is read to its end (so its count and sha256 are checked) before that worker's last batch is
  handed out.
"""

from __future__ import annotations

import copy
import hashlib
from bisect import bisect_right
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards import schema
from shards.errors import ShardError
from shards.manifest import Manifest, ShardRecord, identity_diff
from shards.reader import iter_shard_members, load_empty_prompt
from shards.runtime import worker_init
from shards.store import Store
from shards.verify import check_sample
from train.augment import prepare_cond, threshold_level
from train.augment import soft_threshold as draw_soft_threshold
from train.plan import DataSpec, EpochPlan, ShardSlice, as_records, sample_choice

if TYPE_CHECKING:
    from train.step import Batch

_VERIFY_HINT = "(the cache is damaged or was not written by precompute: `python -m shards verify CACHE` checks all of it)"

# Bump when the plan or the stream changes which samples come in which order for the same
# settings: a checkpoint saved under another version cannot be resumed exactly.
# 2: streams split the epoch at sample granularity (one global shuffle buffer and batch order).
# 3: all but one of the latent shapes' partial batches are completed with repeats (train.plan).
STREAM_VERSION = 3


# --------------------------------------------------------------------------------------------
# What a resume must match


def stream_identity(records: Manifest | Sequence[ShardRecord], spec: DataSpec) -> dict:
    """Everything besides (epoch, rank, start_batch) that decides every rank's batches, as plain
    JSON: the spec, the shards (index, count, sha256) and the stream version.

    The single source of what a resume must match for the data: a checkpoint saves it, and
    `stream_resume_problems(saved, now)` lists what changed (world size, loader workers, cache
    contents, ...); any difference means the resumed run would not continue the same sample sequence.
    """
    digest = hashlib.sha256()
    for r in sorted(as_records(records), key=lambda r: r.index):
        digest.update(f"{r.index} {r.samples} {r.sha256}\n".encode())
    return {"stream_version": STREAM_VERSION, "shards_sha256": digest.hexdigest(), **spec.to_dict()}


_IDENTITY_LABELS = {
    "stream_version": "data stream version (the code changed how samples are ordered)",
    "shards_sha256": "cache shards (samples or contents changed)",
    "batch_size": "--batch-size",
    "seed": "--seed",
    "world_size": "number of processes",
    "num_workers": "--num-workers",
    "shuffle_buffer": "--shuffle-buffer",
    "max_samples": "--max-samples",
    "caption_dropout": "--caption-dropout",
    "soft_threshold": "soft threshold range (--soft-threshold-range, or the cache's default)",
    "validation_split": "--validation-split (which images are held out of training)",
}


def shown(value: object) -> str:
    """A setting's value in a message: as typed in Python, "(unset)" for None."""
    return "(unset)" if value is None else repr(value)


def _one_stream_alike(identity: dict) -> dict:
    workers = identity.get("num_workers")
    return {**identity, "num_workers": 1} if workers == 0 else identity


def stream_resume_problems(saved: dict | None, now: dict) -> list[str]:
    """Why a stream saved as `saved` (a checkpoint's `stream_identity`) would not continue as
    `now`: one line per setting, naming its flag; empty when the stream continues exactly."""
    if not saved:
        return ["the checkpoint records no data stream identity (saved by an older version)"]
    out = []
    # Reading in the training process (0 workers) and in one worker are one stream, read alike.
    for line in identity_diff(_one_stream_alike(saved), _one_stream_alike(now)):
        path, _, values = line.partition(": ")
        key = path.split(".")[0].split("[")[0]
        old, new = saved.get(key), now.get(key)
        if key == "shards_sha256":
            out.append(f"{_IDENTITY_LABELS[key]}: checkpoint {str(old)[:16]}, now {str(new)[:16]}")
        elif key in _IDENTITY_LABELS:
            out.append(f"{_IDENTITY_LABELS[key]}: checkpoint {shown(old)}, now {shown(new)}")
        else:
            out.append(line)
    return sorted(set(out), key=out.index)


def decode_verified(shard: str, index: int, key: str, members: dict[str, bytes], manifest: Manifest | None,
                    planned: Hashable = None) -> tuple[schema.Sample, np.ndarray]:
    """(sample, conditioning image uint8 (H, W, 3)) of one sample of shard `shard` (index `index`),
    held to `manifest` (dtypes, sizes, widths, finite values; None: structure only) and, when the
    plan knows it, to its `planned` latent (h, w). A ShardError names the shard and the sample.
    The one check every sample passes before train uses it. Sizes are held to the manifest's
    geometry before the PNG is decoded (from its header first), so no sample can make a worker
    decode more than one image of that geometry."""
    try:
        sample = schema.decode_sample(key, members)
    except schema.SampleError as e:
        raise ShardError(f"{shard}: {e} {_VERIFY_HINT}") from e
    h, w = sample.latent_mean.shape[1:]
    if planned is not None and planned != (h, w):
        raise ShardError(f"{shard}: sample {key} has latent {h}x{w}, its record says {planned[0]}x{planned[1]}")
    if manifest is None:  # bare records (tests of the plan): structural checks only
        try:
            return sample, sample.cond_image()
        except schema.SampleError as e:
            raise ShardError(f"{shard}: {e} {_VERIFY_HINT}") from e
    problems, cond = check_sample(sample, manifest, index)
    if problems:
        raise ShardError(f"{shard}: sample {key}: " + "; ".join(problems) + f" {_VERIFY_HINT}")
    return sample, cond


# --------------------------------------------------------------------------------------------
# The wire format


@dataclass
class HostBatch:
    """A collated batch as loader workers hand it out (CPU, one latent shape).

    `train.step.Batch`'s tensors, but the conditioning images are uint8 (B, 3, H, W) and soft
    maps carry their per-sample threshold level (B,) uint8 (`train.augment.threshold_level`).
    `.to(device)` makes the `train.step.Batch` the step takes, with the float image built on the
    device; `.cond` builds it where the tensors are (for inspection and tests).
    """

    latent_mean: torch.Tensor
    latent_std: torch.Tensor | None
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    add_time_ids: torch.Tensor
    cond_u8: torch.Tensor  # (B, 3, H, W) uint8, H = h * vae_scale_factor
    cond_levels: torch.Tensor | None  # (B,) uint8 threshold levels of soft maps, else None
    keys: list[str]

    def __len__(self) -> int:
        return self.latent_mean.shape[0]

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    @property
    def cond(self) -> torch.Tensor:
        """The conditioning images as the adapter sees them: float32 in [0, 1] ({0, 1} for soft maps)."""
        return prepare_cond(self.cond_u8, self.cond_levels)

    def pin_memory(self) -> HostBatch:
        """Called by DataLoader(pin_memory=True) so `.to(cuda, non_blocking=True)` overlaps compute."""
        return replace(self, **{name: getattr(self, name).pin_memory() for name in self._tensor_fields()})

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, *, non_blocking: bool = False) -> Batch:
        """The `train.step.Batch` on `device`: every tensor moved, the conditioning images converted
        there (`train.augment.prepare_cond`); `dtype` as in `Batch.to`."""
        from train.step import Batch

        moved = {name: getattr(self, name).to(device, non_blocking=non_blocking) for name in self._tensor_fields()}
        batch = Batch(
            latent_mean=moved["latent_mean"], latent_std=moved.get("latent_std"), prompt_embeds=moved["prompt_embeds"],
            pooled_prompt_embeds=moved["pooled_prompt_embeds"], add_time_ids=moved["add_time_ids"],
            cond=prepare_cond(moved["cond_u8"], moved.get("cond_levels")), keys=self.keys,
        )
        return batch if dtype is None else batch.to(device, dtype)


# --------------------------------------------------------------------------------------------
# The stream


class _Raw(NamedTuple):
    """One sample's undecoded members, held until its batch is complete."""

    shard: str
    index: int  # the shard's index (its keys start with it)
    key: str
    members: dict[str, bytes]
    shape: Hashable  # planned latent (h, w), or None for a one-shape cache


class CacheStream(IterableDataset):
    """Collated `HostBatch`es (CPU) of one rank for one epoch, from `start_batch` on.

    `plan` is the epoch's `train.plan.EpochPlan` (computed once, at start-up); the stream works on
    its own shallow copy, so the batch lists it simulates die with the stream. `manifest`: every
    sample is held to it (dtypes, sizes, widths, finite values) before it joins a batch; None (tests
    of the plan on bare records) keeps the structural checks only. Build one per epoch (and per
    resume). Iterate it through `make_loader` (batch_size=None, `spec.num_workers` workers), or
    directly: with num_workers > 1 outside a DataLoader it reproduces DataLoader's round-robin over
    the worker streams itself. `len()` is the number of batches still to come.
    """

    def __init__(self, store: Store, plan: EpochPlan, *, manifest: Manifest | None = None, rank: int = 0,
                 start_batch: int = 0) -> None:
        super().__init__()
        spec = plan.spec
        problems = []
        if not isinstance(rank, int) or not 0 <= rank < spec.world_size:
            problems.append(f"rank must be an integer in [0, world_size={spec.world_size}), got {rank!r}")
        if not isinstance(start_batch, int) or start_batch < 0:
            problems.append(f"start_batch must be an integer >= 0, got {start_batch!r}")
        if problems:
            raise ValueError("invalid data settings:\n  - " + "\n  - ".join(problems))
        self.store, self.spec, self.manifest = store, spec, manifest
        self.epoch, self.rank, self.start_batch = plan.epoch, rank, start_batch
        self.plan = copy.copy(plan)
        self.stats = plan.stats
        self.steps_per_epoch = self.stats.steps
        if start_batch > self.steps_per_epoch:
            raise ValueError(
                f"start_batch {start_batch} is past the end of epoch {plan.epoch}, which has {self.steps_per_epoch} "
                f"batches per rank; the checkpoint does not belong to this cache and settings"
            )
        # Loaded up front so that a cache without its empty-prompt file fails at start.
        self._empty = load_empty_prompt(store) if spec.caption_dropout > 0 else None

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[HostBatch]:
        roles = self.spec.roles
        info = get_worker_info()
        if info is not None:
            if info.num_workers != roles:
                raise ValueError(
                    f"CacheStream was planned for {self.spec.num_workers} loader workers but runs in a DataLoader "
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

    def _worker(self, worker: int) -> Iterator[HostBatch]:
        roles = self.spec.roles
        role = (self.start_batch + worker) % roles
        first = (self.start_batch + worker) // roles
        stream = self.plan.stream(self.rank, role)
        where = (f"epoch {self.epoch}, rank {self.rank}, loader worker {worker} (stream role {role}, from its "
                 f"batch {first})")
        yield from self._read(list(stream.slices), [list(b) for b in stream.batches[first:]], where)

    def _read(self, stream: list[ShardSlice], batches: list[list[int]], where: str) -> Iterator[HostBatch]:
        """Read just the shards holding samples of `batches` and hand out the batches in order.
        `where` names the stream in errors."""
        if not batches:
            return
        starts = [0]
        for sl in stream:
            starts.append(starts[-1] + sl.count)
        # A position may be in several batches (a completed batch repeats samples): each use is
        # counted, and a sample is held until the last batch that uses it is handed out.
        batches_of: dict[int, list[int]] = {}
        for b, positions in enumerate(batches):
            for j in positions:
                batches_of.setdefault(j, []).append(b)
        uses = {j: len(bs) for j, bs in batches_of.items()}
        missing = [len(positions) for positions in batches]
        needed = sorted({bisect_right(starts, j) - 1 for j in batches_of})
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
                if j is not None and j in batches_of:
                    pending[j] = _Raw(sl.name, sl.record.index, key, members, shapes[i])
                    for b in batches_of[j]:
                        missing[b] -= 1
                # The last batch waits for the end of the shard, so the reader's count and sha256
                # checks run before this worker's stream can end.
                while done < last and missing[done] == 0:
                    yield self._collate(self._take(pending, uses, batches[done]))
                    done += 1
            while done <= last and missing[done] == 0:
                yield self._collate(self._take(pending, uses, batches[done]))
                done += 1
        if done <= last:
            short = {stream[bisect_right(starts, j) - 1].name: None for b in batches[done:] for j in b}
            raise RuntimeError(
                f"internal: {where}: {last + 1 - done} of {len(batches)} planned batch(es) never completed after "
                f"reading shard(s) {', '.join(stream[si].name for si in needed)}; the incomplete batches hold "
                f"samples of {', '.join(short)}"
            )

    @staticmethod
    def _take(pending: dict[int, _Raw], uses: dict[int, int], positions: list[int]) -> list[_Raw]:
        """The samples of one batch, each dropped from `pending` after its last use."""
        items = [pending[j] for j in positions]
        for j in positions:
            uses[j] -= 1
            if uses[j] == 0:
                del pending[j]
        return items

    def _collate(self, items: list[_Raw]) -> HostBatch:
        means, stds, embeds, pooled, time_ids, conds, keys = [], [], [], [], [], [], []
        levels: list[int] = []
        for shard, index, key, members, shape in items:
            sample, cond = decode_verified(shard, index, key, members, self.manifest, planned=shape)
            self._check_sample(shard, sample, cond, first=(means[0], conds[0], keys[0]) if means else None)
            k = sample.prompt_embeds.shape[0]
            c, dropped = sample_choice(seed=self.spec.seed, epoch=self.epoch, key=key, num_captions=k,
                                       caption_dropout=self.spec.caption_dropout)
            if dropped:
                e, p = self._empty_like(shard, sample)
            else:
                e, p = sample.prompt_embeds[c], sample.pooled_prompt_embeds[c]
            means.append(sample.latent_mean)
            stds.append(sample.latent_std)
            embeds.append(e)
            pooled.append(p)
            time_ids.append(sample.meta.add_time_ids)
            if self.spec.soft_threshold is not None:
                low, high = self.spec.soft_threshold
                t = draw_soft_threshold(seed=self.spec.seed, epoch=self.epoch, key=key, low=low, high=high)
                levels.append(threshold_level(t))
            conds.append(cond)
            keys.append(key)
        has_std = [s is not None for s in stds]
        if any(has_std) and not all(has_std):
            names = sorted({item.shard for item in items})
            raise ShardError(f"{', '.join(names)}: some samples store latent_std and others do not (keys {keys})")
        return HostBatch(
            latent_mean=torch.stack(means),
            latent_std=torch.stack(stds) if all(has_std) else None,
            prompt_embeds=torch.stack(embeds),
            pooled_prompt_embeds=torch.stack(pooled),
            add_time_ids=torch.tensor(time_ids, dtype=torch.float32),
            # uint8 until the device (train.augment.prepare_cond); soft maps: one level per sample.
            cond_u8=torch.from_numpy(np.stack(conds)).permute(0, 3, 1, 2).contiguous(),
            cond_levels=torch.tensor(levels, dtype=torch.uint8) if self.spec.soft_threshold is not None else None,
            keys=keys,
        )

    def _check_sample(self, shard: str, sample: schema.Sample, cond: np.ndarray, first) -> None:
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


class DeviceBatches:
    """The loader's `HostBatch`es as device `train.step.Batch`es, in order, optionally one ahead.

    With `prefetch`, taking batch i first issues the copy of batch i+1, so it runs while step i
    computes. On CUDA the copy (and the uint8 -> float conversion of the conditioning images)
    runs on a side stream from pinned memory, non-blocking; the compute stream waits for it
    before using the batch (`wait_stream`), and every tensor of the batch is marked as used by
    the compute stream (`record_stream`) so the caching allocator does not hand its memory back
    to the side stream while the step still reads it. On a CPU the same code runs synchronously:
    only the order of the host work changes, so results are bitwise those without prefetch.

    Without `prefetch` each batch is copied when it is taken (non-blocking from pinned memory).
    One batch is held ahead at most, and one more host batch may be read from the loader past
    the last one the loop takes (when training stops mid-epoch); the data position in a
    checkpoint counts batches taken, never read, so resume is unaffected.
    """

    def __init__(self, batches: Iterator[HostBatch], device: torch.device | str, *, prefetch: bool):
        self.batches, self.device = batches, torch.device(device)
        self.prefetch = prefetch
        self.stream = torch.cuda.Stream(self.device) if prefetch and self.device.type == "cuda" else None
        self.ahead: Batch | None = self._issue() if prefetch else None

    def _issue(self) -> Batch | None:
        host = next(self.batches, None)
        if host is None:
            return None
        if self.stream is None:
            return host.to(self.device, non_blocking=True)
        with torch.cuda.stream(self.stream):
            return host.to(self.device, non_blocking=True)

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> Batch:
        if not self.prefetch:
            batch = self._issue()
        else:
            batch, self.ahead = self.ahead, None
            if batch is not None and self.stream is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(self.stream)
                for name in batch._tensor_fields():
                    getattr(batch, name).record_stream(current)
            if batch is not None:
                self.ahead = self._issue()  # batch i+1's copy, queued before step i's compute
        if batch is None:
            raise StopIteration
        return batch


def make_loader(
    store: Store, plan: EpochPlan, *, manifest: Manifest | None = None, rank: int = 0, start_batch: int = 0,
    pin_memory: bool | None = None, prefetch_factor: int = 2,
) -> DataLoader:
    """DataLoader over this rank's `HostBatch`es of the epoch `plan` from `start_batch` on
    (`len(loader) == plan.steps - start_batch`; `loader.dataset.stats` is the epoch's
    `train.plan.EpochStats`: what it uses and drops).

    Build a new one every epoch and after every resume. Never pass it to `accelerator.prepare`
    (that dispatches from rank 0 and drops data): ranks already hold disjoint streams of equal
    length. `batch.to(device, non_blocking=True)` turns each into the `train.step.Batch` the step
    takes, converting the uint8 conditioning images on the device.
    """
    spec = plan.spec
    dataset = CacheStream(store, plan, manifest=manifest, rank=rank, start_batch=start_batch)
    loader = DataLoader(
        dataset,
        batch_size=None,  # batches are made inside the workers, one shape each
        num_workers=spec.num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=False,  # the epoch and start position are baked into the dataset
        prefetch_factor=prefetch_factor if spec.num_workers > 0 else None,
        worker_init_fn=worker_init,  # a worker dies quietly on SIGTERM; its rank reports why
        # DataLoader hands out worker batches round-robin, in order (its default; in_order=True
        # on torch >= 2.6): the rank's batch sequence, and so exact resume, rests on that.
    )
    return loader
