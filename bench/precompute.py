"""Benchmark precompute: images/s and where the time goes (decode, VAE, text encoders, writing).

Not a test. Builds what it needs in a temporary folder and runs the real runner on it:

    python bench/precompute.py                       # tiny SDXL, 256 fill images at 64 px, here
    python bench/precompute.py --model sdxl --device cuda   # full-size SDXL encoders, random
                                                            # weights, 64 images at 1024 px
    python bench/precompute.py --model PATH_OR_HUB_ID --resolution 1024 --n 256

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


def build_random_sdxl_encoders(out: Path, config_dir: Path) -> Path:
    """A diffusers-layout folder with SDXL's VAE and text encoders at full size, random weights.

    Saved in fp16 to halve the disk traffic (precompute loads in fp32 and casts as asked).
    """
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from precompute.tiny import EOS, PAD_2, _write_tokenizer, build_vocab

    vocab, merges = build_vocab()
    _write_tokenizer(out / "tokenizer", vocab, merges, pad=EOS)
    _write_tokenizer(out / "tokenizer_2", vocab, merges, pad=PAD_2)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(config_dir / "vae")))
    vae.half().save_pretrained(out / "vae")
    del vae
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
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
@click.option("--vae-dtype", default="fp32", show_default=True)
@click.option("--text-dtype", default="fp32", show_default=True)
@click.option("--sdxl-configs", default=None, help="Folder with SDXL's component configs [default: shared/sdxl-base-1.0].")
@click.option("--workdir", default=None, help="Build here and keep it (default: a temp folder, removed).")
def main(model, n, resolution, batch_size, num_workers, samples_per_shard, device, vae_dtype, text_dtype,
         sdxl_configs, workdir) -> None:
    from precompute.config import PrecomputeConfig
    from precompute.fill import make_fill_dataset
    from precompute.runner import run
    from precompute.tiny import build_tiny_sdxl

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
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
        print(f"  settings   batch {batch_size}, {num_workers} decode threads, device {device}, vae {vae_dtype}, "
              f"text {text_dtype}, {s.world_size} process(es)")
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


if __name__ == "__main__":
    main()
