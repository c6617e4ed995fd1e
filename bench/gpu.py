"""The issue's GPU numbers in one command: train step, precompute and loader, one table (and JSON).

    bench/gpu.sh                      # on an H100/H200: SDXL base 1.0 size, 1024 px, bf16, batch 8 and 16
    bench/gpu.sh --device cpu --model mid --resolution 128 --batches 2 --steps 2 --warmup 1   # same code, a CPU

Not a test. Every model is built from configs (tests/assets/sdxl-base-1.0; `mid` halves the UNet's
and VAE's widths, `tiny` is precompute.tiny's) with random weights, on the device; nothing is
downloaded. Sections, in the order they run (each device job in its own fresh process, so memory
peaks and a CUDA out-of-memory stay with the job that caused them):

1. matmul: the device's measured matmul TFLOP/s (bf16, and the step's dtype when it differs).
2. train, first batch size: the reference-style step (bench/train_step.py: VAE encode every step,
   UNet weight gradients, per-sample sigma lookup, torch's default AdamW), ours eager (train.step
   with the trainer's defaults: frozen UNet, SDPA attention, fused AdamW on CUDA) and ours
   compiled (`--compile`: torch.compile of UNet and adapter). Timed steps follow warm-up steps;
   ms/step is the median.
3. precompute: the real runner (precompute.runner.run) on fill images at the resolution, with the
   VAE in bf16 and in fp32 (text encoders at precompute's default: fp16 on CUDA), VAE and both
   SDXL text encoders built from their configs and saved, tokenizers generated locally as
   precompute.tiny does. images/s is the runner's: images over the encoding loop's wall time.
4. loader: one epoch of a local 1024 px cache (SDXL-sized samples, bench/loader.py's writer)
   through train.data.make_loader with train's default worker count; steady samples/s.
5. train, the other batch sizes (batch 16 if it fits: an out-of-memory is reported as OOM).

FLOPs per sample are counted with torch.utils.flop_counter on the meta device, for the model and
resolution benchmarked (for SDXL at 1024 px they equal docs/background.md's 14.79 and 25.81
TFLOP, which the output checks). MFU = FLOPs per sample x images/s / peak, against 989 TFLOP/s
(H100/H200 dense bf16) and against the matmul rate measured on this device.

A time budget (--budget-s, default 450 s on CUDA) bounds the run: each job gets what is left
(a job past it is killed and reported as "timeout"), and a job is skipped when less than
--min-job-s is left. The elapsed time of every section is printed as it ends.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue as queue_module
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import click

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "bench"))  # train_step.py, loader.py; after the repo: bench/precompute.py is not the package

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16 (no sparsity)
# docs/background.md section 2: per sample at 1024 px, SDXL base 1.0.
DOCUMENTED_TFLOP_1024 = {"ours": 14.79, "reference": 25.81}
TARGETS = {"speedup": 2.0, "images_per_s": 40.0, "batch16_gib": 80.0, "precompute_images_per_s": 100.0,
           "loader_vs_step": 3.0}


# --------------------------------------------------------------------------------------------
# jobs (each runs in a fresh spawned process)


def job_matmul(opts: dict) -> dict:
    import torch

    device = torch.device(opts["device"])
    n = 8192 if device.type == "cuda" else 2048
    out = {}
    for name in dict.fromkeys(["bf16", opts["dtype"]]):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        reps = 50 if device.type == "cuda" else 5
        for _ in range(3):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[name] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
    out["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return out


def job_train(opts: dict) -> dict:
    from train_step import run_variant

    return run_variant(opts["variant"], opts)


def job_precompute(opts: dict) -> dict:
    import torch

    from precompute.config import PrecomputeConfig
    from precompute.fill import make_fill_dataset
    from precompute.runner import run
    from precompute.settings import resolve

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    root = Path(opts["workdir"])
    t0 = time.perf_counter()
    if opts["model"] == "tiny":
        from precompute.tiny import build_tiny_sdxl

        model = str(build_tiny_sdxl(root / "model"))
    else:
        import importlib.util

        from train_step import find_sdxl_dir, model_configs

        spec = importlib.util.spec_from_file_location("bench_precompute", REPO / "bench" / "precompute.py")
        bench_precompute = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_precompute)
        sdxl_dir = find_sdxl_dir(opts["sdxl_dir"] and Path(opts["sdxl_dir"]))
        _, vae_cfg = model_configs(opts["model"], sdxl_dir)
        model = str(bench_precompute.build_random_sdxl_encoders(root / "model", sdxl_dir, vae_config=vae_cfg,
                                                                device=opts["device"]))
    data = make_fill_dataset(root / "fill", n=opts["n"], resolution=opts["resolution"], seed=0)
    setup_s = time.perf_counter() - t0
    rows = []
    for vae_dtype in opts["vae_dtypes"]:
        cfg = PrecomputeConfig(model=model, data=str(data), cache=str(root / f"cache-{vae_dtype}"),
                               resolution=opts["resolution"], batch_size=opts["batch_size"],
                               num_workers=opts["num_workers"], samples_per_shard=64, device=opts["device"],
                               vae_dtype=vae_dtype)
        if opts["device"] == "cuda":
            torch.cuda.reset_peak_memory_stats()
        s = run(cfg)
        t = s.timings
        rows.append({
            "vae_dtype": vae_dtype, "text_dtype": resolve(cfg).config.text_dtype, "images": s.items_read,
            "images_per_s": s.images_per_second, "encode_s": s.encode_seconds, "run_s": s.seconds,
            "vae_s": t.vae, "text_s": t.text, "wait_s": t.wait, "write_s": t.write + t.commit,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if opts["device"] == "cuda" else None,
        })
    return {"rows": rows, "setup_s": setup_s, "batch_size": opts["batch_size"], "num_workers": opts["num_workers"]}


def job_loader(opts: dict) -> dict:
    import torch

    from loader import write_cache
    from shards.manifest import Manifest
    from shards.store import LocalStore
    from train.config import TrainConfig
    from train.data import make_loader
    from train.plan import DataSpec, EpochPlan

    torch.set_num_threads(1)  # the work is in the loader's worker processes
    store = LocalStore(Path(opts["workdir"]) / "loader-cache")
    t0 = time.perf_counter()
    write_cache(store, shards=opts["shards"], per_shard=opts["per_shard"], res=opts["resolution"])
    written_s = time.perf_counter() - t0
    manifest = Manifest.load(store)
    workers = TrainConfig.__dataclass_fields__["num_workers"].default  # train's default
    spec = DataSpec(batch_size=opts["batch_size"], seed=0, num_workers=workers, shuffle_buffer=64)
    t0 = time.perf_counter()
    loader = make_loader(store, EpochPlan(manifest, spec, 0), manifest=manifest)  # pinned on CUDA, as train
    n = first = 0
    t_first = None
    for batch in loader:
        n += len(batch.keys)
        if t_first is None:
            t_first, first = time.perf_counter(), n
    end = time.perf_counter()
    return {"workers": workers, "samples": n, "epoch_s": end - t0, "write_s": written_s,
            "samples_per_s": (n - first) / (end - t_first) if n > first else float("nan"),
            "mb_per_sample": manifest.totals["bytes"] / manifest.totals["samples"] / 1e6}


JOBS = {"matmul": job_matmul, "train": job_train, "precompute": job_precompute, "loader": job_loader}


def _child(q, name: str, opts: dict) -> None:
    try:
        q.put({"ok": True, "result": JOBS[name](opts)})
    except BaseException as e:  # reported in the table, never a hang
        q.put({"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}", "trace": traceback.format_exc()[-3000:]})


class Budget:
    def __init__(self, seconds: float, min_job: float):
        self.start, self.seconds, self.min_job = time.perf_counter(), seconds, min_job

    @property
    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def run(self, name: str, opts: dict, label: str) -> dict:
        """Run job `name` in a fresh process with what is left of the budget; print its time."""
        t0 = time.perf_counter()
        if self.left < self.min_job:
            print(f"[{label}] skipped: {self.left:.0f} s left of the {self.seconds:.0f} s budget", flush=True)
            return {"ok": False, "skipped": True, "error": "skipped (time budget)"}
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(q, name, opts))  # not daemonic: the loader job starts workers
        p.start()
        try:
            out = q.get(timeout=max(self.left, 1.0))
        except queue_module.Empty:
            out = {"ok": False, "timeout": True, "error": f"timeout after {time.perf_counter() - t0:.0f} s"}
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
        if not out["ok"] and "trace" in out:
            print(out["trace"], file=sys.stderr)
        out["seconds"] = time.perf_counter() - t0
        print(f"[{label}] {out['seconds']:.1f} s" + ("" if out["ok"] else f": {out['error']}"), flush=True)
        return out


# --------------------------------------------------------------------------------------------
# FLOPs, counted on the meta device


def count_flops(model: str, resolution: int, sdxl_dir: str | None, dtype_name: str) -> dict[str, float]:
    """FLOPs per sample of ours and the reference-style step (torch.utils.flop_counter, meta
    device: nothing is allocated). Only matmuls, convolutions and attention count; ours = adapter
    forward + backward, UNet forward, frozen UNet backward (activation gradients only);
    reference = that plus the VAE encoder's forward and the UNet's weight gradients."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from train.step import build_adapter
    from train_step import DTYPES, model_configs, text_dims

    unet_cfg, vae_cfg = model_configs(model, sdxl_dir and Path(sdxl_dir))
    dtype = DTYPES[dtype_name]
    with torch.device("meta"):
        unet = torch.nn.Module.to(UNet2DConditionModel.from_config(unet_cfg), dtype=dtype)
        vae = AutoencoderKL.from_config(vae_cfg).requires_grad_(False)
        factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        adapter = build_adapter(unet.config, factor)
    text_dim, pooled_dim = text_dims(unet_cfg)
    h = resolution // factor
    out = {}
    for variant in ("ours", "reference"):
        unet.requires_grad_(variant == "reference")
        counter = FlopCounterMode(display=False)
        with counter, torch.device("meta"):
            if variant == "reference":
                latents = vae.encode(torch.rand(1, 3, resolution, resolution)).latent_dist.mean
            else:
                latents = torch.randn(1, 4, h, h)
            features = [f.to(dtype) for f in adapter(torch.rand(1, 3, resolution, resolution))]
            pred = unet(latents.to(dtype), torch.tensor([500]),
                        encoder_hidden_states=torch.randn(1, 77, text_dim, dtype=dtype),
                        added_cond_kwargs={"text_embeds": torch.randn(1, pooled_dim, dtype=dtype),
                                           "time_ids": torch.randn(1, 6)},
                        down_intrablock_additional_residuals=features, return_dict=False)[0]
            pred.float().pow(2).mean().backward()
        out[variant] = counter.get_total_flops()
    return out


# --------------------------------------------------------------------------------------------
# the table


def _fmt(value: Any, spec: str) -> str:
    """format(value, spec), or a dash of the same width for a missing value."""
    if value is None:
        width = "".join(c for c in spec.split(".")[0] if c.isdigit())
        return format("-", f">{width}" if width else "")
    return format(value, spec)


def _train_row(label: str, batch: int, job: dict, flops: float, matmul: float | None) -> dict:
    row = {"section": "train", "variant": label, "batch": batch}
    if not job["ok"]:
        return {**row, "note": job["error"]}
    r = job["result"]
    if r["oom"]:
        return {**row, "note": "OOM", "peak_gib": r["peak_mib"] / 1024, "oom": True}
    ips = r["samples_per_s"]
    achieved = flops * ips / 1e12
    note = f"first step {r['first_step_s']:.1f} s" if r.get("first_step_s") is not None else "no warm-up step"
    if r.get("compile"):
        note += f", {r.get('graphs', 0)} graphs, {r.get('recompiles', 0)} recompiles after warm-up"
    return {**row, "images_per_s": ips, "ms_per_step": r["step_ms"], "peak_gib": r["peak_mib"] / 1024,
            "tflops": achieved, "mfu_989": achieved / PEAK_TFLOPS, "mfu_matmul": achieved / matmul if matmul else None,
            "final_loss": r["final_loss"], "note": note}


def print_table(rows: list[dict], mem_label: str, matmul_label: str) -> None:
    head = (f"{'section':<11} {'variant':<26} {'batch':>5} {'images/s':>9} {'ms/step':>9} {mem_label:>9} "
            f"{'MFU 989':>8} {matmul_label:>12}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['section']:<11} {r['variant']:<26} {_fmt(r.get('batch'), '>5')} "
              f"{_fmt(r.get('images_per_s'), '>9.2f')} "
              f"{_fmt(r.get('ms_per_step'), '>9.1f')} {_fmt(r.get('peak_gib'), '>9.2f')} "
              f"{_fmt(r.get('mfu_989'), '>8.2%')} {_fmt(r.get('mfu_matmul'), '>12.2%')}  {r.get('note', '')}")


def evaluate_targets(rows: list[dict], on_gpu: bool, model: str, resolution: int, dtype: str,
                     batches: list[int]) -> list[dict]:
    """The issue's targets, each with the measured value and met / not met / not measured. The
    issue's batches are 8 and 16; a run with others checks its first and second batch size."""
    def train(variant: str, batch: int) -> dict | None:
        return next((r for r in rows if r["section"] == "train" and r["variant"] == variant and r["batch"] == batch),
                    None)

    def rate(r: dict | None) -> float | None:
        return r.get("images_per_s") if r else None

    first, second = batches[0], (batches[1:] or [16])[0]
    applicable = on_gpu and model == "sdxl" and resolution == 1024 and dtype == "bf16" and (first, second) == (8, 16)
    ref8 = rate(train("reference", first))
    ours8 = max([v for v in (rate(train("ours eager", first)), rate(train("ours compiled", first))) if v],
                default=None)
    b16 = [train(v, second) for v in ("ours eager", "ours compiled")]
    # An out-of-memory run at that batch is the target missed, not unmeasured: its peak counts as
    # over the limit.
    b16_peaks = [r["peak_gib"] if r.get("images_per_s") else float("inf") for r in b16
                 if r and (r.get("images_per_s") or r.get("oom"))]
    pre = next((r for r in rows if r["section"] == "precompute" and r["variant"].startswith("VAE bf16")), None)
    loader = next((r for r in rows if r["section"] == "loader"), None)
    checks = [
        (f"ours >= 2.0x the reference-style step's images/s (batch {first})",
         ours8 / ref8 if ours8 and ref8 else None, lambda v: v >= TARGETS["speedup"], "{:.2f}x"),
        (f"ours >= 40 images/s (batch {first})", ours8, lambda v: v >= TARGETS["images_per_s"], "{:.1f} images/s"),
        (f"batch {second} without gradient checkpointing under 80 GiB", min(b16_peaks) if b16_peaks else None,
         lambda v: v < TARGETS["batch16_gib"], "{:.1f} GiB peak"),
        ("precompute >= 100 images/s (bf16 VAE)", rate(pre), lambda v: v >= TARGETS["precompute_images_per_s"],
         "{:.1f} images/s"),
        (f"loader >= 3x what the step consumes (ours, batch {first})",
         rate(loader) / ours8 if rate(loader) and ours8 else None, lambda v: v >= TARGETS["loader_vs_step"], "{:.2f}x"),
    ]
    out = []
    for name, value, ok, spec in checks:
        if value is None:
            status = "not measured"
        elif not applicable:
            status = "not applicable (targets are for SDXL at 1024 px, bf16, on one H100/H200)"
        else:
            status = "met" if ok(value) else "NOT met"
        shown = "-" if value is None else "out of memory" if value == float("inf") else spec.format(value)
        out.append({"target": name, "value": None if value == float("inf") else value, "shown": shown,
                    "status": status})
    return out


# --------------------------------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="[default: cuda if available]")
@click.option("--model", type=click.Choice(["sdxl", "mid", "tiny"]), default=None,
              help="sdxl: SDXL base 1.0's sizes; mid: its structure at half width; tiny: precompute.tiny's. "
                   "[default: sdxl on cuda, mid on cpu]")
@click.option("--resolution", type=int, default=None, help="[default: 1024 on cuda, 128 on cpu]")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="The step's UNet weight / autocast dtype. [default: bf16 on cuda, fp32 on cpu]")
@click.option("--batches", default=None, help="Train batch sizes, comma-separated. [default: 8,16 on cuda, 2 on cpu]")
@click.option("--steps", type=int, default=None, help="Timed train steps. [default: 8 on cuda, 2 on cpu]")
@click.option("--warmup", type=int, default=None, help="Untimed train steps first (the first compiles). [default: 3 "
                                                        "on cuda, 1 on cpu]")
@click.option("--variants", default="reference,eager,compiled", show_default=True,
              help="Train variants: reference, eager (ours), compiled (ours, torch.compile).")
@click.option("--precompute-n", type=int, default=None, help="Images precomputed per VAE dtype. [default: 256 on "
                                                             "cuda, 16 on cpu]")
@click.option("--loader-samples", type=int, default=None, help="Samples in the loader's 1024 px cache (writing "
                                                               "them costs ~0.1 s each). [default: 192]")
@click.option("--sections", default="train,precompute,loader", show_default=True)
@click.option("--budget-s", type=float, default=None, help="Time budget of the whole run. [default: 450 on cuda, "
                                                           "580 on cpu]")
@click.option("--min-job-s", type=float, default=20.0, show_default=True, help="Skip a job with less than this left.")
@click.option("--json", "json_path", default=None, help="Write the table here too. [default: $GPU_BENCH_JSON, else "
                                                        "bench/gpu-results.json]")
@click.option("--sdxl-dir", default=None, help="SDXL base 1.0 configs [default: tests/assets/sdxl-base-1.0].")
def main(device, model, resolution, dtype, batches, steps, warmup, variants, precompute_n, loader_samples, sections,
         budget_s, min_job_s, json_path, sdxl_dir) -> None:
    import torch

    started = time.perf_counter()
    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    device = "cuda" if on_gpu else "cpu"
    model = model or ("sdxl" if on_gpu else "mid")
    resolution = resolution or (1024 if on_gpu else 128)
    dtype = dtype or ("bf16" if on_gpu else "fp32")
    batch_sizes = [int(b) for b in (batches or ("8,16" if on_gpu else "2")).split(",")]
    steps = steps if steps is not None else (8 if on_gpu else 2)
    warmup = warmup if warmup is not None else (3 if on_gpu else 1)
    wanted = [v.strip() for v in variants.split(",") if v.strip()]
    sections = {s.strip() for s in sections.split(",")}
    budget = Budget(budget_s or (450.0 if on_gpu else 580.0), min_job_s)
    json_path = Path(json_path or os.environ.get("GPU_BENCH_JSON") or REPO / "bench" / "gpu-results.json")
    from train_step import find_sdxl_dir

    sdxl = None if model == "tiny" else str(find_sdxl_dir(sdxl_dir and Path(sdxl_dir)))
    print(f"bench/gpu.py: device {device}, model {model}, {resolution} px, {dtype}, batches {batch_sizes}, "
          f"{steps} timed steps after {warmup} warm-up, budget {budget.seconds:.0f} s; torch {torch.__version__}",
          flush=True)

    t0 = time.perf_counter()
    flops = count_flops(model, resolution, sdxl, dtype)
    flops_note = (f"FLOPs per sample (torch.utils.flop_counter, meta device): ours {flops['ours'] / 1e12:.4g} TFLOP, "
                  f"reference-style {flops['reference'] / 1e12:.4g} TFLOP")
    if model == "sdxl" and resolution == 1024:
        flops_note += (f" (docs/background.md: {DOCUMENTED_TFLOP_1024['ours']} / "
                       f"{DOCUMENTED_TFLOP_1024['reference']})")
    print(flops_note)
    print(f"[flops] {time.perf_counter() - t0:.1f} s", flush=True)

    mm = budget.run("matmul", {"device": device, "dtype": dtype}, "matmul")
    matmul = mm["result"] if mm["ok"] else {}
    device_name = matmul.get("device_name", device)
    if matmul:
        print(f"measured matmul: {', '.join(f'{k} {v:.3f} TFLOP/s' for k, v in matmul.items() if k != 'device_name')} "
              f"on {device_name}", flush=True)
    step_peak = matmul.get(dtype)

    train_opts = {"model": model, "resolution": resolution, "steps": steps, "warmup": warmup, "device": device,
                  "dtype": dtype, "gradient_checkpointing": False, "seed": 0, "sdxl_dir": sdxl,
                  "fused": on_gpu, "channels_last": False, "attention": "sdpa"}
    variant_opts = {"reference": ("reference", {}), "eager": ("ours", {"compile": False}),
                    "compiled": ("ours", {"compile": True})}
    labels = {"reference": "reference", "eager": "ours eager", "compiled": "ours compiled"}
    rows: list[dict] = []
    section_s: dict[str, float] = {}

    def run_train(batch: int) -> None:
        t = time.perf_counter()
        for v in wanted:
            kind, extra = variant_opts[v]
            job = budget.run("train", {**train_opts, **extra, "variant": kind, "batch": batch},
                             f"train batch {batch} {labels[v]}")
            rows.append(_train_row(labels[v], batch, job, flops[kind], step_peak))
        section_s[f"train batch {batch}"] = time.perf_counter() - t

    workdir = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        if "train" in sections and batch_sizes:
            run_train(batch_sizes[0])
        if "precompute" in sections:
            t = time.perf_counter()
            n = precompute_n or (256 if on_gpu else 16)
            job = budget.run("precompute", {"device": device, "model": model, "resolution": resolution, "n": n,
                                            "sdxl_dir": sdxl, "workdir": str(workdir / "precompute"),
                                            "vae_dtypes": ["bf16", "fp32"], "batch_size": 16 if on_gpu else 4,
                                            "num_workers": min(8, os.cpu_count() or 1)}, "precompute")
            if job["ok"]:
                r = job["result"]
                for p in r["rows"]:
                    each = 1000 * p["encode_s"] / max(p["images"], 1)
                    rows.append({"section": "precompute", "variant": f"VAE {p['vae_dtype']}, text {p['text_dtype']}",
                                 "batch": r["batch_size"], "images_per_s": p["images_per_s"],
                                 "peak_gib": p["peak_gib"],
                                 "note": f"{p['images']} images ({each:.1f} ms each); VAE {p['vae_s']:.1f} s, text "
                                         f"{p['text_s']:.1f} s, waiting for decode {p['wait_s']:.1f} s, writing "
                                         f"{p['write_s']:.1f} s; {r['num_workers']} decode threads"})
            else:
                rows.append({"section": "precompute", "variant": "VAE bf16 and fp32", "note": job["error"]})
            section_s["precompute"] = time.perf_counter() - t
        if "loader" in sections:
            t = time.perf_counter()
            total = loader_samples or 192
            per_shard = 24 if total >= 96 else 16
            job = budget.run("loader", {"workdir": str(workdir / "loader"), "resolution": 1024,
                                        "shards": max(1, total // per_shard), "per_shard": per_shard,
                                        "batch_size": batch_sizes[0] if batch_sizes else 8}, "loader")
            if job["ok"]:
                r = job["result"]
                rows.append({"section": "loader", "variant": f"1024 px cache, {r['workers']} workers",
                             "batch": batch_sizes[0] if batch_sizes else 8, "images_per_s": r["samples_per_s"],
                             "note": f"{r['samples']} samples of {r['mb_per_sample']:.2f} MB; epoch {r['epoch_s']:.1f} "
                                     f"s with worker start-up"})
            else:
                rows.append({"section": "loader", "variant": "1024 px cache", "note": job["error"]})
            section_s["loader"] = time.perf_counter() - t
        if "train" in sections:
            for batch in batch_sizes[1:]:
                run_train(batch)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    elapsed = time.perf_counter() - started
    mem_label = "peak GiB" if on_gpu else "RSS GiB"
    print()
    print(f"device: {device_name}; model {model} at {resolution} px, {dtype}; {flops_note}")
    print_table(rows, mem_label, f"MFU {dtype} mm")
    print(f"images/s: train = batch / median step time; precompute = images / encoding wall time; loader = steady "
          f"samples/s. MFU = FLOPs per sample x images/s / peak: 989 TFLOP/s, and the measured {dtype} matmul "
          f"({_fmt(step_peak, '.3f')} TFLOP/s). {mem_label}: " + ("torch.cuda.max_memory_allocated." if on_gpu else
          "the process's peak resident set (weights, allocator slack and the Python runtime included)."))
    by = {(r["variant"], r.get("batch")): r for r in rows if r["section"] == "train"}
    for batch in batch_sizes:
        ref = by.get(("reference", batch), {}).get("images_per_s")
        for v in ("ours eager", "ours compiled"):
            ours = by.get((v, batch), {}).get("images_per_s")
            if ref and ours:
                print(f"batch {batch}: {v} / reference = {ours / ref:.2f}x images/s")
    targets = evaluate_targets(rows, on_gpu, model, resolution, dtype, batch_sizes)
    print("\ntargets (issue 10):")
    for t in targets:
        print(f"  {t['target']:<58} {t['shown']:>18}  {t['status']}")
    print(f"\nsections: {', '.join(f'{k} {v:.0f} s' for k, v in section_s.items())}; total {elapsed:.0f} s")
    result = {"device": device, "device_name": device_name, "torch": torch.__version__, "model": model,
              "resolution": resolution, "dtype": dtype, "steps": steps, "warmup": warmup,
              "flops_per_sample": flops, "flops_source": "torch.utils.flop_counter on the meta device",
              "peak_tflops": PEAK_TFLOPS, "matmul_tflops": {k: v for k, v in matmul.items() if k != "device_name"},
              "rows": rows, "targets": targets, "section_seconds": section_s, "elapsed_s": elapsed,
              "budget_s": budget.seconds, "argv": sys.argv[1:]}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"JSON: {json_path}")


if __name__ == "__main__":
    main()
