"""Benchmark precompute: images/s and where the time goes (decode, VAE, text encoders, writing).

Not a test. Builds what it needs in a temporary folder and runs the real runner on it:

    python bench/precompute.py                       # tiny SDXL, 256 fill images at 64 px, here
    python bench/precompute.py --model sdxl --device cuda   # full-size SDXL encoders, random
                                                            # weights, 64 images at 1024 px
    python bench/precompute.py --model PATH_OR_HUB_ID --resolution 1024 --n 256
    python bench/precompute.py --formats --n 2048 --resolution 256   # reading speed per dataset format
    python bench/precompute.py --formats --with-precompute          # ...and precompute images/s per format

`--formats` writes the same N fill images as a parquet dataset (the hub layout, `datasets.Image`
columns), a metadata folder (metadata.jsonl + PNG files) and WebDataset tars (one per
--samples-per-shard images), then times *reading* each: the source's iteration over every unit
(raw bytes and captions, no decoding, no encoding), best of --repeats passes after one warm-up
pass, so the page cache holds the files for every format alike. Opening is timed apart: for
parquet it includes datasets' one-time conversion into its Arrow cache on the first open.

`--model sdxl` builds the VAE and both text encoders at SDXL base 1.0's real sizes from the
configs in shared/sdxl-base-1.0 (random weights: the speed is the same), with the tiny offline
tokenizers (token ids stay far inside SDXL's vocabulary, and every prompt is padded to 77 tokens
anyway). Several processes: run it under `accelerate launch` like precompute itself.

Reading the split: decoding and preprocessing run in worker threads, overlapped with encoding;
"main thread waiting" is the part of it the encoders could not hide. VAE, text and write times
are the main thread's, so they add up (with the wait) to the encoding wall time.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from a checkout

SDXL_CONFIG_CANDIDATES = (REPO / "tests" / "assets" / "sdxl-base-1.0", REPO / "shared" / "sdxl-base-1.0", REPO.parent / "shared" / "sdxl-base-1.0")


def build_random_sdxl_encoders(out: Path, config_dir: Path, *, vae_config: dict | None = None,
                               device: str = "cpu") -> Path:
    """A diffusers-layout folder with SDXL's VAE and text encoders at full size, random weights.

    `vae_config` replaces the VAE's config (bench/gpu.py's `mid` halves its widths); `device` is
    where the weights are initialised (a GPU does it in seconds). Saved in fp16 to halve the disk
    traffic (precompute loads in fp32 and casts as asked).
    """
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from precompute.tiny import EOS, PAD_2, _write_tokenizer, build_vocab

    vocab, merges = build_vocab()
    _write_tokenizer(out / "tokenizer", vocab, merges, pad=EOS)
    _write_tokenizer(out / "tokenizer_2", vocab, merges, pad=PAD_2)
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL.from_config(vae_config or AutoencoderKL.load_config(str(config_dir / "vae")))
    vae.half().save_pretrained(out / "vae")
    del vae
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        with torch.device(device):
            model = cls(CLIPTextConfig.from_pretrained(str(config_dir / name)))
        model.half().save_pretrained(out / name)
        del model
    return out


def _find_sdxl_configs(given: str | None) -> Path:
    candidates = [Path(given)] if given else list(SDXL_CONFIG_CANDIDATES)
    for c in candidates:
        if (c / "vae" / "config.json").is_file():
            return c
    raise click.UsageError(f"SDXL configs not found in {', '.join(map(str, candidates))}; pass --sdxl-configs")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default="tiny", show_default=True,
              help="tiny (built offline), sdxl (full-size encoders, random weights), or a hub id / folder.")
@click.option("--n", "n", type=int, default=None, help="Fill images to encode [default: 256 tiny, 64 otherwise].")
@click.option("--resolution", type=int, default=None, help="[default: 64 tiny, 1024 otherwise]")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--num-workers", type=int, default=4, show_default=True)
@click.option("--samples-per-shard", type=int, default=64, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--vae-dtype", default=None, help="[default: precompute's: bf16 on cuda, fp32 on cpu]")
@click.option("--text-dtype", default=None, help="[default: precompute's: fp16 on cuda, fp32 on cpu]")
@click.option("--sdxl-configs", default=None, help="Folder with SDXL's component configs [default: shared/sdxl-base-1.0].")
@click.option("--workdir", default=None, help="Build here and keep it (default: a temp folder, removed).")
@click.option("--formats", is_flag=True, help="Compare reading speed of parquet / metadata folder / WebDataset.")
@click.option("--with-precompute", is_flag=True, help="With --formats: also the full precompute images/s per format.")
@click.option("--repeats", type=int, default=3, show_default=True, help="With --formats: timed reading passes.")
def main(model, n, resolution, batch_size, num_workers, samples_per_shard, device, vae_dtype, text_dtype,
         sdxl_configs, workdir, formats, with_precompute, repeats) -> None:
    from precompute.config import PrecomputeConfig
    from precompute.fill import make_fill_dataset
    from precompute.runner import run
    from precompute.tiny import build_tiny_sdxl

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if formats:
        compare_formats(n or 1024, resolution or 64, samples_per_shard, repeats, with_precompute, workdir,
                        dict(batch_size=batch_size, num_workers=num_workers, device=device))
        return
    tiny = model == "tiny"
    n = n or (256 if tiny else 64)
    resolution = resolution or (64 if tiny else 1024)
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        if tiny:
            model_path = str(build_tiny_sdxl(root / "model"))
        elif model == "sdxl":
            model_path = str(build_random_sdxl_encoders(root / "model", _find_sdxl_configs(sdxl_configs)))
        else:
            model_path = model
        data = make_fill_dataset(root / "fill", n=n, resolution=resolution, seed=0)
        setup = time.perf_counter() - t0
        cache = root / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        cfg = PrecomputeConfig(
            model=model_path, data=str(data), cache=str(cache), resolution=resolution, batch_size=batch_size,
            num_workers=num_workers, samples_per_shard=samples_per_shard, device=device, vae_dtype=vae_dtype,
            text_dtype=text_dtype,
        )
        s = run(cfg)
        t = s.timings
        main_thread = t.read + t.wait + t.vae + t.text + t.write + t.commit or 1.0
        per_img = 1000.0 / max(s.items_read, 1)
        print(f"precompute benchmark: model {model} ({model_path if not tiny else 'tiny SDXL'}), {n} fill images at "
              f"{resolution} px")
        print(f"  settings   batch {batch_size}, {num_workers} decode threads, device {device}, vae {vae_dtype or 'default'}, "
              f"text {text_dtype or 'default'}, {s.world_size} process(es)")
        print(f"  images/s   {s.images_per_second:.1f}  ({s.items_read} images in {s.encode_seconds:.2f} s of "
              f"encoding; whole run {s.seconds:.1f} s with model loading; setup {setup:.1f} s)")
        print(f"  output     {s.samples} samples, {s.shards} shards, {s.bytes / 1e6:.2f} MB "
              f"({s.bytes / max(s.samples, 1) / 1024:.1f} KiB/sample)")
        print("  time split (seconds summed over processes; % of the main thread's time; ms per image)")
        rows = [
            ("decode + preprocess (worker threads, overlapped)", t.prepare, None),
            ("  read raw bytes (main thread)", t.read, t.read),
            ("  main thread waiting for decode", t.wait, t.wait),
            ("encode: VAE", t.vae, t.vae),
            ("encode: text encoders", t.text, t.text),
            ("write: serialise into the tar", t.write, t.write),
            ("write: commit (re-read, sha256, publish)", t.commit, t.commit),
        ]
        for label, secs, main_part in rows:
            share = f"{100 * main_part / main_thread:5.1f}%" if main_part is not None else "   -  "
            print(f"    {label:<46} {secs:8.3f}  {share}  {secs * per_img:8.2f} ms")
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)


def write_formats(root: Path, n: int, resolution: int, samples_per_shard: int) -> dict[str, Path]:
    """The same n fill images as a metadata folder, a hub-layout parquet dataset and WebDataset tars."""
    import io
    import json
    import tarfile

    import datasets

    from precompute.fill import make_fill_dataset

    fill = make_fill_dataset(root / "folder", n=n, resolution=resolution, seed=0)
    rows = [json.loads(line) for line in (fill / "prompt.json").read_text().splitlines()]
    meta = [{"image": r["target"], "conditioning_image": r["source"], "text": r["prompt"]} for r in rows]
    (fill / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))  # wins over prompt.json
    image = lambda rel: (fill / rel).read_bytes()  # noqa: E731
    features = datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                  "text": datasets.Value("string")})
    table = {"image": [{"bytes": image(m["image"]), "path": None} for m in meta],
             "conditioning_image": [{"bytes": image(m["conditioning_image"]), "path": None} for m in meta],
             "text": [m["text"] for m in meta]}
    (root / "parquet" / "data").mkdir(parents=True)
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict(table, features=features).to_parquet(
        str(root / "parquet" / "data" / "train-00000-of-00001.parquet"))
    tars = root / "webdataset"
    tars.mkdir()
    for t, start in enumerate(range(0, n, samples_per_shard)):
        with tarfile.open(tars / f"{t:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(start, min(n, start + samples_per_shard)):
                m = meta[i]
                for suffix, data in (("png", image(m["image"])), ("cond.png", image(m["conditioning_image"])),
                                     ("txt", m["text"].encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{suffix}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return {"parquet": root / "parquet", "folder": fill, "webdataset": tars}


def compare_formats(n: int, resolution: int, samples_per_shard: int, repeats: int, with_precompute: bool,
                    workdir: str | None, run_kw: dict) -> None:
    from precompute.config import PrecomputeConfig
    from precompute.runner import run
    from precompute.sources import open_source
    from precompute.tiny import build_tiny_sdxl

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bench-formats-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        specs = write_formats(root, n, resolution, samples_per_shard)
        hf_cache = str(root / "hf-cache")
        model = str(build_tiny_sdxl(root / "model")) if with_precompute else None
        print(f"dataset formats: {n} fill images at {resolution} px, {samples_per_shard} per unit; reading = source "
              f"iteration (raw bytes + captions, no decoding), best of {repeats}")
        head = f"{'format':<11} {'files':>6} {'MB':>8} {'open s':>7} {'read s':>7} {'rows/s':>9} {'MB/s':>7}"
        print(head + (f" {'precompute img/s':>17}" if with_precompute else ""))
        for fmt, path in specs.items():
            files = [p for p in path.rglob("*") if p.is_file()]
            mb = sum(p.stat().st_size for p in files) / 1e6
            t0 = time.perf_counter()
            src = open_source(path, samples_per_shard=samples_per_shard, cache_dir=hf_cache)
            opened = time.perf_counter() - t0
            best, count, nbytes = float("inf"), 0, 0
            for rep in range(repeats + 1):  # pass 0 warms the page cache
                t0 = time.perf_counter()
                count = nbytes = 0
                for u in range(src.num_units()):
                    for it in src.iter_unit(u):
                        count += 1
                        nbytes += len(it.image or b"") + len(it.cond or b"")
                if rep:
                    best = min(best, time.perf_counter() - t0)
            assert count == n, (fmt, count)
            line = (f"{fmt:<11} {len(files):>6} {mb:>8.2f} {opened:>7.3f} {best:>7.3f} {count / best:>9.0f} "
                    f"{nbytes / 1e6 / best:>7.1f}")
            if with_precompute:
                cache = root / f"cache-{fmt}"
                shutil.rmtree(cache, ignore_errors=True)
                s = run(PrecomputeConfig(model=model, data=str(path), cache=str(cache), resolution=resolution,
                                         samples_per_shard=samples_per_shard, cache_dir=hf_cache, **run_kw))
                line += f" {s.images_per_second:>17.1f}"
            print(line)
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
