"""Whole-cache verification: every shard re-read and held to the manifest.

`verify_cache` is what `python -m shards verify URL` runs, and what precompute may call at the end
of a run. It stops at the first problem with a VerifyError whose message starts with the file at
fault (a shard name, `manifest.json`, `empty_prompt.safetensors`...) and says what is wrong.

Checked: the manifest parses and adds up; identity.json (when present) equals the manifest's
identity; each per-shard record (when present) equals the manifest's entry; the empty-prompt
embedding has the manifest's text dims and storage dtype; and for every shard: count, keys in
order, bytes and sha256 (by the reader), then per sample: key belongs to the shard, tensors in the
storage dtype and finite, latent channels, latent_std present iff the cache stores it, prompt dims,
one embedding per caption, the latent's pixel size (latent x the VAE factor) and target_size are
the geometry's (the resolution, or one of the buckets), original_size is within the pixel cap the
cache was made with, and a view key's view agrees with the view its json records; then, only for
a sample whose sizes hold, the conditioning PNG's header states that size and it decodes. (The
json's sizes are whole numbers within bounds, and the crop fits the resize precompute makes:
`schema.SampleMeta.from_json`.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import limits, schema
from .errors import ShardError, StoreError
from .manifest import Manifest, ManifestError, ShardRecord, identity_diff, read_identity
from .reader import iter_shard, load_empty_prompt
from .store import Store
from .views import split_view_key


class VerifyError(ShardError):
    """The first problem found; the message starts with the file at fault."""


@dataclass
class VerifySummary:
    shards: int
    samples: int
    bytes: int
    seconds: float

    def line(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"OK: {self.shards} shards, {self.samples} samples, {self.bytes} bytes verified "
            f"(counts, keys, sha256, dtypes, shapes) in {self.seconds:.1f}s ({rate:.0f} samples/s)"
        )


def sample_problems(sample: schema.Sample, manifest: Manifest, index: int, cond=None) -> list[str]:
    """Everything wrong with one decoded sample relative to the manifest (empty list if fine);
    `check_sample` without the decoded image."""
    return check_sample(sample, manifest, index, cond=cond)[0]


def check_sample(sample: schema.Sample, manifest: Manifest, index: int, cond=None) -> tuple[list[str], np.ndarray | None]:
    """(everything wrong with one decoded sample relative to the manifest, its conditioning image).

    The image is decoded last and only for a sample whose sizes hold: the latent's pixel size
    (latent x the VAE factor) and target_size must be the manifest's resolution or one of its
    buckets, and the PNG's header (read without decoding) must state that size. So the most a
    sample can make a reader decode is one image of the manifest's geometry, whatever its latent,
    json and PNG claim together. The image is None when a problem kept it from being decoded.

    `cond`: the conditioning image already decoded (uint8 H x W x 3), to check instead. Train's
    loader runs this on every sample before it reaches a batch."""
    p: list[str] = []
    storage = manifest.storage_dtype
    prefix = schema.sample_key(index, 0).split("-")[0] + "-"
    if not sample.key.startswith(prefix):
        p.append(f"key does not belong to shard {index} (expected {prefix}...)")
    view = split_view_key(sample.key)[1]
    info = sample.meta.extra.get("view")
    recorded = info.get("index", 0) if isinstance(info, dict) else 0
    if view != recorded:
        p.append(f"the key names view {view}, its json says view {recorded}")
    tensors = {
        schema.LATENT_MEAN: sample.latent_mean,
        schema.LATENT_STD: sample.latent_std,
        schema.PROMPT_EMBEDS: sample.prompt_embeds,
        schema.POOLED_PROMPT_EMBEDS: sample.pooled_prompt_embeds,
    }
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != storage:
            p.append(f"{name} is {schema.dtype_name(t.dtype) or t.dtype}, the manifest says {manifest.dtypes.storage}")
        elif not bool(torch.isfinite(t).all()):
            p.append(f"{name} has non-finite values (NaN/inf: an fp16 VAE overflow?)")
        elif name == schema.LATENT_STD and bool((t < 0).any()):
            p.append(f"{name} has negative values (a standard deviation is >= 0)")
    channels = manifest.latent.channels
    if sample.latent_mean.shape[0] != channels:
        p.append(f"latent_mean has {sample.latent_mean.shape[0]} channels, the manifest says {channels}")
    if manifest.has_latent_std and sample.latent_std is None:
        p.append("latent_std missing (the manifest's latent.store is 'mean_std')")
    if not manifest.has_latent_std and sample.latent_std is not None:
        p.append("latent_std present (the manifest's latent.store is 'mean')")
    text = manifest.text
    pe, pooled = sample.prompt_embeds, sample.pooled_prompt_embeds
    if tuple(pe.shape[1:]) != (text.max_length, text.prompt_dim):
        p.append(f"prompt_embeds {tuple(pe.shape)}, the manifest says (k, {text.max_length}, {text.prompt_dim})")
    if pooled.shape[1] != text.pooled_dim:
        p.append(f"pooled_prompt_embeds {tuple(pooled.shape)}, the manifest says (k, {text.pooled_dim})")
    if pe.shape[0] != len(sample.meta.captions):
        p.append(f"{pe.shape[0]} prompt embeddings for {len(sample.meta.captions)} captions")
    size_problems = _size_problems(sample, manifest)
    p += size_problems
    f = manifest.latent.vae_scale_factor
    latent = tuple(sample.latent_mean.shape[1:])
    pixel_size = (latent[0] * f, latent[1] * f)
    try:
        if cond is None:
            header = schema.png_size(sample.cond_png, sample.key)  # the header only: nothing decoded
            if header != pixel_size:
                p.append(f"cond.png is {header[0]}x{header[1]}, the latent needs {pixel_size[0]}x{pixel_size[1]}")
            elif not size_problems:  # a size of the manifest's geometry: bounded, safe to decode
                cond = schema.decode_png(sample.cond_png, sample.key, expected_size=pixel_size)
        elif cond.shape[:2] != pixel_size:
            p.append(f"cond.png is {cond.shape[0]}x{cond.shape[1]}, the latent needs {pixel_size[0]}x{pixel_size[1]}")
    except schema.SampleError as e:
        p.append(str(e).removeprefix(f"sample {sample.key}: "))
    return p, cond if not size_problems else None


def _size_problems(sample: schema.Sample, manifest: Manifest) -> list[str]:
    """The latent's pixel size, target_size and original_size against the manifest, from the
    numbers alone (nothing is decoded)."""
    p: list[str] = []
    f = manifest.latent.vae_scale_factor
    latent = tuple(sample.latent_mean.shape[1:])
    pixel_size = (latent[0] * f, latent[1] * f)
    geometry = manifest.geometry
    sizes = [tuple(s) for s in geometry.sizes()]
    if pixel_size not in sizes:
        allowed = (f"the manifest's resolution {geometry.resolution}x{geometry.resolution}" if geometry.buckets is None
                   else "one of the manifest's buckets")
        p.append(f"latent {latent[0]}x{latent[1]} covers {pixel_size[0]}x{pixel_size[1]} px (x{f}), not {allowed}")
    target = tuple(sample.meta.target_size)
    if target != pixel_size:
        p.append(f"target_size {target} != latent size x {f} = {pixel_size}")
    if geometry.buckets is None:
        res = geometry.resolution
        if target != (res, res):
            p.append(f"target_size {target}, the manifest's resolution is {res}")
    elif tuple(target) not in geometry.buckets:
        p.append(f"target_size {target} is not one of the manifest's buckets")
    cap = (manifest.identity.section("input_limits") or {}).get("max_image_pixels")  # an object, if any
    h, w = sample.meta.original_size
    if isinstance(cap, int) and not isinstance(cap, bool) and h * w > cap:
        p.append(f"original_size {list(sample.meta.original_size)} is {h * w:,} pixels, over the {cap:,} the cache "
                 "was made with (precompute's --max-image-pixels skips such images)")
    return p


def _check_files(store: Store, manifest: Manifest) -> None:
    try:
        identity = read_identity(store)
    except ManifestError as e:
        raise VerifyError(str(e)) from None
    if identity is not None:
        diff = identity_diff(identity, manifest.identity.to_dict())
        if diff:
            raise VerifyError(f"{schema.IDENTITY_FILE}: differs from the manifest's identity: " + "; ".join(diff))
    try:
        pe, pooled = load_empty_prompt(store)
    except StoreError:  # the store failed, not the cache: said as such by the caller
        raise
    except ShardError as e:
        raise VerifyError(str(e)) from None
    text = manifest.text
    want_pe, want_pooled = (1, text.max_length, text.prompt_dim), (1, text.pooled_dim)
    if tuple(pe.shape) != want_pe or tuple(pooled.shape) != want_pooled:
        raise VerifyError(
            f"{schema.EMPTY_PROMPT_FILE}: shapes {tuple(pe.shape)} and {tuple(pooled.shape)}, the manifest "
            f"says {want_pe} and {want_pooled}"
        )
    if pe.dtype != manifest.storage_dtype or pooled.dtype != manifest.storage_dtype:
        raise VerifyError(f"{schema.EMPTY_PROMPT_FILE}: dtype {pe.dtype}, the manifest says {manifest.dtypes.storage}")


def _check_record_file(store: Store, record: ShardRecord) -> None:
    rel = schema.record_name(record.index)
    try:
        data = store.read_capped(rel, "SHARDS_MAX_RECORD_BYTES")
    except FileNotFoundError:
        return  # records are resume markers; train needs only the manifest
    except limits.LimitError as e:
        raise VerifyError(str(e)) from None
    try:
        on_disk = ShardRecord.from_json(data, where=rel)
    except ManifestError as e:
        raise VerifyError(str(e)) from None
    on_disk = on_disk.without_sources()  # the manifest lists records without them
    if on_disk != record:
        fields = [k for k in record.__dataclass_fields__ if getattr(on_disk, k) != getattr(record, k)]
        raise VerifyError(f"{record.name}: its record {rel} disagrees with the manifest on {fields}")


def verify_cache(
    store: Store,
    manifest: Manifest | None = None,
    *,
    on_sample: Callable[[ShardRecord], None] | None = None,
) -> VerifySummary:
    """Re-read the whole cache; raise VerifyError (or ManifestError) at the first problem, and
    StoreError when the store itself fails (down, refusing, misbehaving past the retries)."""
    start = time.perf_counter()
    if manifest is None:
        manifest = Manifest.load(store)
    _check_files(store, manifest)
    for record in manifest.shards:
        _check_record_file(store, record)
        try:
            for i, sample in enumerate(iter_shard(store, record, check=True)):
                problems = sample_problems(sample, manifest, record.index)
                shape = list(sample.latent_mean.shape[1:])
                if record.latent_shapes is not None and shape != record.latent_shapes[i]:
                    problems.append(f"latent [h, w] {shape}, the record says {record.latent_shapes[i]}")
                if problems:
                    raise VerifyError(f"{record.name}: sample #{i} ({sample.key}): " + "; ".join(problems))
                if on_sample is not None:
                    on_sample(record)
        except StoreError:
            raise
        except ShardError as e:
            raise VerifyError(str(e)) from None
    return VerifySummary(
        shards=len(manifest.shards),
        samples=manifest.totals["samples"],
        bytes=manifest.totals["bytes"],
        seconds=time.perf_counter() - start,
    )
