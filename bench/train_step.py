"""Benchmark (not a test): our training step against a reference-style step, same model and batch.

    PYTHONPATH=. .venv/bin/python bench/train_step.py --model tiny
    PYTHONPATH=. .venv/bin/python bench/train_step.py --model mid --resolution 256 --batch 2
    python bench/train_step.py --model sdxl --resolution 1024 --batch 8 --device cuda --dtype bf16

Two steps over one UNet (random weights built from a config, no download):

- ours: train.step as the trainer runs it: UNet frozen (`freeze_unet`) in the weight dtype, the
  adapter in fp32 under autocast, cached latent moments (one fresh posterior draw per step) and
  prompt embeddings, sigmas from a device table; with the trainer's fast paths as asked
  (`--compile`, `--channels-last`, `--fused-adamw`; attention through `train.fast`, SDPA).
- reference: diffusers' train_t2i_adapter_sdxl.py step (docs/background.md section 1), written here: the
  fp32 VAE encodes every image every step (`latent_dist.sample()`), the UNet is not frozen so its
  weight gradients are computed and kept (nothing ever clears them), per-sample sigma lookup with
  `.nonzero().item()`, `down_block_additional_residuals`, `zero_grad(set_to_none=False)`.

Both use AdamW on the adapter, grad-norm clipping at 1.0 and the same cubic timesteps. As in the
reference (accelerate autocasts only prepared modules, and only the adapter is prepared), autocast
wraps the adapter's forward; the UNet runs in its weight dtype. Each step runs in its own fresh
process, one after the other, so memory and warm caches do not leak from one to the other. Peak
memory is `torch.cuda.max_memory_allocated` on CUDA; on CPU it is the peak resident set size of the
process while stepping (Linux VmHWM, reset after the models are built), which includes the
weights, the allocator's slack and the Python runtime.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import click
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `python bench/train_step.py`

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_RESOLUTION = {"tiny": 64, "mid": 256, "sdxl": 1024}
# SDXL base 1.0's component configs: the team's shared folder beside the repo, or a copy inside it.
SDXL_DIRS = (ROOT / "tests" / "assets" / "sdxl-base-1.0", ROOT / "shared" / "sdxl-base-1.0", ROOT.parent / "shared" / "sdxl-base-1.0")


# --------------------------------------------------------------------------------------------
# models


def find_sdxl_dir(given: Path | None) -> Path:
    found = given or next((d for d in SDXL_DIRS if (d / "unet" / "config.json").is_file()), None)
    if found is None or not (found / "unet" / "config.json").is_file() or not (found / "vae" / "config.json").is_file():
        looked = [str(given)] if given else [str(d) for d in SDXL_DIRS]
        raise click.UsageError(f"no SDXL unet/config.json and vae/config.json in {looked}; pass --sdxl-dir")
    return found


def model_configs(model: str, sdxl_dir: Path | None) -> tuple[dict, dict]:
    """(UNet config, VAE config) for tiny | mid | sdxl."""
    if model == "tiny":
        from precompute.tiny import unet_config, vae_config

        return unet_config(), vae_config()
    sdxl_dir = find_sdxl_dir(sdxl_dir)
    unet_cfg = json.loads((sdxl_dir / "unet" / "config.json").read_text())
    vae_cfg = json.loads((sdxl_dir / "vae" / "config.json").read_text())
    if model == "mid":
        # SDXL's structure (block types, layer and transformer depths, text widths) at half the
        # channel width: about a quarter of the FLOPs, in both the UNet and the VAE.
        unet_cfg["block_out_channels"] = [c // 2 for c in unet_cfg["block_out_channels"]]
        vae_cfg["block_out_channels"] = [c // 2 for c in vae_cfg["block_out_channels"]]
    return unet_cfg, vae_cfg


def text_dims(unet_cfg: dict) -> tuple[int, int]:
    """(prompt embedding width, pooled width) that this UNet takes."""
    pooled = unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
    return unet_cfg["cross_attention_dim"], pooled


def build_unet(unet_cfg: dict, device: torch.device, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):  # initialise in place: a full SDXL UNet is 10 GB in fp32
        return UNet2DConditionModel.from_config(unet_cfg)


class AutocastAdapter(torch.nn.Module):
    """What accelerate does to a prepared module under mixed precision: autocast its forward and
    hand back fp32 outputs."""

    def __init__(self, adapter: torch.nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.adapter, self.device_type, self.dtype = adapter, device_type, dtype

    def forward(self, x):
        if self.dtype == torch.float32:
            return self.adapter(x)
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.adapter(x)
        return [o.float() for o in out]


# --------------------------------------------------------------------------------------------
# memory


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        # Linux: writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS.
        Path("/proc/self/clear_refs").write_text("5")


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return _proc_status_kib("VmHWM") * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# the two steps


def run_variant(variant: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Build the models in this (fresh) process, time `opts['steps']` steps of `variant`."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler

    from precompute.tiny import SDXL_SCHEDULER_CONFIG
    from train.step import (
        Batch,
        Objective,
        build_adapter,
        count_parameters,
        freeze_unet,
    )

    device = torch.device(opts["device"])
    weight_dtype = DTYPES[opts["dtype"]]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    unet_cfg, vae_cfg = model_configs(opts["model"], opts["sdxl_dir"] and Path(opts["sdxl_dir"]))
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    res, n = opts["resolution"], opts["batch"]
    h = res // vae_factor
    text_dim, pooled_dim = text_dims(unet_cfg)
    scaling = vae_cfg.get("scaling_factor", 0.13025)

    unet = build_unet(unet_cfg, device, opts["seed"])
    torch.manual_seed(opts["seed"] + 1)
    adapter = build_adapter(unet.config, vae_factor).to(device)  # fp32 master weights
    if opts["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    run_adapter = AutocastAdapter(adapter, device.type, weight_dtype)

    g = torch.Generator(device).manual_seed(opts["seed"] + 2)
    prompt_embeds = torch.randn(n, 77, text_dim, generator=g, device=device)
    pooled = torch.randn(n, pooled_dim, generator=g, device=device)
    add_time_ids = torch.tensor([[res, res, 0, 0, res, res]] * n, dtype=torch.float32, device=device)
    cond = torch.rand(n, 3, res, res, generator=g, device=device)
    step_generator = torch.Generator(device).manual_seed(opts["seed"] + 3)

    if variant == "ours":
        import logging
        import types

        from train import fast
        from train.optim import OptimizerSpec, make_optimizer

        freeze_unet(unet, weight_dtype)
        optimizer = make_optimizer(OptimizerSpec(learning_rate=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                                                 fused=opts.get("fused", False)), adapter.parameters())
        # The trainer's own fast paths (train.fast): attention processor, channels_last, compile.
        fast_cfg = types.SimpleNamespace(attention=opts.get("attention", "sdpa"), compile=opts.get("compile", False),
                                         channels_last=opts.get("channels_last", False))
        step_fns = fast.prepare(fast_cfg, unet, run_adapter, shapes=1, log=logging.getLogger("bench"))
        objective = Objective(SDXL_SCHEDULER_CONFIG, device)
        # What the loader delivers: cached moments and embeddings in the cache's bf16.
        batch = Batch(
            latent_mean=torch.randn(n, 4, h, h, generator=g, device=device).bfloat16(),
            latent_std=(0.1 * torch.rand(n, 4, h, h, generator=g, device=device)).bfloat16(),
            prompt_embeds=prompt_embeds.bfloat16(),
            pooled_prompt_embeds=pooled.bfloat16(),
            add_time_ids=add_time_ids,
            cond=cond,
            keys=[str(i) for i in range(n)],
        )

        def step() -> torch.Tensor:
            loss = objective.loss(step_fns.unet, step_fns.adapter, batch, step_generator)
            loss.backward()
            step_fns.observe(0, batch)
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        extra = {}
    else:
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5, weight_decay=1e-2)  # the reference's
        step_fns = None
        torch.nn.Module.to(unet, dtype=weight_dtype).train()  # never frozen: weight grads computed every step
        torch.manual_seed(opts["seed"] + 4)
        with torch.device(device):
            vae = AutoencoderKL.from_config(vae_cfg)
        vae.requires_grad_(False).eval()  # fp32, as the reference keeps the default VAE
        scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
        pixel_values = torch.rand(n, 3, res, res, generator=g, device=device) * 2 - 1
        T = scheduler.config.num_train_timesteps

        def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
            sigmas = scheduler.sigmas.to(device=device, dtype=dtype)
            schedule_timesteps = scheduler.timesteps.to(device)
            step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps.to(device)]
            sigma = sigmas[step_indices].flatten()
            while len(sigma.shape) < n_dim:
                sigma = sigma.unsqueeze(-1)
            return sigma

        def step() -> torch.Tensor:
            latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample(generator=step_generator)
            latents = (latents * scaling).to(weight_dtype)
            noise = torch.randn(latents.shape, generator=step_generator, device=device, dtype=latents.dtype)
            timesteps = torch.rand((n,), generator=step_generator, device=device)
            timesteps = ((1 - timesteps**3) * T).long().to(scheduler.timesteps.dtype).clamp(0, T - 1)
            noisy_latents = scheduler.add_noise(latents, noise, timesteps)
            sigmas = get_sigmas(timesteps, len(noisy_latents.shape), noisy_latents.dtype)
            inp_noisy_latents = noisy_latents / ((sigmas**2 + 1) ** 0.5)
            residuals = [r.to(dtype=weight_dtype) for r in run_adapter(cond)]
            model_pred = unet(
                inp_noisy_latents,
                timesteps,
                encoder_hidden_states=prompt_embeds.to(weight_dtype),
                added_cond_kwargs={"text_embeds": pooled.to(weight_dtype), "time_ids": add_time_ids.to(weight_dtype)},
                down_block_additional_residuals=residuals,
                return_dict=False,
            )[0]
            denoised_latents = model_pred * (-sigmas) + noisy_latents
            weighing = sigmas**-2.0
            loss = torch.mean(
                (weighing.float() * (denoised_latents.float() - latents.float()) ** 2).reshape(n, -1), 1
            ).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # the reference's default; UNet grads are never cleared
            return loss.detach()

        extra = {"vae_params": sum(p.numel() for p in vae.parameters())}

    warnings.filterwarnings("ignore", category=FutureWarning)  # the reference's deprecated argument
    trainable, frozen = count_parameters(unet)
    common = {
        "variant": variant,
        "unet_trainable": trainable,
        "unet_frozen": frozen,
        "adapter_params": sum(p.numel() for p in adapter.parameters()),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "compile": bool(step_fns and step_fns.watch),
    }
    reset_peak(device)
    first_step_s = None
    # Per-step wall times (synchronised) so a burst of load from other processes shows up as an
    # outlier the median ignores; process CPU time measures the work itself on a shared CPU box.
    wall, losses = [], []
    try:
        for i in range(opts["warmup"]):
            start = time.perf_counter()
            step()
            sync(device)
            if i == 0:
                first_step_s = time.perf_counter() - start  # with --compile: the compile is in here
        cpu_start = time.process_time()
        for _ in range(opts["steps"]):
            start = time.perf_counter()
            losses.append(step())
            sync(device)
            wall.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return {**common, "oom": True, "peak_mib": peak_bytes(device) / 2**20}
    cpu = time.process_time() - cpu_start
    median = sorted(wall)[len(wall) // 2]
    if step_fns is not None and step_fns.watch is not None:
        common.update(graphs=step_fns.watch.graphs, recompiles=step_fns.watch.recompiles)
    return {
        **common,
        "oom": False,
        "first_step_s": first_step_s,
        "samples_per_s": n / median,
        "step_ms": 1000 * median,
        "mean_step_ms": 1000 * sum(wall) / len(wall),
        "cpu_s_per_step": cpu / opts["steps"],
        "peak_mib": peak_bytes(device) / 2**20,
        "final_loss": float(losses[-1]),
        **extra,
    }


def run_isolated(variant: str, opts: dict[str, Any]) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(run_variant, variant, opts).result()


@click.command()
@click.option("--model", type=click.Choice(["tiny", "mid", "sdxl"]), default="tiny", show_default=True,
              help="tiny: precompute.tiny's configs; mid: SDXL's structure at half width; "
                   "sdxl: SDXL base 1.0's configs, full size.")
@click.option("--resolution", type=int, default=None,
              help="Image side in pixels [default: 64 tiny, 256 mid, 1024 sdxl].")
@click.option("--batch", type=int, default=2, show_default=True)
@click.option("--steps", type=int, default=5, show_default=True, help="Timed steps.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed steps first.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="[default: cuda if available]")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=None,
              help="UNet weight dtype and autocast dtype [default: bf16 on cuda, fp32 on cpu].")
@click.option("--gradient-checkpointing", is_flag=True, help="Checkpoint the UNet's blocks in both steps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sdxl-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder with SDXL base 1.0's unet/ and vae/ config.json, for mid and sdxl "
                   "[default: shared/sdxl-base-1.0 in or beside the repo].")
@click.option("--only", type=click.Choice(["ours", "reference"]), default=None, help="Run one side only.")
@click.option("--compile", "compile_", is_flag=True, help="Ours: torch.compile the UNet and adapter (train --compile).")
@click.option("--channels-last", is_flag=True, help="Ours: the UNet in channels_last (train --channels-last).")
@click.option("--fused-adamw/--no-fused-adamw", default=None,
              help="Ours: fused AdamW (train's default: on with cuda). The reference keeps torch's default AdamW.")
def main(model, resolution, batch, steps, warmup, device, dtype, gradient_checkpointing, seed, sdxl_dir, only,
         compile_, channels_last, fused_adamw):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bf16" if device == "cuda" else "fp32")
    opts = {
        "model": model, "resolution": resolution or DEFAULT_RESOLUTION[model], "batch": batch, "steps": steps,
        "warmup": warmup, "device": device, "dtype": dtype, "gradient_checkpointing": gradient_checkpointing,
        "seed": seed, "sdxl_dir": None if model == "tiny" else str(find_sdxl_dir(sdxl_dir)),
        "compile": compile_, "channels_last": channels_last,
        "fused": device == "cuda" if fused_adamw is None else fused_adamw,
    }  # fmt: skip
    _, vae_cfg = model_configs(model, opts["sdxl_dir"] and Path(opts["sdxl_dir"]))
    multiple = 4 * 2 ** (len(vae_cfg["block_out_channels"]) - 1)  # adapter unshuffle + two UNet downsamples
    if opts["resolution"] % multiple:
        raise click.BadParameter(f"{opts['resolution']} is not a multiple of {multiple}", param_hint="--resolution")
    variants = [only] if only else ["ours", "reference"]
    results = {v: run_isolated(v, opts) for v in variants}
    for v, r in results.items():
        if r["oom"]:
            raise click.ClickException(f"{v}: out of memory at batch {batch} (peak {r['peak_mib']:.0f} MiB)")

    first = next(iter(results.values()))
    mem_label = "peak alloc MiB" if device == "cuda" else "peak RSS MiB"
    print(
        f"model={model} resolution={opts['resolution']} batch={batch} dtype={dtype} device={first['device_name']} "
        f"steps={steps} (+{warmup} warmup) gradient_checkpointing={gradient_checkpointing}"
    )
    unet_params = (first["unet_trainable"] + first["unet_frozen"]) / 1e6
    print(f"UNet params {unet_params:.1f}M, adapter params {first['adapter_params'] / 1e6:.2f}M")
    print(
        f"{'step':<10} {'samples/s':>10} {'median ms':>10} {'mean ms':>10} {'CPU s/step':>11} "
        f"{mem_label:>15} {'UNet trainable':>15} {'final loss':>11}"
    )
    for v, r in results.items():
        print(
            f"{v:<10} {r['samples_per_s']:>10.2f} {r['step_ms']:>10.1f} {r['mean_step_ms']:>10.1f} "
            f"{r['cpu_s_per_step']:>11.2f} {r['peak_mib']:>15.0f} {r['unet_trainable'] / 1e6:>14.1f}M "
            f"{r['final_loss']:>11.4f}"
        )
    print("samples/s = batch / median step time; CPU s/step = process CPU time (all threads) per step")
    if len(results) == 2:
        ours, ref = results["ours"], results["reference"]
        cpu_ratio = ref["cpu_s_per_step"] / ours["cpu_s_per_step"]
        print(
            f"ours / reference: {ours['samples_per_s'] / ref['samples_per_s']:.2f}x samples/s"
            + (f" ({cpu_ratio:.2f}x less CPU time per step)" if device == "cpu" else "")
            + f", {ours['peak_mib'] / ref['peak_mib']:.2f}x peak memory"
        )


if __name__ == "__main__":
    main()
