"""The precompute runner: plan -> (resume) -> encode shards -> manifest, on one or many processes.

`run(cfg)` composes the parts and owns everything about *running* them:

1. Validate the config and open the source; every problem goes into one ConfigError.
2. Load the encoders (local main process first, so a hub download happens once per node).
3. Identity: every process compares `CACHE/identity.json` with its own identity and refuses a
   mismatch (listing each difference: `shards.manifest.ensure_identity`); rank 0 writes it if
   absent. Rank 0 also writes the empty-prompt embedding and removes what a killed run left
   (`Store.cleanup_incomplete`: temp files in the cache and in its staging folder, unfinished
   multipart uploads); the first process of every other machine empties that machine's staging
   folder (`Store.cleanup_staging`). Shards are staged in `store.staging_dir(tmp_dir=--tmp-dir)`,
   a folder per cache, so a shared --tmp-dir is never cleaned beyond this cache's subfolder.
4. Plan: rank 0 finds which output shards are complete (a valid record and a shard of its size;
   checked by a thread pool on remote stores) and broadcasts that; the *pending* shards are dealt
   round-robin over the processes, so a resumed run keeps every process busy. Output shard i is
   made from source unit i.
5. Each shard: source items are decoded and preprocessed by a thread pool (bounded look-ahead,
   results consumed in order) into one or more views each (bucket geometry, extra crops, flips,
   computed conditions: `preprocess.prepare_views`), encoded in batches (VAE moments, one call per
   pixel shape; every caption of every item through both text encoders, once for all its views),
   and written with key `shards.views.view_key(shard, position, view)` (view 0 is
   `schema.sample_key(shard, position)`). A bucketed cache's records list each sample's latent
   shape. Skips are counted per reason in the shard record (`--strict` turns the first into an
   error); an image the VAE encodes to inf/NaN is skipped as `latent_nonfinite`, the rest of its
   batch is kept.
6. After every process is done, rank 0 checks that every planned shard has a record and writes
   `manifest.json` last.

Byte-reproducibility: nothing in a shard, record, identity, empty prompt or manifest depends on
the number of processes, which process made a shard, how often the run was interrupted, or the
time: keys, buckets, random crops and views are functions of (seed, shard, position), batches
are formed within a shard in item order (the batch size and the device kind are in the identity,
so a resume cannot change them), tars carry no timestamps, and the manifest's `created` is always
empty. Timings are reported in the summary, not stored. (Kernels may still round differently on
another GPU model or thread count; that is outside what a cache can pin.)
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from precompute.config import PrecomputeConfig
from precompute.settings import Settings, resolve
from precompute.errors import ConfigError, ModelLoadError, PrecomputeError, StrictSkipError
from precompute.encoders import (
    FP16_VAE_HINT,
    LatentEncoder,
    PromptEncoder,
    load_encoders,
)
from precompute.inputs import Drops, check_inputs, repeated_items, source_key
from precompute.preprocess import (
    MAX_CAPTIONS_PER_ITEM,
    Prepared,
    SKIP_REASONS,
    Skip,
    item_rng,
    prepare_views,
)
from precompute.source_base import content_fingerprint
from precompute.sources import RawItem, ReadLimits, Source, SourceError, open_source
from shards import schema
from shards.errors import ShardError
from shards.lock import LOCK_FILE, WriterLock
from shards.identity import CacheIdentity
from shards.manifest import Manifest, ManifestError, ShardRecord, ensure_identity, identity_diff, read_identity
from shards.reader import write_empty_prompt
from shards.runtime import io_reason, is_io_failure
from shards.secrets import redact
from shards.store import LocalStore, Store, stream_sha256
from shards.stores import open_store
from shards.views import view_key
from shards.writer import ShardState, ShardWriter, shard_state

log = logging.getLogger(__name__)
T = TypeVar("T")

# Prompts per text-encoder call: a batch of images may carry many captions each.
TEXT_CHUNK = 256
# Items decoded ahead of the encoders, per worker thread: enough to hide decode jitter, small
# enough that a 1024 px batch of float pixels stays a few hundred MB.
PREFETCH_PER_WORKER = 4
# Collective timeout. Processes wait for each other only at start and at the very end, where the
# slowest process is at most about one shard behind; loading SDXL from a slow disk or hub on
# every process at once can still take long, so be generous.
DIST_TIMEOUT = timedelta(hours=2)
# Per-process caps on per-item warnings; every skipped item is also listed in its shard record.
MAX_SKIP_WARNINGS = 100
MAX_NOTE_WARNINGS = 20
# Seconds between progress lines when stderr is not a terminal (PRECOMPUTE_PROGRESS_SECONDS).
PROGRESS_SECONDS = float(os.environ.get("PRECOMPUTE_PROGRESS_SECONDS") or 30)
# Concurrent record/size requests when checking which shards of a remote cache are complete.
REMOTE_CHECK_THREADS = 16


# --------------------------------------------------------------------------------------------
# Reporting


@dataclass
class Timings:
    """Seconds per phase, summed over processes (prepare: also over worker threads)."""

    read: float = 0.0  # reading raw bytes from the source (main thread)
    prepare: float = 0.0  # decode + geometry + PNG encode of the conditioning image (workers)
    wait: float = 0.0  # main thread waiting for prepared items: decoding not keeping up
    vae: float = 0.0
    text: float = 0.0
    write: float = 0.0  # serialising samples into the tar
    commit: float = 0.0  # re-read + validate + sha256 + publish + record

    def as_list(self) -> list[float]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_list(cls, values: list[float]) -> "Timings":
        return cls(*values)


@dataclass
class Summary:
    cache: str
    world_size: int
    shards: int  # planned = in the manifest
    shards_resumed: int  # already complete when this run started
    shards_written: int  # by this run
    # samples, skipped, bytes and sources describe the whole cache, read back from every record
    # by rank 0 only: other ranks' summaries hold None there.
    samples: int | None  # in the cache (views included)
    samples_written: int  # by this run
    items_read: int  # source items processed by this run (written + skipped)
    skipped: dict[str, int] | None  # in the cache, by reason
    captions_truncated: int  # by this run: captions over the text encoders' 77 tokens or --max-caption-chars
    bytes: int | None  # shard bytes in the cache
    seconds: float  # the whole run, model loading included
    encode_seconds: float  # from the plan until every process finished its shards
    timings: Timings = field(default_factory=Timings)
    sources: int | None = None  # images in the cache when it stores several views of each
    views_asked: int = 1  # views per image the settings ask for (--crops x --flip)

    @property
    def images_per_second(self) -> float:
        return self.items_read / self.encode_seconds if self.encode_seconds > 0 else 0.0

    def format(self) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        t = self.timings
        main = [(f.name, getattr(t, f.name)) for f in fields(t) if f.name != "prepare"]
        busy = sum(v for _, v in main) or 1.0
        split = ", ".join(f"{name} {v:.1f}s ({100 * v / busy:.0f}%)" for name, v in main)
        lines = [
            f"precompute done: {self.cache}",
            f"  samples   {self.samples} in the cache ({self.samples_written} written by this run), "
            f"skipped {skipped} ({reasons})"
            + (f"; {self.sources} images x {self.samples / self.sources:.2f} views" if self.sources else ""),
            f"  shards    {self.shards} ({self.shards_written} written, {self.shards_resumed} already complete)",
            f"  bytes     {self.bytes:,}" + (f" ({self.bytes / self.samples / 1024:.1f} KiB/sample)" if self.samples else ""),
            f"  time      {self.seconds:.1f}s on {self.world_size} process(es) ({self.encode_seconds:.1f}s "
            f"encoding), {self.images_per_second:.1f} images/s",
            f"  phases    {split} of the encoding loop; decode+preprocess {t.prepare:.1f}s in worker threads",
        ]
        images = self.sources or self.samples  # no `sources`: no image has a second view
        if self.views_asked > 1 and images and self.samples / images < self.views_asked:
            lines.append(f"  views     {self.samples / images:.2f} per image of the {self.views_asked} asked: an image "
                         "no larger than its crop has fewer distinct crop positions, and each is stored once")
        if self.captions_truncated:
            lines.append(f"  captions  {self.captions_truncated} truncated to the text encoders' 77 tokens (as SDXL does) "
                         "or to --max-caption-chars characters")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plumbing


@dataclass
class _Outcome:
    position: int
    source_id: str
    views: list[Prepared]  # one per stored view (empty when skipped)
    cond_pngs: list[bytes]  # the views' conditioning images, PNG-encoded by the worker
    skip: Skip | None
    seconds: float
    fingerprint: str = ""  # the item's input fingerprint (ShardRecord.sources)
    source_key: str = ""  # 16 hex digits of sha256(source id) (ShardRecord.source_keys)


class _Done:
    """A Future stand-in for work done inline (num_workers == 0)."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value

    def cancel(self) -> bool:
        return False


# The manifest's `created`: always empty, so that a cache is byte-identical however often it was
# resumed and on however many processes it was built (the manifest says what, not when).
CREATED = ""


@dataclass
class _ShardSkips:
    """The items one shard skipped: counted per reason, and listed (for its record)."""

    counts: Counter[str] = field(default_factory=Counter)
    items: list[dict] = field(default_factory=list)


class _ShardEncoder:
    """Encodes the shards assigned to this process; keeps per-process counters."""

    def __init__(self, settings: Settings, store: Store, source: Source, latent: LatentEncoder,
                 prompt: PromptEncoder, *, rank_tag: str, bar):
        self.cfg, self.store, self.source = settings.config, store, source
        self.latent, self.prompt = latent, prompt
        self.buckets = None if settings.buckets is None else list(settings.buckets)
        self.view_spec = settings.views
        self.condition = settings.condition
        self.rank_tag = rank_tag
        self.bar = bar
        self.timings = Timings()
        self.shards_written = self.samples_written = self.items_read = self.truncated = 0
        self._skip_warnings = self._note_warnings = 0
        self.pool = (ThreadPoolExecutor(self.cfg.num_workers, thread_name_prefix="prepare") if self.cfg.num_workers
                     else None)
        self.drops: dict[tuple[int, int], tuple[int, int]] = {}  # --dedupe: (unit, position) -> first occurrence

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    # -- preprocessing -------------------------------------------------------------------------
    def _prepare(self, shard: int, position: int, item: RawItem) -> _Outcome:
        t0 = time.perf_counter()
        cfg = self.cfg
        marks = dict(fingerprint=item.fingerprint or content_fingerprint(item), source_key=source_key(item.source_id))
        first = self.drops.get((shard, position))
        if first is not None:  # --dedupe: it repeats an earlier item; not even decoded
            detail = (f"{item.source_id}: repeats {schema.sample_key(*first)} (the same inputs, or the same file / tar "
                      "key)")
            return _Outcome(position, item.source_id, [], [], Skip("duplicate", detail), 0.0, **marks)
        try:
            views = prepare_views(
                item,
                resolution=cfg.resolution,
                crop=cfg.crop,
                rng=item_rng(cfg.seed, shard, position),
                vae_scale_factor=self.latent.info.vae_scale_factor,
                min_size=cfg.min_size,
                max_aspect=cfg.max_aspect,
                allow_empty_captions=cfg.allow_empty_captions,
                buckets=self.buckets,
                views=self.view_spec,
                condition=self.condition,
                max_image_pixels=cfg.max_image_pixels,
                max_caption_chars=cfg.max_caption_chars,
            )
            pngs = [schema.encode_png(v.cond) for v in views]
            return _Outcome(position, item.source_id, views, pngs, None, time.perf_counter() - t0, **marks)
        except Skip as s:
            return _Outcome(position, item.source_id, [], [], s, time.perf_counter() - t0, **marks)

    def _prepared(self, shard: int) -> Iterator[_Outcome]:
        """The unit's items, prepared by the pool with bounded look-ahead, in source order."""
        items = enumerate(self.source.iter_unit(shard))
        workers = max(1, self.cfg.num_workers)
        # Each item in flight holds all its views' pixels: keep the look-ahead's memory, not its
        # item count, what it was without views.
        ahead = max(workers + 1, (workers * PREFETCH_PER_WORKER + self.cfg.batch_size) // self.view_spec.max_views)
        pending: deque[Future | _Done] = deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < ahead:
                    t0 = time.perf_counter()
                    nxt = next(items, None)
                    self.timings.read += time.perf_counter() - t0
                    if nxt is None:
                        exhausted = True
                    elif self.pool is None:
                        pending.append(_Done(self._prepare(shard, *nxt)))
                    else:
                        pending.append(self.pool.submit(self._prepare, shard, *nxt))
                if not pending:
                    return
                t0 = time.perf_counter()
                outcome = pending.popleft().result()
                self.timings.wait += time.perf_counter() - t0
                self.timings.prepare += outcome.seconds
                yield outcome
        finally:
            for f in pending:
                f.cancel()

    # -- encoding ------------------------------------------------------------------------------
    def _warn(self, kind: str, msg: str, *args) -> None:
        if kind == "skip":
            self._skip_warnings += 1
            n, cap = self._skip_warnings, MAX_SKIP_WARNINGS
        else:
            self._note_warnings += 1
            n, cap = self._note_warnings, MAX_NOTE_WARNINGS
        if n <= cap:
            log.warning(self.rank_tag + msg, *args)
        if n == cap:
            log.warning(self.rank_tag + "further %s warnings are not shown (every skip is counted and listed in the "
                        "shard records and the manifest)", "skip" if kind == "skip" else "caption/conditioning")

    def _skip(self, shard: int, o: _Outcome, skip: Skip, skips: _ShardSkips) -> None:
        """Count and list a skipped item (or, with --strict, stop the run naming it)."""
        if self.cfg.strict:
            raise StrictSkipError(
                f"--strict: {skip.reason}: {skip.detail} (shard {shard}, unit {self.source.unit_name(shard)})"
            )
        skips.counts[skip.reason] += 1
        entry = {"source_id": o.source_id, "reason": skip.reason, "detail": skip.detail}
        if skip.reason == "duplicate":  # which item it repeats: a re-run checks the same ones still do
            entry.update(position=o.position, repeats=schema.sample_key(*self.drops[(shard, o.position)]))
        skips.items.append(entry)
        self._warn("skip", "skipped %s (%s): %s", o.source_id, skip.reason, skip.detail)

    def _encode_batch(self, writer: ShardWriter, shard: int, batch: list[_Outcome], notes: Counter[str],
                      skips: _ShardSkips) -> int:
        """Encode and write every view of the items in `batch`; returns the samples written.
        Counts items kept but altered (truncated captions, resized conditions) into `notes`, and
        skips (into `skips`) every item the VAE encoded to inf/NaN in any of its views."""
        t0 = time.perf_counter()
        # One VAE call per pixel shape (aspect buckets bring several), at most batch_size images.
        means: dict[tuple[int, int], torch.Tensor] = {}
        stds: dict[tuple[int, int], torch.Tensor] = {}
        nonfinite: Counter[int] = Counter()  # item -> its views encoded to inf/NaN
        by_shape: dict[tuple, list[tuple[int, int]]] = {}
        for j, o in enumerate(batch):
            for v, p in enumerate(o.views):
                by_shape.setdefault(tuple(p.pixels.shape), []).append((j, v))
        for idx in by_shape.values():
            for start in range(0, len(idx), self.cfg.batch_size):
                chunk = idx[start : start + self.cfg.batch_size]
                mean, std, finite = self.latent.encode(torch.stack([batch[j].views[v].pixels for j, v in chunk]))
                mean, std = mean.cpu(), std.cpu()
                for k, jv in enumerate(chunk):
                    if finite[k]:
                        means[jv], stds[jv] = mean[k], std[k]
                    else:
                        nonfinite[jv[0]] += 1
        t1 = time.perf_counter()
        self.timings.vae += t1 - t0
        for j in sorted(nonfinite):
            o = batch[j]
            self._skip(shard, o, Skip("latent_nonfinite", (
                f"{o.source_id}: the VAE encoded {nonfinite[j]} of its {len(o.views)} view(s) to inf/NaN in "
                f"{self.latent.dtype_name}" + (f"; {FP16_VAE_HINT}" if self.latent.dtype != torch.float32 else "")
            )), skips)
        keep = [j for j in range(len(batch)) if j not in nonfinite]  # indices into means / stds
        batch = [batch[j] for j in keep]
        if not batch:
            return 0

        # Captions once per item: its views share them.
        captions = [c for o in batch for c in o.views[0].captions]
        embeds, pooled = [], []
        for start in range(0, len(captions), TEXT_CHUNK):
            e, p = self.prompt(captions[start : start + TEXT_CHUNK])
            embeds.append(e.cpu())
            pooled.append(p.cpu())
        prompt_embeds, pooled_embeds = torch.cat(embeds), torch.cat(pooled)
        counts = self.prompt.token_counts(captions)
        t2 = time.perf_counter()
        self.timings.text += t2 - t1

        offset = written = 0
        cfg_chars = self.cfg.max_caption_chars
        several_views = self.view_spec.max_views > 1
        for j, o in zip(keep, batch):
            first = o.views[0]
            k = len(first.captions)
            cut = first.captions_cut or [False] * k
            for c, n, chars in zip(first.captions, counts[offset : offset + k], cut):
                if chars:  # cut to --max-caption-chars by preprocess: one note, whatever its tokens
                    self.truncated += 1
                    notes["caption_truncated"] += 1
                    self._warn("note", "%s: caption longer than %d characters (--max-caption-chars); kept its "
                               "first %d: %.60r", o.source_id, cfg_chars, cfg_chars, c)
                elif n > self.prompt.info.max_length:
                    self.truncated += 1
                    notes["caption_truncated"] += 1
                    self._warn("note", "%s: caption has %d tokens; the text encoders see the first %d (truncated as "
                               "SDXL does): %.60r", o.source_id, n, self.prompt.info.max_length, c)
            if first.captions_dropped:
                notes["captions_dropped"] += first.captions_dropped
                self._warn("note", "%s: %d captions over the %d kept per item were dropped", o.source_id,
                           first.captions_dropped, MAX_CAPTIONS_PER_ITEM)
            if first.orientation_differs:
                notes["cond_orientation_differs"] += 1
                self._warn("note", "%s: the image and its conditioning image carry different EXIF orientations, "
                           "and each is turned upright by its own: check that they still line up (a conditioning "
                           "image made from the image's stored pixels does not)", o.source_id)
            if first.cond_resized:
                notes["cond_resized"] += 1
                self._warn("note", "%s: conditioning image has another pixel size than the image (same aspect "
                           "ratio); resampled to the image's geometry", o.source_id)
            for v, p in enumerate(o.views):
                g = p.geometry
                meta = schema.SampleMeta(
                    key=view_key(shard, o.position, v),
                    source_id=o.source_id,
                    captions=list(p.captions),
                    original_size=g.original_size,
                    crop_top_left=g.crop_top_left,
                    target_size=g.target_size,
                    flip=g.flip,
                    # Only caches with views say so: a one-view cache's samples are unchanged.
                    extra={"view": {"index": v, **p.view_info}} if several_views else {},
                )
                writer.write(
                    schema.Sample(
                        meta=meta,
                        latent_mean=means[(j, v)],
                        latent_std=stds[(j, v)] if self.cfg.latent_store == "mean_std" else None,
                        prompt_embeds=prompt_embeds[offset : offset + k],
                        pooled_prompt_embeds=pooled_embeds[offset : offset + k],
                        cond_png=o.cond_pngs[v],
                    )
                )
                written += 1
            offset += k
        self.timings.write += time.perf_counter() - t2
        return written

    def encode_shard(self, shard: int) -> ShardRecord:
        cfg = self.cfg
        skips = _ShardSkips()
        notes: Counter[str] = Counter()  # kept but altered: counted in the record, like skips
        batch: list[_Outcome] = []
        sources: list[str] = []
        source_keys: list[str] = []
        in_batch = written = 0
        # Bucketed caches list each sample's latent shape in the record: train plans one-shape
        # batches from the records alone.
        with ShardWriter(self.store, shard, storage_dtype=cfg.storage_dtype, tmp_dir=cfg.tmp_dir,
                         record_latent_shapes=self.buckets is not None) as writer:
            for o in self._prepared(shard):
                sources.append(o.fingerprint)
                source_keys.append(o.source_key)
                self.items_read += 1
                if self.bar is not None:
                    self.bar.update(1)
                if o.skip is not None:
                    self._skip(shard, o, o.skip, skips)
                    continue
                batch.append(o)
                in_batch += len(o.views)
                if in_batch >= cfg.batch_size:
                    written += self._encode_batch(writer, shard, batch, notes, skips)
                    batch, in_batch = [], 0
            if batch:
                written += self._encode_batch(writer, shard, batch, notes, skips)
            t0 = time.perf_counter()
            record = writer.commit(dict(skips.counts), skips.items, dict(notes), sources=sources,
                                   source_keys=source_keys)
            self.timings.commit += time.perf_counter() - t0
        self.shards_written += 1
        self.samples_written += written
        return record


# --------------------------------------------------------------------------------------------
# The run


def _start(cfg: PrecomputeConfig) -> tuple[Settings, Source]:
    """The run's settings (`precompute.settings.resolve`) and the opened source, refusing with one
    ConfigError that lists every problem of both."""
    problems: list[str] = []
    settings = None
    try:
        settings = resolve(cfg)
    except ConfigError as e:
        problems += e.problems
    source = None
    if not cfg.source_problems():  # those are in problems already; opening would only repeat them
        try:
            source = open_source(
                cfg.data or None,
                kind=cfg.data_kind,
                image_column=cfg.image_column,
                conditioning_image_column=cfg.conditioning_image_column,
                caption_column=cfg.caption_column,
                samples_per_shard=cfg.samples_per_shard,
                max_samples=cfg.max_samples,
                require_conditioning=cfg.condition is None,
                dataset_name=cfg.dataset_name,
                dataset_config_name=cfg.dataset_config_name,
                dataset_revision=cfg.dataset_revision,
                dataset_split=cfg.dataset_split,
                cache_dir=cfg.cache_dir,
                limits=ReadLimits(max_file_bytes=cfg.max_input_bytes, follow_symlinks=cfg.follow_symlinks,
                                  max_json_bytes=cfg.max_json_bytes, max_json_depth=cfg.max_json_depth),
                fingerprint_mode=cfg.source_fingerprint,
            )
        except SourceError as e:
            what = f"--data {redact(cfg.data)}" if cfg.data else f"--dataset-name {cfg.dataset_name}"
            message = str(e)
            problems.append(message if message.startswith(f"{what}: ") else f"{what}: {message}")  # said once
    if problems:
        raise ConfigError(problems)
    assert settings is not None and source is not None
    return settings, source


def _unit_sizes(source: Source, units: list[int]) -> int | None:
    """Items in these units when the source can say without reading them (for the progress bar)."""
    sizes = [source.unit_size(i) for i in units]
    return None if any(n is None for n in sizes) else sum(sizes)


def _per_shard(store: Store, fn: Callable[[int], T], indices: Sequence[int]) -> list[T]:
    """[fn(i) for i in indices]: each is a request or two (a record, a size, a whole shard), which
    on a remote store run concurrently."""
    if isinstance(store, LocalStore) or len(indices) <= 1:
        return [fn(i) for i in indices]
    with ThreadPoolExecutor(min(REMOTE_CHECK_THREADS, len(indices)), thread_name_prefix="check") as pool:
        return list(pool.map(fn, indices))


def _shard_states(store: Store, n: int) -> list[ShardState]:
    """`shard_state` of shards 0..n-1."""
    return _per_shard(store, lambda i: shard_state(store, i), range(n))


def _verify_complete(store: Store, complete: dict[int, ShardRecord]) -> dict[int, str]:
    """--verify-existing: {index: what is wrong} for complete shards whose bytes do not hash to
    their record's sha256 (damaged in place, at the recorded size). Reads every one."""
    def check(i: int) -> str | None:
        record = complete[i]
        with store.open_read(record.name) as f:
            got = stream_sha256(f)
        return None if got == record.sha256 else (f"its sha256 is {got}, its record says {record.sha256} "
                                                   "(damaged after it was written)")

    indices = sorted(complete)
    found = {i: why for i, why in zip(indices, _per_shard(store, check, indices)) if why}
    log.info("--verify-existing: %d complete shard(s) re-read, %d damaged", len(indices), len(found))
    return found


def _remove_leftovers(store: Store, tmp_dir: str | None, state) -> None:
    """What a killed run left: rank 0 cleans the cache (temp files, unfinished multipart uploads)
    and its machine's staging folder, the first process of every other machine that machine's.
    Safe only before any writer of this run starts (two runs must never write one cache at once)."""
    if state.is_main_process:
        removed = store.cleanup_incomplete(tmp_dir=tmp_dir)
    elif state.is_local_main_process:
        removed = store.cleanup_staging(tmp_dir=tmp_dir)
    else:
        removed = []
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", len(removed))
        log.debug("removed: %s", ", ".join(removed))


def _broadcast_ints(state, values: list[int] | None) -> list[int]:
    """Rank 0's list of ints on every process (its length first): tensors, never pickled objects."""
    if state.num_processes == 1:
        return list(values or [])
    n = torch.tensor([len(values) if values is not None else 0], dtype=torch.int64, device=state.device)
    torch.distributed.broadcast(n, src=0)
    data = torch.tensor(values if state.is_main_process else [0] * int(n.item()), dtype=torch.int64,
                        device=state.device)
    if data.numel():
        torch.distributed.broadcast(data, src=0)
    return data.cpu().tolist()


def _withdraw_stale(cfg: PrecomputeConfig, store: Store, stale: dict[int, str]) -> None:
    """Stale shards without --rebuild-stale: the cache is not complete (its manifest, if any, is
    withdrawn so train refuses it), and the message lists each shard and what changed."""
    shown = "\n".join(f"  - {schema.shard_name(i)}: {why}" for i, why in sorted(stale.items())[:20])
    more = f"\n  - ... and {len(stale) - 20} more" if len(stale) > 20 else ""
    withdrawn = ""
    if store.exists(schema.MANIFEST_FILE):
        store.delete(schema.MANIFEST_FILE)
        withdrawn = f" Its {schema.MANIFEST_FILE} was withdrawn, so nothing trains on the stale shards meanwhile."
    raise PrecomputeError(
        f"{store.url}: {len(stale)} shard(s) were made from inputs that changed since:\n{shown}{more}\nThe cache is "
        f"not complete until they are rebuilt: re-run the same command with --rebuild-stale.{withdrawn}")


def _settings_view(identity: dict) -> dict:
    """An identity without what only the loaded model tells: the weight and tokenizer
    fingerprints and the latent and text dims."""
    d = json.loads(json.dumps(identity))
    d["encoder"] = {k: v for k, v in (d.get("encoder") or {}).items() if not k.endswith("_fingerprint")}
    d["latent"] = {"store": (d.get("latent") or {}).get("store")}
    d.pop("text", None)
    return d


@dataclass
class _InputCheck:
    """Rank 0's changed-input check, made before the model loaded (`_check_inputs_early`)."""

    complete: dict[int, ShardRecord]
    stale: dict[int, str]
    drops: Drops
    damaged: dict[int, str]  # shards that contradict their records (ShardState.damage)


def _damage(states: list[ShardState]) -> dict[int, str]:
    return {i: st.damage for i, st in enumerate(states) if st.damage}


def _check_inputs_early(settings: Settings, store: Store, source: Source, state) -> _InputCheck | None:
    """The changed-input check before any model weight loads, so that a refusal for stale shards
    comes at once: fingerprints are the sources' (content hashes, or size and mtime), not the
    model's. It runs only when the cache's identity.json agrees with this run on everything the
    model does not decide (the dataset, the settings, the model's name): against another dataset
    every shard would look stale, and such a cache must instead be refused for its identity, after
    the model loads, with nothing touched. Every process learns whether rank 0 refused. Returns
    rank 0's check for `_prepare_cache` to reuse; None elsewhere, or when the check waits."""
    status, problem, check = 0, None, None
    if state.is_main_process:
        try:
            old = read_identity(store)
        except ManifestError:
            old = None  # reported by the identity check after the model loads, as before
        if old is not None:
            cfg = settings.config
            encoder = {"model": cfg.model, "revision": cfg.revision, "variant": cfg.variant, "vae": cfg.vae}
            mine = settings.identity(encoder=encoder, latent={}, text={}, source=source.describe())
            if not identity_diff(_settings_view(old), _settings_view(mine)):
                states = _shard_states(store, source.num_units())
                complete = {i: st.record for i, st in enumerate(states) if st.record is not None}
                stale, drops = check_inputs(source, complete, dedupe=cfg.dedupe)
                check = _InputCheck(complete, stale, drops, _damage(states))
                if stale and not cfg.rebuild_stale:
                    try:
                        _withdraw_stale(cfg, store, stale)
                    except PrecomputeError as e:
                        status, problem = 1, e
    if state.num_processes > 1:
        status = _broadcast_ints(state, [status] if state.is_main_process else None)[0]
    if status:
        raise problem or PrecomputeError("the main process refused to continue (its message says why)")
    return check


def _prepare_cache(cfg: PrecomputeConfig, store: Store, source: Source, prompt: PromptEncoder, identity: CacheIdentity,
                   state, early: _InputCheck | None = None) -> tuple[list[int], Drops, CacheIdentity]:
    """Identity check, the one-time writes and clean-up, the input checks and the plan. Returns
    the pending shard indices and the items --dedupe drops, the same on every process, and the
    identity in effect (the stored one's names for the same encoder weights). `early`: rank 0's
    input check, already made before the model loaded (`_check_inputs_early`)."""
    # Rank 0 decides on the identity before anyone writes anything else; its refusal reaches every
    # process with the plan (status 1), so all of them stop together.
    status, plan = 0, None  # rank 0: 1 = refused (identity, stale inputs); plan = done flags + drops
    problem: Exception | None = None
    if state.is_main_process:
        try:
            identity, replaced = ensure_identity(store, identity)
        except ManifestError as e:
            status, problem = 1, e
        else:
            early = None if replaced else early  # its records were of the settings just replaced
    if not status:
        _remove_leftovers(store, cfg.tmp_dir, state)
    n = source.num_units()
    if state.is_main_process and status:
        plan = [status]
    elif state.is_main_process:
        if not store.exists(schema.EMPTY_PROMPT_FILE):
            pe, pooled = prompt([""])
            write_empty_prompt(store, pe, pooled, cfg.storage_dtype)
        if early is not None:  # made before the model loaded; the lock kept every record as it was
            complete, stale, drops, damaged = dict(early.complete), early.stale, early.drops, dict(early.damaged)
        else:
            states = _shard_states(store, n)
            complete = {i: st.record for i, st in enumerate(states) if st.record is not None}
            stale, drops = check_inputs(source, complete, dedupe=cfg.dedupe)
            damaged = _damage(states)
        if stale and not cfg.rebuild_stale:
            try:
                _withdraw_stale(cfg, store, stale)
            except PrecomputeError as e:
                status, problem = 1, e
        if cfg.verify_existing:
            damaged.update(_verify_complete(store, complete))
        for i in sorted(stale) if cfg.rebuild_stale else ():
            damaged.setdefault(i, f"its inputs changed: {stale[i]}")
        for i, why in sorted(damaged.items()):
            log.warning("%s: rebuilding it: %s", schema.shard_name(i), why)
            store.delete(schema.record_name(i))  # the record first: a shard without one is "not done"
            store.delete(schema.shard_name(i))
            complete.pop(i, None)
        plan = [status] + [1 if i in complete else 0 for i in range(n)]
        plan += [v for (u, p_), (fu, fp) in sorted(drops.items()) for v in (u, p_, fu, fp)]
    plan = _broadcast_ints(state, plan)  # also the barrier after identity, empty prompt and checks
    if plan[0]:
        raise problem or PrecomputeError("the main process refused to continue (its message says why)")
    done, flat = plan[1 : n + 1], plan[n + 1 :]
    drops = {(flat[k], flat[k + 1]): (flat[k + 2], flat[k + 3]) for k in range(0, len(flat), 4)}
    return [i for i, d in enumerate(done) if not d], drops, identity


class ProgressLines:
    """Progress as log lines (images, %, images/s, ETA) when stderr is not a terminal: every
    PROGRESS_SECONDS, and at each tenth of the work when its size is known. A bar's stand-in."""

    def __init__(self, total: int | None, tag: str = ""):
        self.total, self.tag, self.n = total, tag, 0
        self.started = self.last = time.monotonic()
        self.next_tenth = 1

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        tenth = self.total and self.n * 10 >= self.next_tenth * self.total
        if tenth or now - self.last >= PROGRESS_SECONDS:
            if tenth:
                self.next_tenth = self.n * 10 // self.total + 1
            self.last = now
            rate = self.n / max(now - self.started, 1e-9)
            if self.total:
                eta = (self.total - self.n) / rate if rate > 0 else float("inf")
                log.info("%sprecompute: %d/%d images (%.0f%%), %.1f images/s, ETA %s", self.tag, self.n, self.total,
                         100 * self.n / self.total, rate, _duration(eta))
            else:
                log.info("%sprecompute: %d images, %.1f images/s", self.tag, self.n, rate)

    def set_postfix_str(self, *_a, **_k) -> None:
        pass

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def _encode(settings: Settings, store: Store, source: Source, latent: LatentEncoder, prompt: PromptEncoder,
            mine: list[int], state, drops: Drops) -> _ShardEncoder:
    """Encode this process's shards, with a progress bar (images/s) on a terminal."""
    rank, world = state.process_index, state.num_processes
    bar = None
    if mine:
        total = _unit_sizes(source, mine)
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="img", dynamic_ncols=True, smoothing=0.05,
                       desc=f"precompute{' rank ' + str(rank) if world > 1 else ''}",
                       position=rank if world > 1 else None)
        else:  # a log file or a pipe: progress lines instead of a bar's carriage returns
            bar = ProgressLines(total, f"[rank {rank}] " if world > 1 else "")
    rank_tag = f"[rank {rank}] " if world > 1 else ""
    worker = _ShardEncoder(settings, store, source, latent, prompt, rank_tag=rank_tag, bar=bar)
    worker.drops = drops
    try:
        for i in mine:
            try:
                record = worker.encode_shard(i)
            except Exception as e:
                # A full or read-only disk (safetensors says "IoError"): the shard's writer has
                # already discarded its temp file, so nothing of it is visible; say where and why.
                if isinstance(e, ShardError) or not is_io_failure(e):
                    raise
                reason = io_reason(e)
                where = getattr(e, "filename", None) or store.staging_dir(tmp_dir=settings.config.tmp_dir)
                fix = _io_fix(e)
                raise PrecomputeError(
                    f"{schema.shard_name(i)}: cannot be written ({reason}: {where}). Nothing of it was published; "
                    f"the shards already complete are kept. {fix}, then re-run the same command to finish") from None
            if bar is not None:
                bar.set_postfix_str(f"shard {i + 1}/{source.num_units()}", refresh=False)
            log.debug("%s%s: %d samples, skipped %s", rank_tag, record.name, record.samples, record.skipped or "none")
    finally:
        worker.close()
        if bar is not None:
            bar.close()
    return worker


def _io_fix(error: BaseException) -> str:
    """What to do about a write that failed with `error`, in a few words."""
    code = getattr(error, "errno", None)
    if code in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST):
        return "Something else stands where the file goes: move it out of the way"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "Fix the permissions (or write elsewhere)"
    return "Free space (or fix the permissions)"


def _all_records(store: Store, n: int) -> list[ShardRecord]:
    """Every shard's record, or an error naming the shards that are not complete."""
    found = [st.record for st in _shard_states(store, n)]
    records = [r for r in found if r is not None]
    missing = [schema.shard_name(i) for i, r in enumerate(found) if r is None]
    if missing:
        raise PrecomputeError(
            f"{len(missing)} shard(s) are not complete after the run ({', '.join(missing[:5])}"
            f"{'...' if len(missing) > 5 else ''}); re-run the same command to finish them"
        )
    return records


def _take_writer_lock(cfg: PrecomputeConfig, store: Store, state) -> WriterLock | None:
    """Rank 0 checks that nothing stands where the cache's folders and files go
    (`Store.layout_problems`: a link out of the cache, a folder named manifest.json), then locks
    this cache's staging folder (`.staging/.lock` for a local cache) for the whole run, so a
    second precompute into the same cache fails at start naming the holder, instead of deleting
    this run's staged shards as leftovers. Every process learns the outcome
    through one tensor broadcast, so none waits in a collective for a rank 0 that gave up."""
    lock, problem = None, ""
    if state.is_main_process:
        try:
            obstacles = store.layout_problems((schema.SHARD_DIR, schema.RECORD_DIR),
                                              (schema.MANIFEST_FILE, schema.IDENTITY_FILE, schema.EMPTY_PROMPT_FILE))
            if obstacles:
                raise ShardError("cannot write the cache here:\n  - " + "\n  - ".join(obstacles))
            lock = WriterLock(store.prepare_staging(tmp_dir=cfg.tmp_dir) / LOCK_FILE, f"the cache {store.url}")
            lock.acquire()
            if lock.describe_previous():
                log.warning("%s", lock.describe_previous())
        except (ShardError, OSError) as e:  # LockError is a ShardError
            lock, problem = None, str(e)
    if state.num_processes > 1:
        flag = torch.tensor([1 if problem else 0], dtype=torch.uint8, device=state.device)
        torch.distributed.broadcast(flag, src=0)
        if flag.item() and not problem:
            problem = "the main process could not take the cache's writer lock (its message says why)"
    if problem:
        raise PrecomputeError(problem)
    return lock


def run(cfg: PrecomputeConfig) -> Summary:
    """Encode cfg.data into the cache at cfg.cache (resuming if it is partly there)."""
    from accelerate import PartialState

    started = time.perf_counter()
    settings, source = _start(cfg)  # every setting decided once, here; every problem refused at once
    cfg = settings.config
    store = open_store(cfg.cache)

    device = settings.device
    # cpu=True makes accelerate use gloo (several processes on a CPU-only machine); on GPUs each
    # process gets its local GPU and NCCL.
    state = PartialState(cpu=device == "cpu", timeout=DIST_TIMEOUT)
    world = state.num_processes
    if device.startswith("cuda") and (world > 1 or device == "cuda"):
        device = state.device
    info = log.info if state.is_main_process else log.debug
    lock = _take_writer_lock(cfg, store, state)  # before anything is loaded or touched
    try:
        early = _check_inputs_early(settings, store, source, state)  # a stale cache is refused before the model loads
        info("loading encoders from %s%s on %s (%d process%s): VAE in %s%s, text encoders in %s", cfg.model,
             f" (vae: {cfg.vae})" if cfg.vae else "", device, world, "es" if world > 1 else "", cfg.vae_dtype,
             " (compiled)" if cfg.compile_vae else "", cfg.text_dtype)
        with state.local_main_process_first():
            latent, prompt, encoder_identity = load_encoders(
                cfg.model, vae=cfg.vae, revision=cfg.revision, variant=cfg.variant, device=device,
                vae_dtype=cfg.vae_dtype, text_dtype=cfg.text_dtype, compile_vae=cfg.compile_vae,
            )
        if torch.device(device).type == "cpu":
            from shards.runtime import choose_cpu_threads

            size = sum(p.numel() for m in (latent.vae, *prompt.text_encoders) for p in m.parameters())
            threads, why = choose_cpu_threads(size, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            info("CPU threads per process: %d (%s)", threads, why)
        if latent.info.vae_scale_factor != settings.vae_scale_factor:  # the weights contradict their config
            raise ModelLoadError(f"the VAE loaded from {cfg.vae or cfg.model} downsamples by "
                                 f"{latent.info.vae_scale_factor}, its config.json by {settings.vae_scale_factor}")
        if settings.buckets is not None:
            info("buckets (h x w): %s", ", ".join(f"{h}x{w}" for h, w in settings.buckets))
        # Typed and validated once (shards.identity): what identity.json and the manifest hold.
        identity = CacheIdentity.from_dict(settings.identity(
            encoder=encoder_identity, latent=asdict(latent.info), text=asdict(prompt.info), source=source.describe(),
        ))

        pending, drops, identity = _prepare_cache(cfg, store, source, prompt, identity, state, early)
        n = source.num_units()
        info("%s: %d shard(s) planned from %s, %d already complete, %d to encode", store.url, n,
             source.describe().get("path") or source.describe().get("dataset"), n - len(pending), len(pending))
        encode_started = time.perf_counter()
        # Pending shards dealt round-robin: after a resume every process still gets its share.
        worker = _encode(settings, store, source, latent, prompt, pending[state.process_index :: world], state, drops)

        counters = torch.tensor(
            [worker.shards_written, worker.samples_written, worker.items_read, worker.truncated,
             *worker.timings.as_list()],
            dtype=torch.float64,
        )
        if world > 1:
            counters = counters.to(state.device)
            torch.distributed.all_reduce(counters)  # also the barrier: every shard is committed after this
        counts = counters.cpu().tolist()
        encode_seconds = time.perf_counter() - encode_started

        totals = None
        if state.is_main_process:  # the only reader of every record (2 requests per shard on a remote store)
            records = _all_records(store, n)
            repeats = repeated_items(records)
            if repeats:
                shown = ", ".join(f"{a} repeats {b}" for a, b in repeats[:5]) + (" ..." if len(repeats) > 5 else "")
                log.warning("%d item(s) repeat an earlier one (the same inputs, or the same file / tar key) and were "
                            "encoded again: %s. Pass --dedupe to drop them", len(repeats), shown)
            manifest = Manifest.build(identity, records, cfg.resolved(), created=CREATED,
                                      extra_totals={"repeated_items": len(repeats)})
            manifest.save(store)  # last: its presence says the cache is complete
            totals = manifest.totals
        summary = Summary(
            cache=store.url,
            world_size=world,
            shards=n,
            shards_resumed=n - len(pending),
            shards_written=int(counts[0]),
            samples=totals["samples"] if totals else None,
            samples_written=int(counts[1]),
            items_read=int(counts[2]),
            skipped=dict(totals["skipped"]) if totals else None,
            captions_truncated=int(counts[3]),
            bytes=totals["bytes"] if totals else None,
            seconds=time.perf_counter() - started,
            encode_seconds=encode_seconds,
            timings=Timings.from_list(counts[4:]),
            sources=totals.get("sources") if totals else None,
            views_asked=settings.views.max_views,
        )
        if totals is not None:
            log.info("%s", summary.format())
            if totals["samples"] == 0:  # a complete but empty cache is never what the user wanted
                reasons = "; ".join(f"{r} {k}" + (f" ({SKIP_REASONS[r]})" if r in SKIP_REASONS else "")
                                    for r, k in sorted(totals["skipped"].items())) or "no source items"
                raise PrecomputeError(
                    f"{store.url}: no samples in the cache: every item was skipped: {reasons}. The counts and "
                    "examples are in its manifest.json; check --resolution, --min-size, --max-aspect and the columns, "
                    "then run precompute again with the fixed settings (into this same folder: it holds no sample, "
                    "so the new settings replace the old)."
                )
        return summary
    finally:
        if lock is not None:
            lock.release()
