"""Synthetic samples and caches with the real layout, for tests and benchmarks without models.

A cache written here is indistinguishable in format from one precompute writes (same writer,
records, manifest, identity and empty prompt), only its tensors are random. Tiny dims by default
(4 latent channels, 77 x 64 prompt embeddings, 32-dim pooled) so tests stay fast.
"""

from __future__ import annotations

import numpy as np
import torch

from . import schema
from .identity import CacheIdentity
from .manifest import Manifest, ShardRecord, write_identity
from .reader import write_empty_prompt
from .store import Store
from .writer import ShardWriter


def synthetic_identity(
    *,
    channels: int = 4,
    vae_scale_factor: int = 8,
    resolution: int = 64,
    max_length: int = 77,
    prompt_dim: int = 64,
    pooled_dim: int = 32,
    store: str = "mean_std",
    storage: str = "bf16",
    samples_per_shard: int = 4,
    seed: int = 0,
) -> dict:
    return {
        "format_version": schema.FORMAT_VERSION,
        "encoder": {
            "model": "synthetic",
            "revision": None,
            "variant": None,
            "vae": None,
            "vae_fingerprint": "0" * 64,
            "text_encoder_fingerprint": "1" * 64,
            "text_encoder_2_fingerprint": "2" * 64,
        },
        "latent": {
            "channels": channels,
            "scaling_factor": 0.13025,
            "shift_factor": None,
            "vae_scale_factor": vae_scale_factor,
            "store": store,
        },
        "text": {"max_length": max_length, "prompt_dim": prompt_dim, "pooled_dim": pooled_dim},
        "geometry": {"resolution": resolution, "crop": "center", "buckets": None},
        "dtypes": {"storage": storage, "vae": "fp32", "text": "fp32"},
        "source": {"kind": "synthetic", "path": None, "columns": None},
        "samples_per_shard": samples_per_shard,
        "seed": seed,
    }


def synthetic_sample(key: str, identity: dict, generator: torch.Generator, *, captions: int = 1) -> schema.Sample:
    """A random fp32 sample whose shapes follow `identity` (square `resolution` geometry)."""
    lat, text = identity["latent"], identity["text"]
    res, f = identity["geometry"]["resolution"], lat["vae_scale_factor"]
    h = w = res // f
    mean = torch.randn(lat["channels"], h, w, generator=generator)
    std = torch.rand(lat["channels"], h, w, generator=generator) * 0.1 if lat["store"] == "mean_std" else None
    cond = (torch.rand(res, res, 3, generator=generator) * 255).to(torch.uint8).numpy()
    meta = schema.SampleMeta(
        key=key,
        source_id=f"synthetic/{key}.png",
        captions=[f"caption {c} of {key}" for c in range(captions)],
        original_size=(res + 16, res),
        crop_top_left=(8, 0),
        target_size=(res, res),
    )
    return schema.Sample(
        meta=meta,
        latent_mean=mean,
        latent_std=std,
        prompt_embeds=torch.randn(captions, text["max_length"], text["prompt_dim"], generator=generator),
        pooled_prompt_embeds=torch.randn(captions, text["pooled_dim"], generator=generator),
        cond_png=schema.encode_png(np.ascontiguousarray(cond)),
    )


def write_synthetic_cache(
    store: Store,
    shards: int = 2,
    samples_per_shard: int = 3,
    *,
    seed: int = 0,
    skip_every: int = 0,
    created: str = "2000-01-01T00:00:00Z",
    **identity_kwargs,
) -> Manifest:
    """A complete cache (identity, empty prompt, shards, records, manifest) of random samples.

    `skip_every=k` marks every k-th planned item as skipped ("synthetic_skip") instead of writing
    it, so records and totals carry skip counts as a real run's do.
    """
    identity = synthetic_identity(samples_per_shard=samples_per_shard, seed=seed, **identity_kwargs)
    write_identity(store, CacheIdentity.from_dict(identity))
    g = torch.Generator().manual_seed(seed)
    text = identity["text"]
    dtype = identity["dtypes"]["storage"]
    write_empty_prompt(
        store,
        torch.randn(1, text["max_length"], text["prompt_dim"], generator=g),
        torch.randn(1, text["pooled_dim"], generator=g),
        dtype,
    )
    records: list[ShardRecord] = []
    for index in range(shards):
        skipped: dict[str, int] = {}
        items: list[dict] = []
        with ShardWriter(store, index, storage_dtype=dtype) as writer:
            for pos in range(samples_per_shard):
                key = schema.sample_key(index, pos)
                if skip_every and (index * samples_per_shard + pos) % skip_every == skip_every - 1:
                    skipped["synthetic_skip"] = skipped.get("synthetic_skip", 0) + 1
                    items.append({"source_id": f"synthetic/{key}.png", "reason": "synthetic_skip", "detail": "test"})
                    continue
                writer.write(synthetic_sample(key, identity, g, captions=1 + pos % 2))
            records.append(writer.commit(skipped, items))
    manifest = Manifest.build(CacheIdentity.from_dict(identity), records, {"synthetic": True}, code_version="test", created=created)
    manifest.save(store)
    return manifest
