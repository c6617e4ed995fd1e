"""train(cfg): the training run, from start-up checks to the finished adapter folder.

Three phases, as `train` calls them: `setup` resolves the settings once (`train.config.resolve`),
starts accelerate and runs every start-up refusal (`train.startup`) before loading the frozen UNet
(mixed-precision dtype), the fp32 adapter, optimizer and schedule (`train.optim`) and resuming;
`fit` runs the loop and checkpoints; `finish` checks that every rank holds the same adapter and
writes OUT's deliverables (`train.outputs`). `train.metrics` records each step.

Knowing when the adapter is good, in helpers of their own beside the step: `_update_ema` after
every optimizer step (`train.ema`, with --ema-decay), `_evaluate_now` for the validation loss
(`train.evaluate`: at the start of a new run, every --validation-loss-steps and at the end, before
that step's checkpoint so a resumed run has the record), and `validate_now` for the images and
their condition adherence (`train.validation`, `train.adherence`). Both evaluations use the EMA
weights when there is an EMA (`_eval_adapter`).

The loop: accelerate for devices, DDP and mixed precision; the data loader is built here per
epoch from `train.data` (never passed through `accelerator.prepare`, docs/background.md section 3) and every
rank takes the same number of batches. Gradient accumulation is explicit: a group of k
micro-batches backpropagates loss / k (gradients all-reduced on the last only), then one
clipped optimizer step; an epoch's last group may be shorter and is weighted by its own size.
Losses stay on the device and are fetched every `log_every` steps (each step still logged).
Batches reach the device through `train.data.DeviceBatches` (the next one copied while a step
computes, with --prefetch); the step calls the UNet and adapter through `train.fast` (attention
kernels, channels_last, torch.compile); `optimizer_step` syncs with the host only under fp16.
The LR scheduler is stepped here once per optimizer step (not prepared: accelerate would step it
once per process).

Output in OUT: the adapter (config.json + diffusion_pytorch_model.safetensors), ema/ (with
--ema-decay: the EMA as an adapter folder of its own; --save-ema writes the EMA as the adapter
instead, and no ema/), README.md (the model card), train_config.json, loss_curve.png,
logs/metrics.jsonl, validation/ (each validation step's grids and its labelled page,
step-NNNNNN.png), checkpoints/.

Two environment variables exist for tests of what users cannot easily stage, and do nothing
unless set: `T2I_TRAIN_DEBUG_EXIT_AFTER_CHECKPOINT=N` ends every process with `os._exit` right
after the checkpoint of step N is complete (a job killed at the worst moment: nothing flushed,
no outputs written), and `T2I_TRAIN_DEBUG_REPLICA_DIR=DIR` makes every rank save its own final
adapter weights to `DIR/adapter-rank<R>.safetensors`, so that replicas are compared from outside.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.runtime import raise_if_stopped
from train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from train.config import TrainConfig, resolve
from train.ema import EMA, EMASpec
from train.errors import TrainError
from train.metrics import LOGS_DIR, METRICS_FILE, Metrics, reset_peak_memory, truncate_jsonl
from train.optim import OptimizerSpec, ScaleWatch, ScheduleSpec, make_lr_scheduler, make_optimizer
from train.startup import Plan, Startup

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_NOISE_STREAM = 7  # tag separating the noise generator's seed from other uses of cfg.seed
DEBUG_EXIT_AFTER_CHECKPOINT = "T2I_TRAIN_DEBUG_EXIT_AFTER_CHECKPOINT"
DEBUG_REPLICA_DIR = "T2I_TRAIN_DEBUG_REPLICA_DIR"


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    samples_seen: int  # over the whole run, all ranks, including before a resume
    seconds: float  # this process's wall time in the loop
    samples_per_second: float  # this session's throughput, all ranks
    validation_images: list[Path]
    validation_loss: float | None = None  # the last one measured in this session


@dataclass
class Session:
    """Everything `setup` builds and `fit` and `finish` use: the resolved config, accelerate, the
    start-up decisions, the models and optimizer state, and the data position `state`."""

    cfg: TrainConfig  # resolved (train.config.resolve): read, never re-checked
    accelerator: Any
    log: Any
    run: Startup
    unet: torch.nn.Module | None = None
    adapter: torch.nn.Module | None = None  # prepared (DDP-wrapped on several processes)
    optimizer: Any = None
    lr_scheduler: Any = None
    objective: Any = None
    generator: torch.Generator | None = None  # this rank's noise stream
    state: TrainState = field(default_factory=TrainState)
    weight_dtype: torch.dtype = torch.float32
    parameters: dict[str, int] = field(default_factory=dict)  # trainable / frozen counts
    fast: Any = None  # train.fast.FastStep: the UNet and adapter the step calls (compiled or not)
    scale_watch: Any = None  # train.optim.ScaleWatch: fp16's skipped steps
    ema: EMA | None = None  # --ema-decay: the EMA of the adapter's weights, on every rank

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def plan(self) -> Plan:
        return self.run.plan

    def close(self) -> None:
        if self.run.lock is not None:
            self.run.lock.release()


@dataclass
class Fit:
    """What `fit` did in this session."""

    seconds: float
    samples: int  # all ranks
    validation_images: list[Path]
    validation_loss: float | None = None  # the last one measured in this session
    validation_sheet: Path | None = None  # the labelled page of the last validation images


def _get_logger():
    from accelerate.logging import get_logger

    return get_logger("train")


def make_accelerator(cfg: TrainConfig) -> Any:
    """The Accelerator for this run. The process-group timeout is --ddp-timeout-minutes: start-up
    (rank 0 fingerprints the encoders) and validation (rank 0 renders) keep the other ranks
    waiting in a collective for longer than torch's default would allow on a big model."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=cfg.trackers or None,
        project_config=ProjectConfiguration(project_dir=str(cfg.output_dir), logging_dir=str(cfg.logging_path)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.ddp_timeout_minutes))],
    )


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; returns what was done. Raises the user-facing
    errors of `train.errors` (settings, start-up refusals, checkpoints, the run) and shards'
    ManifestError/ShardError for a damaged cache."""
    session = setup(cfg)
    try:
        if session.run.finished:
            return _nothing_to_do(session)
        _load(session)
        return finish(session, fit(session))
    finally:
        session.close()


# --------------------------------------------------------------------------------------------
# setup: settings, start-up checks, weights, optimizer, resume


def setup(cfg: TrainConfig) -> Session:
    """Resolve the settings (once), start accelerate and run every start-up check; refusals come
    before any weight loads. The models are loaded by `_load` unless the run is already finished."""
    from train import startup

    resolved = resolve(cfg)
    cfg = resolved.config
    accelerator = make_accelerator(cfg)
    log = _get_logger()
    for note in resolved.notes:
        log.warning(note)
    log.info("mixed precision: %s, from %s", cfg.mixed_precision, resolved.precision_source)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run = startup.start(cfg, accelerator, log)  # every refusal, before any weight
    return Session(cfg=cfg, accelerator=accelerator, log=log, run=run, weight_dtype=WEIGHT_DTYPES[cfg.mixed_precision])


def _load(s: Session) -> None:
    """The frozen UNet (in the mixed-precision dtype), the fp32 adapter, optimizer, LR schedule and
    noise stream, restored from the checkpoint when resuming."""
    from accelerate.utils import set_seed
    from diffusers import UNet2DConditionModel

    from train import checks, fast
    from train.step import Objective, build_adapter, count_parameters, freeze_unet

    cfg, plan, accelerator, device = s.cfg, s.plan, s.accelerator, s.accelerator.device
    unet = UNet2DConditionModel.from_pretrained(checks.model_root(cfg.model), subfolder="unet", revision=cfg.revision,
                                                variant=cfg.variant, torch_dtype=s.weight_dtype, cache_dir=cfg.cache_dir)
    freeze_unet(unet, s.weight_dtype)
    unet.to(device)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    # Seeded right here: the new adapter's weights depend on the seed alone, not on what loading
    # the encoders or the UNet may have drawn (DDP also broadcasts rank 0's weights at wrap time).
    set_seed(cfg.seed)
    adapter = build_adapter(plan.unet_config, plan.manifest.latent.vae_scale_factor, path=cfg.adapter,
                            config=plan.adapter_config, cache_dir=cfg.cache_dir)
    adapter.train()
    trainable, _ = count_parameters(adapter)
    _, frozen = count_parameters(unet)
    s.parameters = {"trainable_parameters": trainable, "frozen_parameters": frozen}
    s.log.info("parameters: %s trainable (adapter, fp32), %s frozen (UNet, %s)", f"{trainable:,}", f"{frozen:,}",
               str(s.weight_dtype).removeprefix("torch."))
    if device.type == "cpu":
        from shards.runtime import choose_cpu_threads

        # LOCAL_WORLD_SIZE: the processes of this machine (set by accelerate launch / torchrun).
        threads, why = choose_cpu_threads(trainable + frozen, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        s.log.info("CPU threads per process: %d (%s)", threads, why)

    optimizer = make_optimizer(OptimizerSpec.of(cfg, plan.learning_rate), adapter.parameters())
    lr_scheduler = make_lr_scheduler(ScheduleSpec.of(cfg, plan.total_steps), optimizer)
    adapter, optimizer = accelerator.prepare(adapter, optimizer)
    s.fast = fast.prepare(cfg, unet, adapter, shapes=len(plan.manifest.geometry.sizes()), log=s.log)
    s.log.info("optimizer: AdamW (%s); batches copied to the device %s", "8-bit" if cfg.use_8bit_adam else
               "fused" if cfg.fused_adamw else "foreach", "one ahead (prefetch)" if cfg.prefetch else "when taken")
    # One noise stream per rank (different noise on different samples), reproducible from the seed.
    noise_seed = int(np.random.SeedSequence([cfg.seed, _NOISE_STREAM, s.rank]).generate_state(1, np.uint64)[0] >> 1)
    generator = torch.Generator(device=device).manual_seed(noise_seed)
    s.unet, s.adapter, s.optimizer, s.lr_scheduler = unet, adapter, optimizer, lr_scheduler
    s.objective, s.generator = Objective(plan.scheduler_config, device), generator
    if cfg.ema_enabled:  # starts as the initial adapter; a checkpoint's EMA replaces it below
        s.ema = EMA(accelerator.unwrap_model(adapter), EMASpec(cfg.ema_decay, cfg.ema_warmup_steps))
    ckpt = s.run.checkpoint
    if ckpt is not None:
        s.state = load_checkpoint(ckpt, accelerator, adapter=accelerator.unwrap_model(adapter), optimizer=optimizer,
                                  lr_scheduler=lr_scheduler, noise_generator=generator, ema=s.ema)
        s.log.info("resumed from %s: step %d, epoch %d, batch %d", ckpt.path, s.state.global_step, s.state.epoch,
                   s.state.batches_done)
    s.scale_watch = ScaleWatch(accelerator.scaler)  # after the resume: it starts from the restored scale


def _nothing_to_do(s: Session) -> TrainResult:
    ckpt = s.run.checkpoint
    s.log.info("nothing to do: %s finished all %d steps (checkpoint %s) and its adapter is in %s; raise --max-steps "
               "or --num-epochs to train further", s.out, s.plan.total_steps, ckpt.path.name, s.out)
    s.accelerator.end_training()
    return TrainResult(output_dir=s.out, global_step=ckpt.state.global_step, samples_seen=ckpt.state.samples_seen,
                       seconds=0.0, samples_per_second=0.0, validation_images=[])


# --------------------------------------------------------------------------------------------
# Knowing when the adapter is good: EMA and validation loss, beside the step


def _update_ema(s: Session) -> None:
    """After optimizer step `s.state.global_step`: move the EMA (every rank, the same arithmetic)."""
    if s.ema is not None:
        s.ema.update(s.state.global_step)


def _eval_adapter(s: Session) -> tuple[torch.nn.Module, str]:
    """(the adapter validation renders and evaluates, "ema" or "raw")."""
    if s.ema is not None:
        return s.ema.module, "ema"
    return s.accelerator.unwrap_model(s.adapter), "raw"


class _UnderAutocast(torch.nn.Module):
    """`module` called under `accelerator.autocast()`, as the prepared adapter is."""

    def __init__(self, module: torch.nn.Module, accelerator: Any):
        super().__init__()
        self.module, self._accelerator = module, accelerator

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._accelerator.autocast():
            return self.module(*args, **kwargs)


def _evaluate_now(s: Session, metrics: Metrics) -> float | None:
    """The validation loss at the current step (collective), recorded in metrics.jsonl and the
    tracker; None without a validation set."""
    evaluator = s.run.evaluator
    if evaluator is None:
        return None
    metrics.flush()
    adapter, weights = _eval_adapter(s)
    if weights == "ema":
        # The trained adapter runs under the run's autocast (accelerate wraps its forward); the EMA
        # is evaluated the same way, so the two losses differ by their weights, not their precision.
        adapter = _UnderAutocast(adapter, s.accelerator)
    result = evaluator.run(s.state.global_step, objective=s.objective, unet=s.unet, adapter=adapter,
                           accelerator=s.accelerator, weight_dtype=s.weight_dtype, weights=weights)
    metrics.record(result.record(), result.tracker_values())
    s.log.info("validation loss at step %d: %.6f (%d images x %d timesteps, %s weights, %.1f s)", result.step,
               result.loss, result.images, result.timesteps, weights, result.seconds)
    metrics.restart_window()  # samples/s measures training, not evaluation
    return result.loss


# --------------------------------------------------------------------------------------------
# fit: the loop


def fit(s: Session) -> Fit:
    """Train from `s.state` to the run's last step: epochs of the start-up plan, explicit gradient
    accumulation, checkpoints and validation on schedule, and always a checkpoint at the end."""
    from tqdm.auto import tqdm

    from train.data import DeviceBatches, make_loader

    cfg, plan, accelerator, state, log = s.cfg, s.plan, s.accelerator, s.state, s.log
    device, main, world = accelerator.device, accelerator.is_main_process, s.world
    metrics_path = s.out / LOGS_DIR / METRICS_FILE
    samples_path = s.out / LOGS_DIR / f"samples-rank{s.rank:05d}.jsonl"
    resumed_step = state.global_step if s.run.checkpoint is not None else None
    if main:
        truncate_jsonl(metrics_path, resumed_step, log)
    if cfg.log_samples:
        truncate_jsonl(samples_path, resumed_step, log)
    if accelerator.log_with:
        accelerator.init_trackers(cfg.tracker_project_name, config={
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()})

    total = plan.total_steps
    log.info("training %d optimizer steps: %d process(es) x batch %d x accumulation %d, lr %.3g (%s)", total,
             world, cfg.batch_size, cfg.gradient_accumulation_steps, plan.learning_rate, cfg.lr_scheduler)
    progress = tqdm(total=total, initial=state.global_step, desc="train", disable=not main, dynamic_ncols=True)
    metrics = Metrics(accelerator, metrics_path, progress, cfg.log_every)
    last_checkpoint = state.global_step if s.run.checkpoint is not None else -1
    last_validation = -1
    validation_images: list[Path] = []
    last_sheet: list[Path] = []
    # A checkpoint is preceded by the evaluation of its step when that step is on the schedule or the
    # run's last: a resumed run does not measure (and record) it twice.
    resumed_evaluated = resumed_step is not None and (resumed_step % cfg.validation_loss_steps == 0
                                                      or resumed_step == plan.total_steps)
    evaluated = {"step": resumed_step if resumed_evaluated else -1, "loss": None}
    session_samples = 0
    exit_after = int(os.environ.get(DEBUG_EXIT_AFTER_CHECKPOINT, "-1"))
    started = time.perf_counter()
    samples_file = samples_path.open("a") if cfg.log_samples else None

    def checkpoint_now() -> None:
        metrics.flush()
        if samples_file is not None:
            samples_file.flush()  # the audit log holds every step the checkpoint covers
        save_checkpoint(accelerator, s.out, state=state, adapter=accelerator.unwrap_model(s.adapter),
                        optimizer=s.optimizer, lr_scheduler=s.lr_scheduler, noise_generator=s.generator,
                        meta=s.run.meta, keep=cfg.checkpoints_total_limit, ema=s.ema)
        if state.global_step == exit_after:
            os._exit(75)  # test hook (see module docstring): killed right after a complete checkpoint

    def validate_now() -> None:
        metrics.flush()
        validator = s.run.validator
        if validator is not None:
            adapter, weights = _eval_adapter(s)
            try:
                result = validator.run(state.global_step, unet=s.unet, adapter=adapter, accelerator=accelerator,
                                       weights=weights)
                validation_images[:] = result.grids
                last_sheet[:] = [result.sheet]
                if result.record() is not None:
                    metrics.record(result.record(), {"adherence": result.mean_adherence})
            except Exception:  # e.g. out of memory: hours of training must not die for a preview
                log.exception("validation at step %d failed; training continues", state.global_step)
        accelerator.wait_for_everyone()

    def evaluate_now() -> None:
        evaluated["step"], evaluated["loss"] = state.global_step, _evaluate_now(s, metrics)

    try:
        if s.run.checkpoint is None:
            evaluate_now()  # the validation loss of the initial adapter: where the curve starts
        while state.global_step < total:
            epoch = plan.epoch(state.epoch)
            batches = epoch.steps
            loader = make_loader(s.run.store, epoch, manifest=plan.manifest, rank=s.rank,
                                 start_batch=state.batches_done)
            log.info(epoch.stats.describe())  # what the epoch uses and drops, and why
            batch_iter = DeviceBatches(iter(loader), device, prefetch=cfg.prefetch)
            while state.batches_done < batches and state.global_step < total:
                raise_if_stopped()  # a Ctrl-C swallowed in a loader's clean-up still stops the run
                group = min(cfg.gradient_accumulation_steps, batches - state.batches_done)
                loss_sum = torch.zeros((), device=device)
                data_wait = 0.0
                step_keys: list[str] = []
                for j in range(group):
                    t0 = time.perf_counter()
                    batch = next(batch_iter)
                    data_wait += time.perf_counter() - t0
                    step_keys += batch.keys
                    if samples_file is not None:
                        samples_file.write(json.dumps({"step": state.global_step + 1, "epoch": state.epoch,
                                                       "batch": state.batches_done, "keys": batch.keys}) + "\n")
                    # Gradients are all-reduced on the group's last backward only.
                    sync = contextlib.nullcontext() if j == group - 1 else accelerator.no_sync(s.adapter)
                    with sync:
                        # No outer autocast: the prepared adapter autocasts itself, and the frozen
                        # UNet runs in its weight dtype as in the reference (autocast would push its
                        # norms and softmax back to fp32: more casts and memory for no gradient).
                        loss = s.objective.loss(s.fast.unet, s.fast.adapter, batch, s.generator,
                                                weight_dtype=s.weight_dtype)
                        accelerator.backward(loss / group)
                    s.fast.observe(state.global_step + 1, batch)
                    loss_sum += loss.detach()
                    state.batches_done += 1
                grad_norm, lr, skipped = optimizer_step(s)
                state.global_step += 1
                _update_ema(s)
                step_samples = group * cfg.batch_size * world
                state.samples_seen += step_samples
                session_samples += step_samples
                if state.batches_done == batches:  # epoch done: a checkpoint here resumes at the next one
                    state.epoch, state.batches_done = state.epoch + 1, 0
                metrics.add(state.global_step, loss_sum / group, grad_norm, lr, data_wait, step_samples, step_keys,
                            scaler_skipped=skipped)
                progress.update(1)

                if state.global_step % cfg.validation_loss_steps == 0:
                    evaluate_now()  # before the checkpoint: a run resumed from it has this record
                if state.global_step % cfg.checkpointing_steps == 0:
                    checkpoint_now()
                    last_checkpoint = state.global_step
                    metrics.restart_window()  # samples/s and peak memory measure training, not saving
                if cfg.validation_enabled and state.global_step % cfg.validation_steps == 0:
                    validate_now()
                    last_validation = state.global_step
                    metrics.restart_window()
                if state.batches_done == 0:
                    break
            del batch_iter, loader
        metrics.flush()
        seconds = time.perf_counter() - started
        if evaluated["step"] != state.global_step:
            evaluate_now()
        if last_checkpoint != state.global_step:
            checkpoint_now()  # the end is always resumable (e.g. to train further with more steps)
        if cfg.validation_enabled and last_validation != state.global_step:
            validate_now()
            reset_peak_memory()
    finally:
        progress.close()
        if samples_file is not None:
            samples_file.close()
    return Fit(seconds=seconds, samples=session_samples, validation_images=validation_images,
               validation_loss=evaluated["loss"], validation_sheet=last_sheet[0] if last_sheet else None)


def optimizer_step(s: Session) -> tuple[torch.Tensor, float, bool]:
    """Clip, step and advance the schedule once: (gradient norm on the device, the learning rate
    this step used, whether fp16's loss scaler skipped it). No host sync without a loss scaler
    (bf16, fp32); with fp16 one, to learn whether the step was skipped (train.optim.ScaleWatch)."""
    grad_norm = s.accelerator.clip_grad_norm_(s.adapter.parameters(), s.cfg.max_grad_norm)
    lr = s.lr_scheduler.get_last_lr()[0]  # the rate this step uses
    s.optimizer.step()
    skipped = s.scale_watch()
    if not skipped:  # fp16 overflow: no step, no schedule
        s.lr_scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr, skipped


# --------------------------------------------------------------------------------------------
# finish: every replica equal, then OUT's deliverables


def finish(s: Session, done: Fit) -> TrainResult:
    """Check that every rank holds the same adapter, then write OUT's outputs (main process)."""
    from train import outputs

    accelerator, state = s.accelerator, s.state
    rate = done.samples / max(done.seconds, 1e-9)
    final_adapter = accelerator.unwrap_model(s.adapter)
    if os.environ.get(DEBUG_REPLICA_DIR):  # test hook (see module docstring)
        from safetensors.torch import save_file

        replica_dir = Path(os.environ[DEBUG_REPLICA_DIR])
        replica_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in final_adapter.state_dict().items()},
                  str(replica_dir / f"adapter-rank{s.rank:05d}.safetensors"))
    digests = outputs.replica_digests(accelerator, final_adapter)
    if len(set(digests)) != 1:
        raise TrainError(f"the adapter replicas of the {s.world} processes differ at the end (sha256 per rank: "
                         f"{digests}); gradients were not synchronised")
    if s.ema is not None:
        ema_digests = outputs.replica_digests(accelerator, s.ema.module)
        if len(set(ema_digests)) != 1:
            raise TrainError(f"the EMA replicas of the {s.world} processes differ at the end (sha256 per rank: "
                             f"{ema_digests})")
    if accelerator.is_main_process:
        outputs.write_outputs(s.cfg, s.plan, state, final_adapter, world=s.world, seconds=done.seconds, rate=rate,
                              validation_images=done.validation_images, replica_digests=digests,
                              parameters=s.parameters, hub_repo=s.run.hub_repo,
                              ema=None if s.ema is None else s.ema.module, validation_sheet=done.validation_sheet)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir=s.out, global_step=state.global_step, samples_seen=state.samples_seen,
                       seconds=done.seconds, samples_per_second=rate, validation_images=done.validation_images,
                       validation_loss=done.validation_loss)


__all__ = ["Fit", "Session", "TrainError", "TrainResult", "finish", "fit", "make_accelerator", "optimizer_step",
           "setup", "train"]
