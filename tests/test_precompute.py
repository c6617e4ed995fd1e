"""precompute end to end: what lands in the cache, resume after SIGKILL, bad inputs, refusals, NPROC=2.

In-process runs (`runner.run`) check contents; the real entry point runs as a subprocess where the
behaviour is about processes (kill and resume, `accelerate launch` with two gloo processes, exit
codes). Subprocess runs pin OMP_NUM_THREADS=1: CPU convolutions round differently with other
thread counts, and byte-for-byte comparisons need the same kernels on both sides.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from precompute.config import PrecomputeConfig
from precompute.errors import ConfigError, PrecomputeError
from precompute.settings import resolve
from clirun import run_cli, run_launched
from precompute.encoders import LatentEncoder, PromptEncoder
from precompute.preprocess import to_model_input
from precompute.runner import StrictSkipError, run
from shards import schema
from shards.manifest import Manifest, ManifestError, read_identity
from shards.reader import iter_shard, load_empty_prompt
from shards.stores import open_store
from shards.verify import verify_cache
from ports import free_port

REPO = Path(__file__).resolve().parents[1]
RES = 64


def _cfg(model, data, cache, **kw) -> PrecomputeConfig:
    base = dict(
        model=str(model), data=str(data), cache=str(cache), resolution=RES, samples_per_shard=6,
        batch_size=4, num_workers=2, device="cpu",
    )
    base.update(kw)
    return PrecomputeConfig(**base)


def _files(cache: Path) -> dict[str, bytes]:
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def _samples(cache: Path) -> tuple[Manifest, list[schema.Sample]]:
    store = open_store(cache)
    manifest = Manifest.load(store)
    return manifest, [s for r in manifest.shards for s in iter_shard(store, r)]


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return run_cli("precompute", args, env=_env(), timeout=300)



# ----------------------------------------------------------------------------------------------
# End to end on the fill fixture


@pytest.fixture(scope="module")
def run_cache(tiny_model, fill_data, tmp_path_factory):
    """`fill_data` precomputed in-process by `runner.run` (6 per shard, VAE batch 4), with its
    summary; conftest's `fill_cache` is the CLI's (4 per shard)."""
    cache = tmp_path_factory.mktemp("run-cache") / "cache"
    summary = run(_cfg(tiny_model, fill_data, cache))
    return cache, summary


def test_fill_cache_contents_equal_the_encoders(tiny_model, fill_data, run_cache):
    from diffusers import StableDiffusionXLPipeline

    cache, summary = run_cache
    rows = [json.loads(line) for line in (fill_data / "prompt.json").read_text().splitlines()]
    assert (summary.samples, summary.samples_written, summary.shards, summary.skipped) == (16, 16, 3, {})
    manifest, samples = _samples(cache)
    assert [r.samples for r in manifest.shards] == [6, 6, 4]
    assert manifest.totals["samples"] == 16 and manifest.totals["skipped"] == {}
    assert dataclasses.asdict(manifest.latent) == {"channels": 4, "scaling_factor": 0.13025, "shift_factor": None,
                               "vae_scale_factor": 8, "store": "mean_std"}
    assert dataclasses.asdict(manifest.text) == {"max_length": 77, "prompt_dim": 64, "pooled_dim": 32}
    assert dataclasses.asdict(manifest.dtypes) == {"storage": "bf16", "vae": "fp32", "text": "fp32"}
    assert manifest.config["resolution"] == RES and manifest.config["model"] == str(tiny_model)
    assert not {"cache", "tmp_dir", "device", "num_workers", "strict"} & set(manifest.config)
    # The batch size and the device kind change the bytes: recorded, and part of the identity.
    assert manifest.config["batch_size"] == 4
    assert manifest.identity.section("compute") == {"batch_size": 4, "device": "cpu"}
    assert manifest.created == ""  # no wall-clock time in a reproducible cache
    verify_cache(open_store(cache), manifest)

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model))
    latent = LatentEncoder(pipe.vae)
    prompt = PromptEncoder(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2)
    by_key = {s.key: s for s in samples}
    # Mirror the runner's batches (4 items at a time within each shard of 6) so the reference is
    # the same computation; the cache must then hold exactly its bf16 rounding.
    for shard, start, stop in ((0, 0, 6), (1, 6, 12), (2, 12, 16)):
        for b in range(start, stop, 4):
            idx = list(range(b, min(b + 4, stop)))
            targets = [np.asarray(Image.open(fill_data / rows[i]["target"]).convert("RGB")) for i in idx]
            mean, std = latent(torch.stack([to_model_input(t) for t in targets]))
            pe, pooled = prompt([rows[i]["prompt"] for i in idx])
            for k, i in enumerate(idx):
                s = by_key[schema.sample_key(shard, i - start)]
                assert s.meta.source_id == rows[i]["target"] and s.meta.captions == [rows[i]["prompt"]]
                assert s.meta.add_time_ids == (RES, RES, 0, 0, RES, RES)
                assert s.latent_mean.dtype == torch.bfloat16 and s.latent_mean.shape == (4, RES // 8, RES // 8)
                assert torch.equal(s.latent_mean, mean[k].to(torch.bfloat16))
                assert torch.equal(s.latent_std, std[k].to(torch.bfloat16))
                assert s.prompt_embeds.shape == (1, 77, 64) and s.pooled_prompt_embeds.shape == (1, 32)
                assert torch.equal(s.prompt_embeds, pe[k : k + 1].to(torch.bfloat16))
                assert torch.equal(s.pooled_prompt_embeds, pooled[k : k + 1].to(torch.bfloat16))
                # The conditioning image has the latent's geometry: here the source image itself.
                cond = s.cond_image()
                assert cond.shape == (s.meta.target_size[0], s.meta.target_size[1], 3)
                assert np.array_equal(cond, np.asarray(Image.open(fill_data / rows[i]["source"]).convert("RGB")))
    empty_pe, empty_pooled = load_empty_prompt(open_store(cache))
    ref = prompt([""])
    assert torch.equal(empty_pe, ref[0].to(torch.bfloat16)) and torch.equal(empty_pooled, ref[1].to(torch.bfloat16))


def test_rerun_of_a_complete_cache_changes_nothing(tiny_model, fill_data, run_cache, tmp_path):
    cache, _ = run_cache
    before = _files(cache)
    summary = run(_cfg(tiny_model, fill_data, cache, num_workers=0, strict=True))  # run-only settings may differ
    assert (summary.shards_resumed, summary.shards_written, summary.samples_written) == (3, 0, 0)
    assert _files(cache) == before
    # The same weights by another path (a link, as a mount or a local snapshot of a hub id would
    # spell them): the same cache, by the fingerprints; the identity keeps its first spelling.
    cache = Path(shutil.copytree(cache, tmp_path / "cache"))
    alias = tmp_path / "same-model-elsewhere"
    alias.symlink_to(tiny_model, target_is_directory=True)
    summary = run(_cfg(alias, fill_data, cache, num_workers=0))
    assert (summary.shards_resumed, summary.shards_written) == (3, 0)
    after = _files(cache)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}
    # The manifest records this run's command (its config) and the identity as first written.
    assert json.loads(after["manifest.json"])["identity"] == json.loads(before["manifest.json"])["identity"]
    verify_cache(open_store(cache), Manifest.load(open_store(cache)))


def test_resume_re_encodes_byte_identically_and_refuses_another_batch_size(tiny_model, fill_data, run_cache,
                                                                           tmp_path):
    """A resume that must re-encode a shard: with another --batch-size the VAE batches (and so
    the bf16-rounded latents) would differ from the kept shards': refused before anything is
    written. With the same settings (workers and strictness may differ) the rebuilt shard is
    byte-identical to the original."""
    cache = tmp_path / "cache"
    shutil.copytree(run_cache[0], cache)
    before = _files(cache)
    for rel in (schema.record_name(1), schema.shard_name(1), schema.MANIFEST_FILE):
        (cache / rel).unlink()
    partial = _files(cache)
    with pytest.raises(ManifestError) as err:
        run(_cfg(tiny_model, fill_data, cache, batch_size=3))
    assert "compute.batch_size: 4 != 3" in str(err.value) and str(cache) in str(err.value)
    assert _files(cache) == partial  # refused before any write
    summary = run(_cfg(tiny_model, fill_data, cache, num_workers=0, strict=True))
    assert (summary.shards_resumed, summary.shards_written, summary.samples_written) == (2, 1, 6)
    assert _files(cache) == before


def test_changed_model_or_settings_are_refused(tiny_model, fill_data, run_cache, tmp_path):
    cache, _ = run_cache
    before = _files(cache)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    vae_config = json.loads((other / "vae" / "config.json").read_text())
    vae_config["scaling_factor"] = 0.2
    (other / "vae" / "config.json").write_text(json.dumps(vae_config))
    with pytest.raises(ManifestError) as err:
        run(_cfg(other, fill_data, cache, resolution=32, latent_store="mean"))
    msg = str(err.value)
    assert f"{cache} was built with different settings or encoders" in msg and "delete this one" in msg
    for line in (
        f"encoder.model: '{tiny_model}' != '{other}'",
        "encoder.vae_fingerprint: ",
        "latent.scaling_factor: 0.13025 != 0.2",
        "latent.store: 'mean_std' != 'mean'",
        "geometry.resolution: 64 != 32",
    ):
        assert line in msg
    assert "text_encoder_fingerprint" not in msg and "tokenizer" not in msg  # only what differs is listed
    assert _files(cache) == before


def test_encode_dtypes_are_decided_once_by_device_and_recorded_in_the_identity(tiny_model, fill_data, run_cache,
                                                                               tmp_path):
    """Unset, the encoders' dtypes follow the device kind (bf16 VAE, fp16 text on CUDA; fp32 on
    CPU); resolve() decides them once and the identity and manifest hold the result. tf32 is its
    own entry: a tf32 run into an fp32 cache is refused, as a bf16 one is."""
    cache, _ = run_cache
    unset = _cfg(tiny_model, fill_data, cache, device="auto")
    assert (unset.vae_dtype, unset.text_dtype) == (None, None)
    on_gpu, on_cpu = resolve(unset, cuda_available=True), resolve(unset, cuda_available=False)
    assert on_gpu.device == "cuda" and (on_gpu.config.vae_dtype, on_gpu.config.text_dtype) == ("bf16", "fp16")
    assert on_cpu.device == "cpu" and (on_cpu.config.vae_dtype, on_cpu.config.text_dtype) == ("fp32", "fp32")
    assert resolve(_cfg(tiny_model, fill_data, cache), cuda_available=True).config.vae_dtype == "fp32"  # --device cpu
    explicit = resolve(_cfg(tiny_model, fill_data, cache, device="auto", vae_dtype="tf32", text_dtype="bf16"),
                       cuda_available=True)
    assert (explicit.config.vae_dtype, explicit.config.text_dtype) == ("tf32", "bf16")
    # Only resolved settings have an identity: an undecided dtype cannot reach identity.json.
    assert not hasattr(unset, "identity")
    ident = explicit.identity(encoder={}, latent={}, text={}, source={})
    assert ident["dtypes"] == {"storage": "bf16", "vae": "tf32", "text": "bf16"} and "compile_vae" not in ident["compute"]
    compiled = resolve(_cfg(tiny_model, fill_data, cache, compile_vae=True), cuda_available=False)
    assert compiled.identity(encoder={}, latent={}, text={}, source={})["compute"]["compile_vae"] is True

    manifest = Manifest.load(open_store(cache))  # made with the dtypes unset, on CPU
    assert manifest.dtypes.vae == "fp32" and manifest.dtypes.text == "fp32"
    assert (manifest.config["vae_dtype"], manifest.config["text_dtype"]) == ("fp32", "fp32")
    before = _files(cache)
    with pytest.raises(ManifestError) as err:
        run(_cfg(tiny_model, fill_data, cache, vae_dtype="tf32"))
    assert "dtypes.vae: 'fp32' != 'tf32'" in str(err.value)
    assert _files(cache) == before


def test_a_tokenizer_with_another_pad_token_is_refused(tiny_model, fill_data, run_cache, tmp_path):
    """Same weights, but tokenizer_2 pads with another token: every prompt embedding changes
    (the padded positions feed hidden_states[-2]), so the cache must refuse the resume."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    cache, _ = run_cache
    before = _files(cache)
    other = tmp_path / "other-pad"
    shutil.copytree(tiny_model, other)
    tok_2 = CLIPTokenizer.from_pretrained(other / "tokenizer_2")
    assert tok_2.pad_token == "!"  # as SDXL's tokenizer_2; tokenizer pads with <|endoftext|>
    tok_2.pad_token = tok_2.eos_token
    tok_2.save_pretrained(other / "tokenizer_2")

    def embeds(model):
        prompt = PromptEncoder(
            CLIPTokenizer.from_pretrained(model / "tokenizer"), CLIPTokenizer.from_pretrained(model / "tokenizer_2"),
            CLIPTextModel.from_pretrained(model / "text_encoder"),
            CLIPTextModelWithProjection.from_pretrained(model / "text_encoder_2"),
        )
        return prompt(["red circle"])[0]

    assert not torch.equal(embeds(tiny_model), embeds(other))  # it matters...
    with pytest.raises(ManifestError) as err:  # ...so it is refused
        run(_cfg(other, fill_data, cache))
    diff = [line.strip() for line in str(err.value).splitlines()[1:]]
    assert [line.split(":")[0] for line in diff] == ["encoder.model", "encoder.tokenizer_2_fingerprint"], diff
    assert _files(cache) == before


# ----------------------------------------------------------------------------------------------
# Bad inputs


def _image(h, w, seed) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad") / "data"
    (root / "img").mkdir(parents=True)
    good = _png(_image(RES, RES, 0))
    rows = []

    def add(name, image, cond, caption):
        if image is not None:
            (root / "img" / f"{name}.png").write_bytes(image)
        if cond is not None:
            (root / "img" / f"{name}.cond.png").write_bytes(cond)
        rows.append({"image": f"img/{name}.png", "conditioning_image": f"img/{name}.cond.png", "text": caption})

    add("good0", good, _png(_image(RES, RES, 1)), "red circle with blue background")
    add("multi", _png(_image(RES, RES, 2)), good, ["a red circle", "a circle, red, on blue"])
    add("corrupt", b"this is not an image, just text" * 4, good, "corrupt")
    add("truncated", good[: len(good) // 2], good, "truncated png")
    add("zero", b"", good, "zero bytes")
    add("missing", None, good, "the image file does not exist")
    add("nocond", good, None, "the conditioning image does not exist")
    add("badcond", good, b"\x89PNG\r\n\x1a\n garbage", "corrupt conditioning image")
    add("nocaption", good, good, "")
    add("long", _png(_image(RES, RES, 3)), good, " ".join(["red circle with blue background"] * 30))
    add("tiny", _png(_image(8, 8, 4)), _png(_image(8, 8, 5)), "an 8 px image")
    add("panorama", _png(_image(RES, 10 * RES, 6)), _png(_image(RES, 10 * RES, 7)), "a 10:1 panorama")
    add("good1", _png(_image(RES + 16, RES, 8)), _png(_image(RES + 16, RES, 9)), "portrait")
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


EXPECTED_SKIPS = {
    "image_corrupt": 2, "image_empty": 1, "image_missing": 1, "cond_missing": 1, "cond_corrupt": 1,
    "caption_missing": 1, "image_too_small": 1, "aspect_extreme": 1,
}


def test_bad_inputs_are_skipped_counted_and_named(tiny_model, bad_data, tmp_path, caplog):
    caplog.set_level("WARNING", logger="precompute.runner")
    summary = run(_cfg(tiny_model, bad_data, tmp_path / "cache", samples_per_shard=5))
    assert summary.skipped == EXPECTED_SKIPS
    assert summary.samples == 4 and summary.captions_truncated == 1
    manifest, samples = _samples(tmp_path / "cache")
    assert manifest.totals["skipped"] == EXPECTED_SKIPS
    # The overlong caption is kept (cut to 77 tokens as SDXL does) and counted in its shard's record.
    assert manifest.totals["notes"] == {"caption_truncated": 1}
    assert [r.notes for r in manifest.shards if r.notes] == [{"caption_truncated": 1}]
    # Keys keep the item's planned position: skipped items leave gaps, nothing shifts.
    assert [s.key for s in samples] == ["000000-000000", "000000-000001", "000001-000004", "000002-000002"]
    assert [s.meta.source_id for s in samples] == ["img/good0.png", "img/multi.png", "img/long.png", "img/good1.png"]
    multi = samples[1]
    assert multi.meta.captions == ["a red circle", "a circle, red, on blue"]
    assert multi.prompt_embeds.shape == (2, 77, 64) and multi.pooled_prompt_embeds.shape == (2, 32)
    assert not torch.equal(multi.prompt_embeds[0], multi.prompt_embeds[1])
    portrait = samples[3]  # 80x64 (h x w): resized to 80x64 already, centre crop 8 px from the top
    assert portrait.meta.add_time_ids == (RES + 16, RES, 8, 0, RES, RES)
    assert portrait.cond_image().shape == (RES, RES, 3)
    items = {i["source_id"]: i for r in manifest.shards for i in r.skipped_items}
    assert items["img/corrupt.png"]["reason"] == "image_corrupt"
    assert items["img/tiny.png"]["reason"] == "image_too_small"
    assert items["img/panorama.png"]["reason"] == "aspect_extreme"
    assert sum(r.skipped.get("image_empty", 0) for r in manifest.shards) == 1
    warned = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("corrupt.png", "truncated.png", "zero.png", "missing.png", "nocond.cond.png", "badcond.cond.png",
                 "nocaption.png", "tiny.png", "panorama.png"):
        assert name in warned, name
    assert "img/long.png: caption has" in warned and "truncated" in warned


def test_strict_fails_on_the_first_bad_item_naming_it(tiny_model, bad_data, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(StrictSkipError) as err:
        run(_cfg(tiny_model, bad_data, cache, samples_per_shard=5, strict=True))
    assert "image_corrupt" in str(err.value) and "img/corrupt.png" in str(err.value)
    # The failing shard was aborted: nothing of it is published, no temp file is left.
    for folder in (cache / "records", cache / "shards"):
        assert not folder.exists() or list(folder.iterdir()) == []
    assert not (cache / schema.MANIFEST_FILE).exists()


@pytest.fixture
def overflowing_vae(monkeypatch):
    """The run's VAE returns an inf posterior mean for any all-white image (as an fp16 VAE
    overflows on some images), and a correct one for everything else."""
    import precompute.runner as runner

    real_load = runner.load_encoders

    def load(*args, **kwargs):
        latent, prompt, identity = real_load(*args, **kwargs)
        encode = latent.vae.encode

        def overflowing(x, *a, **k):
            out = encode(x, *a, **k)
            white = x.flatten(1).min(1).values >= 1.0
            out.latent_dist.mean[white] = float("inf")
            return out

        monkeypatch.setattr(latent.vae, "encode", overflowing)
        return latent, prompt, identity

    monkeypatch.setattr(runner, "load_encoders", load)


@pytest.fixture(scope="module")
def white_data(tmp_path_factory) -> Path:
    """Five items; item 2 is all white (the overflowing VAE's victim)."""
    root = tmp_path_factory.mktemp("white") / "data"
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(5):
        rgb = np.full((RES, RES, 3), 255, np.uint8) if i == 2 else _image(RES, RES, 300 + i)
        (root / "img" / f"{i}.png").write_bytes(_png(rgb))
        (root / "img" / f"{i}.cond.png").write_bytes(_png(_image(RES, RES, 400 + i)))
        rows.append({"image": f"img/{i}.png", "conditioning_image": f"img/{i}.cond.png", "text": f"item {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_a_non_finite_latent_skips_that_image_and_keeps_its_batch(tiny_model, white_data, tmp_path, overflowing_vae,
                                                                   caplog):
    caplog.set_level("WARNING", logger="precompute.runner")
    summary = run(_cfg(tiny_model, white_data, tmp_path / "cache", samples_per_shard=5, batch_size=5))
    assert summary.skipped == {"latent_nonfinite": 1} and summary.samples == 4
    manifest, samples = _samples(tmp_path / "cache")
    assert [s.meta.source_id for s in samples] == ["img/0.png", "img/1.png", "img/3.png", "img/4.png"]
    assert [s.key for s in samples] == [schema.sample_key(0, i) for i in (0, 1, 3, 4)]  # positions kept
    assert all(torch.isfinite(s.latent_mean.float()).all() for s in samples)
    [item] = manifest.shards[0].skipped_items
    assert item["source_id"] == "img/2.png" and item["reason"] == "latent_nonfinite"
    assert "img/2.png: the VAE encoded 1 of its 1 view(s) to inf/NaN in fp32" in item["detail"]
    assert "skipped img/2.png (latent_nonfinite)" in caplog.text
    # The other four are exactly what an unpoisoned run of the same batch stores.
    from diffusers import AutoencoderKL

    latent = LatentEncoder(AutoencoderKL.from_pretrained(tiny_model / "vae"))
    images = [np.asarray(Image.open(white_data / "img" / f"{i}.png").convert("RGB")) for i in range(5)]
    mean, _ = latent(torch.stack([to_model_input(im) for im in images]))
    for s, i in zip(samples, (0, 1, 3, 4)):
        assert torch.equal(s.latent_mean, mean[i].to(torch.bfloat16))


def test_strict_fails_on_a_non_finite_latent_naming_the_image(tiny_model, white_data, tmp_path, overflowing_vae):
    with pytest.raises(StrictSkipError) as err:
        run(_cfg(tiny_model, white_data, tmp_path / "cache", samples_per_shard=5, strict=True))
    assert "--strict: latent_nonfinite: img/2.png: the VAE encoded" in str(err.value)
    assert not (tmp_path / "cache" / schema.record_name(0)).exists()


def test_tmp_dir_stages_in_a_per_cache_subfolder_emptied_at_start(tiny_model, fill_data, tmp_path):
    tmp, cache = tmp_path / "tmp", tmp_path / "cache"
    tmp.mkdir()
    cfg = _cfg(tiny_model, fill_data, cache, tmp_dir=str(tmp), max_samples=6)
    staging = open_store(cache).staging_dir(tmp_dir=tmp)
    assert staging.parent.parent == tmp and staging != open_store(tmp_path / "other").staging_dir(tmp_dir=tmp)
    staging.mkdir(parents=True)
    (staging / ".tmp-shard-000000.tar.123.abcd").write_bytes(b"left by a killed run")
    (tmp / ".tmp-shard-000000.tar.456.ef01").write_bytes(b"another program's, or another cache's")
    run(cfg)
    assert [p.name for p in staging.iterdir()] == [".lock"]  # the leftover is gone; the writer lock, released, stays
    assert (staging / ".lock").read_text() == ""
    assert (tmp / ".tmp-shard-000000.tar.456.ef01").exists()  # outside this cache's subfolder: untouched
    assert sorted(p.name for p in (cache / "shards").iterdir()) == ["shard-000000.tar"]


# ----------------------------------------------------------------------------------------------
# Start-time validation


def test_every_config_problem_is_listed_at_once(tiny_model, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    cfg = PrecomputeConfig(
        model=None, data=str(tmp_path / "missing"), cache=str(not_a_dir), resolution=60, batch_size=0,
        crop="diagonal", storage_dtype="fp8", vae_dtype="int8", device="tpu", max_aspect=0.5,
        image_column="img", caption_column="img",
    )
    with pytest.raises(ConfigError) as err:
        run(cfg)
    problems = err.value.problems
    expected = [
        "make precompute",
        f"--data {tmp_path / 'missing'}: no such file or folder",
        "--image-column and --caption-column are both 'img'",
        f"--cache {not_a_dir}: exists and is not a folder",
        "--resolution 60 is not a multiple of 32 px",
        "--crop must be one of",
        "--max-aspect must be a number >= 1",
        "--batch-size must be an integer >= 1",
        "--storage-dtype must be one of",
        "--vae-dtype must be one of",
        "--device must be one of",
    ]
    for e in expected:
        assert sum(e in p for p in problems) == 1, (e, problems)
    assert len(problems) == len(expected)


@pytest.mark.parametrize("cache, problem", [
    ("https://example.com/c", "--cache https://example.com/c: https:// caches are read-only"),
    ("http://example.com/c", "--cache http://example.com/c: http:// caches are read-only"),
    ("s3://a/x", "--cache s3://a/x: 'a' is not a valid bucket name"),
    ("s3://", "--cache s3://: no bucket name"),
    ("ftp://host/c", "--cache ftp://host/c: unknown URL scheme 'ftp'"),
])
def test_an_unwritable_cache_url_is_a_start_time_problem(tiny_model, fill_data, cache, problem):
    with pytest.raises(ConfigError) as err:
        run(_cfg(tiny_model, fill_data, cache))
    assert [p for p in err.value.problems if p.startswith("--cache")] == [err.value.problems[0]]
    assert err.value.problems[0].startswith(problem), err.value.problems


def test_a_cache_folder_of_something_else_is_refused(tiny_model, fill_data, tmp_path):
    """The dataset given as the cache by mistake, a folder that holds the dataset, or one of other
    files: refused before anything is written (a cache's files would land among them)."""
    before = sorted(p.relative_to(fill_data) for p in fill_data.rglob("*"))
    for cache in (fill_data, fill_data.parent):
        with pytest.raises(ConfigError) as err:
            run(_cfg(tiny_model, fill_data, cache))
        assert f"--cache {cache}: the dataset ({fill_data}) is in that folder: a cache is a folder of its own" \
            in err.value.problems
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError) as err:
        run(_cfg(tiny_model, fill_data, notes))
    assert err.value.problems == [f"--cache {notes}: the folder holds files that are no cache's (todo.txt); precompute "
                                  "would write among them: choose a new or empty folder"]
    assert sorted(p.relative_to(fill_data) for p in fill_data.rglob("*")) == before
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
    # A cache something else was put in since: move it out (the cache is not to be abandoned).
    # Its own staging folder (a --tmp-dir pointed at the cache folder) is no stranger.
    (notes / "identity.json").write_text("{}")
    (notes / "shards-staging").mkdir()
    with pytest.raises(ConfigError) as err:
        run(_cfg(tiny_model, fill_data, notes))
    assert err.value.problems == [f"--cache {notes}: the cache folder also holds files that are no cache's (todo.txt); "
                                  "precompute would write among them: move them out of it (a cache is a folder of its "
                                  "own)"]


def test_resolution_must_be_a_multiple_of_the_model_granularity(tiny_model, fill_data, tmp_path):
    with pytest.raises(ConfigError) as err:
        run(_cfg(tiny_model, fill_data, tmp_path / "c", resolution=48))
    assert err.value.problems == [
        "--resolution 48 is not a multiple of 32 px, the model's granularity (VAE factor 8 x 2^(UNet down blocks - "
        "1)): a T2I-Adapter's features would not meet the UNet's; try 64"
    ]
    assert not (tmp_path / "c").exists()


def test_latents_the_unet_cannot_take_are_refused_before_anything_is_encoded(tiny_model, fill_data, tmp_path):
    """From the configs alone, at start: a VAE with per-channel latent normalisation (not what
    the cache stores) and an inpainting UNet (9 input channels) are settings problems."""
    import json

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    for part, changes in (("vae", {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}), ("unet", {"in_channels": 9})):
        config = json.loads((model / part / "config.json").read_text())
        config.update(changes)
        (model / part / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as err:
        run(_cfg(model, fill_data, tmp_path / "c"))
    assert err.value.problems == [
        f"{model}/vae: its config sets latents_mean/latents_std (per-channel latent normalisation, as Playground v2.5 "
        "does); the cache stores latents as (z - shift_factor) * scaling_factor, which is not what such a model's UNet "
        "was trained on: not supported",
        f"{model}/unet takes 9 input channels but the VAE makes 4-channel latents (an inpainting UNet takes 9: a "
        "T2I-Adapter trains on a text-to-image UNet)",
    ]
    assert not (tmp_path / "c").exists()


def test_one_spelling_per_meaning_in_the_config():
    """"--max-aspect 0" and "--buckets none" mean "no limit" and "square crops": the config
    stores them as None, so the identity and the manifest do not depend on the spelling."""
    spelled = PrecomputeConfig(max_aspect=0, buckets=" None ")
    plain = PrecomputeConfig(max_aspect=None, buckets=None)
    assert (spelled.max_aspect, spelled.buckets) == (None, None)
    assert spelled.resolved() == plain.resolved()
    assert PrecomputeConfig().max_aspect == 4.0 and PrecomputeConfig(max_aspect=2.5).max_aspect == 2.5


def test_source_problems_join_config_problems(tiny_model, fill_data, tmp_path):
    with pytest.raises(ConfigError) as err:
        run(_cfg(tiny_model, fill_data, tmp_path / "c", image_column="nope", resolution=20))
    msg = str(err.value)
    assert "no image column 'nope'" in msg and "--resolution 20 is not a multiple of 32" in msg


def test_cli_reports_user_errors_without_traceback(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "text_encoder_2" / "config.json").unlink()
    result = _cli(["--model", str(broken), "--data", str(tmp_path / "nodata"), "--cache", str(tmp_path / "c"),
                   "--resolution", "100"])
    assert result.returncode == 1, result.stderr  # user errors exit 1 in every command (shards.runtime)
    assert "Traceback" not in result.stderr
    for part in (f"{broken}/text_encoder_2: no config.json", f"--data {tmp_path / 'nodata'}: no such file",
                 "--resolution 100 is not a multiple of 32"):
        assert part in result.stderr
    assert not (tmp_path / "c").exists()
    result = _cli(["--model", str(tiny_model), "--data", str(tmp_path), "--cache", "https://example.com/c",
                   "--resolution", "64"])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--cache https://example.com/c: https:// caches are read-only" in result.stderr
    from click.testing import CliRunner

    from precompute.__main__ import main

    help_text = CliRunner().invoke(main, ["--help"], terminal_width=200).output
    for flag in ("--model", "--vae", "--revision", "--variant", "--data", "--cache", "--data-kind", "--image-column",
                 "--conditioning-image-column", "--caption-column", "--resolution", "--crop", "--seed",
                 "--samples-per-shard", "--batch-size", "--latent-store", "--storage-dtype", "--vae-dtype",
                 "--text-dtype", "--device", "--strict", "--max-samples", "--allow-empty-captions",
                 "--num-workers", "--min-size", "--max-aspect", "--tmp-dir"):
        assert flag in help_text, flag
    flat = " ".join(help_text.split())
    assert "s3://bucket/prefix" in flat and "32 for SDXL" in flat and "per-cache subfolder" in flat


# ----------------------------------------------------------------------------------------------
# Processes: kill and resume, two processes


@pytest.fixture(scope="module")
def crop_data(tmp_path_factory) -> Path:
    """80x96 (h x w) images, so random crops at 64 px have room to move (and must repeat exactly)."""
    root = tmp_path_factory.mktemp("crop") / "data"
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(14):
        (root / "img" / f"{i}.png").write_bytes(_png(_image(80, 96, 100 + i)))
        (root / "img" / f"{i}.cond.png").write_bytes(_png(_image(80, 96, 200 + i)))
        rows.append({"image": f"img/{i}.png", "conditioning_image": f"img/{i}.cond.png", "text": f"item {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _args(model, data, cache) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--cache", str(cache), "--resolution", str(RES),
            "--crop", "random", "--seed", "7", "--samples-per-shard", "4", "--batch-size", "3",
            "--num-workers", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def reference_cache(tiny_model, crop_data, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("ref") / "cache"
    result = _cli(_args(tiny_model, crop_data, cache))
    assert result.returncode == 0, result.stderr
    return cache


def test_reference_cache_has_seeded_random_crops(reference_cache):
    manifest, samples = _samples(reference_cache)
    assert manifest.totals["samples"] == 14 and len(manifest.shards) == 4
    # 80x96 resizes to 64x76: the crop can only slide left-right, by up to 12 px.
    assert all(s.meta.original_size == (80, 96) and s.meta.target_size == (RES, RES) for s in samples)
    crops = [s.meta.crop_top_left for s in samples]
    assert all(top == 0 and 0 <= left <= 12 for top, left in crops)
    assert len(set(crops)) > 3  # random, not centred
    assert manifest.identity.section("seed") == 7


@pytest.mark.slow
def test_kill_and_resume_gives_a_byte_identical_cache(tiny_model, crop_data, reference_cache, tmp_path):
    cache = tmp_path / "cache"
    # Items 9-11 (shard 2, positions 1-3) become slow: 62 MP images (just under --max-image-pixels,
    # so they are decoded) take a few tenths of a second each to decode and resize, so the run sits
    # in shard 2 with shards 0 and 1 committed long enough for the kill to land mid-shard. (A FIFO
    # used to block the run here; precompute now refuses non-regular files without reading them.)
    # The process is frozen (SIGSTOP) first and the state checked, so the kill is mid-shard for sure.
    slow = io.BytesIO()
    Image.new("1", (8640, 7200)).save(slow, format="PNG")  # 80x96's aspect ratio, a few KB
    blockers = [crop_data / "img" / f"{i}.png" for i in (9, 10, 11)]
    originals = [b.read_bytes() for b in blockers]
    for b in blockers:
        b.write_bytes(slow.getvalue())
    try:
        proc = subprocess.Popen([sys.executable, "-m", "precompute", *_args(tiny_model, crop_data, cache)],
                                cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        staging = open_store(cache).staging_dir()  # where a local cache builds its shards

        def mid_shard_2() -> bool:
            return ((cache / schema.record_name(1)).exists() and not (cache / schema.record_name(2)).exists()
                    and bool(list(staging.glob(".tmp-shard-000002*"))))

        while not mid_shard_2():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the run never reached shard 2"
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)
        assert mid_shard_2(), "shard 2 finished before the run could be stopped"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
    finally:
        for b, data in zip(blockers, originals):
            b.write_bytes(data)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (cache / "records").iterdir()) == ["shard-000000.json", "shard-000001.json"]
    assert not (cache / schema.MANIFEST_FILE).exists()
    kept = (cache / schema.shard_name(0)).stat()

    result = _cli(_args(tiny_model, crop_data, cache))
    assert result.returncode == 0, result.stderr
    assert "2 already complete, 2 to encode" in result.stderr
    assert "removed 1 temporary file(s)" in result.stderr
    again = (cache / schema.shard_name(0)).stat()
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # resumed, not rebuilt
    ours, ref = _files(cache), _files(reference_cache)
    assert sorted(ours) == sorted(ref)
    assert [name for name in ref if ours[name] != ref[name]] == []


@pytest.mark.slow
def test_two_processes_give_the_same_cache_as_one(tiny_model, crop_data, reference_cache, tmp_path):
    cache = tmp_path / "cache"
    env = _env()
    env["ACCELERATE_USE_CPU"] = "true"  # without it, accelerate would start lone processes on a CPU box
    accelerate = Path(sys.executable).with_name("accelerate")
    result = run_launched(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         "-m", "precompute", *_args(tiny_model, crop_data, cache)],
        cwd=REPO, env=env, timeout=400,
    )
    assert result.returncode == 0, result.stderr
    assert "on cpu (2 processes)" in result.stderr and "on 2 process(es)" in result.stderr
    ours, ref = _files(cache), _files(reference_cache)
    assert sorted(ours) == sorted(ref)
    assert [name for name in ref if ours[name] != ref[name]] == []


def test_a_cache_where_every_item_was_skipped_is_an_error(tiny_model, fill_data, tmp_path):
    # The fill images are 64 px; a minimum side of 128 px skips every one of them. The run must
    # not report success, yet keep the manifest that says why.
    cache = tmp_path / "cache"
    with pytest.raises(PrecomputeError, match="no samples in the cache") as err:
        run(_cfg(tiny_model, fill_data, cache, min_size=128))
    assert "image_too_small 16 (the image's shortest side is below min_size)" in str(err.value)  # with its cure
    manifest = Manifest.load(open_store(cache))  # the record of why stays inspectable
    assert manifest.totals["samples"] == 0 and manifest.totals["skipped"] == {"image_too_small": 16}
    assert "run precompute again with the fixed settings (into this same folder" in str(err.value)
    # Other weights under the same name, the same settings: the early input check (which reads
    # the records before the model loads) saw the empty shards as done; once the identity is
    # replaced they are rebuilt, not taken as done.
    from precompute.tiny import build_tiny_sdxl

    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    empty = tmp_path / "empty"
    with pytest.raises(PrecomputeError, match="no samples in the cache"):
        run(_cfg(model, fill_data, empty, min_size=128))
    shutil.rmtree(model)
    build_tiny_sdxl(model, seed=1)
    with pytest.raises(PrecomputeError, match="no samples in the cache"):
        run(_cfg(model, fill_data, empty, min_size=128))
    assert read_identity(open_store(empty))["encoder"]["vae_fingerprint"] != \
        read_identity(open_store(cache))["encoder"]["vae_fingerprint"]
    # The fixed settings into the same folder: it holds no sample, so they replace the old ones.
    summary = run(_cfg(tiny_model, fill_data, cache))
    assert summary.samples_written == 16
    assert Manifest.load(open_store(cache)).identity.geometry.min_size is None


def test_a_resolution_off_the_model_granularity_suggests_one_that_fits(tiny_model, fill_data, tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve(_cfg(tiny_model, fill_data, tmp_path / "c", resolution=60), cuda_available=False)
    message = str(err.value)
    assert "not a multiple of 32" in message and "try 64" in message
    assert "try 56" not in message  # 56 passes the VAE factor but not the adapter's granularity


def test_progress_is_logged_as_lines_when_stderr_is_not_a_terminal(tiny_model, fill_data, tmp_path):
    result = _cli(["--model", str(tiny_model), "--data", str(fill_data), "--cache", str(tmp_path / "c"),
                   "--resolution", "64", "--samples-per-shard", "4", "--num-workers", "0"])
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "precompute: " in line and "images/s" in line]
    assert len(lines) >= 5 and lines[-1].split("precompute: ")[1].startswith("16/16 images (100%)")
    assert all("ETA" in line for line in lines)
    assert "\r" not in result.stderr  # no progress bar's carriage returns in a log


def test_a_caches_manifest_repeats_its_precompute(fill_cache, tmp_path):
    """manifest.json is a --config file: with another --cache it makes the same cache again, byte
    for byte (the manifest records every setting that decides the bytes, none of where it ran).
    The command line is parsed by the real command; the run is the one it calls."""
    from precompute.__main__ import main

    again = tmp_path / "again"
    params = main.make_context("precompute", ["--config", str(fill_cache / "manifest.json"), "--cache", str(again),
                                              "--num-workers", "0"]).params
    params.pop("config"), params.pop("verbose")
    run(PrecomputeConfig(**params))
    ours, theirs = _files(again), _files(fill_cache)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in theirs if ours[name] != theirs[name]] == []


def test_a_resolution_readers_would_refuse_is_refused_before_anything_is_written(tiny_model, fill_data, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("SHARDS_MAX_IMAGE_PIXELS", str(63 * 64))
    with pytest.raises(ConfigError, match=r"image sizes \[\(64, 64\)\] \(h, w\) are over 4032 pixels"):
        resolve(_cfg(tiny_model, fill_data, tmp_path / "c"), cuda_available=False)
    assert not (tmp_path / "c").exists()


def test_a_tmp_dir_that_is_a_file_is_called_one(tiny_model, fill_data, tmp_path):
    a_file = tmp_path / "scratch"
    a_file.write_text("x")
    assert f"--tmp-dir {a_file}: is a file, not a folder" in _cfg(tiny_model, fill_data, tmp_path / "c",
                                                                 tmp_dir=str(a_file)).problems()
    assert f"--tmp-dir {tmp_path / 'none'}: no such folder" in _cfg(tiny_model, fill_data, tmp_path / "c",
                                                                    tmp_dir=str(tmp_path / "none")).problems()


def test_the_summary_says_when_fewer_views_were_made_than_asked():
    """--crops 3 on images no larger than the crop: one crop position each, said in the summary."""
    from precompute.runner import Summary

    def summary(samples: int, sources: int | None, asked: int) -> str:
        return Summary(cache="c", world_size=1, shards=1, shards_resumed=0, shards_written=1, samples=samples,
                       samples_written=samples, items_read=8, skipped={}, captions_truncated=0, bytes=1000,
                       seconds=1.0, encode_seconds=1.0, sources=sources, views_asked=asked).format()

    assert "  views     1.00 per image of the 3 asked: an image no larger than its crop has fewer distinct crop " \
           "positions, and each is stored once" in summary(8, None, 3)
    assert "  views     2.50 per image of the 3 asked" in summary(20, 8, 3)
    assert "views     " not in summary(24, 8, 3) and "views     " not in summary(8, None, 1)


def test_a_glob_pattern_given_as_data_is_explained(tiny_model, tmp_path):
    problems = PrecomputeConfig(model=str(tiny_model), data=str(tmp_path / "data" / "train-*.parquet"),
                                cache=str(tmp_path / "c"), device="cpu").problems()
    assert (f"--data {tmp_path / 'data' / 'train-*.parquet'}: no such file or folder (glob patterns are not expanded: "
            "give the folder that holds the files, or a brace pattern such as 'data/{00000..00009}.tar')") in problems


def test_a_cache_folder_with_a_linked_shards_folder_or_a_manifest_folder_is_refused_before_encoding(
        tiny_model, fill_data, tmp_path):
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "shard-000000.tar").write_bytes(b"theirs")
    cache.mkdir()
    (cache / "shards").symlink_to(elsewhere)
    (cache / "manifest.json").mkdir()
    result = run_cli("precompute", ["--model", tiny_model, "--data", fill_data, "--cache", cache, "--resolution", "64",
                                    "--num-workers", "0"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"error: cannot write the cache here:\n  - {cache}/shards: a symbolic link inside the cache" in result.stderr
    assert f"  - {cache}/manifest.json: not a regular file, where the cache writes its manifest.json" in result.stderr
    assert "loading encoders" not in result.stderr  # said before any work
    assert (elsewhere / "shard-000000.tar").read_bytes() == b"theirs"
