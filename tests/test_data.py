"""train.plan and train.data: the epoch plan, equal steps per rank, exact resume, per-sample randomness, errors.

Caches here are written with the real shards writer and read with the real reader: tiny tensors
(latent 4x2x2, prompt width 8), 16x16 conditioning PNGs, shards of uneven sizes (one empty).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import tarfile
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from streams import cache_loader, cache_stream, epoch_plan_of, identity_of, stats_of

import train.data
import train.step  # noqa: F401  (imported once here so forked loader workers inherit it)
from shards import schema
from shards.errors import ShardError
from shards.identity import CacheIdentity
from shards.manifest import Manifest, ShardRecord, identity_diff
from shards.reader import iter_shard, load_empty_prompt, write_empty_prompt
from shards.stores import open_store
from shards.synthetic import synthetic_identity
from shards.writer import ShardWriter
from train.augment import soft_threshold, soft_threshold_range_for
from train.data import HostBatch, stream_resume_problems
from train.plan import Draw, data_summary, key_rng, sample_choice

FACTOR = 8  # VAE scale factor of the fake latents
DIM, POOLED = 8, 4
SIZES = [5, 3, 7, 4, 6, 2, 0, 5]  # samples per shard: uneven, one empty shard; 32 in all


def _sample(shard: int, pos: int, hw: tuple[int, int] = (2, 2)) -> schema.Sample:
    key = schema.sample_key(shard, pos)
    g = torch.Generator().manual_seed(1000 * shard + pos)
    k = 1 + (shard + pos) % 3  # 1 to 3 captions
    h, w = hw
    cond = torch.randint(0, 256, (h * FACTOR, w * FACTOR, 3), generator=g, dtype=torch.uint8).numpy()
    meta = schema.SampleMeta(
        key=key, source_id=f"img/{key}.png", captions=[f"caption {c} of {key}" for c in range(k)],
        original_size=(100 + pos, 400 + shard), crop_top_left=(0, pos + shard), target_size=(h * FACTOR, w * FACTOR),
    )
    return schema.Sample(
        meta=meta,
        latent_mean=torch.randn(4, h, w, generator=g),
        latent_std=torch.rand(4, h, w, generator=g) + 0.1,
        prompt_embeds=torch.randn(k, 77, DIM, generator=g),
        pooled_prompt_embeds=torch.randn(k, POOLED, generator=g),
        cond_png=schema.encode_png(cond),
    )


def _write_cache(root: Path, sizes: list[int], shape_of=lambda shard, pos: (2, 2), *,
                 record_latent_shapes: bool = False) -> list[ShardRecord]:
    store = open_store(root)
    records = []
    for i, n in enumerate(sizes):
        with ShardWriter(store, i, record_latent_shapes=record_latent_shapes) as writer:
            for pos in range(n):
                writer.write(_sample(i, pos, shape_of(i, pos)))
            records.append(writer.commit({}, []))
    g = torch.Generator().manual_seed(7)
    write_empty_prompt(store, torch.randn(1, 77, DIM, generator=g), torch.randn(1, POOLED, generator=g), "bf16")
    return records


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    records = _write_cache(root, SIZES)
    store = open_store(root)
    truth = {s.key: s for rec in records for s in iter_shard(store, rec)}
    return root, records, truth


def _all(stream) -> list:
    return list(stream)


def _keys(batches) -> list[list[str]]:
    return [b.keys for b in batches]


def _same_batches(a, b) -> None:
    assert _keys(a) == _keys(b)
    for x, y in zip(a, b):
        for name in ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids", "cond_u8"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert (x.cond_levels is None) == (y.cond_levels is None)
        assert x.cond_levels is None or torch.equal(x.cond_levels, y.cond_levels)


# --------------------------------------------------------------------------------------------
# The plan


def _stream_keys(records, *, rank, role, **kw) -> list[list[str]]:
    """Keys of each batch stream (rank, role) hands out, from the plan alone."""
    sp = epoch_plan_of(records, **kw).stream(rank, role)
    keys = [k for sl in sp.slices for k in sl.keys]
    return [[keys[j] for j in batch] for batch in sp.batches]


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 0), (2, 2), (1, 3), (3, 2), (2, 4)])
def test_plan_takes_every_sample_at_most_once_and_is_reproducible(cache, world_size, num_workers):
    _, records, _ = cache
    roles = max(1, num_workers)
    kw = dict(batch_size=2, seed=3, world_size=world_size, num_workers=num_workers, shuffle_buffer=4)

    def plan(epoch):
        return [_stream_keys(records, rank=r, role=w, epoch=epoch, **kw) for r in range(world_size) for w in range(roles)]

    p0 = plan(0)
    taken = [k for stream in p0 for batch in stream for k in batch]
    stats = stats_of(records, epoch=0, **kw)
    assert len(taken) == len(set(taken)) == stats.samples_used == stats.steps * 2 * world_size
    assert set(taken) <= {k for r in records for k in r.keys}
    # Every rank takes the same number of batches: role w of a rank holds its positions = w mod W.
    for r in range(world_size):
        assert sum(len(p0[r * roles + w]) for w in range(roles)) == stats.steps
    assert plan(0) == p0
    assert any(plan(e) != p0 for e in (1, 2, 3))


def test_shard_order_changes_with_epoch_and_seed(cache):
    _, records, _ = cache
    order = lambda seed, epoch: [sl.name for sl in epoch_plan_of(records, batch_size=1, seed=seed, epoch=epoch).read_order]
    orders = {tuple(order(0, e)) for e in range(4)}
    assert len(orders) == 4
    assert order(0, 0) == order(0, 0) and order(0, 0) != order(1, 0)


def test_step_count_and_what_an_epoch_drops(cache):
    _, records, _ = cache  # 32 samples in 7 non-empty shards of uneven sizes
    # 32 samples make 16 batches of 2: 8 per rank, nothing dropped, whatever the shard sizes.
    for epoch in range(3):
        stats = stats_of(records, batch_size=2, world_size=2, num_workers=0, seed=0, epoch=epoch)
        assert (stats.steps, stats.samples, stats.samples_used, stats.samples_dropped) == (8, 32, 32, 0)
    # Batches of 3 on 3 ranks: 10 batches (2 samples left over), 3 steps each, the 10th batch cut.
    stats = stats_of(records, batch_size=3, world_size=3, num_workers=2, seed=0, epoch=0)
    assert (stats.steps, stats.samples_used, stats.samples_in_partial_batches, stats.samples_cut_for_equal_steps) == (
        3, 27, 2, 3)
    assert stats.describe() == (
        "epoch 0: 3 batches of 3 per rank x 3 rank(s) from 32 samples in 7 shards (2 stream(s) per rank): "
        "27 used, 5 dropped this epoch (15.6%: 2 in partial batches, 3 cut so every rank takes the same steps)"
    )
    assert json.loads(json.dumps(stats.to_dict())) == {
        "epoch": 0, "steps": 3, "batch_size": 3, "world_size": 3, "num_workers": 2, "shards": 7, "samples": 32,
        "samples_in_partial_batches": 2, "samples_repeated": 0, "samples_used": 27, "samples_dropped": 5,
        "samples_cut_for_equal_steps": 3,
    }
    # A run's totals for train_config.json and the model card.
    three = [stats_of(records, batch_size=3, world_size=3, num_workers=2, seed=0, epoch=e) for e in range(3)]
    assert data_summary(three) == {
        "epochs_planned": 3, "samples_per_epoch": 32, "samples_dropped": 15, "samples_dropped_in_partial_batches": 6,
        "samples_dropped_for_equal_steps": 9, "samples_dropped_fraction": 0.15625, "samples_repeated": 0,
    }
    whole = stats_of(records, batch_size=2, world_size=1, num_workers=0, seed=0, epoch=0, max_samples=12)
    assert whole.samples_dropped == 0 and whole.describe().endswith("12 used, 0 dropped this epoch")
    # One-shape caches never drop a whole global batch (batch_size x world_size samples) in an epoch.
    for b in range(1, 9):
        for world in range(1, 5):
            for workers in (0, 1, 3):
                try:
                    s = stats_of(records, batch_size=b, world_size=world, num_workers=workers, seed=0, epoch=0)
                except ValueError:
                    assert 32 // b < world  # fewer complete batches than ranks
                    continue
                assert 0 <= s.samples_dropped < b * world, (b, world, workers)


def test_few_or_uneven_shards_train_on_any_topology(cache, tmp_path):
    root, records, _ = cache
    # 7 shards, 2 ranks x 4 loader workers = 8 streams: every stream still gets batches.
    store = open_store(root)
    seen = []
    for rank in range(2):
        ds = cache_stream(store, records, batch_size=1, seed=0, epoch=0, world_size=2, rank=rank, num_workers=4)
        assert len(ds) == 16
        seen += [k for b in ds for k in b.keys]
    assert sorted(seen) == sorted(k for r in records for k in r.keys)
    # 8 + 2 samples: one global batch of 4 at most is dropped, not the small shard's share of streams.
    small = _write_cache(tmp_path / "uneven", [8, 2])
    s = stats_of(small, batch_size=2, world_size=1, num_workers=2, seed=0, epoch=0)
    assert (s.steps, s.samples_dropped) == (5, 0)
    s = stats_of(small, batch_size=3, world_size=2, num_workers=2, seed=0, epoch=0)
    assert (s.steps, s.samples_used, s.samples_dropped) == (1, 6, 4) and s.samples_dropped < 3 * 2
    # A single 14-sample shard on 2 ranks x 2 workers: 7 batches of 2, 3 per rank, one batch cut.
    single = _write_cache(tmp_path / "single", [14])
    s = stats_of(single, batch_size=2, world_size=2, num_workers=2, seed=0, epoch=0)
    assert (s.steps, s.samples_used, s.samples_cut_for_equal_steps, s.samples_in_partial_batches) == (3, 12, 2, 0)
    with pytest.raises(ValueError, match=r"not one full batch per rank in epoch 0: 32 sample\(s\) make 1 batch\(es\) of 20 "
                                         r"for 2 rank\(s\)"):
        stats_of(records, batch_size=20, world_size=2, num_workers=0, seed=0, epoch=0)
    # What shrank the epoch is named, with its own way out.
    with pytest.raises(ValueError) as err:
        stats_of(records, batch_size=10, world_size=2, num_workers=0, seed=0, epoch=0, validation_split=0.5)
    message = str(err.value)
    assert "(after --validation-split 0.5 held out 16 image(s))" in message, message
    assert "a smaller --validation-split (or --validation-cache)" in message
    with pytest.raises(ValueError, match=r"4 sample\(s\) \(--max-samples 4\) make 0 batch\(es\) of 8 .*a larger "
                                         r"--max-samples, or more data"):
        stats_of(records, batch_size=8, world_size=1, num_workers=0, seed=0, epoch=0, max_samples=4)


def test_invalid_settings_list_every_problem(cache):
    root, records, _ = cache
    with pytest.raises(ValueError) as e:  # the settings: every problem at once
        cache_stream(open_store(root), records, batch_size=0, seed=-1, epoch=0, world_size=2, caption_dropout=1.5)
    msg = str(e.value)
    assert "batch_size" in msg and "seed" in msg and "caption_dropout" in msg
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, world_size=2\), got 2"):
        cache_stream(open_store(root), records, batch_size=1, seed=0, epoch=0, world_size=2, rank=2)
    with pytest.raises(ValueError, match="past the end of epoch 0, which has 8 batches"):
        cache_stream(open_store(root), records, batch_size=2, seed=0, epoch=0, world_size=2, rank=0, start_batch=9)


# --------------------------------------------------------------------------------------------
# Streams: equal steps, disjoint samples, contents


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_take_equal_steps_on_disjoint_samples(cache, num_workers):
    root, records, truth = cache
    store = open_store(root)
    seen = []
    for rank in range(2):
        ds = cache_stream(store, records, batch_size=2, seed=5, epoch=1, world_size=2, rank=rank,
                         num_workers=num_workers, shuffle_buffer=4)
        batches = _all(ds)  # in-process: reproduces DataLoader's round-robin itself
        assert len(batches) == len(ds) == ds.steps_per_epoch == ds.stats.steps
        assert all(len(b.keys) == 2 for b in batches)
        seen.append([k for b in batches for k in b.keys])
    assert len(seen[0]) == len(seen[1])
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0] + seen[1])) == len(seen[0]) + len(seen[1]) == ds.stats.samples_used


def test_batch_contents_match_the_shards(cache):
    root, records, truth = cache
    batches = _all(cache_stream(open_store(root), records, batch_size=3, seed=1, epoch=0, shuffle_buffer=5))
    assert len(batches) == 32 // 3
    for b in batches:
        assert isinstance(b, HostBatch) and len(b) == 3
        assert b.latent_mean.shape == b.latent_std.shape == (3, 4, 2, 2)
        assert b.prompt_embeds.shape == (3, 77, DIM) and b.pooled_prompt_embeds.shape == (3, POOLED)
        # The wire format: uint8 conditioning images, a quarter of fp32's bytes; no levels (not soft).
        assert b.cond_u8.shape == (3, 3, 16, 16) and b.cond_u8.dtype == torch.uint8 and b.cond_levels is None
        assert b.cond.shape == (3, 3, 16, 16) and b.cond.dtype == torch.float32
        assert b.cond_u8.nbytes * 4 == b.cond.nbytes
        assert b.add_time_ids.dtype == torch.float32
        # .to(device) is the one way to the step's Batch: same tensors, the float image built there.
        moved = b.to("cpu")
        assert isinstance(moved, train.step.Batch) and moved.keys == b.keys
        assert moved.cond.dtype == torch.float32 and torch.equal(moved.cond, b.cond_u8.float() / 255)
        for name in ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids"):
            assert torch.equal(getattr(moved, name), getattr(b, name)), name
        assert b.to("cpu", torch.float16).cond.dtype == torch.float16
        for i, key in enumerate(b.keys):
            s = truth[key]
            c, dropped = sample_choice(seed=1, epoch=0, key=key, num_captions=s.prompt_embeds.shape[0], caption_dropout=0.0)
            assert not dropped
            assert torch.equal(b.latent_mean[i], s.latent_mean) and torch.equal(b.latent_std[i], s.latent_std)
            assert torch.equal(b.prompt_embeds[i], s.prompt_embeds[c])
            assert torch.equal(b.pooled_prompt_embeds[i], s.pooled_prompt_embeds[c])
            assert b.add_time_ids[i].tolist() == [float(v) for v in s.meta.add_time_ids]
            assert torch.equal(b.cond_u8[i], torch.from_numpy(s.cond_image().copy()).permute(2, 0, 1))
            expected = torch.from_numpy(s.cond_image().copy()).permute(2, 0, 1).float() / 255
            assert torch.equal(b.cond[i], expected)
            assert 0.0 <= b.cond[i].min() and b.cond[i].max() <= 1.0


def test_shuffle_buffer_mixes_and_zero_keeps_shard_order(cache):
    root, records, _ = cache
    store = open_store(root)
    flat = lambda buf: [k for b in cache_stream(store, records, batch_size=1, seed=0, epoch=0, shuffle_buffer=buf) for k in b.keys]
    plain = flat(0)
    plan = epoch_plan_of(records, batch_size=1, seed=0, epoch=0)
    assert plain == [k for sl in plan.read_order for k in sl.keys]
    mixed = flat(8)
    assert sorted(mixed) == sorted(plain) and mixed != plain
    assert flat(8) == mixed


def test_max_samples_takes_the_same_first_samples_every_epoch(cache):
    root, records, _ = cache
    store = open_store(root)
    first10 = [k for r in sorted(records, key=lambda r: r.index) for k in r.keys][:10]
    runs = []
    for epoch in (0, 1):
        ds = cache_stream(store, records, batch_size=2, seed=0, epoch=epoch, max_samples=10, shuffle_buffer=4)
        assert ds.stats.samples == 10 and ds.steps_per_epoch == 5
        runs.append([k for b in ds for k in b.keys])
    assert sorted(runs[0]) == sorted(runs[1]) == sorted(first10)
    assert runs[0] != runs[1]


# --------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_resume_yields_exactly_the_tail_in_process(cache, num_workers):
    root, records, _ = cache
    store = open_store(root)
    kw = dict(batch_size=2, seed=11, epoch=2, world_size=2, rank=1, num_workers=num_workers, shuffle_buffer=6)
    if num_workers == 3:  # 2 ranks x 3 workers = 6 streams over 7 shards
        kw["world_size"], kw["rank"] = 2, 0
    full = _all(cache_stream(store, records, **kw))
    assert len(full) >= 3
    for b in range(len(full) + 1):
        tail = _all(cache_stream(store, records, start_batch=b, **kw))
        _same_batches(tail, full[b:])


def test_resume_through_dataloader_with_two_workers(cache):
    root, records, _ = cache
    store = open_store(root)
    kw = dict(batch_size=2, seed=4, epoch=0, world_size=1, rank=0, num_workers=2, shuffle_buffer=4, caption_dropout=0.3)
    emulated = _all(cache_stream(store, records, **kw))
    loader, steps = cache_loader(store, records, **kw)
    full = list(loader)
    assert len(full) == steps == len(loader) == len(emulated)
    _same_batches(full, emulated)
    for b in (1, 4):  # odd and even: worker roles rotate
        loader, _ = cache_loader(store, records, start_batch=b, **kw)
        _same_batches(list(loader), full[b:])


def test_stream_identity_names_what_a_resume_would_change(cache):
    _, records, _ = cache
    kw = dict(batch_size=2, seed=0, world_size=2, num_workers=2, shuffle_buffer=4, max_samples=None, caption_dropout=0.1)
    saved = json.loads(json.dumps(identity_of(records, **kw)))  # as a checkpoint stores it
    assert saved["stream_version"] == 3 and saved["soft_threshold"] is None
    assert identity_diff(saved, identity_of(records, **kw)) == []
    assert stream_resume_problems(saved, identity_of(records, **kw)) == []
    assert identity_diff(saved, identity_of(records, **{**kw, "world_size": 4, "num_workers": 1})) == [
        "num_workers: 2 != 1", "world_size: 2 != 4",
    ]
    # Every setting the stream depends on is in it, and each change is named by its flag.
    changes = {"batch_size": 3, "seed": 1, "world_size": 4, "num_workers": 1, "shuffle_buffer": 8, "max_samples": 20,
               "caption_dropout": 0.2, "soft_threshold": (0.3, 0.8)}
    problems = stream_resume_problems(saved, identity_of(records, **{**kw, **changes}))
    assert problems == [
        "--batch-size: checkpoint 2, now 3",
        "--caption-dropout: checkpoint 0.1, now 0.2",
        "--max-samples: checkpoint (unset), now 20",
        "--num-workers: checkpoint 2, now 1",
        "--seed: checkpoint 0, now 1",
        "--shuffle-buffer: checkpoint 4, now 8",
        "soft threshold range (--soft-threshold-range, or the cache's default): checkpoint (unset), now [0.3, 0.8]",
        "number of processes: checkpoint 2, now 4",
    ]
    changed_cache = stream_resume_problems(saved, identity_of(records[:-1], **kw))
    assert len(changed_cache) == 1 and changed_cache[0].startswith("cache shards (samples or contents changed)")
    assert stream_resume_problems({**saved, "stream_version": 0}, saved) == [
        "data stream version (the code changed how samples are ordered): checkpoint 0, now 3"]
    assert stream_resume_problems(None, saved) == [
        "the checkpoint records no data stream identity (saved by an older version)"]
    # The range is resolved once from the manifest (train start-up does it) and recorded as such.
    soft = Manifest.build(CacheIdentity.from_dict({**synthetic_identity(prompt_dim=DIM, pooled_dim=POOLED),
                                                "condition": {"method": "sketch", "soft": True}}), records, {}, code_version="t", created="")
    default = soft_threshold_range_for(soft.identity.condition, None)
    assert default == (0.3, 0.8)
    assert identity_of(soft, **kw, soft_threshold=default)["soft_threshold"] == [0.3, 0.8]
    assert identity_of(soft, **kw, soft_threshold=(0.4, 0.6))["soft_threshold"] == [0.4, 0.6]
    with pytest.raises(ValueError, match="low <= high"):
        identity_of(records, **kw, soft_threshold=(0.9, 0.1))


class _CountingStore:
    """A store that records which files are opened (everything else passes through)."""

    def __init__(self, store):
        self._store, self.opened = store, []

    def open_read(self, rel):
        self.opened.append(rel)
        return self._store.open_read(rel)

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_resume_skips_whole_shards_and_decodes_only_what_it_yields(cache, monkeypatch):
    root, records, _ = cache
    decoded = []
    real_decode = schema.decode_sample
    monkeypatch.setattr(schema, "decode_sample", lambda key, members: decoded.append(key) or real_decode(key, members))
    kw = dict(batch_size=2, seed=0, epoch=0, shuffle_buffer=0)
    full_store = _CountingStore(open_store(root))
    full = _all(cache_stream(full_store, records, **kw))
    assert len(decoded) == 2 * len(full) == 32
    decoded.clear()
    store = _CountingStore(open_store(root))
    tail = _all(cache_stream(store, records, start_batch=len(full) - 2, **kw))
    assert len(decoded) == 4 and _keys(tail) == _keys(full[-2:])
    last_keys = set(tail[0].keys + tail[1].keys)
    plan = epoch_plan_of(records, batch_size=2, seed=0, epoch=0)
    assert store.opened == [sl.name for sl in plan.read_order if set(sl.keys) & last_keys]
    assert len(store.opened) < len(full_store.opened)


# --------------------------------------------------------------------------------------------
# Per-sample randomness


def test_caption_choice_and_dropout_are_deterministic_at_the_right_rate():
    keys = [schema.sample_key(i // 100, i % 100) for i in range(4000)]
    picks = [sample_choice(seed=0, epoch=0, key=k, num_captions=3, caption_dropout=0.25) for k in keys]
    assert picks == [sample_choice(seed=0, epoch=0, key=k, num_captions=3, caption_dropout=0.25) for k in keys]
    rate = np.mean([d for _, d in picks])
    assert abs(rate - 0.25) < 0.03  # 4000 draws: std 0.007
    counts = np.bincount([c for c, _ in picks], minlength=3) / len(picks)
    assert np.all(np.abs(counts - 1 / 3) < 0.03)
    # The dropout probability never shifts which caption is picked.
    assert [c for c, _ in picks] == [sample_choice(seed=0, epoch=0, key=k, num_captions=3, caption_dropout=0.9)[0] for k in keys]
    # A new epoch or seed draws again.
    other = [sample_choice(seed=0, epoch=1, key=k, num_captions=3, caption_dropout=0.25) for k in keys]
    assert np.mean([a != b for a, b in zip(picks, other)]) > 0.4
    assert all(sample_choice(seed=0, epoch=0, key=k, num_captions=3, caption_dropout=p)[1] == want
               for k in keys[:50] for p, want in ((0.0, False), (1.0, True)))


def test_per_sample_draws_share_one_derivation_with_a_tag_each():
    # The derivation is part of every run's sample sequence (and of resuming old checkpoints): pin it.
    key = schema.sample_key(3, 7)
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    assert [int(t) for t in Draw] == [0, 1, 2, 3, 4]
    for draw in Draw:
        want = np.random.default_rng([5, 2, int(draw), h]).random(4)
        assert np.array_equal(key_rng(seed=5, epoch=2, draw=draw, key=key).random(4), want)
    # Caption choice and soft threshold are draws of that helper under their own tags.
    rng = np.random.default_rng([5, 2, int(Draw.CAPTION), h])
    dropped = rng.random() < 0.5
    assert sample_choice(seed=5, epoch=2, key=key, num_captions=4, caption_dropout=0.5) == (int(rng.integers(4)), dropped)
    u = np.random.default_rng([5, 2, int(Draw.SOFT_THRESHOLD), h]).random()
    assert soft_threshold(seed=5, epoch=2, key=key, low=0.3, high=0.8) == 0.3 + 0.5 * u
    # Different tags: independent draws for the same (seed, epoch, key).
    firsts = {key_rng(seed=5, epoch=2, draw=d, key=key).random() for d in Draw}
    assert len(firsts) == len(Draw)


def test_stream_swaps_in_the_stored_empty_prompt(cache):
    root, records, truth = cache
    store = open_store(root)
    empty, empty_pooled = load_empty_prompt(store)
    runs = {}
    for epoch in (0, 1):
        dropped = {}
        for b in cache_stream(store, records, batch_size=4, seed=9, epoch=epoch, caption_dropout=0.5, shuffle_buffer=3):
            for i, key in enumerate(b.keys):
                s = truth[key]
                c, drop = sample_choice(seed=9, epoch=epoch, key=key, num_captions=s.prompt_embeds.shape[0], caption_dropout=0.5)
                want = (empty[0], empty_pooled[0]) if drop else (s.prompt_embeds[c], s.pooled_prompt_embeds[c])
                assert torch.equal(b.prompt_embeds[i], want[0]) and torch.equal(b.pooled_prompt_embeds[i], want[1])
                dropped[key] = drop
        assert 0 < sum(dropped.values()) < len(dropped)
        runs[epoch] = dropped
    common = runs[0].keys() & runs[1].keys()
    assert any(runs[0][k] != runs[1][k] for k in common)


# --------------------------------------------------------------------------------------------
# Damaged caches


def _copy(cache, tmp_path) -> tuple[Path, str]:
    """A copy of the cache and the name of the first shard rank 0 reads (seed 0, epoch 0)."""
    root, records, _ = cache
    dst = tmp_path / "cache"
    shutil.copytree(root, dst)
    first = epoch_plan_of(records, batch_size=1, seed=0, epoch=0).read_order[0].name
    return dst, first


def test_truncated_shard_is_an_error_naming_it(cache, tmp_path):
    root, first = _copy(cache, tmp_path)
    path = root / first
    with tarfile.open(path) as tar:
        second = tar.getmembers()[3]  # first member of the second sample: cut at a member boundary
    with open(path, "r+b") as f:
        f.truncate(second.offset)
    records = cache[1]
    with pytest.raises(ShardError, match=re.escape(first)):
        _all(cache_stream(open_store(root), records, batch_size=1, seed=0, epoch=0))
    loader, _ = cache_loader(open_store(root), records, batch_size=1, seed=0, epoch=0, num_workers=2)
    with pytest.raises(ShardError, match=re.escape(first)) as failed:
        list(loader)
    # The failed iterator lives on in the error's frames; freed now (as `python -m train` frees
    # them), it shuts its workers down at once. Left to a later garbage collection, which may
    # clear its queues first, each worker's join waited out torch's 5 s timeout in another test.
    traceback.clear_frames(failed.tb)


def test_sha256_mismatch_is_an_error_naming_it(cache, tmp_path):
    root, first = _copy(cache, tmp_path)
    path = root / first
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.size % 512)  # one followed by zero padding
    with open(path, "r+b") as f:
        f.seek(member.offset_data + member.size)  # zero padding: only the sha256 can notice
        f.write(b"\x01")
    with pytest.raises(ShardError, match=re.escape(first) + ".*sha256"):
        _all(cache_stream(open_store(root), cache[1], batch_size=1, seed=0, epoch=0))


def test_an_incomplete_plan_names_its_stream_and_shards(cache, monkeypatch):
    # A reader that ends a shard early without raising (it never should: the real one checks the
    # count) leaves planned batches incomplete; the error says which stream and which shards.
    root, records, _ = cache
    real = train.data.iter_shard_members

    def short(store, record):
        for pos, item in enumerate(real(store, record)):
            if pos < record.samples - 2:
                yield item

    monkeypatch.setattr(train.data, "iter_shard_members", short)
    ds = cache_stream(open_store(root), records, batch_size=2, seed=0, epoch=1, world_size=2, rank=1, num_workers=2,
                     start_batch=1, shuffle_buffer=0)
    plan = epoch_plan_of(records, batch_size=2, seed=0, epoch=1, world_size=2, num_workers=2, shuffle_buffer=0)
    streams = {w: [sl.name for sl in plan.stream(1, w).slices] for w in range(2)}
    with pytest.raises(RuntimeError) as e:
        _all(ds)
    msg = str(e.value)
    # start_batch 1: physical worker 0 plays role 1 from its batch 0, worker 1 role 0 from its batch 1.
    m = re.match(r"internal: epoch 1, rank 1, loader worker (\d) \(stream role (\d), from its batch (\d)\): ", msg)
    assert m is not None, msg
    worker, role, first = (int(g) for g in m.groups())
    assert (role, first) == ((1, 0) if worker == 0 else (0, 1))
    assert "planned batch(es) never completed after reading shard(s) " in msg
    read = msg.split("after reading shard(s) ")[1].split(";")[0].split(", ")
    # The shards that stream reads from its start batch on, in its reading order.
    assert read and read == [name for name in streams[role] if name in read]


def test_the_last_batch_waits_for_its_shard_to_verify(cache, tmp_path):
    # max_samples=2: one batch from the first 2 samples of shard 0. The damage is in the padding
    # of shard 0's last member, which no sample needs; the batch is still held back until the
    # shard has been read to its end and its sha256 checked.
    root, _ = _copy(cache, tmp_path)
    name = schema.shard_name(0)
    path = root / name
    with tarfile.open(path) as tar:
        last = [m for m in tar.getmembers() if m.size % 512][-1]
    with open(path, "r+b") as f:
        f.seek(last.offset_data + last.size)
        f.write(b"\x01")
    ds = cache_stream(open_store(root), cache[1], batch_size=2, seed=0, epoch=0, max_samples=2)
    assert len(ds) == 1
    with pytest.raises(ShardError, match=re.escape(name) + ".*sha256"):
        next(iter(ds))
    intact = cache_stream(open_store(cache[0]), cache[1], batch_size=2, seed=0, epoch=0, max_samples=2)
    assert sorted(next(iter(intact)).keys) == cache[1][0].keys[:2]


# --------------------------------------------------------------------------------------------
# Buckets (records that list each sample's latent shape)


def test_batches_have_one_shape_and_resume_exactly_with_buckets(tmp_path):
    shape = lambda shard, pos: (2, 2) if (shard + pos) % 3 else (2, 3)  # interleaved in every shard
    sizes = [6, 5, 7, 4]
    records = _write_cache(tmp_path, sizes, shape, record_latent_shapes=True)
    assert records[0].latent_shapes == [list(shape(0, p)) for p in range(6)]
    store = open_store(tmp_path)
    plain = [dataclasses.replace(r, latent_shapes=None) for r in records]
    kw = dict(batch_size=2, seed=1, epoch=0, world_size=2, rank=0, num_workers=2, shuffle_buffer=3)
    ds = cache_stream(store, records, **kw)
    full = _all(ds)
    assert len(full) == ds.steps_per_epoch
    for b in full:
        assert {shape(int(k[:6]), int(k[7:])) for k in b.keys} == {tuple(b.latent_mean.shape[2:])}
        assert b.cond.shape[2:] == tuple(FACTOR * v for v in b.latent_mean.shape[2:])
    # The step count counts batches per shape over the whole epoch: 22 samples, 15 of shape 2x2 (7
    # batches, 1 left over) and 7 of 2x3 (3 batches, 1 left over). Of the two partial batches, tied
    # at 1 sample, the 2x3 one (later in shape order) is dropped and the 2x2 one completed with a
    # repeat: 11 batches, 5 per rank, the completed one cut for equal steps (so nothing repeated).
    counts = {}
    for r in records:
        for p in range(r.samples):
            counts[shape(r.index, p)] = counts.get(shape(r.index, p), 0) + 1
    assert counts == {(2, 2): 15, (2, 3): 7}
    assert ds.steps_per_epoch == (sum(n // 2 for n in counts.values()) + 1) // 2 == 5
    assert ds.stats.samples_in_partial_batches == 1 and ds.stats.samples_cut_for_equal_steps == 1
    assert ds.stats.samples_repeated == 0 and ds.stats.samples_dropped == 2
    for b in range(len(full) + 1):
        _same_batches(_all(cache_stream(store, records, start_batch=b, **kw)), full[b:])
    # Without per-sample shapes the same cache is refused as soon as a batch would mix shapes.
    with pytest.raises(ShardError, match="latent_shapes"):
        _all(cache_stream(store, plain, batch_size=4, seed=1, epoch=0, shuffle_buffer=0))
