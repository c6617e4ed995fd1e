"""The precompute configuration: one typed object, validated once, listing every problem.

`PrecomputeConfig` is what the CLI builds and `runner.run` consumes. `validate()` checks the
settings and everything that can be checked before loading a model (dataset path, model folder
layout, cache writability, geometry, buckets against the model's granularity, views, condition
method) and raises one `ConfigError` listing every problem, so a user fixes them all in one go. `identity()` says which settings change the bytes of the cache
(and so must match when a run resumes into an existing cache): the resolved bucket sizes, the
views, and the condition method with its parameters among them; `resolved()` is the full config
recorded in the manifest.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from precompute.sources import KINDS as DATA_KINDS
from shards import schema

DEVICES = ("auto", "cpu", "cuda")
ENCODE_DTYPES = ("fp32", "bf16", "fp16")
# Settings that never change what a cache holds (see `resolved`).
RUN_ONLY = ("cache", "tmp_dir", "device", "batch_size", "num_workers", "strict")
MISSING_MODEL_HINT = (
    "--model is required: a hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0) or a local "
    "diffusers SDXL folder; `make precompute` with no MODEL builds and uses the tiny offline model"
)


class PrecomputeError(RuntimeError):
    """An error the user can act on; the CLI prints its message without a traceback."""


class ConfigError(PrecomputeError):
    """Invalid settings. `problems` holds every problem found; the message lists them all."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid precompute settings:\n  - " + "\n  - ".join(self.problems))


def _is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


@dataclass
class PrecomputeConfig:
    """Every setting of one precompute run. Defaults match the reference training script."""

    # -- what to encode with ------------------------------------------------------------------
    model: str | None = None  # hub id or local diffusers SDXL folder
    vae: str | None = None  # VAE override: hub id or folder (e.g. madebyollin/sdxl-vae-fp16-fix)
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16": load model.fp16.safetensors files
    # -- what to encode -------------------------------------------------------------------------
    data: str | None = None  # dataset folder, or WebDataset tar shards
    data_kind: str = "auto"  # auto | folder | fill50k | webdataset
    # Columns (folder) or member suffixes / json keys (webdataset; comma-separated, tried in
    # order). None: the format's defaults (folder: image|file_name, conditioning_image, text).
    image_column: str | None = None
    conditioning_image_column: str | None = None
    caption_column: str | None = None
    max_samples: int | None = None  # first N source items (in source order); None = all
    allow_empty_captions: bool = False  # keep items without a caption, captioned ""
    # -- where ------------------------------------------------------------------------------------
    cache: str | None = None  # output folder
    tmp_dir: str | None = None  # where shards are staged before publishing (default: beside them)
    # -- geometry ---------------------------------------------------------------------------------
    resolution: int = 1024
    crop: str = "center"  # center | random (seeded per item)
    seed: int = 0
    min_size: int | None = None  # skip images whose short side is below this (None: resolution // 4)
    max_aspect: float | None = 4.0  # skip images more elongated than their target (None: no limit)
    # Aspect-ratio buckets: none (square crops), sdxl, sdxl-full, or "HxW,HxW,..." (precompute.buckets).
    buckets: str | None = None
    bucket_step: int | None = None  # side granularity of scaled presets (None: 64 * resolution / 1024, model-valid)
    # -- views: extra stored versions of each image ------------------------------------------------
    crops: int = 1  # crops per image: the planned one plus crops - 1 other random positions
    flip: bool = False  # also store each crop mirrored left-right
    # -- conditioning images computed from the image (precompute.conditions) ----------------------
    condition: str | None = None  # canny | gray | sketch; None: the dataset's conditioning images
    canny_low: int | None = None  # None: 100 (with --condition canny)
    canny_high: int | None = None  # None: 200
    condition_soft: bool = False  # the stored condition is a soft map: train thresholds it per draw
    # -- what is stored ---------------------------------------------------------------------------
    samples_per_shard: int = 256
    latent_store: str = "mean_std"  # mean_std | mean
    storage_dtype: str = "bf16"
    vae_dtype: str = "fp32"  # SDXL's VAE overflows in fp16; see --vae
    text_dtype: str = "fp32"
    # -- how it runs (never changes the bytes written) --------------------------------------------
    device: str = "auto"  # auto | cpu | cuda (each process uses its local GPU)
    batch_size: int = 8  # images per VAE call
    num_workers: int = 4  # threads decoding and preprocessing images ahead of the encoders
    strict: bool = False  # any skipped item is an error

    # ------------------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every problem with these settings (empty when they are valid)."""
        from precompute.encoders import check_model_sources
        from precompute.preprocess import geometry_problems

        p: list[str] = []
        if not self.model:
            p.append(MISSING_MODEL_HINT)
        else:
            p += check_model_sources(self.model, self.vae, self.variant)
        p += self.source_problems()
        p += self._cache_problems()
        if self.tmp_dir is not None:
            t = Path(self.tmp_dir).expanduser()
            if not t.is_dir():
                p.append(f"--tmp-dir {self.tmp_dir}: no such folder")
            elif not os.access(t, os.W_OK | os.X_OK):
                p.append(f"--tmp-dir {self.tmp_dir}: not writable")
        p += geometry_problems(
            resolution=self.resolution,
            crop=self.crop,
            vae_scale_factor=self.vae_scale_factor_hint(),
            min_size=self.min_size,
            max_aspect=self.max_aspect,
        )
        p += self._bucket_problems()
        p += self.view_spec().problems()
        p += self._condition_problems()
        if not isinstance(self.seed, int) or self.seed < 0:
            p.append(f"--seed must be an integer >= 0, got {self.seed!r}")
        for name, value, low in (
            ("batch_size", self.batch_size, 1),
            ("num_workers", self.num_workers, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                p.append(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.latent_store not in schema.LATENT_STORES:
            p.append(f"--latent-store must be one of {list(schema.LATENT_STORES)}, got {self.latent_store!r}")
        if self.storage_dtype not in schema.DTYPES:
            p.append(f"--storage-dtype must be one of {list(schema.DTYPES)}, got {self.storage_dtype!r}")
        for flag, value in (("--vae-dtype", self.vae_dtype), ("--text-dtype", self.text_dtype)):
            if value not in ENCODE_DTYPES:
                p.append(f"{flag} must be one of {list(ENCODE_DTYPES)}, got {value!r}")
        p += self._device_problems()
        return p

    def source_problems(self) -> list[str]:
        """Problems with the settings that `sources.open_source` needs (checked before opening it)."""
        p: list[str] = []
        if not self.data:
            p.append("--data is required: a dataset folder (metadata file + images) or WebDataset tar shards")
        elif not _is_url(self.data) and "{" not in self.data and not Path(self.data).expanduser().exists():
            p.append(f"--data {self.data}: no such file or folder")
        if self.data_kind not in DATA_KINDS:
            p.append(f"--data-kind must be one of {list(DATA_KINDS)}, got {self.data_kind!r}")
        columns = {
            "--image-column": self.image_column,
            "--conditioning-image-column": self.conditioning_image_column,
            "--caption-column": self.caption_column,
        }
        named = [(flag, c) for flag, c in columns.items() if c is not None]
        for i, (flag, c) in enumerate(named):
            if not c:
                p.append(f"{flag} must not be empty")
            for other, d in named[i + 1 :]:
                if c and c == d:
                    p.append(f"{flag} and {other} are both {c!r}; each column must be different")
        if not isinstance(self.samples_per_shard, int) or isinstance(self.samples_per_shard, bool) or self.samples_per_shard < 1:
            p.append(f"--samples-per-shard must be an integer >= 1, got {self.samples_per_shard!r}")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            p.append(f"--max-samples must be an integer >= 1, got {self.max_samples!r}")
        if self.condition is not None and self.conditioning_image_column is not None:
            p.append(f"--conditioning-image-column has no effect with --condition {self.condition}: the "
                     "conditioning image is computed from the image; drop one of them")
        return p

    # -- buckets, views, conditions -------------------------------------------------------------
    def _bucket_problems(self) -> list[str]:
        from precompute.buckets import bucket_problems

        if not isinstance(self.resolution, int) or self.resolution < 1:
            return []  # reported by geometry_problems
        return bucket_problems(self.buckets, self.resolution, self.bucket_step, self.granularity_hint())

    def resolved_buckets(self, vae_scale_factor: int | None = None) -> list[tuple[int, int]] | None:
        """The bucket sizes (h, w) of this run, or None for square crops. `vae_scale_factor` is the
        loaded VAE's (the config hint otherwise)."""
        from precompute.buckets import resolve_buckets

        return resolve_buckets(self.buckets, self.resolution, step=self.bucket_step,
                               granularity=self.granularity_hint(vae_scale_factor))

    def view_spec(self):
        from precompute.preprocess import ViewSpec

        return ViewSpec(crops=self.crops, flip=self.flip)

    def condition_spec(self):
        """The ConditionSpec of --condition, or None when the dataset supplies conditioning images."""
        from precompute.conditions import DEFAULT_CANNY_HIGH, DEFAULT_CANNY_LOW, ConditionSpec

        if self.condition is None:
            return None
        return ConditionSpec(
            method=self.condition,
            canny_low=DEFAULT_CANNY_LOW if self.canny_low is None else self.canny_low,
            canny_high=DEFAULT_CANNY_HIGH if self.canny_high is None else self.canny_high,
            soft=self.condition_soft,
        )

    def _condition_problems(self) -> list[str]:
        spec = self.condition_spec()
        p = spec.problems() if spec is not None else []
        if self.condition != "canny":
            for flag, value in (("--canny-low", self.canny_low), ("--canny-high", self.canny_high)):
                if value is not None:
                    p.append(f"{flag} only applies to --condition canny")
        return p

    def condition_identity(self) -> dict:
        from precompute.conditions import dataset_identity

        spec = self.condition_spec()
        return dataset_identity(self.condition_soft) if spec is None else spec.identity()

    def granularity_hint(self, vae_scale_factor: int | None = None) -> int:
        """Pixels every bucket side must be a multiple of: vae_scale_factor * 2^(UNet down blocks
        - 1), from the model's local UNet config (SDXL's 3 down blocks when there is none)."""
        import json

        from precompute.buckets import model_granularity

        blocks = None
        if self.model:
            try:
                unet = json.loads((Path(self.model).expanduser() / "unet" / "config.json").read_text())
                blocks = len(unet["down_block_types"])
            except (OSError, ValueError, KeyError, TypeError):
                blocks = None
        factor = self.vae_scale_factor_hint() if vae_scale_factor is None else vae_scale_factor
        return model_granularity(factor, blocks)

    def validate(self) -> "PrecomputeConfig":
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    def _cache_problems(self) -> list[str]:
        if not self.cache:
            return ["--cache is required: the output folder of the cache (e.g. cache/mine)"]
        if _is_url(self.cache) and not self.cache.startswith("file://"):
            return []  # the store validates remote URLs when it opens them
        path = Path(self.cache.removeprefix("file://")).expanduser()
        if path.exists() and not path.is_dir():
            return [f"--cache {self.cache}: exists and is not a folder"]
        base = _nearest_existing(path)
        if not base.is_dir():
            return [f"--cache {self.cache}: {base} is not a folder"]
        if not os.access(base, os.W_OK | os.X_OK):
            return [f"--cache {self.cache}: {base} is not writable"]
        return []

    def _device_problems(self) -> list[str]:
        kind = self.device.split(":", 1)[0]
        if kind not in DEVICES or (":" in self.device and kind != "cuda"):
            return [f"--device must be one of {list(DEVICES)} (or cuda:N), got {self.device!r}"]
        if kind == "cuda":
            import torch

            if not torch.cuda.is_available():
                return ["--device cuda: no CUDA GPU is visible to torch (use --device cpu or auto)"]
        return []

    def vae_scale_factor_hint(self) -> int:
        """The VAE's pixels per latent cell, read from a local VAE config when there is one
        (8 otherwise; the runner re-checks against the loaded VAE)."""
        import json

        candidates = []
        if self.vae:
            candidates += [Path(self.vae) / "config.json", Path(self.vae) / "vae" / "config.json"]
        elif self.model:
            candidates.append(Path(self.model) / "vae" / "config.json")
        for c in candidates:
            try:
                blocks = json.loads(c.expanduser().read_text())["block_out_channels"]
                return 2 ** (len(blocks) - 1)
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return 8

    # ------------------------------------------------------------------------------------------
    def resolved_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def identity(self, *, encoder: dict, latent: dict, text: dict, source: dict,
                 buckets: list[tuple[int, int]] | None = None) -> dict:
        """What makes a cache built with these settings this cache: everything that changes the
        bytes of a shard, and nothing that does not (strictness, batch size, workers, device,
        where the cache or its temp files live).

        `encoder` comes from `encoders.load_encoders`, `latent` and `text` from the loaded
        encoders (dims and factors), `source` from `Source.describe()`, `buckets` from
        `resolved_buckets` with the loaded VAE's factor.
        """
        return {
            "format_version": schema.FORMAT_VERSION,
            "encoder": dict(encoder),
            "latent": {**latent, "store": self.latent_store},
            "text": dict(text),
            "geometry": {
                "resolution": self.resolution,
                "crop": self.crop,
                "buckets": [list(b) for b in buckets] if buckets else None,
                "min_size": self.min_size,
                "max_aspect": self.max_aspect,
            },
            "views": {"crops": self.crops, "flip": self.flip},
            "condition": self.condition_identity(),
            "dtypes": {"storage": self.storage_dtype, "vae": self.vae_dtype, "text": self.text_dtype},
            "source": dict(source),
            "captions": {"allow_empty": self.allow_empty_captions},
            "max_samples": self.max_samples,
            "samples_per_shard": self.samples_per_shard,
            # The seed only draws random crops: with centre crops (and one crop per image) it
            # changes nothing, and a resume with another --seed must not be refused for it.
            "seed": self.seed if self.crop == "random" or self.crops > 1 else None,
        }

    def resolved(self) -> dict:
        """The config as recorded in the manifest: every setting that decides what the cache
        holds. Where it lives and how this particular run went (device, batch size, workers,
        strictness, temp folder) are left out, so the manifest describes the cache, not the last
        command that touched it, and is byte-identical however the cache was produced."""
        d = asdict(self)
        for key in RUN_ONLY:
            d.pop(key)
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
