"""train.data with views and buckets: one view per image per epoch chosen from keys alone, batches of
one shape, equal steps on every rank, the partial-batch policy (all but one completed with
repeats: less than a global batch dropped), bitwise resume, and soft thresholds.

Caches are written with the real shards writer (view keys from shards.views, per-sample latent
shapes in the records) and read with the real reader; tensors are tiny.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from streams import cache_loader, cache_stream, epoch_plan_of, stats_of

import train.step  # noqa: F401  (imported once here so forked loader workers inherit it)
from shards import schema
from shards.identity import CacheIdentity
from shards.manifest import Manifest, ShardRecord
from shards.reader import iter_shard, write_empty_prompt
from shards.stores import open_store
from shards.synthetic import synthetic_identity
from shards.views import count_sources, group_views, split_view_key, view_key
from shards.writer import ShardWriter
from train.augment import (
    binarize,
    prepare_cond,
    soft_threshold,
    soft_threshold_range_for,
    threshold_level,
)
from train.plan import view_choice

FACTOR = 8
DIM, POOLED = 8, 4
SQUARE, WIDE, RARE = (2, 2), (2, 3), (3, 1)
SIZES = [5, 6, 4, 7, 5, 3]  # images per shard: 30 images, 74 samples (views)


def _views_of(shard: int, pos: int) -> int:
    return 1 + (shard + 2 * pos) % 4  # 1 to 4 views per image


def _shape_of(shard: int, pos: int) -> tuple[int, int]:
    if (shard, pos) in ((0, 1), (3, 2)):
        return RARE  # two images in a bucket smaller than any batch
    return WIDE if (shard + pos) % 3 == 0 else SQUARE


def _sample(key: str, hw: tuple[int, int], seed: int) -> schema.Sample:
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    cond = torch.randint(0, 256, (h * FACTOR, w * FACTOR, 3), generator=g, dtype=torch.uint8).numpy()
    meta = schema.SampleMeta(key=key, source_id=f"img/{split_view_key(key)[0]}.png", captions=[f"caption of {key}"],
                             original_size=(100, 200), crop_top_left=(0, seed % 7), target_size=(h * FACTOR, w * FACTOR),
                             extra={"view": {"index": split_view_key(key)[1]}})
    return schema.Sample(meta=meta, latent_mean=torch.randn(4, h, w, generator=g),
                         latent_std=torch.rand(4, h, w, generator=g) + 0.1,
                         prompt_embeds=torch.randn(1, 77, DIM, generator=g),
                         pooled_prompt_embeds=torch.randn(1, POOLED, generator=g), cond_png=schema.encode_png(cond))


def _write_cache(root: Path, sizes: list[int]) -> list[ShardRecord]:
    store = open_store(root)
    records = []
    for i, n in enumerate(sizes):
        with ShardWriter(store, i, record_latent_shapes=True) as writer:
            for pos in range(n):
                for v in range(_views_of(i, pos)):
                    writer.write(_sample(view_key(i, pos, v), _shape_of(i, pos), 1000 * i + 10 * pos + v))
            records.append(writer.commit({}, []))
    g = torch.Generator().manual_seed(7)
    write_empty_prompt(store, torch.randn(1, 77, DIM, generator=g), torch.randn(1, POOLED, generator=g), "bf16")
    return records


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("views-cache")
    records = _write_cache(root, SIZES)
    return root, records


def _identity(**kw) -> dict:
    """The synthetic identity of this cache: its widths, and its three buckets as geometry."""
    identity = synthetic_identity(prompt_dim=DIM, pooled_dim=POOLED, **kw)
    identity["geometry"] = {**identity["geometry"], "resolution": 16,
                            "buckets": [[FACTOR * h, FACTOR * w] for h, w in (SQUARE, WIDE, RARE)]}
    return identity


def _images(records) -> dict[str, int]:
    """image (base key) -> number of views, from the records."""
    out = {}
    for r in records:
        for g in group_views(r.keys):
            out[split_view_key(r.keys[g[0]])[0]] = len(g)
    return out


def _same_batches(a, b) -> None:
    assert [x.keys for x in a] == [y.keys for y in b]
    for x, y in zip(a, b):
        for name in ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids", "cond_u8"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert (x.cond_levels is None) == (y.cond_levels is None)
        assert x.cond_levels is None or torch.equal(x.cond_levels, y.cond_levels)


def test_records_hold_view_keys_and_latent_shapes(cache):
    _, records = cache
    r = records[0]
    assert r.keys[:4] == ["000000-000000", "000000-000001", "000000-000001-v1", "000000-000001-v2"]
    assert r.latent_shapes[:4] == [list(WIDE), list(RARE), list(RARE), list(RARE)]
    views = sum(_views_of(i, p) for i, n in enumerate(SIZES) for p in range(n))
    assert sum(count_sources(r.keys) for r in records) == 30 and sum(r.samples for r in records) == views == 74
    m = Manifest.build(CacheIdentity.from_dict(synthetic_identity()), records, {}, code_version="test", created="")
    assert m.totals["sources"] == 30
    assert m.totals["buckets"] == {"16x16": sum(1 for r in records for s in r.latent_shapes if tuple(s) == SQUARE),
                                   "16x24": sum(1 for r in records for s in r.latent_shapes if tuple(s) == WIDE),
                                   "24x8": sum(1 for r in records for s in r.latent_shapes if tuple(s) == RARE)}


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 1)])
def test_the_plan_takes_one_view_per_image_and_rotates_them(cache, world_size, num_workers):
    _, records = cache
    images = _images(records)
    seen: dict[str, list[int]] = {b: [] for b in images}
    for epoch in range(4):
        keys = [k for sl in epoch_plan_of(records, batch_size=1, seed=3, epoch=epoch, world_size=world_size,
                                          num_workers=num_workers).read_order for k in sl.keys]
        bases = [split_view_key(k) for k in keys]
        assert sorted(b for b, _ in bases) == sorted(images)  # every image exactly once
        for b, v in bases:
            assert v == view_choice(seed=3, key=b, epoch=epoch, num_views=images[b])
            seen[b].append(v)
    # Over 4 epochs an image with n views (n in 1, 2, 4) used each view 4 / n times.
    for b, used in seen.items():
        n = images[b]
        if 4 % n == 0:
            assert sorted(used) == sorted(list(range(n)) * (4 // n)), (b, used)
    # The choice depends on the seed; about half the 2-view images show view 1 in a given epoch.
    two = [b for b, n in images.items() if n == 2]
    assert [view_choice(seed=3, key=b, epoch=0, num_views=2) for b in two] != \
           [view_choice(seed=4, key=b, epoch=0, num_views=2) for b in two]


def test_batches_have_one_shape_ranks_take_equal_steps_and_resume_is_bitwise(cache):
    root, records = cache
    store = open_store(root)
    shapes = {k: tuple(s) for r in records for k, s in zip(r.keys, r.latent_shapes)}
    for epoch in (0, 1):
        per_rank = []
        kw = dict(batch_size=2, seed=5, epoch=epoch, world_size=2, num_workers=2, shuffle_buffer=3)
        for rank in range(2):
            ds = cache_stream(store, records, rank=rank, **kw)
            full = list(ds)
            assert len(full) == ds.steps_per_epoch
            for b in full:
                assert len({shapes[k] for k in b.keys}) == 1
                assert tuple(b.latent_mean.shape[2:]) == shapes[b.keys[0]]
                assert tuple(b.cond.shape[2:]) == tuple(FACTOR * v for v in shapes[b.keys[0]])
            for start in range(len(full) + 1):
                _same_batches(list(cache_stream(store, records, rank=rank, start_batch=start, **kw)), full[start:])
            per_rank.append(full)
        assert len(per_rank[0]) == len(per_rank[1])  # equal steps on every rank
        keys = [split_view_key(k)[0] for full in per_rank for b in full for k in b.keys]
        assert len(keys) == len(set(keys))  # no image twice in an epoch, across ranks


def _shape_counts(records, **kw) -> dict:
    shapes = {k: tuple(s) for r in records for k, s in zip(r.keys, r.latent_shapes)}
    counts: dict = {}
    for sl in epoch_plan_of(records, **kw).read_order:
        for k in sl.keys:
            counts[shapes[k]] = counts.get(shapes[k], 0) + 1
    return counts


def test_partial_batches_but_the_smallest_are_completed_with_counted_repeats(cache):
    """18 square, 10 wide and 2 rare images in epoch 0. At batch 3 the partial batches are the
    2 rare images and 1 wide one: the wide one (fewest samples) is dropped, the rare one is
    completed by repeating one of its own 2 images (no other rare image to take)."""
    root, records = cache
    store = open_store(root)
    shapes = {k: tuple(s) for r in records for k, s in zip(r.keys, r.latent_shapes)}
    assert _shape_counts(records, batch_size=3, seed=0, epoch=0) == {SQUARE: 18, WIDE: 10, RARE: 2}
    stats = stats_of(records, batch_size=3, world_size=1, num_workers=0, seed=0, epoch=0)
    assert (stats.steps, stats.samples, stats.samples_used, stats.samples_in_partial_batches,
            stats.samples_repeated, stats.samples_cut_for_equal_steps, stats.samples_dropped) == (10, 30, 30, 1, 1, 0, 1)
    assert stats.describe() == (
        "epoch 0: 10 batches of 3 per rank x 1 rank(s) from 30 samples in 6 shards (1 stream(s) per rank): 30 used "
        "(1 of them repeats completing a latent shape's last batch), 1 dropped this epoch (3.3%: 1 in partial "
        "batches, 0 cut so every rank takes the same steps)")
    batches = list(cache_stream(store, records, batch_size=3, seed=0, epoch=0, shuffle_buffer=0))
    used = [k for b in batches for k in b.keys]
    assert len(batches) == 10 and len(used) == 30 and len(set(used)) == 29  # one sample twice
    assert [shapes[k] for k in set(used) if used.count(k) == 2] == [RARE]
    assert sum(shapes[k] == WIDE for k in set(used)) == 9  # the one dropped
    (rare,) = [b for b in batches if shapes[b.keys[0]] == RARE]
    twice = [i for i, k in enumerate(rare.keys) if rare.keys.count(k) == 2]
    assert len(set(rare.keys)) == 2 and len(twice) == 2  # the same sample, decoded the same
    assert torch.equal(rare.latent_mean[twice[0]], rare.latent_mean[twice[1]])
    assert torch.equal(rare.cond_u8[twice[0]], rare.cond_u8[twice[1]])
    # Batch 4: 2 left over in each shape; the rare one (last in shape order) is dropped, the other
    # two completed with 2 repeats each, from their own shape.
    four = stats_of(records, batch_size=4, world_size=1, num_workers=0, seed=0, epoch=0)
    assert (four.steps, four.samples_in_partial_batches, four.samples_repeated, four.samples_dropped) == (8, 2, 4, 2)
    batches = list(cache_stream(store, records, batch_size=4, seed=0, epoch=0, shuffle_buffer=0))
    used = [k for b in batches for k in b.keys]
    assert len(used) - len(set(used)) == 4 and not any(shapes[k] == RARE for k in used)
    for b in batches:
        assert len({shapes[k] for k in b.keys}) == 1


def test_a_bucketed_epoch_drops_less_than_one_global_batch(cache):
    """Three latent shapes: the old rule (each shape's leftover dropped, plus the equal-steps cut)
    could lose more than a global batch; now one partial batch and fewer than world_size cut
    batches at most, on every topology, with the repeats counted."""
    root, records = cache
    store = open_store(root)
    exceeded_before = 0
    for epoch in (0, 1):
        counts = _shape_counts(records, batch_size=1, seed=0, epoch=epoch)
        for b in range(1, 9):
            for world in range(1, 5):
                for workers in (0, 1, 3):
                    try:
                        s = stats_of(records, batch_size=b, world_size=world, num_workers=workers, seed=0, epoch=epoch)
                    except ValueError:  # fewer batches than ranks, even with the completed ones
                        partial = sum(1 for n in counts.values() if n % b)
                        assert sum(n // b for n in counts.values()) + max(0, partial - 1) < world
                        continue
                    assert 0 <= s.samples_dropped < b * world, (epoch, b, world, workers)
                    assert s.samples_in_partial_batches < b and s.samples_cut_for_equal_steps <= (world - 1) * b
                    assert s.samples + s.samples_repeated == s.samples_used + s.samples_dropped
                    old = sum(n % b for n in counts.values()) + (sum(n // b for n in counts.values()) % world) * b
                    exceeded_before += old >= b * world
    assert exceeded_before > 0  # the bound is new for bucketed caches
    # Read for real, 2 ranks x 2 workers: the batches hold exactly the planned repeats, every
    # image not dropped is used, and every rank resumes bitwise from any batch.
    kw = dict(batch_size=4, seed=5, epoch=0, world_size=2, num_workers=2, shuffle_buffer=3)
    stats = stats_of(records, **kw)
    assert stats.samples_repeated > 0 and stats.samples_dropped < 4 * 2
    keys = []
    for rank in range(2):
        full = list(cache_stream(store, records, rank=rank, **kw))
        assert len(full) == stats.steps
        keys += [k for b in full for k in b.keys]
        for start in range(len(full) + 1):
            _same_batches(list(cache_stream(store, records, rank=rank, start_batch=start, **kw)), full[start:])
    assert len(keys) == stats.samples_used and len(keys) - len(set(keys)) == stats.samples_repeated
    assert len(set(keys)) == stats.samples - stats.samples_dropped


def test_max_samples_counts_images(cache):
    _, records = cache
    plan = epoch_plan_of(records, batch_size=1, seed=0, epoch=2, max_samples=8)
    keys = [k for sl in plan.read_order for k in sl.keys]
    assert len(keys) == 8
    assert sorted(split_view_key(k)[0] for k in keys) == [schema.sample_key(0, p) for p in range(5)] + \
        [schema.sample_key(1, p) for p in range(3)]


def test_soft_conditions_are_thresholded_per_sample_and_epoch(cache, tmp_path):
    root, records = cache
    store = open_store(root)
    truth = {s.key: s.cond_image() for r in records for s in iter_shard(store, r)}
    kw = dict(batch_size=2, seed=5, world_size=1, num_workers=0, shuffle_buffer=0)
    thresholds: dict[str, set[float]] = {}
    for epoch in (0, 1):
        batches = list(cache_stream(store, records, epoch=epoch, soft_threshold=(0.3, 0.8), **kw))
        for b in batches:
            # Shipped raw (uint8) with one threshold level per sample; binarised by prepare_cond.
            assert b.cond_u8.dtype == b.cond_levels.dtype == torch.uint8 and b.cond_levels.shape == (len(b),)
            assert set(b.cond.unique().tolist()) <= {0.0, 1.0}
            assert torch.equal(b.to("cpu").cond, b.cond)
            for i, k in enumerate(b.keys):
                t = soft_threshold(seed=5, epoch=epoch, key=k, low=0.3, high=0.8)
                assert int(b.cond_levels[i]) == threshold_level(t)
                assert torch.equal(b.cond_u8[i], torch.from_numpy(np.array(truth[k])).permute(2, 0, 1))
                raw = torch.from_numpy(np.array(truth[k])).permute(2, 0, 1).float() / 255.0
                assert torch.equal(b.cond[i], binarize(raw, t))
                thresholds.setdefault(split_view_key(k)[0], set()).add(t)
        # resume reproduces the thresholds
        _same_batches(list(cache_stream(store, records, epoch=epoch, start_batch=3, soft_threshold=(0.3, 0.8), **kw)),
                      batches[3:])
    # An image drawn in both epochs got two thresholds.
    assert any(len(ts) == 2 for ts in thresholds.values())
    # The range comes from a manifest that says its conditions are soft (resolved once, at start-up).
    identity = {**_identity(), "condition": {"method": "sketch", "soft": True}}
    manifest = Manifest.build(CacheIdentity.from_dict(identity), records, {}, code_version="test", created="")
    loader, _ = cache_loader(store, manifest, epoch=0, soft_threshold=soft_threshold_range_for(manifest.identity.condition, None),
                             **kw)
    auto = list(loader)
    _same_batches(auto, list(cache_stream(store, records, epoch=0, soft_threshold=(0.3, 0.8), **kw)))
    plain = Manifest.build(CacheIdentity.from_dict(_identity()), records, {}, code_version="test",
                           created="")
    assert soft_threshold_range_for(plain.identity.condition, None) is None
    assert not set(next(iter(cache_loader(store, plain, epoch=0, **kw)[0])).cond.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="does not store soft"):
        soft_threshold_range_for(plain.identity.condition, (0.3, 0.8))
    with pytest.raises(ValueError, match="low <= high"):
        cache_stream(store, records, epoch=0, soft_threshold=(0.9, 0.1), **kw)


def test_prepare_cond_binarises_the_8_bit_image_exactly():
    values = torch.arange(256, dtype=torch.uint8)
    img = values.view(1, 1, 16, 16).expand(2, 3, 16, 16).contiguous()  # every 8-bit value, 3 channels
    assert [threshold_level(v / 255) for v in range(256)] == list(range(256))  # t = v / 255 keeps v
    for t in [0.3, 0.8, *np.random.default_rng(0).random(300)]:
        level = threshold_level(t)
        # The smallest 8-bit value v with v / 255 >= t, in exact arithmetic (float64 t * 255 rounds
        # 0.8 * 255, a hair above 204, to 204: the level the decimal 0.8 means).
        assert level == next(v for v in range(256) if Fraction(v, 255) >= Fraction(t)) - (t == 0.8)
        out = prepare_cond(img, torch.tensor([level, 255 - level], dtype=torch.uint8))
        assert out.dtype == torch.float32
        # The same bits as binarising the float image at t, with no float image.
        assert torch.equal(out[0], binarize(img[0].float() / 255, t))
        assert int(out[0].sum()) == 3 * (256 - level) and int(out[1].sum()) == 3 * (1 + level)
    assert torch.equal(prepare_cond(values.view(1, 1, 16, 16), None), (values.float() / 255).view(1, 1, 16, 16))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            threshold_level(bad)
    with pytest.raises(ValueError, match="uint8 conditioning images"):
        prepare_cond(values.float().view(1, 1, 16, 16), None)
    with pytest.raises(ValueError, match=r"\(2,\) uint8 threshold levels"):
        prepare_cond(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))


def test_loader_workers_read_views_like_the_in_process_stream(cache):
    root, records = cache
    store = open_store(root)
    kw = dict(batch_size=2, seed=1, epoch=1, world_size=1, num_workers=2, shuffle_buffer=4)
    loader, steps = cache_loader(store, records, start_batch=1, **kw)
    got = list(loader)
    assert len(got) == steps - 1
    _same_batches(got, list(cache_stream(store, records, **kw))[1:])
    assert np.all([len(b.keys) == 2 for b in got])


def test_verify_checks_that_a_view_key_and_its_json_agree():
    from shards.verify import sample_problems

    identity = {**synthetic_identity(prompt_dim=DIM, pooled_dim=POOLED, resolution=16), "condition": None}
    identity["geometry"]["buckets"] = [[16, 16]]
    manifest = Manifest.build(CacheIdentity.from_dict(identity), [], {}, code_version="test", created="")

    def stored(key: str, extra: dict) -> schema.Sample:  # as read back from a shard: bf16 tensors
        sample = _sample(key, SQUARE, 0)
        sample.meta.extra = extra
        return schema.decode_sample(key, schema.encode_sample(sample))

    assert sample_problems(stored(view_key(0, 1, 1), {}), manifest, 0) == ["the key names view 1, its json says view 0"]
    assert sample_problems(stored(view_key(0, 1, 1), {"view": {"index": 1, "crop": 0, "flip": True}}), manifest, 0) == []
    assert sample_problems(stored(view_key(0, 1, 0), {}), manifest, 0) == []
