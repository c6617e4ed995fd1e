"""How far the VAE's latents move when precompute encodes in bf16 or fp16 instead of fp32.

    python bench/vae_error.py --model mid --resolution 256 --n 8

Not a test. Builds the VAE from a config with random weights (seeded; `mid` is SDXL's VAE at half
width, `sdxl` full size, `tiny` precompute.tiny's), encodes the same images with
precompute.encoders.LatentEncoder in fp32, bf16 and fp16 (tf32 is fp32 on a CPU: it only changes
CUDA kernels), and compares the scaled posterior mean (latent_mean, what the cache stores) and
std with fp32's: relative L2 error (||x - x_fp32|| / ||x_fp32|| over the whole batch) and max
absolute error, and the mean's RMS error over the posterior's RMS std (train draws mean + std x
noise every step: below 1 the error hides in that noise). For scale, a row per set gives the
rounding the cache's bf16 storage already applies to the fp32 latents.

The math is the GPU's up to kernel choice and accumulation order; random weights are not SDXL's
trained ones (whose activations reach fp16's range on some images: the reason for fp16-fixed
VAEs), so read the numbers as the arithmetic's error through SDXL's VAE structure, not as a
measurement of SDXL's own VAE. Two image sets: fill images (flat circles, as the demo data) and
uniform noise (every pixel independent: the hardest case for rounding).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "bench"))


def _images(kind: str, n: int, resolution: int, workdir: Path):
    import numpy as np
    import torch
    from PIL import Image

    if kind == "noise":
        g = torch.Generator().manual_seed(0)
        return torch.rand(n, 3, resolution, resolution, generator=g) * 2 - 1
    from precompute.fill import make_fill_dataset

    data = make_fill_dataset(workdir / "fill", n=n, resolution=resolution, seed=0)
    paths = sorted((data / "target").glob("*.png"))[:n]
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@click.command()
@click.option("--model", type=click.Choice(["tiny", "mid", "sdxl"]), default="mid", show_default=True)
@click.option("--resolution", type=int, default=256, show_default=True)
@click.option("--n", type=int, default=8, show_default=True, help="Images per set.")
@click.option("--batch", type=int, default=4, show_default=True, help="Images per VAE call.")
@click.option("--dtypes", default="fp32,bf16,fp16", show_default=True,
              help="Encode dtypes (fp32 is always the reference). fp16 convolutions have no fast CPU kernels here "
                   "(about 200x slower than fp32): measure it at a lower resolution.")
@click.option("--sdxl-dir", default=None, help="SDXL base 1.0 configs [default: tests/assets/sdxl-base-1.0].")
def main(model: str, resolution: int, n: int, batch: int, dtypes: str, sdxl_dir: str | None) -> None:
    import tempfile

    import torch
    from diffusers import AutoencoderKL

    from precompute.encoders import LatentEncoder
    from train_step import find_sdxl_dir, model_configs

    _, vae_cfg = model_configs(model, None if model == "tiny" else find_sdxl_dir(sdxl_dir and Path(sdxl_dir)))
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(vae_cfg)
    params = sum(p.numel() for p in vae.parameters()) / 1e6
    print(f"VAE: {model} ({params:.1f}M parameters, random weights, seed 0), {resolution} px, {n} images per set, "
          f"batch {batch}, CPU, torch {torch.__version__}")
    print(f"{'images':<7} {'encode':<20} {'mean rel L2':>12} {'mean max abs':>13} {'std rel L2':>11} "
          f"{'std max abs':>12} {'mean rms/std':>13} {'s/image':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("fill", "noise"):
            pixels = _images(kind, n, resolution, Path(tmp))
            out = {}
            names = ["fp32"] + [d for d in dtypes.split(",") if d and d != "fp32"]
            for name in names:
                enc = LatentEncoder(copy.deepcopy(vae), dtype=name)
                t0 = time.perf_counter()
                parts = [enc.encode(pixels[i:i + batch])[:2] for i in range(0, n, batch)]
                seconds = (time.perf_counter() - t0) / n
                out[name] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), seconds)
            mean32, std32, _ = out["fp32"]

            def errors(mean, std):
                rel = lambda x, ref: float((x - ref).norm() / ref.norm())  # noqa: E731
                rms = lambda x: x.pow(2).mean().sqrt()  # noqa: E731
                return (rel(mean, mean32), float((mean - mean32).abs().max()), rel(std, std32),
                        float((std - std32).abs().max()), float(rms(mean - mean32) / rms(std32)))

            for name in names:
                mean, std, seconds = out[name]
                finite = bool(torch.isfinite(mean).all() and torch.isfinite(std).all())
                e = errors(mean, std) if finite else (float("nan"),) * 5
                print(f"{kind:<7} {name:<20} {e[0]:>12.2e} {e[1]:>13.2e} {e[2]:>11.2e} {e[3]:>12.2e} {e[4]:>13.2e} "
                      f"{seconds:>8.2f}"
                      + ("" if finite else "  non-finite latents"))
            stored = errors(mean32.bfloat16().float(), std32.bfloat16().float())
            print(f"{kind:<7} {'fp32, stored as bf16':<20} {stored[0]:>12.2e} {stored[1]:>13.2e} {stored[2]:>11.2e} "
                  f"{stored[3]:>12.2e} {stored[4]:>13.2e}        -  (what the cache's default bf16 storage rounds)")
            print(f"{kind:<7} fp32 latent_mean: std {float(mean32.std()):.3f}, max abs {float(mean32.abs().max()):.3f}")


if __name__ == "__main__":
    main()
