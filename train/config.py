"""TrainConfig: every knob of a training run, in one typed, frozen, validated place.

The CLI (`python -m train`) is generated from these fields: each field's `help` metadata is its
`--help` text, so the two cannot drift apart. A run turns its config into settings exactly once,
at start: `resolve(cfg)` decides what depends on the environment (the mixed precision, from the
flag or accelerate's own setting; the checkpoint limit's floor; fused AdamW and batch prefetching,
on with CUDA), checks every value and raises one
`ConfigError` listing every problem, and returns a `Resolved` whose `config` the rest of the run
reads and never re-checks. Facts that need the cache or the model (dimensions, encoder
fingerprints) are checked by `train.startup` right after, before any weight loads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards.options import NUMBER_PAIR, setting
from shards.store import nearest_existing, writable_problem
from train.errors import TrainError
from train.plan import range_problems

LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "piecewise_constant",
)
MIXED_PRECISION = ("no", "fp16", "bf16")
ATTENTION = ("sdpa", "eager")
TRACKERS = ("tensorboard", "wandb")
REPORT_TO = ("none", *TRACKERS, "all")  # all: every one of TRACKERS that is installed (the reference's "all")
# Largest --validation-resolution: a validation image of 4096 px is already 4x SDXL's; a typo past
# it (10240 for 1024) would take the machine's memory before saying anything.
MAX_VALIDATION_RESOLUTION = 4096
MIN_CHECKPOINTS_KEPT = 2  # one may be half-written when a job dies: keep a complete one besides it


class ConfigError(TrainError, ValueError):
    """Every problem found in a config, one per line (a single problem: one line in all)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(f"invalid training config: {self.problems[0]}")
            return
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid training config ({len(self.problems)} problem(s)):\n{lines}")


_f = setting  # a field with its option's help text, --help group, choices and aliases (shards.options)


def _image_problem(path: str | Path) -> str | None:
    """Why `path` cannot serve as a validation image (None when it is a file that decodes, fully,
    as validation will decode it), found before any model loads rather than when validation first
    renders."""
    from train.validation import ConditionImageError, load_condition

    if not Path(path).is_file():
        return "is a folder, not an image" if Path(path).is_dir() else "does not exist"
    try:
        load_condition(path)
    except ConditionImageError as e:
        return f"cannot be used: {e.detail}"
    return None


def _foreign_folder_problem(out: Path) -> str | None:
    """A problem when `out` holds files but is no training run's folder: training writes README.md,
    config.json and more there and would replace a user's files of those names, or mix its own
    into a cache or a dataset. A run's folder has what only a run puts there: its lock (taken
    first), train_config.json, checkpoints/ or logs/metrics.jsonl (a bare logs/ folder is no
    sign: many projects have one)."""
    from shards.lock import LOCK_FILE
    from train.checkpoint import CHECKPOINT_DIR
    from train.metrics import LOGS_DIR, METRICS_FILE
    from train.outputs import TRAIN_CONFIG_FILE

    try:
        names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        has_metrics = (out / LOGS_DIR / METRICS_FILE).is_file()
    except OSError:
        return None  # writable_problem speaks of access
    markers = (LOCK_FILE, TRAIN_CONFIG_FILE, CHECKPOINT_DIR)
    if not names or has_metrics or any(m in names for m in markers):
        return None
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (f"the folder holds files of something else ({shown}) and no training run (no "
            f"{', '.join(markers)}, {LOGS_DIR}/{METRICS_FILE}); training would write over or among them: choose a "
            "new or empty folder")


# Settings that name local files or folders, and those that may (a folder, or a hub id / URL):
# written absolute by TrainConfig.to_dict.
LOCAL_PATHS = ("output_dir", "cache_dir", "local_cache", "validation_file")
MAYBE_LOCAL_PATHS = ("model", "cache", "vae", "adapter", "validation_cache")


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


@dataclass(frozen=True)
class TrainConfig:
    # --- what to train on ------------------------------------------------------------------
    model: str = _f("", "Base SDXL model: a diffusers folder or hub id. Only its UNet and scheduler config are "
                        "loaded for training; its VAE, text encoders and tokenizers (when present) are fingerprinted "
                        "against the cache and used for validation images.", "model", required=True,
                    aliases=["--pretrained-model-name-or-path"], metavar="ID|DIR")
    cache: str = _f("", "Cache made by `python -m precompute`: a folder, s3://bucket/prefix or https:// URL. Its "
                        "manifest is checked against the model before any weights are loaded.", "model",
                    required=True, metavar="DIR|URL")
    output_dir: str = _f("", "Run folder: final adapter (diffusers format), README.md, config, checkpoints/, "
                             "validation/, logs/.", "model", required=True, metavar="DIR")
    revision: str | None = _f(None, "Model revision (branch, tag or commit) for hub models.", "model")
    variant: str | None = _f(None, "Model weight variant, e.g. fp16 (loads diffusion_pytorch_model.fp16.safetensors).",
                             "model")
    cache_dir: str | None = _f(None, "Where hub downloads of MODEL, --vae and --adapter are kept (default: the "
                                     "Hugging Face cache, HF_HOME).", "model", metavar="DIR")
    vae: str | None = _f(None, "VAE folder or hub id used to decode validation images (and checked against the cache). "
                               "Default: the VAE the cache was encoded with if precompute was given one, else MODEL's.",
                         "model", aliases=["--pretrained-vae-model-name-or-path"], metavar="ID|DIR")
    adapter: str | None = _f(None, "Continue training this T2IAdapter instead of a new one: a save_pretrained folder "
                                   "or a hub id (safetensors weights; checked to fit the UNet before it loads).",
                             "model", aliases=["--adapter-model-name-or-path"], metavar="ID|DIR")
    accept_encoder_mismatch: bool = _f(False, "Train even though the cache was encoded by a VAE, text encoders or "
                                              "tokenizers whose fingerprints differ from MODEL's (shapes must still "
                                              "fit).", "model")

    # --- data ------------------------------------------------------------------------------
    batch_size: int = _f(4, "Samples per process per micro-batch.", "data", aliases=["--train-batch-size"])
    num_workers: int = _f(2, "DataLoader worker processes per rank (0 = read in the training process). Any cache "
                             "works with any count: streams split shards by sample. A resume must give the same "
                             "count (one stream per worker; 0 and 1 are the same stream, interchangeable).", "data",
                          aliases=["--dataloader-num-workers"])
    max_samples: int | None = _f(None, "Use only the first N samples of the cache (for quick runs and debugging).",
                                 "data", aliases=["--max-train-samples"])
    caption_dropout: float = _f(0.0, "Probability of replacing a sample's prompt with the empty prompt each step "
                                     "(the reference's proportion_empty_prompts; drawn anew every step).", "data",
                                aliases=["--proportion-empty-prompts"])
    # 256 raw samples is about 150 MB per loader worker at 1024 px (train.plan.DEFAULT_SHUFFLE_BUFFER).
    shuffle_buffer: int = _f(256, "Samples in the epoch's seeded shuffle buffer (0 or 1: shard order only); a loader "
                                  "worker holds about this many raw samples.", "data")
    local_cache: str | None = _f(None, "Local folder where shards streamed from a remote --cache (s3://, https://) are "
                                       "kept, named by content hash and verified before reuse, so later runs on this "
                                       "node read local disk. Runs and ranks on one node may share it.", "data",
                                 metavar="DIR")
    local_cache_max: str | None = _f(None, "Size limit of --local-cache, e.g. 500GB or 1.5TiB; least recently used "
                                           "shards are evicted. Default: no limit.", "data", metavar="SIZE")
    soft_threshold_range: tuple[float, float] | None = _f(
        None, "LOW,HIGH: for a cache precomputed with --condition-soft, each conditioning image is binarised at a "
              "threshold drawn from this range every time it is used (the authors' sketch augmentation). Default for "
              "such caches: 0.3,0.8.", "data", metavar="LOW,HIGH", click_type=NUMBER_PAIR)

    # --- optimisation ------------------------------------------------------------------------
    num_epochs: int = _f(1, "Passes over the cache; ignored when --max-steps is given.", "optimization",
                         aliases=["--num-train-epochs"])
    max_steps: int | None = _f(None, "Optimizer steps to train for; overrides --num-epochs.", "optimization",
                               aliases=["--max-train-steps"])
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", "optimization")
    gradient_checkpointing: bool = _f(False, "Recompute UNet activations in the backward pass: less memory, "
                                             "about 30% more compute.", "optimization")
    learning_rate: float = _f(1e-5, "Peak learning rate (the published SDXL adapters used 1e-5).", "optimization")
    scale_lr: bool = _f(False, "Multiply the learning rate by batch size * accumulation * processes.", "optimization")
    lr_scheduler: str = _f("constant", "Learning-rate schedule: " + ", ".join(LR_SCHEDULERS) + ".", "optimization",
                           choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _f(500, "Linear warm-up steps (every schedule but constant and piecewise_constant).",
                              "optimization")
    lr_num_cycles: int = _f(1, "Hard restarts of cosine_with_restarts.", "optimization")
    lr_power: float = _f(1.0, "Power of the polynomial schedule.", "optimization")
    lr_step_rules: str | None = _f(None, "Rules of piecewise_constant, e.g. '1:10,0.1:20,0.01' (multiplier:until "
                                         "step, ..., final multiplier).", "optimization")
    use_8bit_adam: bool = _f(False, "bitsandbytes 8-bit AdamW (needs bitsandbytes and a CUDA GPU).", "optimization")
    adam_beta1: float = _f(0.9, "AdamW beta1.", "optimization")
    adam_beta2: float = _f(0.999, "AdamW beta2.", "optimization")
    adam_weight_decay: float = _f(1e-2, "AdamW decoupled weight decay.", "optimization")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", "optimization")
    max_grad_norm: float = _f(1.0, "Clip the adapter's gradient norm to this value.", "optimization")
    mixed_precision: str | None = _f(None, "no | fp16 | bf16: UNet weights in this dtype, adapter fp32 under "
                                           "autocast; fp16 needs a GPU. Default: accelerate's setting (accelerate "
                                           "launch --mixed_precision, or the accelerate config file), else no.",
                                     "optimization", choices=MIXED_PRECISION)
    allow_tf32: bool = _f(False, "Allow TF32 matmuls on Ampere+ GPUs (faster fp32, slightly less exact).",
                          "optimization")

    # --- speed: the step's fast paths (each a switch; see README "Speed on a GPU") ---------------
    attention: str = _f("sdpa", "Attention in the UNet: sdpa (PyTorch's scaled_dot_product_attention: flash / "
                                "memory-efficient kernels on a GPU; diffusers' default) or eager (explicit matmul and "
                                "softmax; more memory). The processor class in use is checked and logged at start.",
                        "speed", choices=ATTENTION)
    compile: bool = _f(False, "torch.compile the UNet forward and the adapter for training: one graph per bucket "
                              "shape (the first batch of each shape compiles, minutes for SDXL); recompiles are "
                              "counted and logged, and one after warm-up is a warning. Validation stays eager. "
                              "Off by default: not yet measured on a GPU here.", "speed")
    channels_last: bool = _f(False, "Hold the frozen UNet's weights in channels_last memory format (NHWC "
                                    "convolutions). Off by default: not yet measured on a GPU here.", "speed")
    fused_adamw: bool | None = _f(None, "torch.optim.AdamW(fused=True): one kernel for the whole update (with fp16, "
                                        "an overflowed step is skipped inside it). Default: on with CUDA, off on CPU "
                                        "(decided at start; --no-fused-adamw turns it off).", "speed")
    prefetch: bool | None = _f(None, "Copy the next batch to the device (pinned memory, non-blocking, on a side CUDA "
                                     "stream) while the current step computes. Default: on with CUDA; on a CPU it "
                                     "changes nothing but the order of the host work (results are bitwise the "
                                     "same).", "speed")
    seed: int = _f(0, "Seed of everything random: adapter init, data order, caption choice and dropout, noise, "
                      "timesteps, validation samples.", "optimization")
    ema_decay: float = _f(0.0, "Keep an exponential moving average of the adapter's weights with this decay per "
                               "optimizer step (e.g. 0.999; 0 = off). Checkpointed and resumed exactly; validation "
                               "images and the validation loss then use the EMA weights, and OUT/ema/ holds it "
                               "(see --save-ema).", "optimization")
    ema_warmup_steps: int = _f(0, "Ramp the EMA decay up linearly over the first N optimizer steps (decay x step / N), "
                                  "so the average follows a new adapter's early changes.", "optimization")
    save_ema: bool = _f(False, "Write the EMA weights as the run's adapter (OUT/diffusion_pytorch_model.safetensors) "
                               "instead of the trained ones (which the last checkpoint keeps). Needs --ema-decay.",
                        "optimization")

    # --- checkpoints ----------------------------------------------------------------------------
    checkpointing_steps: int = _f(500, "Save a resumable checkpoint every N optimizer steps (and at the end).",
                                  "checkpoints")
    checkpoints_total_limit: int | None = _f(3, "Keep the newest K complete checkpoints (K >= 2; smaller values are "
                                                "raised to 2). Default keeps 3.", "checkpoints")
    resume: str | None = _f(None, "'latest' (newest complete checkpoint in OUT/checkpoints, or a fresh start when "
                                  "there is none), a checkpoint folder or its name in OUT/checkpoints (step-000200; "
                                  "the reference's checkpoint-200 means the same), or 'none' (start over although OUT holds "
                                  "checkpoints: they move to OUT/checkpoints-replaced-<UTC time>).", "checkpoints",
                            aliases=["--resume-from-checkpoint"], metavar="latest|none|DIR")

    # --- validation -----------------------------------------------------------------------------
    validation_image: tuple[str, ...] = _f((), "Conditioning image for validation (repeatable, or several after one "
                                               "flag). Pairs with --validation-prompt 1:N, N:1 or N:N.", "validation",
                                           multiple=True, metavar="PNG")
    validation_prompt: tuple[str, ...] = _f((), "Validation prompt (repeatable, or several after one flag); embedded "
                                                "once at start with MODEL's text encoders.", "validation",
                                            multiple=True, metavar="TEXT")
    num_validation_images: int = _f(4, "Images rendered per (image, prompt) pair.", "validation")
    validation_steps: int = _f(100, "Render validation images every N optimizer steps (and at the end).", "validation")
    validation_inference_steps: int = _f(20, "Denoising steps per validation image.", "validation")
    validation_guidance_scale: float = _f(5.0, "Classifier-free guidance scale of validation images.", "validation")
    validation_resolution: int | None = _f(None, "Square validation image size in pixels, a multiple of the "
                                                 "adapter's coarsest feature stride (32 for SDXL; checked at start). "
                                                 "Default: each conditioning image's aspect ratio mapped to the "
                                                 "nearest of the cache's buckets (the cache resolution, square, for a "
                                                 "cache without buckets).", "validation")
    validation_file: str | None = _f(None, "More validation pairs from a file: JSON lines or CSV with an image column "
                                           "(image or conditioning_image; paths relative to the file) and a prompt "
                                           "column (prompt or text). Added to --validation-image/--validation-prompt.",
                                     "validation", metavar="JSONL|CSV")
    validation_split: float | None = _f(None, "Hold out this fraction of the cache's images (all their views) from "
                                              "training and measure the validation loss on them. The choice hashes "
                                              "the image keys only: the same images for every run on the cache, "
                                              "whatever the seed or the number of processes.", "validation",
                                        metavar="FRACTION")
    validation_cache: str | None = _f(None, "Measure the validation loss on every image of this other cache (folder, "
                                            "s3:// or https://), precomputed with the same model and settings as "
                                            "--cache.", "validation", metavar="DIR|URL")
    validation_loss_steps: int = _f(100, "Measure the validation loss (--validation-split or --validation-cache) "
                                         "every N optimizer steps, at the start of a new run and at the end.",
                                    "validation")
    validation_loss_timesteps: int = _f(8, "Timesteps of the validation loss: every sample at K fixed quantiles of the "
                                           "training timestep distribution, with fixed noise.", "validation")

    # --- logging --------------------------------------------------------------------------------
    report_to: str = _f("none", "Tracker: none | tensorboard | wandb | all (those of the two installed). Loss and lr "
                                "always go to OUT/logs/metrics.jsonl "
                                "and the loss curve.", "logging", choices=REPORT_TO)
    tracker_project_name: str = _f("t2i-adapter-sdxl", "Tracker project / run group name.", "logging")
    logging_dir: str = _f("logs", "Tracker folder, relative to OUT unless absolute.", "logging")
    log_every: int = _f(10, "Fetch losses from the device every N steps (each step is still logged; fewer host syncs).",
                        "logging")
    log_samples: bool = _f(False, "Write each step's sample keys to OUT/logs/samples-rank<R>.jsonl (audits the exact "
                                  "sample order, e.g. across a resume).", "logging")

    # --- distributed ------------------------------------------------------------------------
    ddp_timeout_minutes: int = _f(60, "How long a process waits in a collective for the others. Start-up (the main "
                                      "process fingerprints the encoders, several GB for SDXL) and validation (it "
                                      "renders alone) keep the others waiting longer than torch's default 10 min "
                                      "may allow.", "distributed")

    # --- hub ------------------------------------------------------------------------------------
    push_to_hub: bool = _f(False, "Upload OUT's adapter, model card, config, loss curve and validation grids (not "
                                  "checkpoints/ nor logs/) to the hub at the end. The repository is created (private "
                                  "unless --hub-public) at start, so a bad login fails before training.", "hub")
    hub_model_id: str | None = _f(None, "Hub repository for --push-to-hub (default: OUT's folder name).", "hub")
    hub_token: str | None = _f(None, "Hub token for --push-to-hub (default: HF_TOKEN or the saved `hf auth login`). "
                                     "Never written to OUT or logs.", "hub")
    hub_public: bool = _f(False, "Create the --push-to-hub repository public instead of private.", "hub")

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        """Normalise the forms code and config files give (no checks here: `validate` lists every
        problem at once): "LOW,HIGH" strings and lists become (low, high) floats, lists of
        repeatable options become tuples."""
        value = self.soft_threshold_range
        parts = value.replace(",", " ").split() if isinstance(value, str) else value
        if isinstance(parts, (list, tuple)) and len(parts) == 2:
            try:  # two numbers become a float pair, in range or not: validate() checks the range
                value = (float(parts[0]), float(parts[1]))
            except (TypeError, ValueError):
                pass  # kept as given: validate() names the problem
        object.__setattr__(self, "soft_threshold_range", value)
        for f in dataclasses.fields(self):
            if f.metadata.get("multiple") and isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        if isinstance(self.resume, str) and self.resume not in ("latest", "none") and not Path(self.resume).is_dir():
            from train.checkpoint import named_checkpoint

            # A checkpoint by its name in OUT/checkpoints (step-000200, or checkpoint-200 as the
            # reference names it): resolved to its folder, so the run records which one.
            named = named_checkpoint(self.output_dir, self.resume) if self.output_dir else None
            if named is not None and named.is_dir():
                object.__setattr__(self, "resume", str(named))

    @property
    def trackers(self) -> list[str]:
        """The trackers --report-to names (`all`: those of TRACKERS that are installed)."""
        if self.report_to == "all":
            return [t for t in TRACKERS if importlib.util.find_spec(t) is not None]
        return [self.report_to] if self.report_to in TRACKERS else []

    @property
    def validation_enabled(self) -> bool:
        return bool(self.validation_image or self.validation_prompt or self.validation_file)

    @property
    def ema_enabled(self) -> bool:
        return bool(self.ema_decay)

    def validation_pairs(self) -> list[tuple[str, str]]:
        """(image, prompt) pairs: 1 image with N prompts, N images with 1 prompt, or N with N; then
        the pairs of --validation-file."""
        images, prompts = list(self.validation_image), list(self.validation_prompt)
        if len(images) == 1 and len(prompts) > 1:
            images = images * len(prompts)
        elif len(prompts) == 1 and len(images) > 1:
            prompts = prompts * len(images)
        pairs = list(zip(images, prompts))
        if self.validation_file:
            pairs += read_validation_file(self.validation_file)[0]
        return pairs

    @property
    def logging_path(self) -> Path:
        return Path(self.output_dir) / self.logging_dir

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON of every setting, as OUT and checkpoints record it: secrets are left out
        (--hub-token is None, URLs lose their query values and passwords: `shards.secrets`), and
        local paths are absolute, so the saved config given back as --config repeats the run from
        any working directory (a relative `runs/tiny` read elsewhere would name another folder,
        or pass for a hub id)."""
        from shards.secrets import redact

        d = dataclasses.asdict(self)
        d["hub_token"] = None
        for name in LOCAL_PATHS:
            if d[name]:
                d[name] = _absolute(d[name])
        d["validation_image"] = tuple(_absolute(p) for p in d["validation_image"])
        for name in MAYBE_LOCAL_PATHS:
            if d[name] and "://" not in d[name] and os.path.exists(os.path.expanduser(d[name])):
                d[name] = _absolute(d[name])
            d[name] = redact(d[name])
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError([f"unknown config key {k!r}" for k in unknown])
        kwargs = {k: tuple(v) if names[k].metadata.get("multiple") else v for k, v in d.items()}
        return cls(**kwargs)

    def validate(self, *, cuda_available: bool | None = None, environ: dict | None = None) -> list[str]:
        """Raise ConfigError listing every problem; return the notes `resolve` would log (the
        adjustments it makes, e.g. the checkpoint limit's floor). Changes nothing."""
        return list(resolve(self, cuda_available=cuda_available, environ=environ).notes)

    def _problems(self, precision: str, precision_source: str, cuda_available: bool) -> list[str]:
        """Every problem with these settings that can be seen without the cache or the model."""
        problems: list[str] = []

        for name in ("model", "cache", "output_dir"):
            if not getattr(self, name):
                problems.append(f"--{name.replace('_', '-')} is required")
        from shards.hub import locate

        for flag, value in (("--model", self.model), ("--adapter", self.adapter), ("--vae", self.vae)):
            problem = locate(value).problem(flag) if value else None
            if problem:
                problems.append(problem)
        if self.cache and "://" not in self.cache and Path(self.cache).exists() and not Path(self.cache).is_dir():
            problems.append(f"cache {self.cache!r} exists and is not a folder")
        elif self.cache and "://" not in self.cache and not Path(self.cache).is_dir():
            problems.append(f"cache folder {self.cache!r} does not exist (run `python -m precompute` first)")
        for flag, url in (("--cache", self.cache), ("--validation-cache", self.validation_cache)):
            if url and "://" in url:
                from shards.stores import open_store

                try:
                    open_store(url)  # parses the URL and the store's settings; no request is made
                except ValueError as e:
                    problems.append(f"{flag}: {e}")
        if self.output_dir and Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            problems.append(f"output dir {self.output_dir!r} exists and is not a folder")
        elif self.output_dir:
            problem = writable_problem(nearest_existing(self.output_dir)) or _foreign_folder_problem(
                Path(self.output_dir)) or _inside_cache_problem(self.output_dir, self.cache)
            if problem:
                problems.append(f"--output-dir {self.output_dir}: {problem}")
        if self.local_cache and Path(self.local_cache).exists() and not Path(self.local_cache).is_dir():
            problems.append(f"--local-cache {self.local_cache!r} exists and is not a folder")
        if self.local_cache_max is not None:
            from shards.units import parse_size

            if not self.local_cache:
                problems.append("--local-cache-max needs --local-cache")
            try:
                parse_size(self.local_cache_max)
            except ValueError as e:
                problems.append(f"--local-cache-max: {e}")

        for f in dataclasses.fields(self):  # inf and nan pass comparisons that read as checks
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")

        def positive(name: str, minimum: float = 1) -> None:
            value = getattr(self, name)
            if value is not None and value < minimum:
                problems.append(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")

        for name in ("batch_size", "num_epochs", "max_steps", "gradient_accumulation_steps", "lr_num_cycles",
                     "max_samples", "checkpointing_steps", "num_validation_images", "validation_steps",
                     "validation_inference_steps", "log_every", "ddp_timeout_minutes"):
            positive(name)
        for name in ("num_workers", "lr_warmup_steps", "shuffle_buffer", "seed", "adam_weight_decay"):
            positive(name, 0)
        for name in ("learning_rate", "lr_power", "adam_epsilon", "max_grad_norm"):
            if not getattr(self, name) > 0:
                problems.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            problems.append(f"--caption-dropout must be in [0, 1], got {self.caption_dropout}")
        if self.soft_threshold_range is not None:
            problems += [f"--soft-threshold-range: {p}" for p in range_problems(self.soft_threshold_range)]

        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(f"--lr-scheduler {self.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
        if self.lr_scheduler == "piecewise_constant" and not self.lr_step_rules:
            problems.append("--lr-scheduler piecewise_constant needs --lr-step-rules")
        elif self.lr_step_rules:
            from train.optim import step_rules_problems

            found = step_rules_problems(self.lr_step_rules)
            if found:
                problems.append(f"--lr-step-rules {self.lr_step_rules!r}: " + "; ".join(found)
                                + " (the form is MULTIPLIER:STEP,...,MULTIPLIER, e.g. '1:10,0.1:20,0.01')")
        if precision not in MIXED_PRECISION:
            problems.append(f"mixed precision {precision!r} (from {precision_source}) is not one of "
                            f"{', '.join(MIXED_PRECISION)}")
        elif precision == "fp16" and not cuda_available:
            problems.append(f"mixed precision fp16 needs a CUDA GPU (set by {precision_source}); use bf16 or no on CPU")
        if self.attention not in ATTENTION:
            problems.append(f"--attention {self.attention!r} is not one of {', '.join(ATTENTION)}")
        if self.fused_adamw and self.use_8bit_adam:
            problems.append("--fused-adamw and --use-8bit-adam are two different optimizers: pick one")
        if self.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
            problems.append("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes")
        elif self.use_8bit_adam and not cuda_available:
            problems.append("--use-8bit-adam needs a CUDA GPU (bitsandbytes' 8-bit AdamW has no CPU kernels here): "
                            "drop it on CPU")
        if self.push_to_hub and not (self.hub_token or _hub_token_available()):
            problems.append("--push-to-hub needs a hub login (the upload would fail only after training): set "
                            "HF_TOKEN or run `hf auth login`")
        if self.report_to not in REPORT_TO:
            problems.append(f"--report-to {self.report_to!r} is not one of {', '.join(REPORT_TO)}")
        elif self.report_to == "all" and not self.trackers:
            problems.append(f"--report-to all needs one of {', '.join(TRACKERS)} installed: pip install tensorboard")
        elif self.report_to in TRACKERS and importlib.util.find_spec(self.report_to) is None:
            problems.append(f"--report-to {self.report_to} needs the {self.report_to} package: "
                            f"pip install {self.report_to}")

        if self.resume not in (None, "latest", "none") and not Path(self.resume).is_dir():
            from train.checkpoint import step_folders

            there = [p.name for p in step_folders(self.output_dir)] if self.output_dir else []
            problems.append(f"--resume {self.resume!r} is neither 'latest', 'none', a checkpoint folder nor the name "
                            "of one in OUT/checkpoints (" + (f"there: {', '.join(there[-5:])}" if there else
                                                              "it holds none") + ")")

        n_img, n_prompt = len(self.validation_image), len(self.validation_prompt)
        if n_img and not n_prompt:
            problems.append("--validation-image given without --validation-prompt")
        elif n_prompt and not n_img:
            problems.append("--validation-prompt given without --validation-image")
        elif n_img > 1 and n_prompt > 1 and n_img != n_prompt:
            problems.append(f"{n_img} validation images and {n_prompt} validation prompts: give 1 image and N "
                            "prompts, N images and 1 prompt, or N of each")
        for image in self.validation_image:
            if (problem := _image_problem(image)) is not None:
                problems.append(f"validation image {image!r} {problem}")
        if self.validation_resolution is not None and not (
                8 <= self.validation_resolution <= MAX_VALIDATION_RESOLUTION and self.validation_resolution % 8 == 0):
            problems.append(f"--validation-resolution must be a multiple of 8 (of the model's coarsest stride, 32 px for "
                            f"SDXL, checked when it loads) from 8 to {MAX_VALIDATION_RESOLUTION}, got "
                            f"{self.validation_resolution}")
        if self.validation_file is not None:
            file_pairs, file_problems = read_validation_file(self.validation_file)
            problems += file_problems
            for image, _ in file_pairs:
                if problem := _image_problem(image):
                    problems.append(f"--validation-file {self.validation_file}: image {image!r} {problem}")

        if self.validation_split is not None and not 0.0 <= self.validation_split < 1.0:
            problems.append(f"--validation-split must be a fraction in [0, 1), got {self.validation_split}")
        if self.validation_split and self.validation_cache:
            problems.append("--validation-split and --validation-cache both name the validation loss's samples: "
                            "give one")
        if self.validation_cache and "://" not in self.validation_cache and not Path(self.validation_cache).is_dir():
            what = "is a file, not a cache folder" if Path(self.validation_cache).exists() else "does not exist"
            problems.append(f"validation cache folder {self.validation_cache!r} {what}")
        for name in ("validation_loss_steps", "validation_loss_timesteps"):
            positive(name)
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"--ema-decay must be in [0, 1) (0 = no EMA), got {self.ema_decay}")
        positive("ema_warmup_steps", 0)
        if self.ema_warmup_steps and not self.ema_decay:
            problems.append("--ema-warmup-steps needs --ema-decay (the EMA is off)")
        if self.save_ema and not self.ema_decay:
            problems.append("--save-ema needs --ema-decay (there is no EMA to save)")

        return problems


IMAGE_COLUMNS = ("image", "conditioning_image")
PROMPT_COLUMNS = ("prompt", "text")
MAX_VALIDATION_FILE_BYTES = 16 * 2**20


def read_validation_file(path: str | Path) -> tuple[list[tuple[str, str]], list[str]]:
    """((image, prompt) pairs, problems) of a --validation-file: JSON lines (one object per line) or
    CSV with a header, by suffix (.jsonl/.json: JSON lines, .csv: CSV). Columns `image` (or
    `conditioning_image`) and `prompt` (or `text`); relative image paths are relative to the file's
    folder. Every problem is listed, one per line or file-level fault."""
    import csv
    import io
    import json

    path = Path(path)
    flag = f"--validation-file {path}"
    try:
        if path.stat().st_size > MAX_VALIDATION_FILE_BYTES:
            return [], [f"{flag}: larger than {MAX_VALIDATION_FILE_BYTES // 2**20} MiB"]
        text = path.read_text(encoding="utf-8-sig")  # a leading BOM (Excel's "CSV UTF-8") is no part of a name
    except (OSError, UnicodeDecodeError) as e:
        return [], [f"{flag}: cannot read it ({getattr(e, 'strerror', None) or e})"]
    rows: list[tuple[int, Any]] = []
    problems: list[str] = []
    if path.suffix.lower() == ".csv":
        rows = list(enumerate(csv.DictReader(io.StringIO(text)), start=2))
    elif path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except ValueError as e:
                    problems.append(f"{flag}: line {n} is not JSON ({e})")
    else:
        return [], [f"{flag}: unknown format {path.suffix!r}; use .jsonl (JSON lines) or .csv"]
    pairs = []
    for n, row in rows:
        if not isinstance(row, dict):
            problems.append(f"{flag}: line {n} is not an object")
            continue
        image = next((row[c] for c in IMAGE_COLUMNS if isinstance(row.get(c), str) and row[c].strip()), None)
        prompt = next((row[c] for c in PROMPT_COLUMNS if isinstance(row.get(c), str) and row[c].strip()), None)
        if image is None or prompt is None:
            missing = " and ".join(what for what, v in (("an image (image or conditioning_image)", image),
                                                          ("a prompt (prompt or text)", prompt)) if v is None)
            problems.append(f"{flag}: line {n} lacks {missing}, as a non-empty string")
            continue
        image_path = Path(image.strip()).expanduser()
        pairs.append((str(image_path if image_path.is_absolute() else path.parent / image_path), prompt))
    if not pairs and not problems:
        problems.append(f"{flag}: holds no image/prompt pair")
    return pairs, problems


@dataclass(frozen=True)
class Resolved:
    """A run's settings after `resolve`: `config` with every environment-dependent default decided
    (mixed precision, checkpoint limit, fused AdamW and prefetch: on with CUDA), where the precision
    came from, and the notes to log."""

    config: TrainConfig
    precision_source: str
    notes: tuple[str, ...]


def resolve(cfg: TrainConfig, *, cuda_available: bool | None = None, environ: dict | None = None) -> Resolved:
    """The one place a TrainConfig becomes the run's settings: raise ConfigError listing every
    problem, or return the resolved config. Nothing downstream re-checks or re-resolves it."""
    if cuda_available is None:
        cuda_available = _cuda_available()
    precision, source = resolve_mixed_precision(cfg.mixed_precision, environ)
    problems = cfg._problems(precision, source, cuda_available)
    if problems:
        raise ConfigError(problems)
    notes = unused_settings(cfg)
    keep = cfg.checkpoints_total_limit
    if keep is not None and keep < MIN_CHECKPOINTS_KEPT:
        notes.append(f"--checkpoints-total-limit {keep} raised to {MIN_CHECKPOINTS_KEPT}: the newest checkpoint "
                     "may be the one a crash interrupts")
        keep = MIN_CHECKPOINTS_KEPT
    # The fast paths known to be safe on a GPU are on there by default; on a CPU they buy nothing.
    fused = cfg.fused_adamw if cfg.fused_adamw is not None else (cuda_available and not cfg.use_8bit_adam)
    prefetch = cfg.prefetch if cfg.prefetch is not None else cuda_available
    return Resolved(config=dataclasses.replace(cfg, mixed_precision=precision, checkpoints_total_limit=keep,
                                               fused_adamw=fused, prefetch=prefetch),
                    precision_source=source, notes=tuple(notes))


def _inside_cache_problem(output_dir: str, cache: str) -> str | None:
    """An output folder in a local cache folder (or the cache itself): the run's files would sit
    among the cache's, and a later precompute (resume, --rebuild-stale) refuses a cache folder
    holding files that are not its own."""
    if not cache or "://" in cache:
        return None
    out = Path(os.path.realpath(os.path.expanduser(output_dir)))
    root = Path(os.path.realpath(os.path.expanduser(cache)))
    if out == root or root in out.parents:
        return (f"is inside the cache folder {cache}: a run's files go in a folder of their own, outside the cache "
                "(a run already there: move its folder out, then resume it from there)")
    return None


def unused_settings(cfg: TrainConfig) -> list[str]:
    """One note per setting given (not its default) that this run does not use, so that nothing a
    user asked for is dropped without a word. (Settings that only make sense with another, such
    as --save-ema without --ema-decay, are refused instead, by `_problems`.)"""
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

    def given(*names: str) -> list[str]:
        flags = [(f"--{n.replace('_', '-')}", getattr(cfg, n)) for n in names if getattr(cfg, n) != default[n]]
        return [flag if isinstance(value, bool) else f"{flag} {value}" for flag, value in flags]

    notes = []
    if cfg.max_steps is not None and given("num_epochs"):
        notes.append(f"{given('num_epochs')[0]} is not used: --max-steps {cfg.max_steps} sets the run's length")
    unused_by_schedule = {  # (a warm-up of 0 steps asks for none: nothing to say)
        "lr_warmup_steps": cfg.lr_scheduler in ("constant", "piecewise_constant") and cfg.lr_warmup_steps > 0,
        "lr_num_cycles": cfg.lr_scheduler != "cosine_with_restarts",
        "lr_power": cfg.lr_scheduler != "polynomial",
        "lr_step_rules": cfg.lr_scheduler != "piecewise_constant",
    }
    for name in [n for n, unused in unused_by_schedule.items() if unused]:
        for flag in given(name):
            notes.append(f"{flag} is not used by the {cfg.lr_scheduler} learning-rate schedule")
    if not (cfg.validation_split or cfg.validation_cache):
        for flag in given("validation_loss_steps", "validation_loss_timesteps"):
            notes.append(f"{flag} is not used: no validation loss is measured without --validation-split or "
                         "--validation-cache")
    if not (cfg.validation_image or cfg.validation_file):
        for flag in given("validation_steps", "num_validation_images", "validation_inference_steps",
                          "validation_guidance_scale", "validation_resolution"):
            notes.append(f"{flag} is not used: no validation images are rendered without --validation-image and "
                         "--validation-prompt (or --validation-file)")
    if not cfg.push_to_hub:
        for flag in given("hub_model_id", "hub_public"):
            notes.append(f"{flag} is not used without --push-to-hub")
    if cfg.report_to == "none":
        for flag in given("tracker_project_name"):
            notes.append(f"{flag} is not used with --report-to none (metrics go to OUT/logs/metrics.jsonl)")
    if cfg.validation_cache and cfg.cache and _same_location(cfg.validation_cache, cfg.cache):
        notes.append(f"--validation-cache is the training cache itself ({cfg.cache}): the validation loss measures "
                     "images the adapter trains on, not held-out ones (--validation-split holds some out)")
    return notes


def _same_location(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


_DETECT = object()  # resolve_mixed_precision: look at the real parent process


def resolve_mixed_precision(requested: str | None, environ: dict | None = None,
                            parent: Any = _DETECT) -> tuple[str, str]:
    """(precision, where it came from) for --mixed-precision `requested` (None: unset).

    Unset, accelerate decides as it does for its own scripts. `accelerate launch` always exports
    ACCELERATE_MIXED_PRECISION to its processes: its --mixed_precision flag, else its config
    file's value, else "no". The variable does not say which, so the source is read from the
    launcher itself, this process's parent (`shards.launcher`): "accelerate launch
    --mixed_precision", "the accelerate config file PATH (...)" or "accelerate launch's default:
    ...". A plain `python -m train` reads accelerate's default config file itself (the one
    `accelerate config` writes; ACCELERATE_CONFIG_FILE, this project's own variable, names
    another). Neither: "no" (fp32).

    `parent`: a `shards.launcher.Parent`, or None when the launcher cannot be seen; by default the
    real parent process, unless `environ` is given (then None: nothing real to look at).
    """
    from shards import launcher

    if parent is _DETECT:
        parent = launcher.parent_process() if environ is None else None
    environ = os.environ if environ is None else environ
    if requested is not None:
        return requested, "--mixed-precision"
    launched = environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        value = launched.lower()
        if parent is not None and parent.launcher != launcher.ACCELERATE:
            return value, "the ACCELERATE_MIXED_PRECISION environment variable"
        decided = launcher.accelerate_precision(parent) if parent is not None else None
        if decided is not None and decided[0] == value:
            return decided
        # The launcher cannot be seen (or read differently, e.g. its config file changed since).
        if value == "no":
            return value, "accelerate launch (its --mixed_precision flag, its config file or its default)"
        return value, "accelerate launch (its --mixed_precision flag or config file)"
    path = _accelerate_config_file(environ)
    if path is not None:
        try:
            value = launcher.config_file_precision(path)
        except (OSError, ValueError) as e:
            return "no", f"default (the accelerate config file {path} is unreadable: {e})"
        if value:
            return value, f"the accelerate config file {path}"
    return "no", "default (no --mixed-precision and no accelerate setting)"


def _accelerate_config_file(environ: dict) -> Path | None:
    """The accelerate config file a plain `python -m train` reads, if it exists: accelerate's
    default ($HF_HOME/accelerate/default_config.yaml, HF_HOME defaulting to ~/.cache/huggingface),
    or ACCELERATE_CONFIG_FILE when set. That variable is this project's, not accelerate's: under
    `accelerate launch` give the file with its --config_file instead."""
    from shards.launcher import accelerate_default_config

    explicit = environ.get("ACCELERATE_CONFIG_FILE")
    if explicit:
        p = Path(explicit).expanduser()
        return p if p.is_file() else None
    p = accelerate_default_config(environ)
    return p if p.is_file() else None


def _cuda_available() -> bool:
    import torch

    # accelerate's switch for "run on the CPU even if a GPU is present" (docs/background.md section 3).
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return False
    return torch.cuda.is_available()


def _hub_token_available() -> bool:
    """A token from HF_TOKEN or the saved login; read locally, no network."""
    from huggingface_hub import get_token

    return get_token() is not None
