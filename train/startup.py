"""Start-up: everything decided before a weight is loaded, and the one refusal that lists it all.

In this order, so that every refusal comes before the UNet is read:
config -> cache manifest -> UNet/VAE/adapter configs against the cache's shapes -> data plan
(steps per epoch, shards per rank x worker) -> checkpoint to resume (settings that must match)
-> encoder and tokenizer fingerprints (main process; its text encoders are then reused once to
embed the validation prompts and freed). All processes then agree through one tensor
all-reduce: if any of them found a problem, every one of them stops (none waits forever in a
collective).

`start()` returns a `Startup`: the plan the loop and the outputs follow, the store to read, the
checkpoint to resume (if any) with the metadata new checkpoints record, the validator, and (with
--validation-split or --validation-cache) the evaluator of the validation loss (`train.evaluate`),
whose samples the plan fixed: the held-out images, or a validation cache held to this cache's
identity.
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shards.errors import ShardError
from shards.manifest import Manifest
from shards.secrets import redact
from shards.store import Store
from shards.stores import open_store
from train import checks
from train.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoints_dir,
    read_checkpoint,
    resolve_resume,
    resume_problems,
    step_folders,
)
from train.checks import CacheMismatchError, StartupError
from train.config import TrainConfig
from train.evaluate import EvalSet, EvalSpec, Evaluator, eval_set, identity_problems
from train.plan import DataSpec, EpochPlan, EpochStats


@dataclass
class Plan:
    """Facts resolved at start-up, before weights: what the loop and the outputs need."""

    manifest: Manifest
    manifest_id: str
    unet_config: dict
    scheduler_config: dict
    vae_location: tuple[str, str | None] | None
    adapter_config: dict | None  # --adapter's config.json (read from a folder or the hub)
    world_size: int
    data: DataSpec | None  # None only when the settings are refused (problems say why)
    learning_rate: float  # effective (after --scale-lr)
    epoch_stats: list[EpochStats]  # index = epoch, for the epochs the run will touch: steps, samples used/dropped
    total_steps: int  # optimizer steps of the whole run (shapes decaying LR schedules)
    validation: EvalSet | None = None  # the validation loss's samples (None: no validation loss)
    validation_store: Store | None = None  # --validation-cache's store (None: the training cache's)
    validation_manifest: Manifest | None = None  # --validation-cache's manifest

    validation_pairs: tuple[tuple[str, str], ...] = ()  # (conditioning image, prompt) to render, read once
    _epoch: EpochPlan | None = None  # the plan of the epoch under way (see `epoch`)

    @property
    def batches_per_epoch(self) -> list[int]:
        return [s.steps for s in self.epoch_stats]

    def epoch(self, index: int) -> EpochPlan:
        """The plan of epoch `index`, which the loop's loaders read. A plan holds every used
        sample's position, so only the epoch under way is kept: start-up computed each epoch's
        plan for its stats (and keeps the first epoch's); a later epoch's is made when it
        begins. Plans are pure functions of (manifest, spec, epoch): nothing is cross-checked."""
        if self._epoch is None or self._epoch.epoch != index:
            self._epoch = EpochPlan(self.manifest, self.data, index)
        return self._epoch


@dataclass
class Startup:
    plan: Plan
    store: Store
    checkpoint: Checkpoint | None  # to resume from
    meta: dict[str, Any]  # what every checkpoint of this run records and a resume compares
    validator: Any  # train.validation.Validator on the main process when validation is on, else None
    evaluator: Evaluator | None = None  # the validation loss, on every process (None when off)
    hub_repo: str | None = None  # --push-to-hub: the repository created at start (main process)
    finished: bool = False  # resumed at the last step with the outputs written: nothing to do
    lock: Any = None  # the main process's shards.lock.WriterLock on OUT, held until the run ends


@dataclass
class _Problems:
    """Refusal reasons, split by kind: a cache that does not fit vs. anything else."""

    cache: list[str]
    other: list[str]

    def __bool__(self) -> bool:
        return bool(self.cache or self.other)


def optimizer_steps(batches: int, accumulation: int) -> int:
    return math.ceil(batches / accumulation)


def make_plan(cfg: TrainConfig, world_size: int, store: Store) -> tuple[Plan, _Problems]:
    """Everything checkable from configs and the manifest; returns (plan, problems)."""
    from diffusers import T2IAdapter

    from train.augment import soft_threshold_range_for

    manifest, mid = Manifest.load_with_id(store)  # the id: sha256 of the very bytes read
    problems = _Problems([], [])
    hub = {"cache_dir": cfg.cache_dir}
    unet_config = checks.read_unet_config(cfg.model, cfg.revision, **hub)
    scheduler_config = checks.read_scheduler_config(cfg.model, cfg.revision, **hub)
    vae_location = checks.vae_location(cfg.vae, manifest, cfg.model, cfg.revision, **hub)
    vae_config = None
    if vae_location is not None:
        repo, subfolder = vae_location
        vae_config = checks.load_component_config(repo, subfolder, cfg.revision if subfolder == "vae" else None, **hub)
    adapter_config = None
    if cfg.adapter:
        # load_config resolves a folder or a hub id (from the hub cache when offline).
        try:
            adapter_config = dict(T2IAdapter.load_config(checks.model_root(cfg.adapter), cache_dir=cfg.cache_dir))
        except (OSError, ValueError) as e:
            inner = Path(cfg.adapter).expanduser() / "adapter"  # a checkpoint folder holds it there
            hint = f"; a checkpoint's adapter is its adapter/ folder: --adapter {inner}" if (
                inner / "config.json").is_file() else ""
            problems.other.append(f"--adapter {cfg.adapter}: cannot read its config.json ({e}){hint}")
    problems.cache += checks.shape_problems(manifest, unet_config, vae_config, adapter_config=adapter_config)
    if cfg.validation_resolution is not None:
        problems.other += checks.validation_resolution_problems(cfg.validation_resolution, unet_config,
                                                                manifest.latent.vae_scale_factor)
    soft = None
    try:
        soft = soft_threshold_range_for(manifest.identity.condition, cfg.soft_threshold_range)
    except ValueError as e:
        problems.cache.append(f"--soft-threshold-range: {e}")

    if cfg.validation_enabled:
        if not all(checks.load_component_config(cfg.model, sub, cfg.revision, **hub) for sub in checks.TEXT_COMPONENTS):
            problems.other.append(f"validation prompts need text encoders, and {cfg.model} has no text_encoder and "
                                  "text_encoder_2: drop --validation-prompt/--validation-image or use the full model")
        if vae_location is None:
            problems.other.append(f"validation images need a VAE to decode, and {cfg.model} has none: pass --vae")

    learning_rate = cfg.learning_rate
    if cfg.scale_lr:
        learning_rate *= cfg.batch_size * cfg.gradient_accumulation_steps * world_size

    # The epoch plans come from the manifest alone, so every rank computes the same ones: here for
    # their stats (steps per epoch, what each uses and drops), the first one kept for the loop.
    stats: list[EpochStats] = []
    first: EpochPlan | None = None
    total = 0
    spec = None
    try:
        spec = DataSpec(batch_size=cfg.batch_size, seed=cfg.seed, world_size=world_size, num_workers=cfg.num_workers,
                        shuffle_buffer=cfg.shuffle_buffer, max_samples=cfg.max_samples,
                        caption_dropout=cfg.caption_dropout, soft_threshold=soft,
                        validation_split=cfg.validation_split)
        while (total < cfg.max_steps) if cfg.max_steps is not None else (len(stats) < cfg.num_epochs):
            plan_of_epoch = EpochPlan(manifest, spec, len(stats))
            first = first or plan_of_epoch
            stats.append(plan_of_epoch.stats)
            total += optimizer_steps(stats[-1].steps, cfg.gradient_accumulation_steps)
        if cfg.max_steps is not None:
            total = cfg.max_steps
    except ValueError as e:
        problems.cache.append(str(e))
        spec = None

    validation, validation_store, validation_manifest = None, None, None
    if cfg.validation_split:
        validation = eval_set(manifest, mid, fraction=cfg.validation_split,
                              source=f"--validation-split {cfg.validation_split:g}: held out of the training cache")
    elif cfg.validation_cache:
        where = f"--validation-cache {redact(cfg.validation_cache)}"
        try:
            validation_store = open_store(cfg.validation_cache)
            validation_manifest, validation_id = Manifest.load_with_id(validation_store)
            problems.cache += identity_problems(manifest, validation_manifest, where)
            if validation_id == mid:  # a copy of the training cache: the same manifest, byte for byte
                logging.getLogger("train").warning(
                    "%s holds the training cache itself (the same manifest id %s): the validation loss measures "
                    "images the adapter trains on, not held-out ones (--validation-split holds some out)",
                    where, mid[:16])
            validation = eval_set(validation_manifest, validation_id, source=where)
            if not validation.count:
                problems.cache.append(f"{where} holds no samples")
        except (ShardError, OSError) as e:
            problems.cache.append(f"{where}: {e}")

    plan = Plan(manifest=manifest, manifest_id=mid, unet_config=unet_config,
                scheduler_config=scheduler_config, vae_location=vae_location, adapter_config=adapter_config,
                world_size=world_size, data=spec, learning_rate=learning_rate, epoch_stats=stats, total_steps=total,
                validation=validation, validation_store=validation_store, validation_manifest=validation_manifest,
                validation_pairs=tuple(cfg.validation_pairs()) if cfg.validation_enabled else (), _epoch=first)
    return plan, problems


def make_evaluator(cfg: TrainConfig, plan: Plan, store: Store) -> Evaluator | None:
    """The validation loss's evaluator (None when there is no validation set). Soft maps are
    binarised at the middle of the run's threshold range."""
    if plan.validation is None or not plan.validation.count:
        return None
    soft = plan.data.soft_threshold if plan.data is not None else None
    spec = EvalSpec(timesteps=cfg.validation_loss_timesteps,
                    soft_threshold=None if soft is None else (soft[0] + soft[1]) / 2)
    if plan.validation_store is not None:
        return Evaluator(plan.validation, plan.validation_store, plan.validation_manifest, spec)
    return Evaluator(plan.validation, store, plan.manifest, spec)


def check_encoders_and_prepare_validation(cfg: TrainConfig, plan: Plan, device: torch.device, log: Any,
                                          refuse: bool) -> tuple[list[str], Any]:
    """(fingerprint differences, Validator or None). Loads MODEL's tokenizers, text encoders and
    the VAE once on the CPU, compares their fingerprints with the cache's, embeds the validation
    prompts with the text encoders unless the run is refused anyway, and frees them all."""
    text_stack = checks.load_text_stack(cfg.model, cfg.revision, cfg.variant, cache_dir=cfg.cache_dir)
    vae = (checks.load_vae(plan.vae_location, revision=cfg.revision, variant=cfg.variant, cache_dir=cfg.cache_dir)
           if plan.vae_location else None)
    report = checks.compare_fingerprints(plan.manifest.identity.encoder, {
        "vae": vae,
        "text_encoder": text_stack.text_encoder if text_stack else None,
        "text_encoder_2": text_stack.text_encoder_2 if text_stack else None,
    }, tokenizers={
        "tokenizer": text_stack.tokenizer if text_stack else None,
        "tokenizer_2": text_stack.tokenizer_2 if text_stack else None,
    }, variant=cfg.variant)
    del vae
    for note in report.notes:
        log.info("encoder check: %s", note)
    if not report.differences:
        log.info("encoder fingerprints match the cache")
    validator = None
    refused = refuse or (report.differences and not cfg.accept_encoder_mismatch)
    if cfg.validation_enabled and text_stack is not None and not refused:
        from train.validation import (
            Validator,
            embed_validation_prompts,
            force_zeros_for_empty_prompt,
        )

        from train.adherence import EdgeDetector

        force_zeros = force_zeros_for_empty_prompt(cfg.model, cache_dir=cfg.cache_dir)
        prompts = embed_validation_prompts(text_stack, list(plan.validation_pairs), force_zeros=force_zeros,
                                           device=device)
        condition = plan.manifest.identity.condition
        detector = EdgeDetector.for_condition(condition)
        if detector is None:
            how = ("come with the dataset" if condition.method == "dataset"
                   else f"are {condition.method} maps, not edges")
            log.info("condition adherence is not measured: this cache's conditioning images %s, so there is no edge "
                     "detector to run on the generated images (it is, for caches precomputed with --condition canny "
                     "or sketch)", how)
        else:
            log.info("condition adherence: every validation image is scored by edge F1 against its conditioning "
                     "image, with the cache's detector: %s", detector.describe())
        validator = Validator(
            prompts, output_dir=cfg.output_dir, vae_location=plan.vae_location,
            vae_kwargs={"revision": cfg.revision, "variant": cfg.variant, "cache_dir": cfg.cache_dir},
            scheduler_config=plan.scheduler_config, force_zeros=force_zeros,
            resolution=cfg.validation_resolution, sizes=plan.manifest.geometry.sizes(), detector=detector,
            num_images=cfg.num_validation_images, inference_steps=cfg.validation_inference_steps,
            guidance_scale=cfg.validation_guidance_scale, seed=cfg.seed,
        )
    del text_stack  # the text encoders are not needed again
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report.differences, validator


def agree(accelerator: Any, refuse_here: bool) -> bool:
    """True when any process refuses: a tensor all-reduce (no pickled objects between ranks)."""
    if accelerator.num_processes == 1:
        return refuse_here
    flag = torch.tensor([1.0 if refuse_here else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def refusal(cfg: TrainConfig, problems: _Problems, differences: list[str]) -> StartupError:
    """One error listing every problem: CacheMismatchError when the cache does not fit the model
    (with the other problems listed too), else StartupError."""
    if problems.cache or (differences and not cfg.accept_encoder_mismatch):
        return CacheMismatchError(checks.refusal_message(redact(cfg.cache), cfg.model, problems.cache + problems.other,
                                                         differences, accepted=cfg.accept_encoder_mismatch))
    return StartupError("cannot start training:\n" + "\n".join(f"  - {p}" for p in problems.other))


def start(cfg: TrainConfig, accelerator: Any, log: Any) -> Startup:
    """Run every start-up check on every process; raise one error listing all problems, or
    return what the loop needs. Loads no UNet or adapter weights."""
    out = Path(cfg.output_dir)
    main = accelerator.is_main_process
    store = open_store(cfg.cache)
    plan, problems = make_plan(cfg, accelerator.num_processes, store)
    log.info("cache %s: %d samples in %d shards, manifest id %s", store.url, plan.manifest.num_samples,
             len(plan.manifest.shards), plan.manifest_id[:16])
    if cfg.local_cache:
        from shards.localcache import CachingStore
        from shards.units import parse_size

        max_bytes = parse_size(cfg.local_cache_max) if cfg.local_cache_max else None
        largest = max((r.bytes for r in plan.manifest.shards), default=0)
        if max_bytes is not None and max_bytes < largest:
            log.warning("--local-cache-max %s is smaller than the cache's largest shard (%d bytes): shards that do not "
                        "fit are streamed every epoch and not kept; raise it, or leave it out for no limit",
                        cfg.local_cache_max, largest)
        store = CachingStore(store, cfg.local_cache, max_bytes=max_bytes, records=plan.manifest.shards)
        log.info("local cache %s: %d shard(s) already there", cfg.local_cache,
                 sum(store.path_for(r.sha256).is_file() for r in plan.manifest.shards))

    from train.data import stream_identity

    stream = stream_identity(plan.manifest, plan.data) if plan.data is not None else None
    meta = {"world_size": accelerator.num_processes, "manifest_id": plan.manifest_id,
            "learning_rate": plan.learning_rate, "total_steps": plan.total_steps, "stream": stream,
            "config": cfg.to_dict()}
    # One training per OUT: the main process holds OUT/.lock for the whole run (released by the
    # kernel however the process ends). Taken before anything reads or writes OUT's checkpoints.
    lock = None
    if main:
        from shards.lock import LOCK_FILE, LockError, WriterLock

        try:
            lock = WriterLock(out / LOCK_FILE, f"the output folder {out}").acquire()
            if lock.describe_previous():
                log.warning("%s", lock.describe_previous())
        except (LockError, OSError) as e:
            problems.other.append(str(e))
        problems.other += output_obstacles(out)
    try:
        resume_path = resolve_resume(cfg.resume, out, warn=log.warning)
        ckpt = read_checkpoint(resume_path) if resume_path else None
        if ckpt is not None and not problems:
            differences = resume_problems(ckpt, meta)
            if differences:
                raise CheckpointError(f"cannot resume from {ckpt.path}: these settings differ from the checkpoint's "
                                      "(resume needs them equal to continue the same run):\n"
                                      + "\n".join(f"  - {d}" for d in differences)
                                      + f"\nTo go on from these weights with the new settings instead, start a new "
                                      f"run (another --output-dir) with --adapter {ckpt.path / 'adapter'}")
            if ckpt.state.global_step > plan.total_steps:
                problems.other.append(f"checkpoint {ckpt.path} is at step {ckpt.state.global_step}, past the "
                                      f"{plan.total_steps} steps asked for: raise --max-steps or --num-epochs")
        elif cfg.resume is None and step_folders(out):
            problems.other.append(f"{out} already holds checkpoints of a run: continue it with --resume latest, start "
                                  "it over with --resume none, or choose another --output-dir")
        if cfg.resume == "latest" and ckpt is None:
            log.info("--resume latest: no checkpoint in %s yet, starting a new run", out)
        warm = cfg.lr_scheduler not in ("constant", "piecewise_constant")
        if warm and plan.total_steps and cfg.lr_warmup_steps >= plan.total_steps:
            log.warning("--lr-warmup-steps %d is not shorter than the run's %d optimizer steps: the learning rate never "
                        "reaches --learning-rate %g with the %s schedule; lower --lr-warmup-steps", cfg.lr_warmup_steps,
                        plan.total_steps, plan.learning_rate, cfg.lr_scheduler)

        # Main process only: the encoders are loaded once, fingerprinted, used to embed the
        # validation prompts and freed. Its failures become problems, so that every process learns
        # of them through agree() instead of waiting in a collective.
        differences: list[str] = []
        validator = None
        if main:
            try:
                differences, validator = check_encoders_and_prepare_validation(cfg, plan, accelerator.device, log,
                                                                              refuse=bool(problems))
            except (CacheMismatchError, OSError, ValueError) as e:
                problems.cache.append(str(e))
        hub_repo = None
        if main and cfg.push_to_hub and not problems:
            from train.hub import create_hub_repo

            try:
                hub_repo = create_hub_repo(cfg)
                log.info("--push-to-hub: %s repository %s ready", "public" if cfg.hub_public else "private", hub_repo)
            except Exception as e:  # huggingface_hub raises HTTP, auth and validation errors of its own
                problems.other.append(f"--push-to-hub: cannot create the hub repository "
                                      f"{cfg.hub_model_id or out.name!r} ({type(e).__name__}: {e}); check the token "
                                      "(--hub-token, HF_TOKEN or `hf auth login`) and --hub-model-id")
        refused_here = bool(problems) or (bool(differences) and not cfg.accept_encoder_mismatch)
        if agree(accelerator, refused_here):
            if refused_here:
                raise refusal(cfg, problems, differences)
            raise StartupError("cannot start training: the main process refused to start; its message says why")
        if differences:
            log.warning("--accept-encoder-mismatch: training on a cache encoded with other encoders:\n%s",
                        "\n".join(f"  - {d}" for d in differences))
        if cfg.resume == "none" and main:
            set_aside_old_checkpoints(out, log)
        finished = (ckpt is not None and ckpt.state.global_step == plan.total_steps
                    and (out / "diffusion_pytorch_model.safetensors").is_file())
        evaluator = make_evaluator(cfg, plan, store)
        if evaluator is not None:
            log.info("validation loss every %d steps on %s, %d timesteps each", cfg.validation_loss_steps,
                     plan.validation.describe(), cfg.validation_loss_timesteps)
        return Startup(plan=plan, store=store, checkpoint=ckpt, meta=meta, validator=validator, hub_repo=hub_repo,
                       finished=finished, lock=lock, evaluator=evaluator)
    except BaseException:
        if lock is not None:  # a refusal, or any failure: the next attempt must find OUT free
            lock.release()
        raise


def output_obstacles(out: Path) -> list[str]:
    """What in OUT would stop the run's writes after its work (a folder where an output file goes,
    a file where a folder goes), said at start instead."""
    from train.card import LOSS_CURVE_FILE, README_FILE
    from train.checkpoint import CHECKPOINT_DIR
    from train.metrics import LOGS_DIR
    from train.outputs import TRAIN_CONFIG_FILE
    from train.validation import VALIDATION_DIR

    problems = []
    for name in (TRAIN_CONFIG_FILE, README_FILE, LOSS_CURVE_FILE, "config.json", "diffusion_pytorch_model.safetensors"):
        path = out / name
        if path.exists() and not path.is_file():
            problems.append(f"{path}: not a file, where the run writes its {name}: move it away")
    for name in (CHECKPOINT_DIR, LOGS_DIR, VALIDATION_DIR):
        path = out / name
        if path.exists() and not path.is_dir():
            problems.append(f"{path}: not a folder, where the run keeps its {name}: move it away")
    return problems


def set_aside_old_checkpoints(out: Path, log) -> Path | None:
    """--resume none in a folder holding an earlier run's checkpoints: they move to
    `checkpoints-replaced-<UTC time>` beside it, kept but out of the way, so that the new run's
    pruning and a later --resume latest see the new run's checkpoints only (left in place, an
    old step-000006 outlived a new 4-step run and was resumed as its end)."""
    from datetime import datetime, timezone

    old = step_folders(out)
    if not old:
        return None
    folder = checkpoints_dir(out)
    aside = folder.with_name(f"{folder.name}-replaced-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}")
    folder.rename(aside)
    log.warning("--resume none: the earlier run's %d checkpoint(s) (%s ... %s) moved to %s; delete that folder when "
                "you no longer need them", len(old), old[0].name, old[-1].name, aside)
    return aside


__all__ = ["Plan", "Startup", "agree", "make_plan", "optimizer_steps", "refusal", "set_aside_old_checkpoints",
           "start"]
