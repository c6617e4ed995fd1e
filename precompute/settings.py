"""From the command line's `PrecomputeConfig` to the run's `Settings`: once, listing every problem.

`resolve(cfg)` is the one place a precompute run's settings are decided. It reads what the
model's configs say about image sizes (`encoders.model_layout`: the VAE's scale factor and the
UNet's depth, hence the granularity every side must be a multiple of), resolves the aspect
buckets, the views and the conditioning method, chooses the device and, by the device, the
encoders' dtypes. It asks each component for the problems of its own settings
(`encoders.check_model_sources`, `preprocess.geometry_problems`, `buckets.bucket_problems`,
`ViewSpec.problems`, `ConditionSpec.problems`), adds the config's own (`PrecomputeConfig.problems`:
values and places) and raises one `ConfigError` listing them all. The runner and the components
then read `Settings` and never check or decide again; the config itself calls no component.

`Settings.identity(...)` says which settings make a cache this cache: everything that changes the
bytes of a shard (the VAE batch size and the device kind among them), and nothing that does not
(strictness, workers, which GPU index, where the cache or its temp files live).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from precompute.buckets import DEFAULT_UNET_DOWN_BLOCKS, bucket_problems, model_granularity, resolve_buckets
from precompute.conditions import DEFAULT_CANNY_HIGH, DEFAULT_CANNY_LOW, ConditionSpec, dataset_identity
from precompute.config import DEFAULT_ENCODE_DTYPES, PrecomputeConfig
from precompute.encoders import ModelLayout, check_model_sources, model_layout
from precompute.errors import ConfigError, ModelLoadError
from precompute.preprocess import MAX_CAPTION_CHARS, ViewSpec, geometry_problems
from precompute.source_base import MAX_JSON_BYTES, MAX_JSON_DEPTH
from shards import limits, schema

# SDXL's layout: used only to go on listing the other problems when the model cannot say (a run
# with a model problem is refused anyway).
_SDXL_LAYOUT = ModelLayout(vae_scale_factor=8, unet_down_blocks=DEFAULT_UNET_DOWN_BLOCKS)


@dataclass(frozen=True)
class Settings:
    """A precompute run's settings, decided by `resolve` and read by everything after it."""

    config: PrecomputeConfig  # as asked, with the encoders' dtypes decided: what the manifest records
    device: str  # "cpu", "cuda" or "cuda:N"
    layout: ModelLayout  # from the model's configs
    granularity: int  # px every image side must be a multiple of (32 for SDXL)
    buckets: tuple[tuple[int, int], ...] | None  # (h, w) sizes, tallest first; None: square crops
    views: ViewSpec
    condition: ConditionSpec | None  # None: the dataset supplies the conditioning images

    @property
    def device_kind(self) -> str:
        """cpu or cuda: what the identity records (the GPU index changes nothing)."""
        return self.device.split(":", 1)[0]

    @property
    def vae_scale_factor(self) -> int:
        return self.layout.vae_scale_factor

    def identity(self, *, encoder: dict, latent: dict, text: dict, source: dict) -> dict:
        """The identity's JSON object (`shards.identity.CacheIdentity.from_dict` types and checks
        it). `encoder` comes from `encoders.load_encoders`, `latent` and `text` from the loaded
        encoders (dims and factors), `source` from `Source.describe()`."""
        c = self.config
        compute = {"batch_size": c.batch_size, "device": self.device_kind}
        if c.compile_vae:  # only when on: caches made before the option keep their identity
            compute["compile_vae"] = True
        return {
            "format_version": schema.FORMAT_VERSION,
            "encoder": dict(encoder),
            "latent": {**latent, "store": c.latent_store},
            "text": dict(text),
            "geometry": {
                "resolution": c.resolution,
                "crop": c.crop,
                "buckets": [list(b) for b in self.buckets] if self.buckets else None,
                "min_size": c.min_size,
                "max_aspect": c.max_aspect,
            },
            "views": {"crops": c.crops, "flip": c.flip},
            "condition": dataset_identity(c.condition_soft) if self.condition is None else self.condition.identity(),
            "dtypes": {"storage": c.storage_dtype, "vae": c.vae_dtype, "text": c.text_dtype},
            # Batched VAE calls round differently from single ones (bf16 storage keeps the
            # difference), and so do CPU and GPU kernels: a resume must not mix them in one cache.
            "compute": compute,
            "source": dict(source),
            "captions": {"allow_empty": c.allow_empty_captions,
                         **_changed(max_chars=(c.max_caption_chars, MAX_CAPTION_CHARS))},
            # Which inputs are read at all (and so which items are skipped).
            "input_limits": {"max_input_bytes": c.max_input_bytes, "max_image_pixels": c.max_image_pixels,
                             "follow_symlinks": c.follow_symlinks,
                             **_changed(max_json_bytes=(c.max_json_bytes, MAX_JSON_BYTES),
                                        max_json_depth=(c.max_json_depth, MAX_JSON_DEPTH))},
            "max_samples": c.max_samples,
            "samples_per_shard": c.samples_per_shard,
            # How records fingerprint the inputs (records are compared across runs) and whether
            # repeated items are dropped (which items a shard holds).
            "inputs": {"fingerprint": c.source_fingerprint, "dedupe": c.dedupe},
            # The seed only draws random crops: with centre crops (and one crop per image) it
            # changes nothing, and a resume with another --seed must not be refused for it.
            "seed": c.seed if c.crop == "random" or c.crops > 1 else None,
        }


def _changed(**settings: tuple) -> dict:
    """{name: value} of the settings (value, default) whose value is not the default. These caps
    were constants before they were settings: recording them only when changed keeps the identity
    of every cache made with the defaults, so such caches still resume."""
    return {name: value for name, (value, default) in settings.items() if value != default}


def resolve(cfg: PrecomputeConfig, *, cuda_available: bool | None = None) -> Settings:
    """The run's settings, or one ConfigError listing every problem (see the module docstring).
    `cuda_available` (default: ask torch) decides `--device auto` and the encoders' dtypes."""
    problems = cfg.problems()

    # The model: its folder layout, then what its configs say about sizes.
    layout = _SDXL_LAYOUT
    if cfg.model:
        model_problems = check_model_sources(cfg.model, cfg.vae, cfg.variant)
        problems += model_problems
        try:
            layout = model_layout(cfg.model, cfg.vae, revision=cfg.revision, cache_dir=cfg.cache_dir)
            problems += list(layout.problems)
        except ModelLoadError as e:
            if not model_problems:  # else they already say what is missing
                problems.append(str(e))
    granularity = model_granularity(layout.vae_scale_factor, layout.unet_down_blocks)

    # Geometry: the square size or the buckets, against the model's granularity.
    square = cfg.buckets is None and isinstance(cfg.resolution, int) and cfg.resolution >= 1
    off_grid = []
    if square and cfg.resolution % granularity:
        off_grid = [f"--resolution {cfg.resolution} is not a multiple of {granularity} px, the model's granularity "
                    f"(VAE factor {layout.vae_scale_factor} x 2^(UNet down blocks - 1)): a T2I-Adapter's features "
                    f"would not meet the UNet's; try {max(1, round(cfg.resolution / granularity)) * granularity}"]
    geometry = geometry_problems(resolution=cfg.resolution, crop=cfg.crop, vae_scale_factor=layout.vae_scale_factor,
                                 min_size=cfg.min_size, max_aspect=cfg.max_aspect)
    # The granularity check is the stricter one, and its suggestion passes both: say only it.
    problems += [q for q in geometry if not (off_grid and q.startswith("resolution "))] + off_grid
    buckets = None
    if isinstance(cfg.resolution, int) and cfg.resolution >= 1:  # a non-positive one: said by geometry_problems
        bucket = bucket_problems(cfg.buckets, cfg.resolution, cfg.bucket_step, granularity)
        problems += bucket
        if not bucket and cfg.buckets is not None:
            buckets = tuple(resolve_buckets(cfg.buckets, cfg.resolution, step=cfg.bucket_step,
                                            granularity=granularity))
        # Readers refuse a cache declaring larger images (shards.limits): refuse to write one.
        try:
            cap, too_big = limits.oversized_images(buckets or [(cfg.resolution, cfg.resolution)])
        except limits.LimitError as e:
            problems.append(str(e))
        else:
            if too_big:
                problems.append(f"image sizes {too_big} (h, w) are over {cap} pixels, what readers accept "
                                "(SHARDS_MAX_IMAGE_PIXELS): lower --resolution, or raise SHARDS_MAX_IMAGE_PIXELS "
                                "here and wherever the cache is read")

    # Views and the conditioning method.
    views = ViewSpec(crops=cfg.crops, flip=cfg.flip)
    problems += views.problems()
    condition = None
    if cfg.condition is not None:
        condition = ConditionSpec(
            method=cfg.condition,
            canny_low=DEFAULT_CANNY_LOW if cfg.canny_low is None else cfg.canny_low,
            canny_high=DEFAULT_CANNY_HIGH if cfg.canny_high is None else cfg.canny_high,
            soft=cfg.condition_soft,
        )
        problems += condition.problems()
    if cfg.condition != "canny":
        problems += [f"{flag} only applies to --condition canny"
                     for flag, value in (("--canny-low", cfg.canny_low), ("--canny-high", cfg.canny_high))
                     if value is not None]

    if problems:
        raise ConfigError(problems)

    # The device, and by its kind the encoders' dtypes left unset.
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    device = ("cuda" if cuda_available else "cpu") if cfg.device == "auto" else cfg.device
    defaults = DEFAULT_ENCODE_DTYPES[device.split(":", 1)[0]]
    config = dataclasses.replace(cfg, vae_dtype=cfg.vae_dtype or defaults["vae"],
                                 text_dtype=cfg.text_dtype or defaults["text"])
    return Settings(config=config, device=device, layout=layout, granularity=granularity, buckets=buckets,
                    views=views, condition=condition)


__all__ = ["Settings", "resolve"]
