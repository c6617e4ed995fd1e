"""Does this cache fit this model? Answered from configs and fingerprints, before UNet weights load.

Two kinds of facts, checked in this order and reported together:

1. Shapes (always refused when wrong): the manifest's latent channels, prompt width and pooled
   width against the UNet config (`in_channels`, `cross_attention_dim`,
   `projection_class_embeddings_input_dim` = pooled + 6 * `addition_time_embed_dim`); the cache's
   image sizes against the adapter's strides; the VAE config (when there is one) against the
   cache's latent channels, scaling factor and downsampling; an `--adapter` to continue against the
   UNet. Only `config.json` files are read (`load_config`), no weights.
2. Encoder identity (refused unless `--accept-encoder-mismatch`): the fingerprints the cache
   recorded for its VAE, text encoders and tokenizers against those of the ones train would
   use (MODEL's, or `--vae`). They are computed as precompute computes them
   (`shards.fingerprint.module_fingerprint` over the module loaded in fp32,
   `shards.fingerprint.tokenizer_fingerprint` over the tokenizer), which means loading each
   encoder once on the CPU; the tokenizers are loaded with the text encoders (another pad token
   changes every prompt embedding as surely as other weights do). A cache from before tokenizer
   fingerprints were recorded is not refused for lacking them (the log says so). Fingerprinting
   loaded modules is the correct choice over hashing weight files: a model
   copied to another folder, re-saved in another file layout or shard size, or given as a hub id
   instead of a path still matches, and only different weights or architecture do not. It costs
   one load (seconds for SDXL; the text encoders are then reused to embed the validation prompts,
   so they are not loaded twice) and is done on the main process only.

A model without a VAE or text encoders (a UNet-only folder) cannot be compared; that is said
in the log, not refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from shards.fingerprint import module_fingerprint, tokenizer_fingerprint
from shards.hub import locate
from shards.hub import vae_location as shared_vae_location
from shards.identity import Encoder
from shards.manifest import Manifest
from train.errors import TrainError

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
FINGERPRINTED = ("vae", "text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")


class StartupError(TrainError, ValueError):
    """The run cannot start (settings, OUT, the model's components); the message lists every problem."""


class CacheMismatchError(StartupError):
    """The run cannot start because the cache does not fit the model (or the data plan or settings
    do not fit the cache). The message lists every problem, the cache's and any other."""


def model_root(model: str) -> str:
    """A local folder's path, or the hub id as given (`shards.hub.locate`)."""
    return locate(model).ref


def load_component_config(model: str, subfolder: str | None, revision: str | None = None, *,
                          cache_dir: str | None = None) -> dict | None:
    """`MODEL/subfolder/config.json` as a dict, or None when the model has no such component."""
    from diffusers import ConfigMixin

    root = model_root(model)
    local = Path(root)
    if local.is_dir():
        path = local / subfolder / "config.json" if subfolder else local / "config.json"
        if not path.is_file():
            return None

    class _AnyConfig(ConfigMixin):  # load_config only reads JSON; any ConfigMixin will do
        config_name = "config.json"

    try:
        return dict(_AnyConfig.load_config(root, subfolder=subfolder, revision=revision, cache_dir=cache_dir))
    except (OSError, ValueError) as e:
        if local.is_dir():
            raise CacheMismatchError(f"cannot read {path}: {e}") from e
        return None  # a hub model without this component (or not in the local hub cache)


def read_scheduler_config(model: str, revision: str | None = None, *, cache_dir: str | None = None) -> dict:
    """MODEL/scheduler/scheduler_config.json (the training noise schedule and the validation sampler)."""
    from diffusers import EulerDiscreteScheduler

    try:
        return dict(EulerDiscreteScheduler.load_config(model_root(model), subfolder="scheduler", revision=revision,
                                                       cache_dir=cache_dir))
    except (OSError, ValueError) as e:
        raise CacheMismatchError(f"{model}: cannot read scheduler/scheduler_config.json: {e}") from e


def read_unet_config(model: str, revision: str | None = None, *, cache_dir: str | None = None) -> dict:
    config = load_component_config(model, "unet", revision, cache_dir=cache_dir)
    if config is None:
        raise CacheMismatchError(f"{model}: no unet/config.json (MODEL must be a diffusers SDXL folder or hub id)")
    return config


def vae_location(cfg_vae: str | None, manifest: Manifest, model: str, revision: str | None = None, *,
                 cache_dir: str | None = None) -> tuple[str, str | None] | None:
    """(repo or folder, subfolder) of the VAE for validation decoding and the fingerprint check.

    --vae wins; else the VAE the cache was encoded with when precompute was given one; else
    MODEL's own `vae/` (None when MODEL has none).
    """
    override = cfg_vae or manifest.identity.encoder.vae
    if override:
        return shared_vae_location(override)
    if load_component_config(model, "vae", revision, cache_dir=cache_dir) is None:
        return None
    return model_root(model), "vae"


# ---------------------------------------------------------------------------------------------
# Shapes


def _first(value: Any) -> Any:
    """cross_attention_dim may be per block; every block must agree for one prompt width."""
    if isinstance(value, (list, tuple)):
        return value[0] if len(set(value)) == 1 else tuple(value)
    return value


def shape_problems(
    manifest: Manifest,
    unet_config: dict,
    vae_config: dict | None,
    *,
    adapter_config: dict | None = None,
) -> list[str]:
    """Every way the cache's tensors (and an adapter to continue) do not fit the UNet/VAE."""
    from train.step import adapter_kwargs_for, check_adapter_fits, unet_residual_shapes

    problems = []
    latent, text = manifest.latent, manifest.text
    if latent.channels != unet_config.get("in_channels"):
        problems.append(f"latent channels: cache {latent.channels} != UNet in_channels {unet_config.get('in_channels')}")
    cross = _first(unet_config.get("cross_attention_dim"))
    if text.prompt_dim != cross:
        problems.append(f"prompt width: cache prompt_embeds {text.prompt_dim} != UNet cross_attention_dim {cross}")
    if unet_config.get("addition_embed_type") != "text_time":
        problems.append(f"UNet addition_embed_type is {unet_config.get('addition_embed_type')!r}, not 'text_time': "
                        "it takes no pooled prompt or size conditioning (not an SDXL UNet)")
    else:
        time_dim = unet_config.get("addition_time_embed_dim") or 0
        expected = unet_config.get("projection_class_embeddings_input_dim")
        if text.pooled_dim + 6 * time_dim != expected:
            problems.append(
                f"pooled width: cache pooled_prompt_embeds {text.pooled_dim} + 6 x addition_time_embed_dim "
                f"{time_dim} = {text.pooled_dim + 6 * time_dim} != UNet projection_class_embeddings_input_dim "
                f"{expected}"
            )

    vae_factor = latent.vae_scale_factor
    if vae_config is not None:
        vae_channels = vae_config.get("latent_channels")
        if vae_channels != latent.channels:
            problems.append(f"VAE latent_channels {vae_channels} != cache latent channels {latent.channels}")
        blocks = vae_config.get("block_out_channels") or []
        if blocks and 2 ** (len(blocks) - 1) != vae_factor:
            problems.append(f"VAE downsamples by {2 ** (len(blocks) - 1)}, the cache by {vae_factor}")
        for key in ("scaling_factor", "shift_factor"):
            theirs, ours = vae_config.get(key), getattr(latent, key)
            if theirs is not None and ours is not None and abs(float(theirs) - float(ours)) > 1e-9:
                problems.append(f"VAE {key} {theirs} != cache {key} {ours} (validation images would decode wrong)")

    try:
        down, mid = unet_residual_shapes(unet_config, vae_factor)
        stride = max(s.stride for s in down + ([mid] if mid else []))
        sizes = [(manifest.geometry.resolution,) * 2] + [tuple(b) for b in manifest.geometry.buckets or []]
        bad = sorted({s for s in sizes if s[0] % stride or s[1] % stride})
        if bad:
            problems.append(f"cache image sizes {bad} are not multiples of {stride} px, the coarsest adapter feature "
                            "of this UNet")
        if adapter_config is not None:
            check_adapter_fits(adapter_config, unet_config, vae_factor, what="--adapter")
        else:
            adapter_kwargs_for(unet_config, vae_factor)
    except ValueError as e:
        problems.append(str(e))
    return problems


def validation_resolution_problems(resolution: int, unet_config: dict, vae_scale_factor: int) -> list[str]:
    """--validation-resolution must be a multiple of the adapter's coarsest feature stride (32 px
    for SDXL): the pipeline would otherwise fail mid-run, inside validation."""
    from train.step import unet_residual_shapes

    try:
        down, mid = unet_residual_shapes(unet_config, vae_scale_factor)
    except ValueError:
        return []  # the UNet itself is refused by shape_problems
    stride = max(s.stride for s in down + ([mid] if mid else []))
    if resolution % stride:
        return [f"--validation-resolution {resolution} is not a multiple of {stride} px, the coarsest adapter "
                f"feature of this UNet (e.g. {max(stride, resolution // stride * stride)})"]
    return []


# ---------------------------------------------------------------------------------------------
# Encoders


@dataclass
class TextStack:
    """MODEL's tokenizers and text encoders (fp32, CPU), held only while checking and embedding."""

    tokenizer: Any
    tokenizer_2: Any
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module


def load_text_stack(model: str, revision: str | None, variant: str | None, *,
                    cache_dir: str | None = None) -> TextStack | None:
    """Both tokenizers and text encoders in fp32 on the CPU, or None when MODEL lacks them."""
    if any(load_component_config(model, sub, revision, cache_dir=cache_dir) is None for sub in TEXT_COMPONENTS):
        return None
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = model_root(model)
    try:
        return TextStack(
            tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", revision=revision, cache_dir=cache_dir),
            tokenizer_2=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2", revision=revision,
                                                      cache_dir=cache_dir),
            # fp32, as precompute loads them before fingerprinting: the fingerprint names the weights.
            text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder", revision=revision,
                                                       variant=variant, dtype=torch.float32, cache_dir=cache_dir),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                root, subfolder="text_encoder_2", revision=revision, variant=variant, dtype=torch.float32,
                cache_dir=cache_dir),
        )
    except (OSError, ValueError) as e:
        raise CacheMismatchError(f"cannot load the text encoders of {model}: {e}") from e


def load_vae(location: tuple[str, str | None], *, revision: str | None, variant: str | None,
             dtype: torch.dtype = torch.float32, cache_dir: str | None = None):
    from diffusers import AutoencoderKL

    repo, subfolder = location
    kwargs = {"revision": revision, "variant": variant} if subfolder == "vae" else {}
    try:
        return AutoencoderKL.from_pretrained(repo, subfolder=subfolder, torch_dtype=dtype, cache_dir=cache_dir, **kwargs)
    except (OSError, ValueError) as e:
        where = f"{repo}/{subfolder}" if subfolder else repo
        raise CacheMismatchError(f"cannot load the VAE {where}: {e}") from e


@dataclass
class FingerprintReport:
    differences: list[str] = field(default_factory=list)  # refused unless accepted
    notes: list[str] = field(default_factory=list)  # what could not be compared


def compare_fingerprints(encoder: Encoder, modules: dict[str, torch.nn.Module | None], *,
                         tokenizers: dict[str, Any] | None = None,
                         variant: str | None = None) -> FingerprintReport:
    """Cache-recorded fingerprints vs. those of `modules` (name -> module, None when absent) and
    of `tokenizers` ("tokenizer"/"tokenizer_2" -> tokenizer, None when absent; not compared at
    all when `tokenizers` is None). A fingerprint the cache did not record (an older cache) is
    noted, not a difference.
    `variant`: the --variant the modules were loaded with (named when it is not the cache's)."""
    report = FingerprintReport()
    cache_model, cache_variant = encoder.model, encoder.variant

    def compare(name: str, obj: Any, fingerprint: Callable[[Any], str]) -> bool:
        """Record `name`'s difference, if any; True when it differs."""
        recorded = encoder.fingerprint(name)
        if obj is None:
            report.notes.append(f"{name}: MODEL has none; cannot check it against the cache")
            return False
        if not recorded:
            report.notes.append(f"{name}: the cache recorded no fingerprint; cannot check it")
            return False
        ours = fingerprint(obj)
        if ours == recorded:
            return False
        report.differences.append(
            f"{name} fingerprint: cache {recorded[:16]}... (encoded with {cache_model!r}) != this "
            f"model's {ours[:16]}..."
        )
        return True

    weights_differ = False
    for name in FINGERPRINTED:
        weights_differ |= compare(name, modules.get(name), module_fingerprint)
    if tokenizers is not None:
        for name in TOKENIZERS:
            compare(name, tokenizers.get(name), tokenizer_fingerprint)
    if weights_differ and cache_variant != variant:
        # e.g. fp16 weight files are rounded copies: other bytes, other fingerprint, same model.
        report.differences.append(
            f"likely cause: the cache was encoded from weight variant {cache_variant!r} and this run loads "
            f"--variant {variant!r}; pass --variant {cache_variant or 'not at all'} to load the same weight files")
    return report


def refusal_message(cache_url: str, model: str, problems: list[str], differences: list[str], *,
                    accepted: bool = False) -> str:
    """The CacheMismatchError text: every problem, then what to do about encoder differences
    (unless `accepted`: --accept-encoder-mismatch was given, and the problems are what remain)."""
    lines = [f"cannot train {model} on the cache {cache_url}:"]
    lines += [f"  - {p}" for p in problems + ([] if accepted else differences)]
    if differences and not accepted:
        lines.append("The cache was encoded with other encoder weights or tokenizers than this model's. Re-run "
                     "precompute with this model, or pass --accept-encoder-mismatch if that is intended (e.g. a "
                     "fine-tuned text encoder of the same widths).")
    return "\n".join(lines)
