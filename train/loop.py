"""train(cfg): the training run, from checks to the finished adapter folder.

Start-up, in this order, so that every refusal comes before any weight is loaded:
config -> cache manifest -> UNet/VAE configs and cache shapes -> data plan (steps, shards per
rank x worker) -> checkpoint to resume (settings that must match) -> encoder fingerprints (main
process, text encoders then reused once to embed the validation prompts and freed) -> only then
the UNet, frozen, in the mixed-precision dtype, and the adapter in fp32.

The loop: accelerate for devices, DDP and mixed precision; the data loader is built here per
epoch from `train.data` (never passed through `accelerator.prepare`, REFERENCE.md §3) and every
rank takes the same number of batches. Gradient accumulation is explicit: a group of k
micro-batches backpropagates loss / k (gradients all-reduced on the last only), then one
clipped optimizer step; an epoch's last group may be shorter and is weighted by its own size.
Losses stay on the device and are fetched every `log_every` steps (each step still logged).
The LR scheduler is stepped here once per optimizer step (not prepared: accelerate would step it
once per process).

Output in OUT: the adapter (config.json + diffusion_pytorch_model.safetensors), README.md,
train_config.json, loss_curve.png, logs/metrics.jsonl, validation/, checkpoints/.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.fingerprint import module_fingerprint
from shards.manifest import Manifest
from shards.store import open_store
from train import card, checks
from train.checkpoint import (
    Checkpoint,
    CheckpointError,
    TrainState,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    resolve_resume,
    resume_problems,
    save_checkpoint,
)
from train.config import TrainConfig

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
_NOISE_STREAM = 7  # tag separating the noise generator's seed from other uses of cfg.seed


class TrainError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    samples_seen: int  # over the whole run, all ranks, including before a resume
    seconds: float  # this process's wall time in the loop
    samples_per_second: float  # this session's throughput, all ranks
    validation_images: list[Path]


def _get_logger():
    from accelerate.logging import get_logger

    return get_logger("train")


# ---------------------------------------------------------------------------------------------
# Start-up checks


@dataclass
class _Plan:
    """Facts resolved at start-up, before weights: what the loop and the outputs need."""

    manifest: Manifest
    manifest_id: str
    unet_config: dict
    scheduler_config: dict
    vae_location: tuple[str, str | None] | None
    world_size: int
    learning_rate: float
    batches_per_epoch: list[int]  # index = epoch, for the epochs the run will touch
    total_steps: int


def _optimizer_steps(batches: int, accumulation: int) -> int:
    return math.ceil(batches / accumulation)


def _plan(cfg: TrainConfig, accelerator: Any, store: Any) -> tuple[_Plan, list[str]]:
    """Everything checkable from configs and the manifest; returns (plan, problems)."""
    from diffusers import T2IAdapter

    from train.data import epoch_stats

    manifest = Manifest.load(store)
    problems: list[str] = []
    unet_config = checks.read_unet_config(cfg.model, cfg.revision)
    scheduler_config = checks.read_scheduler_config(cfg.model, cfg.revision)
    vae_location = checks.vae_location(cfg.vae, manifest, cfg.model, cfg.revision)
    vae_config = None
    if vae_location is not None:
        repo, subfolder = vae_location
        vae_config = checks.load_component_config(repo, subfolder, cfg.revision if subfolder == "vae" else None)
    adapter_config = None
    if cfg.adapter:
        try:
            adapter_config = dict(T2IAdapter.load_config(cfg.adapter))
        except (OSError, ValueError) as e:
            problems.append(f"--adapter {cfg.adapter}: cannot read its config.json ({e})")
    problems += checks.shape_problems(manifest, unet_config, vae_config, adapter_config=adapter_config)
    if cfg.soft_threshold_range is not None:
        from train.augment import soft_threshold_range_for

        try:
            soft_threshold_range_for(manifest.identity, cfg.soft_threshold())
        except ValueError as e:
            problems.append(f"--soft-threshold-range: {e}")

    if cfg.validation_enabled:
        if not all(checks.load_component_config(cfg.model, sub, cfg.revision) for sub in checks.TEXT_COMPONENTS):
            problems.append(f"validation prompts need text encoders, and {cfg.model} has no text_encoder and "
                            "text_encoder_2: drop --validation-prompt/--validation-image or use the full model")
        if vae_location is None:
            problems.append(f"validation images need a VAE to decode, and {cfg.model} has none: pass --vae")

    world = accelerator.num_processes
    learning_rate = cfg.learning_rate
    if cfg.scale_lr:
        learning_rate *= cfg.batch_size * cfg.gradient_accumulation_steps * world

    # Steps per epoch come from the manifest alone, so every rank computes the same numbers.
    batches: list[int] = []
    total = 0
    try:
        def batches_in(epoch: int) -> int:
            return epoch_stats(manifest, batch_size=cfg.batch_size, world_size=world, num_workers=cfg.num_workers,
                               seed=cfg.seed, epoch=epoch, max_samples=cfg.max_samples).steps

        if cfg.max_steps is not None:
            while total < cfg.max_steps:
                batches.append(batches_in(len(batches)))
                total += _optimizer_steps(batches[-1], cfg.gradient_accumulation_steps)
            total = cfg.max_steps
        else:
            for epoch in range(cfg.num_epochs):
                batches.append(batches_in(epoch))
                total += _optimizer_steps(batches[-1], cfg.gradient_accumulation_steps)
    except ValueError as e:
        problems.append(str(e))

    plan = _Plan(manifest=manifest, manifest_id=checks.manifest_id(store), unet_config=unet_config,
                 scheduler_config=scheduler_config, vae_location=vae_location, world_size=world,
                 learning_rate=learning_rate, batches_per_epoch=batches, total_steps=total)
    return plan, problems


def make_optimizer(cfg: TrainConfig, params: Any, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW with the configured hyper-parameters (bitsandbytes' 8-bit AdamW with --use-8bit-adam)."""
    if cfg.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(params, lr=learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                         weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


def make_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """diffusers' schedule `cfg.lr_scheduler`, stepped once per optimizer step for `total_steps`."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, step_rules=cfg.lr_step_rules,
                         num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total_steps,
                         num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)


def _check_encoders_and_prepare_validation(cfg: TrainConfig, plan: _Plan, device: torch.device, log: Any,
                                           refuse: bool) -> tuple[list[str], Any]:
    """(fingerprint differences, Validator or None). Loads MODEL's text encoders and the VAE once
    on the CPU, compares their fingerprints with the cache's, embeds the validation prompts with
    the text encoders unless the run is refused anyway, and frees them all."""
    text_stack = checks.load_text_stack(cfg.model, cfg.revision, cfg.variant)
    vae = checks.load_vae(plan.vae_location, revision=cfg.revision, variant=cfg.variant) if plan.vae_location else None
    report = checks.compare_fingerprints(plan.manifest.identity, {
        "vae": vae,
        "text_encoder": text_stack.text_encoder if text_stack else None,
        "text_encoder_2": text_stack.text_encoder_2 if text_stack else None,
    })
    del vae
    for note in report.notes:
        log.info("encoder check: %s", note)
    if not report.differences:
        log.info("encoder fingerprints match the cache")
    validator = None
    refused = refuse or (report.differences and not cfg.accept_encoder_mismatch)
    if cfg.validation_enabled and text_stack is not None and not refused:
        from train.validation import Validator, embed_validation_prompts, force_zeros_for_empty_prompt

        force_zeros = force_zeros_for_empty_prompt(cfg.model)
        prompts = embed_validation_prompts(text_stack, cfg.validation_pairs(), force_zeros=force_zeros, device=device)
        validator = Validator(
            prompts, output_dir=cfg.output_dir, vae_location=plan.vae_location,
            vae_kwargs={"revision": cfg.revision, "variant": cfg.variant},
            scheduler_config=plan.scheduler_config, force_zeros=force_zeros,
            resolution=cfg.validation_resolution or int(plan.manifest.geometry["resolution"]),
            num_images=cfg.num_validation_images, inference_steps=cfg.validation_inference_steps,
            guidance_scale=cfg.validation_guidance_scale, seed=cfg.seed,
        )
    del text_stack  # the text encoders are not needed again
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report.differences, validator


def _agree(accelerator: Any, refuse_here: bool) -> bool:
    """True when any process refuses: a tensor all-reduce (no pickled objects between ranks)."""
    if accelerator.num_processes == 1:
        return refuse_here
    flag = torch.tensor([1.0 if refuse_here else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


# ---------------------------------------------------------------------------------------------
# Logging helpers


class _Metrics:
    """Per-step values kept on the device and flushed every `every` steps with one host sync."""

    def __init__(self, accelerator: Any, path: Path, progress: Any, every: int):
        self.accelerator, self.path, self.progress, self.every = accelerator, path, progress, every
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, float, float, int]] = []
        self.window_start = time.perf_counter()

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, data_wait: float,
            samples: int) -> None:
        self.pending.append((step, loss.detach().float(), grad_norm.detach().float(), lr, data_wait, samples))
        if len(self.pending) >= self.every:
            self.flush()

    def restart_clock(self) -> None:
        self.window_start = time.perf_counter()

    def flush(self) -> None:
        if not self.pending:
            return
        acc = self.accelerator
        values = torch.stack([torch.stack([p[1], p[2]]) for p in self.pending])  # (n, 2)
        values = acc.reduce(values, reduction="mean").cpu().tolist()  # the one sync per window
        now = time.perf_counter()
        rate = sum(p[5] for p in self.pending) / max(now - self.window_start, 1e-9)
        self.window_start = now
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        records = []
        for (step, _, _, lr, wait, _), (loss, grad_norm) in zip(self.pending, values):
            record = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "samples_per_s": rate,
                      "data_wait_s": wait}
            if peak is not None:
                record["peak_memory_gib"] = peak
            records.append(record)
        self.pending = []
        if acc.is_main_process:
            with self.path.open("a") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            for r in records:
                acc.log({k: v for k, v in r.items() if k != "step"}, step=r["step"])
            last = records[-1]
            self.progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                      samples_s=f"{rate:.1f}", refresh=False)


def _truncate_jsonl(path: Path, after_step: int | None) -> None:
    """Drop records of steps > after_step (a resumed run rewrites them); None: start empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if after_step is None or not path.exists():
        path.write_text("")
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in keep))


# ---------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; returns what was done. Raises the user-facing
    errors train.config.ConfigError, checks.CacheMismatchError, CheckpointError, TrainError
    (and shards' ManifestError/ShardError for a damaged cache)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    notes = cfg.validate()
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(cfg.logging_path)),
    )
    log = _get_logger()
    for note in notes:
        log.warning(note)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # --- checks, before any weights ------------------------------------------------------------
    store = open_store(cfg.cache)
    plan, problems = _plan(cfg, accelerator, store)
    log.info("cache %s: %d samples in %d shards, manifest id %s", cfg.cache, plan.manifest.num_samples,
             len(plan.manifest.shards), plan.manifest_id[:16])
    if cfg.local_cache:
        from shards.localcache import CachingStore, parse_bytes

        max_bytes = parse_bytes(cfg.local_cache_max) if cfg.local_cache_max else None
        store = CachingStore(store, cfg.local_cache, max_bytes=max_bytes, records=plan.manifest.shards)
        log.info("local cache %s: %d shard(s) already there", cfg.local_cache,
                 sum(store.path_for(r.sha256).is_file() for r in plan.manifest.shards))

    resume_path = resolve_resume(cfg.resume, out)
    ckpt: Checkpoint | None = read_checkpoint(resume_path) if resume_path else None
    meta = {"world_size": world, "manifest_id": plan.manifest_id, "learning_rate": plan.learning_rate,
            "config": cfg.to_dict()}
    if ckpt is not None:
        differences = resume_problems(ckpt, meta)
        if differences:
            raise CheckpointError(f"cannot resume from {ckpt.path}: these settings differ from the checkpoint's "
                                  "(resume needs them equal to continue the same run):\n"
                                  + "\n".join(f"  - {d}" for d in differences))
        if ckpt.state.global_step > plan.total_steps:
            problems.append(f"checkpoint {ckpt.path} is at step {ckpt.state.global_step}, past the "
                            f"{plan.total_steps} steps asked for: raise --max-steps or --num-epochs")
    elif cfg.resume is None and list_checkpoints(out):
        problems.append(f"{out} already holds checkpoints of a run: continue it with --resume latest, or "
                        "choose another --output-dir")
    if cfg.resume == "latest" and ckpt is None:
        log.info("--resume latest: no checkpoint in %s yet, starting a new run", out)

    # Main process only: the encoders are loaded once, fingerprinted, used to embed the
    # validation prompts and freed. Its failures become problems, so that every process learns
    # of them through _agree instead of waiting forever in a collective.
    differences: list[str] = []
    validator = None
    if main:
        try:
            differences, validator = _check_encoders_and_prepare_validation(cfg, plan, device, log,
                                                                           refuse=bool(problems))
        except (checks.CacheMismatchError, OSError, ValueError) as e:
            problems.append(str(e))
    refused_here = bool(problems) or (bool(differences) and not cfg.accept_encoder_mismatch)
    if _agree(accelerator, refused_here):
        if refused_here:
            raise checks.CacheMismatchError(checks.refusal_message(cfg.cache, cfg.model, problems, differences))
        raise checks.CacheMismatchError("the main process refused to start; its message says why")
    if differences:
        log.warning("--accept-encoder-mismatch: training on a cache encoded with other encoders:\n%s",
                    "\n".join(f"  - {d}" for d in differences))

    # --- weights -------------------------------------------------------------------------------
    from diffusers import UNet2DConditionModel

    from train.data import make_loader
    from train.step import Objective, build_adapter, count_parameters, freeze_unet

    weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]
    unet = UNet2DConditionModel.from_pretrained(checks.model_root(cfg.model), subfolder="unet",
                                                revision=cfg.revision, variant=cfg.variant, torch_dtype=weight_dtype)
    freeze_unet(unet, weight_dtype)
    unet.to(device)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    vae_factor = int(plan.manifest.latent["vae_scale_factor"])
    # Seeded right here: the new adapter's weights depend on the seed alone, not on what loading
    # the encoders or the UNet may have drawn (DDP also broadcasts rank 0's weights at wrap time).
    set_seed(cfg.seed)
    adapter = build_adapter(plan.unet_config, vae_factor, path=cfg.adapter)
    adapter.train()
    trainable, _ = count_parameters(adapter)
    _, frozen = count_parameters(unet)
    log.info("parameters: %s trainable (adapter, fp32), %s frozen (UNet, %s)", f"{trainable:,}", f"{frozen:,}",
             str(weight_dtype).removeprefix("torch."))

    optimizer = make_optimizer(cfg, adapter.parameters(), plan.learning_rate)
    lr_scheduler = make_lr_scheduler(cfg, optimizer, plan.total_steps)
    adapter, optimizer = accelerator.prepare(adapter, optimizer)
    objective = Objective(plan.scheduler_config, device)
    # One noise stream per rank (different noise on different samples), reproducible from the seed.
    noise_seed = int(np.random.SeedSequence([cfg.seed, _NOISE_STREAM, rank]).generate_state(1, np.uint64)[0] >> 1)
    generator = torch.Generator(device=device).manual_seed(noise_seed)

    state = TrainState()
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator, adapter=accelerator.unwrap_model(adapter), optimizer=optimizer,
                                lr_scheduler=lr_scheduler, noise_generator=generator)
        log.info("resumed from %s: step %d, epoch %d, batch %d", ckpt.path, state.global_step, state.epoch,
                 state.batches_done)

    logs_dir = out / "logs"
    metrics_path = logs_dir / METRICS_FILE
    samples_path = logs_dir / f"samples-rank{rank:05d}.jsonl"
    resumed_step = state.global_step if ckpt is not None else None
    if main:
        _truncate_jsonl(metrics_path, resumed_step)
    if cfg.log_samples:
        _truncate_jsonl(samples_path, resumed_step)
    if accelerator.log_with:
        accelerator.init_trackers(cfg.tracker_project_name, config={
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()})

    # --- loop ----------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    total = plan.total_steps
    log.info("training %d optimizer steps: %d process(es) x batch %d x accumulation %d, lr %.3g (%s)", total,
             world, cfg.batch_size, cfg.gradient_accumulation_steps, plan.learning_rate, cfg.lr_scheduler)
    progress = tqdm(total=total, initial=state.global_step, desc="train", disable=not main, dynamic_ncols=True)
    metrics = _Metrics(accelerator, metrics_path, progress, cfg.log_every)
    last_checkpoint = state.global_step if ckpt is not None else -1
    last_validation = -1
    validation_images: list[Path] = []
    session_samples = 0
    started = time.perf_counter()
    samples_file = samples_path.open("a") if cfg.log_samples else None

    def checkpoint_now() -> None:
        save_checkpoint(accelerator, out, state=state, adapter=accelerator.unwrap_model(adapter),
                        optimizer=optimizer, lr_scheduler=lr_scheduler, noise_generator=generator,
                        meta=meta, keep=cfg.checkpoints_total_limit)

    def validate_now() -> None:
        if validator is not None:
            try:
                validation_images[:] = validator.run(state.global_step, unet=unet,
                                                     adapter=accelerator.unwrap_model(adapter), accelerator=accelerator)
            except Exception:  # e.g. out of memory: hours of training must not die for a preview
                log.exception("validation at step %d failed; training continues", state.global_step)
        accelerator.wait_for_everyone()

    try:
        while state.global_step < total:
            batches = plan.batches_per_epoch[state.epoch]
            loader, steps = make_loader(store, plan.manifest, batch_size=cfg.batch_size, seed=cfg.seed,
                                        epoch=state.epoch, world_size=world, rank=rank, num_workers=cfg.num_workers,
                                        start_batch=state.batches_done, caption_dropout=cfg.caption_dropout,
                                        shuffle_buffer=cfg.shuffle_buffer, max_samples=cfg.max_samples,
                                        soft_threshold=cfg.soft_threshold())
            if steps != batches:
                raise TrainError(f"internal: epoch {state.epoch} has {steps} batches, planned {batches}")
            batch_iter = iter(loader)
            while state.batches_done < batches and state.global_step < total:
                group = min(cfg.gradient_accumulation_steps, batches - state.batches_done)
                loss_sum = torch.zeros((), device=device)
                data_wait = 0.0
                for j in range(group):
                    t0 = time.perf_counter()
                    batch = next(batch_iter)
                    data_wait += time.perf_counter() - t0
                    if samples_file is not None:
                        samples_file.write(json.dumps({"step": state.global_step + 1, "epoch": state.epoch,
                                                       "batch": state.batches_done, "keys": batch.keys}) + "\n")
                    batch = batch.to(device, non_blocking=True)
                    # Gradients are all-reduced on the group's last backward only.
                    sync = contextlib.nullcontext() if j == group - 1 else accelerator.no_sync(adapter)
                    with sync:
                        # No outer autocast: the prepared adapter autocasts itself, and the frozen
                        # UNet runs in its weight dtype as in the reference (autocast would push its
                        # norms and softmax back to fp32: more casts and memory for no gradient).
                        loss = objective.loss(unet, adapter, batch, generator, weight_dtype=weight_dtype)
                        accelerator.backward(loss / group)
                    loss_sum += loss.detach()
                    state.batches_done += 1
                grad_norm = accelerator.clip_grad_norm_(adapter.parameters(), cfg.max_grad_norm)
                lr = lr_scheduler.get_last_lr()[0]  # the rate this step uses
                optimizer.step()
                if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, no schedule
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
                step_samples = group * cfg.batch_size * world
                state.samples_seen += step_samples
                session_samples += step_samples
                if state.batches_done == batches:  # epoch done: a checkpoint here resumes at the next one
                    state.epoch, state.batches_done = state.epoch + 1, 0
                metrics.add(state.global_step, loss_sum / group, grad_norm, lr, data_wait, step_samples)
                progress.update(1)

                if state.global_step % cfg.checkpointing_steps == 0:
                    metrics.flush()
                    checkpoint_now()
                    last_checkpoint = state.global_step
                    metrics.restart_clock()  # samples/s measures training, not saving
                if cfg.validation_enabled and state.global_step % cfg.validation_steps == 0:
                    metrics.flush()
                    validate_now()
                    last_validation = state.global_step
                    metrics.restart_clock()
                if state.batches_done == 0:
                    break
            del batch_iter, loader
        metrics.flush()
        seconds = time.perf_counter() - started
        if last_checkpoint != state.global_step:
            checkpoint_now()  # the end is always resumable (e.g. to train further with more steps)
        if cfg.validation_enabled and last_validation != state.global_step:
            validate_now()
    finally:
        progress.close()
        if samples_file is not None:
            samples_file.close()

    # --- outputs -------------------------------------------------------------------------------
    rate = session_samples / max(seconds, 1e-9)
    replica_digests = _replica_digests(accelerator, accelerator.unwrap_model(adapter))
    if len(set(replica_digests)) != 1:
        raise TrainError(f"the adapter replicas of the {world} processes differ at the end (sha256 per rank: "
                         f"{replica_digests}); gradients were not synchronised")
    if main:
        _write_outputs(cfg, plan, state, accelerator.unwrap_model(adapter), log=log, world=world, seconds=seconds,
                       rate=rate, validation_images=validation_images, replica_digests=replica_digests,
                       parameters={"trainable_parameters": trainable, "frozen_parameters": frozen})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir=out, global_step=state.global_step, samples_seen=state.samples_seen,
                       seconds=seconds, samples_per_second=rate, validation_images=validation_images)


def _write_outputs(cfg: TrainConfig, plan: _Plan, state: TrainState, adapter: torch.nn.Module, *, log: Any,
                   world: int, seconds: float, rate: float, validation_images: list[Path],
                   replica_digests: list[str], parameters: dict[str, int]) -> None:
    """OUT's deliverables: the adapter (diffusers format), resolved config, loss curve, model card."""
    out = Path(cfg.output_dir)
    adapter.save_pretrained(out, safe_serialization=True)
    resolved = {
        **cfg.to_dict(),
        "resolved": {
            "world_size": world, "effective_learning_rate": plan.learning_rate, "total_steps": plan.total_steps,
            "batches_per_epoch_per_rank": plan.batches_per_epoch, "weight_dtype": cfg.mixed_precision,
            "manifest_id": plan.manifest_id, "cache_samples": plan.manifest.num_samples,
            "adapter_config": {k: v for k, v in adapter.config.items() if not k.startswith("_")},
            "adapter_fingerprint_per_rank": replica_digests, **parameters,
        },
    }
    (out / TRAIN_CONFIG_FILE).write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str) + "\n")
    metrics = card.read_metrics(out / "logs" / METRICS_FILE)
    curve = card.plot_loss_curve(metrics, out / card.LOSS_CURVE_FILE)
    summary = {
        "optimizer_steps": state.global_step,
        "samples_seen": state.samples_seen,
        "epochs": round(_epochs_done(state, plan.batches_per_epoch), 2),
        "global_batch": cfg.batch_size * cfg.gradient_accumulation_steps * world,
        "final_loss": round(metrics[-1]["loss"], 5) if metrics else None,
        "time_this_session_s": round(seconds, 1),
        "samples_per_s_this_session": round(rate, 2),
    }
    (out / card.README_FILE).write_text(card.model_card(
        base_model=cfg.model, cache_url=cfg.cache, manifest_id=plan.manifest_id, config=resolved, summary=summary,
        validation_grids=[p.relative_to(out).as_posix() for p in validation_images],
        prompts=[prompt for _, prompt in cfg.validation_pairs()],
        loss_curve=card.LOSS_CURVE_FILE if curve else None,
    ))
    log.info("done: %d steps, %d samples, %.1f s this session, %.2f samples/s. Adapter in %s", state.global_step,
             state.samples_seen, seconds, rate, out)
    if cfg.push_to_hub:
        _push_to_hub(cfg, out)


def _replica_digests(accelerator: Any, adapter: torch.nn.Module) -> list[str]:
    """Every rank's adapter fingerprint (sha256 of config + weights), gathered as integer tensors."""
    digest = bytes.fromhex(module_fingerprint(adapter))
    local = torch.from_numpy(np.frombuffer(digest, dtype=np.int64).copy()).to(accelerator.device)
    gathered = accelerator.gather(local).cpu().numpy().reshape(accelerator.num_processes, -1)
    return [row.tobytes().hex() for row in gathered]


def _epochs_done(state: TrainState, batches_per_epoch: list[int]) -> float:
    if state.epoch < len(batches_per_epoch) and batches_per_epoch[state.epoch]:
        return state.epoch + state.batches_done / batches_per_epoch[state.epoch]
    return float(state.epoch)


def _push_to_hub(cfg: TrainConfig, out: Path) -> None:
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(cfg.hub_model_id or out.name, exist_ok=True).repo_id
    upload_folder(repo_id=repo_id, folder_path=out, commit_message="T2I-Adapter training run",
                  ignore_patterns=["checkpoints/**", "logs/**"])
    _get_logger().info("pushed %s to https://huggingface.co/%s", out, repo_id)


__all__ = ["TrainError", "TrainResult", "make_lr_scheduler", "make_optimizer", "train"]
