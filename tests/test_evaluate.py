"""The validation loss, model-free where it can be: the held-out split (train.plan), the fixed
timesteps and draws, the reduction over ranks, and `train.evaluate` on the tiny UNet with
in-memory samples and on the real fill cache.
"""

from __future__ import annotations

import math

import pytest
import torch

from shards import schema
from shards.identity import CacheIdentity
from shards.manifest import Manifest, ShardRecord
from shards.synthetic import synthetic_identity
from shards.views import split_view_key, view_key
from train.data import stream_identity
from train.evaluate import (
    EvalSample,
    EvalSpec,
    Evaluator,
    combine,
    eval_set,
    fixed_inputs,
    fixed_normal,
    identity_problems,
    quantile_timesteps,
    sample_losses,
)
from train.plan import DataSpec, EpochPlan, count_held_out, held_out_images


def _records(sizes: list[int], views: int = 1) -> list[ShardRecord]:
    """Shard records (no shard files: the plan reads keys only) with `views` views per image."""
    out = []
    for i, n in enumerate(sizes):
        keys = [view_key(i, p, v) for p in range(n) for v in range(views)]
        out.append(ShardRecord(index=i, name=schema.shard_name(i), samples=len(keys), bytes=0,
                               sha256=f"{i:064x}", keys=keys))
    return out


def _planned_keys(records, spec: DataSpec, epoch: int) -> list[str]:
    plan = EpochPlan(records, spec, epoch)
    keys = []
    for rank in range(spec.world_size):
        for role in range(spec.roles):
            stream = plan.stream(rank, role)
            used = [k for sl in stream.slices for k in sl.keys]
            keys += [used[j] for batch in stream.batches for j in batch]
    return keys


# ---------------------------------------------------------------------------------------------
# Which images are held out


def test_held_out_images_depend_on_the_keys_and_fraction_only():
    records = _records([5, 3, 7, 4, 6, 2, 0, 5])  # 32 images
    held = held_out_images(records, 0.25)
    assert len(held) == count_held_out(32, 0.25) == 8
    assert held_out_images(list(reversed(records)), 0.25) == held  # not the order records are listed in
    assert held < held_out_images(records, 0.5)  # a larger fraction holds out a superset
    assert len(held_out_images(records, 0.001)) == 1  # any fraction > 0 holds out at least one image
    assert held_out_images(records, None) == held_out_images(records, 0.0) == frozenset()
    for seed, world, workers, batch in ((0, 1, 0, 2), (5, 2, 2, 3), (9, 3, 1, 1)):
        spec = DataSpec(batch_size=batch, seed=seed, world_size=world, num_workers=workers, validation_split=0.25)
        for epoch in (0, 1):
            used = _planned_keys(records, spec, epoch)
            assert not held & set(used)  # never trained on, whatever the seed, ranks or batching
            stats = EpochPlan(records, spec, epoch).stats
            assert stats.samples == 32 - 8


def test_every_view_of_a_held_out_image_is_left_out():
    records = _records([4, 4, 4], views=3)  # 12 images, 36 samples
    held = held_out_images(records, 0.25)
    assert len(held) == 3 and all(split_view_key(k)[1] == 0 for k in held)
    spec = DataSpec(batch_size=1, seed=3, validation_split=0.25)
    seen_views = {}
    for epoch in range(3):
        for key in _planned_keys(records, spec, epoch):
            base, view = split_view_key(key)
            assert base not in held
            seen_views.setdefault(base, set()).add(view)
    assert len(seen_views) == 9 and all(v == {0, 1, 2} for v in seen_views.values())  # views still rotate


def test_without_a_split_the_plan_and_the_stream_identity_are_unchanged():
    """Unset (or 0): the same batches and the same identity dict as before the option existed, so
    existing checkpoints resume; set, the identity names it."""
    records = _records([5, 3, 7, 4])
    base = DataSpec(batch_size=2, seed=1, world_size=2, num_workers=2)
    zero = DataSpec(batch_size=2, seed=1, world_size=2, num_workers=2, validation_split=0)
    assert zero.validation_split is None
    assert "validation_split" not in stream_identity(records, base)
    assert stream_identity(records, zero) == stream_identity(records, base)
    for epoch in (0, 1):
        assert _planned_keys(records, zero, epoch) == _planned_keys(records, base, epoch)
    split = DataSpec(batch_size=2, seed=1, world_size=2, num_workers=2, validation_split=0.2)
    assert stream_identity(records, split)["validation_split"] == 0.2


def test_max_samples_counts_the_training_images_left():
    records = _records([8, 8])
    held = held_out_images(records, 0.25)
    plan = EpochPlan(records, DataSpec(batch_size=2, seed=0, max_samples=6, validation_split=0.25), 0)
    kept = [k for sl in plan.read_order for k in sl.keys]
    assert len(kept) == 6 and not held & set(kept)
    first = sorted(k for r in records for k in r.keys if k not in held)[:6]
    assert sorted(kept) == first  # the first 6 training images in manifest order


def test_a_split_that_leaves_nothing_to_train_on_is_refused():
    with pytest.raises(ValueError, match="holds out all 1 image"):
        EpochPlan(_records([1]), DataSpec(batch_size=1, seed=0, validation_split=0.5), 0)
    with pytest.raises(ValueError, match="validation_split must be a fraction in \\[0, 1\\)"):
        DataSpec(batch_size=1, seed=0, validation_split=1.0)


def test_eval_set_takes_view_0_of_each_held_out_image():
    records = _records([4, 4, 4], views=2)
    held = held_out_images(records, 0.25)
    evalset = eval_set(records, "m" * 64, source="split", fraction=0.25)
    assert sorted(evalset.keys) == sorted(held) and evalset.count == 3
    assert all(rec.keys[pos] == key for rec, samples in evalset.shards for pos, key in samples)
    assert eval_set(records, "m" * 64, source="cache").count == 12  # a validation cache: every image
    assert evalset.set_id == eval_set(list(reversed(records)), "m" * 64, source="x", fraction=0.25).set_id
    assert evalset.set_id != eval_set(records, "n" * 64, source="split", fraction=0.25).set_id


# ---------------------------------------------------------------------------------------------
# Fixed timesteps, draws and the reduction


def test_timesteps_are_quantiles_of_the_cubic_distribution():
    assert quantile_timesteps(8, 1000).tolist() == [999, 993, 969, 916, 822, 675, 463, 176]
    assert quantile_timesteps(1, 1000).tolist() == [875]  # u = 0.5: (1 - 1/8) * 1000
    # Each t_k is a (k + 0.5)/K upper quantile of t = floor((1 - u^3) T), u ~ U(0, 1), the training
    # draw: P(t > t_k) <= (k + 0.5)/K <= P(t >= t_k), the probabilities exact (t >= s iff u <= (1 - s/T)^(1/3)).
    for k, t in enumerate(quantile_timesteps(8, 1000).tolist()):
        above, at_least = (1 - (t + 1) / 1000) ** (1 / 3), (1 - t / 1000) ** (1 / 3)
        assert above <= (k + 0.5) / 8 <= at_least


def test_fixed_draws_depend_on_the_key_and_timestep_only():
    a = fixed_normal((4, 2, 2), "000001-000002", "latent")
    assert torch.equal(a, fixed_normal((4, 2, 2), "000001-000002", "latent"))
    assert not torch.equal(a, fixed_normal((4, 2, 2), "000001-000003", "latent"))
    torch.manual_seed(123)  # the global generator has no say
    assert torch.equal(a, fixed_normal((4, 2, 2), "000001-000002", "latent"))
    sample = _sample("000000-000001")
    timesteps = torch.tensor([999, 500])
    latents, noise = fixed_inputs(sample, timesteps)
    assert torch.equal(latents[0], latents[1])  # one latent draw per sample
    assert torch.equal(latents[0], sample.latent_mean + sample.latent_std * fixed_normal((4, 2, 2), sample.key,
                                                                                         "latent"))
    assert not torch.equal(noise[0], noise[1])  # noise per (key, timestep)
    assert torch.equal(noise[1], fixed_normal((4, 2, 2), sample.key, "noise", "500"))


def test_combine_adds_in_no_particular_order_and_counts_every_pair():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(37, 8, generator=g, dtype=torch.float64) * 10 ** torch.randint(-6, 6, (37, 1), generator=g)
    table = torch.cat([losses, torch.ones(37, 1, dtype=torch.float64)], dim=1)
    loss, per_t, pairs = combine(table)
    assert pairs == 37 * 8
    assert loss == math.fsum(losses.flatten().tolist()) / (37 * 8)
    assert per_t[3] == math.fsum(losses[:, 3].tolist()) / 37
    # Three "ranks" each filled some rows; their tables summed in any order give the same bits.
    parts = [torch.zeros_like(table) for _ in range(3)]
    for i in range(37):
        parts[i % 3][i] = table[i]
    assert combine(parts[2] + parts[0] + parts[1]) == combine(parts[0] + parts[1] + parts[2]) == (loss, per_t, pairs)
    assert combine(table[torch.randperm(37, generator=g)])[0] == loss
    table[5, -1] = 0  # a sample no rank evaluated
    with pytest.raises(RuntimeError, match=r"validation samples \[5\] were evaluated \[0.0\] times"):
        combine(table)


# ---------------------------------------------------------------------------------------------
# On the tiny UNet


def _sample(key: str, hw: tuple[int, int] = (2, 2), seed: int = 0) -> EvalSample:
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    return EvalSample(key=key, latent_mean=torch.randn(4, h, w, generator=g),
                      latent_std=torch.rand(4, h, w, generator=g) + 0.1,
                      prompt_embeds=torch.randn(77, 64, generator=g), pooled_prompt_embeds=torch.randn(32, generator=g),
                      add_time_ids=torch.tensor([h * 8.0, w * 8.0, 0, 0, h * 8.0, w * 8.0]),
                      cond_u8=torch.randint(0, 256, (3, h * 8, w * 8), generator=g, dtype=torch.uint8))


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from diffusers import UNet2DConditionModel

    from train.checks import read_scheduler_config
    from train.step import Objective, build_adapter

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").eval().requires_grad_(False)
    torch.manual_seed(0)
    adapter = build_adapter(dict(unet.config), 8).eval()
    return unet, adapter, Objective(read_scheduler_config(str(tiny_model)), "cpu")


def test_the_validation_loss_is_the_training_objective_at_fixed_draws(tiny):
    """Each of the K values is the objective's sigma^-2-weighted denoising error at t_k for the
    fixed latent and noise, computed here from the UNet's prediction by hand; a sample's K
    values do not depend on the other samples or on how many timesteps share its pass."""
    from train.augment import prepare_cond

    unet, adapter, objective = tiny
    sample = _sample("000002-000001", hw=(4, 2))  # not square: 32 x 16 px
    timesteps = quantile_timesteps(4, objective.num_train_timesteps)
    got = sample_losses(objective, unet, adapter, sample, timesteps, device="cpu")
    assert got.dtype == torch.float64 and got.shape == (4,)
    latents, noise = fixed_inputs(sample, timesteps)
    with torch.no_grad():
        for k, t in enumerate(timesteps.tolist()):
            sigma = objective.sigmas[t]
            noisy = latents[k : k + 1] + noise[k : k + 1] * sigma
            features = adapter(prepare_cond(sample.cond_u8[None], None))
            pred = unet(noisy / torch.sqrt(sigma**2 + 1), torch.tensor([t]),
                        encoder_hidden_states=sample.prompt_embeds[None],
                        added_cond_kwargs={"text_embeds": sample.pooled_prompt_embeds[None],
                                           "time_ids": sample.add_time_ids[None]},
                        down_intrablock_additional_residuals=list(features), return_dict=False)[0]
            denoised = pred * (-sigma) + noisy
            expected = ((denoised - latents[k : k + 1]) ** 2).mean() / sigma**2
            assert got[k].item() == pytest.approx(expected.item(), rel=1e-5)
    alone = sample_losses(objective, unet, adapter, sample, timesteps[2:3], device="cpu")
    assert alone[0].item() == pytest.approx(got[2].item(), rel=1e-5)
    assert torch.equal(got, sample_losses(objective, unet, adapter, sample, timesteps, device="cpu"))
    # Soft maps: binarised at one fixed level, so a threshold in the middle of the range gives a
    # cond of {0, 1} and a different loss than the raw grey levels.
    soft = sample_losses(objective, unet, adapter, sample, timesteps, device="cpu", soft_level=128)
    assert not torch.equal(soft, got)


def test_evaluator_on_the_fill_cache_gives_the_same_bits_for_any_world_size(tiny, fill_cache):
    """The real cache, the real reader: 4 held-out images (4 of 16) evaluated by 1, 2 or 3
    processes, each reading only its shards and filling its rows; the tables the all-reduce adds
    give bitwise the same number in any order."""
    from shards.stores import open_store

    unet, adapter, objective = tiny
    store = open_store(fill_cache)
    manifest = Manifest.load(store)
    evalset = eval_set(manifest, "id", source="split", fraction=0.25)
    assert evalset.count == 4
    spec = EvalSpec(timesteps=3)

    def tables(world: int) -> list[torch.Tensor]:
        return [Evaluator(evalset, store, manifest, spec).local_table(rank=r, world=world, objective=objective,
                                                                      unet=unet, adapter=adapter, device="cpu")
                for r in range(world)]

    [single] = tables(1)
    loss, per_t, pairs = combine(single)
    assert pairs == 12 and len(per_t) == 3 and 0.5 < loss < 2.0
    for world in (2, 3):
        parts = tables(world)
        counts = [int(t[:, -1].sum().item()) for t in parts]
        assert sum(counts) == 4 and max(counts) < 4  # split over the ranks, each sample once
        assert combine(sum(parts[1:], parts[0])) == (loss, per_t, pairs)
        assert combine(sum(reversed(parts[:-1]), parts[-1]))[0] == loss


def test_quantiles_that_share_a_timestep_are_all_averaged_and_counted(tiny, fill_cache):
    """With K = 16 two quantiles floor to t = 999: both draws count, in the loss and in its
    per-timestep record (their mean there), and the count said is 16."""
    from accelerate import Accelerator

    from shards.stores import open_store

    unet, adapter, objective = tiny
    store = open_store(fill_cache)
    manifest = Manifest.load(store)
    evalset = eval_set(manifest, "id", source="split", fraction=0.25)
    timesteps = quantile_timesteps(16, objective.num_train_timesteps).tolist()
    assert timesteps.count(999) == 2
    result = Evaluator(evalset, store, manifest, EvalSpec(timesteps=16)).run(
        0, objective=objective, unet=unet, adapter=adapter, accelerator=Accelerator(cpu=True),
        weight_dtype=torch.float32, weights="raw")
    assert result.timesteps == 16 and sorted(result.per_timestep, reverse=True) == sorted(set(timesteps), reverse=True)
    assert result.loss == pytest.approx(sum(result.per_timestep[t] for t in timesteps) / 16, rel=1e-5)


def test_a_validation_cache_must_share_the_identity():
    a = Manifest.build(CacheIdentity.from_dict(synthetic_identity()), [], {}, created="")
    other = synthetic_identity(prompt_dim=32)
    other["condition"] = {"method": "canny", "version": 1, "params": {"low": 100, "high": 200}, "soft": False}
    other["samples_per_shard"] = 9  # not compared: a validation cache may be sharded differently
    b = Manifest.build(CacheIdentity.from_dict(other), [], {}, created="")
    problems = identity_problems(a, b, "--validation-cache v")
    assert any(p.startswith("--validation-cache v: text.prompt_dim") for p in problems)
    assert any(p.startswith("--validation-cache v: condition.method") for p in problems)
    assert not any("samples_per_shard" in p for p in problems)
    assert identity_problems(a, a, "--validation-cache v") == []
