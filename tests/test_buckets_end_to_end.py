"""Buckets, views and computed conditions through the real stages, on the tiny SDXL.

precompute (in process) writes mixed-aspect fill data into bucketed caches with flipped and extra
cropped views and canny / soft sketch conditions; the tests check every stored sample against the
geometry planned for it, the latents against the VAE on the view's own pixels (the flipped view on
the flipped image), the manifest's per-bucket counts, `shards stats`, identity refusals, and then
train on such a cache with the real loop: one shape per batch and a bitwise-identical resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from streams import cache_loader

from precompute.buckets import bucket_label, resolve_buckets
from precompute.conditions import canny, sketch
from precompute.config import PrecomputeConfig
from precompute.encoders import LatentEncoder
from precompute.fill import main as fill_main
from precompute.fill import make_fill_dataset, mixed_size
from precompute.preprocess import (
    ViewSpec,
    apply_geometry,
    item_rng,
    plan_geometry,
    plan_views,
    to_model_input,
)
from precompute.runner import run
from precompute.sources import ReadLimits, open_source
from shards.cli import cli as shards_cli
from shards.manifest import Manifest, ManifestError
from shards.reader import iter_shard
from shards.stores import open_store
from shards.verify import verify_cache
from shards.views import split_view_key
from train.augment import soft_threshold_range_for
from train.checks import CacheMismatchError
from train.config import ConfigError, TrainConfig
from train.loop import train

RES = 64
N = 12
BUCKETS_64 = resolve_buckets("sdxl", RES, granularity=32)  # the tiny UNet: 8 * 2^(3-1)


def _cfg(model, data, cache, **kw) -> PrecomputeConfig:
    base = dict(model=str(model), data=str(data), cache=str(cache), resolution=RES, samples_per_shard=4,
                batch_size=4, num_workers=0, device="cpu", buckets="sdxl", flip=True)
    return PrecomputeConfig(**{**base, **kw})


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return make_fill_dataset(tmp_path_factory.mktemp("mixed") / "fill", n=N, resolution=RES, seed=0, aspect="mixed")


@pytest.fixture(scope="module")
def canny_cache(tiny_model, mixed, tmp_path_factory):
    """batch_size 1: every VAE call encodes one view, so a test can repeat the exact computation."""
    cache = tmp_path_factory.mktemp("canny") / "cache"
    summary = run(_cfg(tiny_model, mixed, cache, crops=2, condition="canny", batch_size=1))
    return cache, summary


def _planned(index: int, position: int, crops: int) -> list:
    size = mixed_size(index * 4 + position, RES)
    base = plan_geometry(size, RES, rng=item_rng(0, index, position), buckets=BUCKETS_64)
    return plan_views(base, ViewSpec(crops=crops, flip=True), item_rng(0, index, position))


def test_fill_mixed_aspect_cycles_four_shapes(tmp_path):
    result = CliRunner().invoke(fill_main, [str(tmp_path / "f"), "--n", "5", "--resolution", "64", "--aspect", "mixed"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "f/prompt.json").read_text().splitlines()]
    shapes = [np.asarray(_rgb(tmp_path / "f" / r["target"])).shape[:2] for r in rows]
    assert shapes == [(64, 64), (64, 96), (96, 64), (64, 128), (64, 64)]
    for r, shape in zip(rows, shapes):
        source = np.asarray(_rgb(tmp_path / "f" / r["source"]))
        assert source.shape[:2] == shape and source.any()
        # the whole outline is inside the frame: the border rows and columns are black
        assert not source[[0, -1]].any() and not source[:, [0, -1]].any()
    # square items are unchanged by the option's existence
    make_fill_dataset(tmp_path / "sq", n=2, resolution=64, seed=0)
    make_fill_dataset(tmp_path / "mx", n=2, resolution=64, seed=0, aspect="mixed")
    assert (tmp_path / "sq/target/0.png").read_bytes() == (tmp_path / "mx/target/0.png").read_bytes()


def test_every_view_has_its_planned_geometry_canny_and_latent(tiny_model, mixed, canny_cache):
    from diffusers import AutoencoderKL

    cache, summary = canny_cache
    store = open_store(cache)
    manifest = Manifest.load(store)
    assert manifest.geometry.buckets == tuple(tuple(b) for b in BUCKETS_64)
    assert manifest.identity.section("views") == {"crops": 2, "flip": True}
    assert manifest.identity.section("condition") == {"method": "canny", "version": 1, "params": {"low": 100, "high": 200},
                                              "soft": False}
    verify_cache(store, manifest)

    expected_counts: dict[str, int] = {}
    n_views = 0
    for index in range(3):
        for position in range(4):
            views = _planned(index, position, crops=2)
            n_views += len(views)
            label = bucket_label(views[0][0].target_size)
            expected_counts[label] = expected_counts.get(label, 0) + len(views)
    # 64x128 items have room for a second crop (4 views); the others only flip (2 views).
    assert n_views == 3 * (2 + 2 + 2 + 4) == summary.samples == manifest.num_samples
    assert manifest.totals["buckets"] == expected_counts == {"64x64": 6, "64x96": 18, "96x64": 6}
    assert manifest.totals["sources"] == N

    encoder = LatentEncoder(AutoencoderKL.from_pretrained(str(tiny_model), subfolder="vae"))
    rows = [json.loads(line) for line in (mixed / "prompt.json").read_text().splitlines()]
    for record in manifest.shards:
        assert record.latent_shapes is not None
        samples = list(iter_shard(store, record))
        for sample, shape in zip(samples, record.latent_shapes):
            base, view = split_view_key(sample.key)
            index, position = int(base[:6]), int(base[7:])
            g, info = _planned(index, position, crops=2)[view]
            meta = sample.meta
            assert (meta.original_size, meta.crop_top_left, meta.target_size, meta.flip) == (
                g.original_size, g.crop_top_left, g.target_size, g.flip)
            assert meta.add_time_ids == g.add_time_ids
            assert meta.extra == {"view": {"index": view, **info}}
            assert list(sample.latent_mean.shape[1:]) == shape == [g.target_size[0] // 8, g.target_size[1] // 8]
            rgb = apply_geometry(_rgb(mixed / rows[index * 4 + position]["target"]), g)
            np.testing.assert_array_equal(sample.cond_image(), canny(rgb))
            # The latent is the VAE's encoding of this view's pixels (a flipped view: of the
            # flipped image), computed alone as precompute did with batch_size 1.
            mean, std = encoder(to_model_input(rgb)[None])
            assert torch.equal(sample.latent_mean, mean[0].to(torch.bfloat16)), sample.key
            assert torch.equal(sample.latent_std, std[0].to(torch.bfloat16)), sample.key
            if g.flip:
                unflipped = apply_geometry(_rgb(mixed / rows[index * 4 + position]["target"]), g.mirrored())
                np.testing.assert_array_equal(rgb, unflipped[:, ::-1])
                flipped_mean, _ = encoder(to_model_input(unflipped).flip(-1)[None])
                assert torch.equal(sample.latent_mean, flipped_mean[0].to(torch.bfloat16))


def test_stats_report_views_and_buckets(canny_cache):
    cache, _ = canny_cache
    result = CliRunner().invoke(shards_cli, ["stats", str(cache)])
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(open_store(cache))
    total = manifest.totals["bytes"]
    assert (f"views      30 samples of 12 images (2.50 views per image): {total / 12 / 1024:.1f} KiB per image, "
            f"{total / 30 / 1024:.1f} KiB per view; one view per image is 40% of the bytes train reads") in result.output
    assert "buckets    3 used (HxW samples): 64x96 18, 64x64 6, 96x64 6" in result.output


def test_other_condition_settings_are_refused_for_the_same_cache(tiny_model, mixed, canny_cache):
    cache, _ = canny_cache
    with pytest.raises(ManifestError) as err:
        run(_cfg(tiny_model, mixed, cache, crops=2, condition="canny", canny_low=50))
    assert "condition.params.low: 100 != 50" in str(err.value)
    with pytest.raises(ManifestError) as err:
        run(_cfg(tiny_model, mixed, cache, crops=1, condition="gray"))
    msg = str(err.value)
    assert "condition.method: 'canny' != 'gray'" in msg and "views.crops: 2 != 1" in msg


# --------------------------------------------------------------------------------------------
# Computed conditions need no conditioning column; soft maps are thresholded by train.


@pytest.fixture(scope="module")
def soft_cache(tiny_model, mixed, tmp_path_factory):
    """A folder dataset with images and captions only (no conditioning column): sketch maps,
    stored soft, 3 shards of 4 images, 2 views each (flip). Its metadata names the images by
    absolute paths into another folder, which precompute reads only with --follow-symlinks."""
    data = tmp_path_factory.mktemp("nocond") / "data"
    data.mkdir()
    rows = [json.loads(line) for line in (mixed / "prompt.json").read_text().splitlines()]
    (data / "metadata.jsonl").write_text("".join(
        json.dumps({"image": str(mixed / r["target"]), "text": r["prompt"]}) + "\n" for r in rows))
    cache = tmp_path_factory.mktemp("soft") / "cache"
    run(_cfg(tiny_model, data, cache, condition="sketch", condition_soft=True, num_workers=2, follow_symlinks=True))
    return data, cache


def test_computed_conditions_read_no_conditioning_images(soft_cache, mixed, tmp_path):
    data, cache = soft_cache
    source = open_source(data, require_conditioning=False, limits=ReadLimits(follow_symlinks=True))
    assert source.describe()["columns"]["conditioning_image"] is None
    item = next(source.iter_unit(0))
    assert item.cond is None and item.error is None
    manifest = Manifest.load(open_store(cache))
    assert manifest.identity.condition.method == "sketch" and manifest.identity.condition.soft
    sample = next(iter_shard(open_store(cache), manifest.shards[0]))
    g = plan_geometry(mixed_size(0, RES), RES, buckets=BUCKETS_64)
    np.testing.assert_array_equal(sample.cond_image(), sketch(apply_geometry(_rgb(mixed / "target/0.png"), g)))
    # WebDataset shards without conditioning members work the same way.
    tar = tmp_path / "wds.tar"
    with tarfile.open(tar, "w") as tf:
        for name, payload in (("a.png", (mixed / "target/1.png").read_bytes()), ("a.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    item = next(open_source(tar, require_conditioning=False).iter_unit(0))
    assert item.cond is None and item.error is None and item.captions == ["a caption"]
    assert next(open_source(tar).iter_unit(0)).error[0] == "cond_missing"


def test_train_on_a_bucketed_soft_cache_one_shape_per_batch_and_bitwise_resume(tiny_model, soft_cache, tmp_path):
    _, cache = soft_cache
    manifest = Manifest.load(open_store(cache))
    shapes = {k: tuple(s) for r in manifest.shards for k, s in zip(r.keys, r.latent_shapes)}
    # The soft maps reach the loop binarised.
    loader, steps = cache_loader(open_store(cache), manifest, batch_size=2, seed=0, epoch=0, shuffle_buffer=0,
                                 soft_threshold=soft_threshold_range_for(manifest.identity.condition, None))
    assert all(set(b.cond.unique().tolist()) <= {0.0, 1.0} for b in loader)

    def cfg(out, **kw) -> TrainConfig:
        base = dict(model=str(tiny_model), cache=str(cache), output_dir=str(out), batch_size=2, num_workers=0,
                    learning_rate=1e-3, log_samples=True, log_every=1, checkpointing_steps=100,
                    soft_threshold_range="0.4,0.7")
        return TrainConfig(**{**base, **kw})

    a, b = tmp_path / "a", tmp_path / "b"
    total = steps + 2  # crosses into epoch 1, where other views are used
    train(cfg(a, max_steps=total))
    train(cfg(b, max_steps=3, checkpointing_steps=1))
    train(cfg(b, max_steps=total, resume="latest"))

    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    def jsonl(p: Path) -> list[dict]:
        return [json.loads(line) for line in p.read_text().splitlines()]

    assert sha(a / "diffusion_pytorch_model.safetensors") == sha(b / "diffusion_pytorch_model.safetensors")
    logged = jsonl(a / "logs/samples-rank00000.jsonl")
    assert logged == jsonl(b / "logs/samples-rank00000.jsonl") and len(logged) == total
    assert [m["loss"] for m in jsonl(a / "logs/metrics.jsonl")] == [m["loss"] for m in jsonl(b / "logs/metrics.jsonl")]
    for entry in logged:
        assert len({shapes[k] for k in entry["keys"]}) == 1, entry
    epoch0 = [split_view_key(k)[0] for e in logged if e["epoch"] == 0 for k in e["keys"]]
    # Each image at most once per epoch, but for the counted repeats that complete a shape's last
    # batch (every shape but one has a leftover here); what is not used is the one dropped batch.
    stats = loader.dataset.stats
    assert len(epoch0) == 2 * steps and stats.samples_repeated > 0
    assert len(epoch0) - len(set(epoch0)) == stats.samples_repeated
    assert len(set(epoch0)) == stats.samples - stats.samples_dropped and stats.samples_dropped < 2
    assert {e["epoch"] for e in logged} == {0, 1}
    with pytest.raises(ConfigError, match="--soft-threshold-range"):
        train(cfg(tmp_path / "c", soft_threshold_range="0.9,0.1"))


def test_a_threshold_range_for_a_cache_without_soft_maps_is_refused(tiny_model, canny_cache, tmp_path):
    cache, _ = canny_cache
    cfg = TrainConfig(model=str(tiny_model), cache=str(cache), output_dir=str(tmp_path / "out"), batch_size=2,
                      num_workers=0, max_steps=1, soft_threshold_range="0.3,0.8")
    with pytest.raises(CacheMismatchError, match="the cache does not store soft conditioning maps"):
        train(cfg)
    assert not (tmp_path / "out" / "checkpoints").exists()
