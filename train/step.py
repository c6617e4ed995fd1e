"""One training step's math: the batch, the adapter that fits the UNet, and the objective.

Owns:

- `Batch`: one collated, single-bucket batch as it leaves the loader and enters the loss.
- The adapter's shape: `adapter_kwargs_for` derives a diffusers `T2IAdapter` (channels, downscale
  factor, type) from the UNet config and the VAE factor; `build_adapter` makes a new one (fp32) or
  loads one with `--adapter PATH` and proves it fits the UNet. This is the single implementation
  (`precompute.tiny` and the loop import it from here).
- `Objective`: the reference's objective (docs/background.md section 1), vectorised: cubic timesteps,
  Euler sigmas, input scaling, sigma^-2-weighted denoised loss, computed in fp32. Sigmas come from
  a per-timestep table on the device, so a step has no host sync (the reference runs
  `.nonzero().item()` per sample).
- `freeze_unet` and `count_parameters`: the lean trainer's frozen UNet and its start-up log line.

How adapter features reach the UNet (diffusers `UNet2DConditionModel.forward`, 0.42): the list
passed as `down_intrablock_additional_residuals` is consumed front to back, one feature per down
block, then one more by the mid block:

- `CrossAttnDownBlock2D`: added after its last resnet/transformer pair, *before* its downsampler,
  so at the block's input resolution.
- `DownBlock2D`: added to the block's output, *after* its downsampler.
- mid block: added only if the next feature's shape equals the mid block output; otherwise diffusers
  silently ignores it (and any feature left over) - which is why shapes are checked up front here,
  and `Objective` fails if a feature was not consumed.

Every down block but the last halves the resolution. For SDXL (`DownBlock2D`, `CrossAttnDownBlock2D`
x2, block_out_channels (320, 640, 1280)) at latent size h the UNet takes (320, h/2), (640, h/2),
(1280, h/4) and, in the mid block, (1280, h/4). diffusers' adapter types emit, for channels c and
unshuffle factor d (in pixels, h * vae_scale_factor):

- full_adapter_xl: (c0, d), (c1, d), (c2, 2d), (c3, 2d)   -> SDXL with d = 2 * vae_scale_factor = 16
- full_adapter:    (c_i, d * 2**i)                         -> SD 1.x/2.x with d = vae_scale_factor
- light_adapter:   (c_i, d * 2**i), then (c_last, d * 2**n)

`layers_per_block` and the transformer depths do not change any of these shapes.

Randomness: `Objective.loss` draws, from the generator it is given and in this order, the latent
posterior noise (only when the cache stores `latent_std`), the diffusion noise, then the timesteps.
The generator must live on the training device: on GPU that keeps the draws on the device (no
host-to-device copy, no sync), on CPU it is the CPU generator, so CPU runs are bitwise
reproducible; its `get_state()` belongs in a checkpoint for exact resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler, T2IAdapter

ADAPTER_TYPES = ("full_adapter_xl", "full_adapter", "light_adapter")
# Picked in this order when the caller does not name a type: the XL layout first, as the
# published SDXL adapters use it; light_adapter is a capacity choice, never picked implicitly.
AUTO_ADAPTER_TYPES = ("full_adapter_xl", "full_adapter")
DEFAULT_NUM_RES_BLOCKS = {"full_adapter_xl": 2, "full_adapter": 2, "light_adapter": 4}

# Down blocks whose adapter hook we know (see the module docstring); others either take no
# `additional_residuals` argument (e.g. SimpleCrossAttnDownBlock2D: a TypeError in forward) or add
# them at places this module has not verified.
_RESIDUAL_AFTER_DOWNSAMPLE = {"DownBlock2D"}
_RESIDUAL_BEFORE_DOWNSAMPLE = {"CrossAttnDownBlock2D"}
_MID_BLOCKS = {"UNetMidBlock2DCrossAttn", "UNetMidBlock2D"}


# --------------------------------------------------------------------------------------------
# Batch


@dataclass
class Batch:
    """A collated batch, one bucket shape, everything on one device.

    One caption per sample has already been chosen and caption dropout applied (by train.data).
    """

    latent_mean: torch.Tensor  # (B, C, h, w), already times the VAE scaling factor
    latent_std: torch.Tensor | None  # (B, C, h, w) or None for a mean-only cache
    prompt_embeds: torch.Tensor  # (B, 77, D)
    pooled_prompt_embeds: torch.Tensor  # (B, P)
    add_time_ids: torch.Tensor  # (B, 6) float: original_size + crop_top_left + target_size
    cond: torch.Tensor  # (B, 3, H, W) float in [0, 1], H = h * vae_scale_factor
    keys: list[str]

    def __len__(self) -> int:
        return self.latent_mean.shape[0]

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, *, non_blocking: bool = False) -> Batch:
        """Move every tensor to `device`; with `dtype`, also cast the floating-point ones.

        `Objective.loss` casts what it needs itself (latents and the loss stay fp32, UNet inputs
        go to the UNet's dtype), so the loop should normally pass no dtype.
        """
        moved = {}
        for name in self._tensor_fields():
            t = getattr(self, name)
            cast = dtype if (dtype is not None and t.is_floating_point()) else None
            moved[name] = t.to(device=device, dtype=cast, non_blocking=non_blocking)
        return replace(self, **moved)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) so `.to(cuda, non_blocking=True)` overlaps compute."""
        return replace(self, **{name: getattr(self, name).pin_memory() for name in self._tensor_fields()})


# --------------------------------------------------------------------------------------------
# Adapter shape


@dataclass(frozen=True)
class FeatureShape:
    """One adapter feature map: channels and stride in pixels of the conditioning image."""

    channels: int
    stride: int

    def __str__(self) -> str:
        return f"({self.channels} ch, 1/{self.stride})"


def _cfg(config: Any) -> Mapping[str, Any]:
    if isinstance(config, Mapping):
        return config
    raise TypeError(f"expected a config mapping (e.g. unet.config), got {type(config).__name__}")


def unet_residual_shapes(
    unet_config: Mapping[str, Any], vae_scale_factor: int
) -> tuple[list[FeatureShape], FeatureShape | None]:
    """Where the UNet adds adapter features: one per down block, plus the optional mid-block one.

    Strides are in conditioning-image pixels (latent stride * `vae_scale_factor`). Raises
    ValueError listing every reason the UNet cannot take T2I-Adapter features.
    """
    cfg = _cfg(unet_config)
    problems = []
    if not isinstance(vae_scale_factor, int) or isinstance(vae_scale_factor, bool) or vae_scale_factor < 1:
        problems.append(f"vae_scale_factor must be a positive int, got {vae_scale_factor!r}")
    down = list(cfg.get("down_block_types") or [])
    channels = list(cfg.get("block_out_channels") or [])
    if not down or len(down) != len(channels):
        problems.append(
            f"down_block_types {down} and block_out_channels {channels} must be non-empty and of equal length"
        )
    known = sorted(_RESIDUAL_AFTER_DOWNSAMPLE | _RESIDUAL_BEFORE_DOWNSAMPLE)
    for i, block in enumerate(down):
        if block not in known:
            problems.append(f"down block {i} is {block!r}; T2I-Adapter features can only feed {known}")
    mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type is not None and mid_type not in _MID_BLOCKS:
        problems.append(f"mid_block_type {mid_type!r} is not one of {sorted(_MID_BLOCKS)} (or None)")
    if problems:
        raise ValueError("UNet cannot take T2I-Adapter features:\n  - " + "\n  - ".join(problems))

    shapes = []
    stride = vae_scale_factor  # conv_in keeps the latent resolution
    for i, (block, ch) in enumerate(zip(down, channels)):
        downsamples = i < len(down) - 1  # UNet2DConditionModel: add_downsample = not is_final_block
        if block in _RESIDUAL_BEFORE_DOWNSAMPLE:
            shapes.append(FeatureShape(int(ch), stride))
            stride *= 2 if downsamples else 1
        else:
            stride *= 2 if downsamples else 1
            shapes.append(FeatureShape(int(ch), stride))
    mid = FeatureShape(int(channels[-1]), stride) if mid_type is not None else None
    return shapes, mid


def adapter_feature_shapes(adapter_config: Mapping[str, Any]) -> list[FeatureShape]:
    """The feature maps a diffusers T2IAdapter with this config emits (from diffusers' adapter.py)."""
    cfg = _cfg(adapter_config)
    kind = cfg.get("adapter_type", "full_adapter")
    c = [int(x) for x in cfg.get("channels", (320, 640, 1280, 1280))]
    d = int(cfg.get("downscale_factor", 8))
    if kind == "full_adapter_xl":
        # Blocks 0, 1 keep the resolution, block 2 halves it, later blocks keep it.
        return [FeatureShape(ch, d if i < 2 else 2 * d) for i, ch in enumerate(c)]
    if kind == "full_adapter":
        return [FeatureShape(ch, d * 2**i) for i, ch in enumerate(c)]
    if kind == "light_adapter":
        return [FeatureShape(ch, d * 2**i) for i, ch in enumerate(c)] + [FeatureShape(c[-1], d * 2 ** len(c))]
    raise ValueError(f"unknown adapter_type {kind!r}; diffusers has {list(ADAPTER_TYPES)}")


def _fit_problems(kind: str, channels: list[int]) -> list[str]:
    """Constraints diffusers' adapter classes put on `channels` that their constructors do not check."""
    if kind == "full_adapter_xl":
        if len(channels) < 3:
            return ["full_adapter_xl needs at least 3 feature maps"]
        # Blocks 3.. are built as AdapterBlock(c_i, c_i) but receive c_{i-1} channels.
        bad = [i for i in range(3, len(channels)) if channels[i] != channels[i - 1]]
        if bad:
            return [f"full_adapter_xl needs channels[{bad[0]}] == channels[{bad[0] - 1}], got {channels}"]
    if kind == "light_adapter" and min(channels) < 4:
        return [f"light_adapter needs every channel count >= 4 (it works at channels // 4), got {channels}"]
    return []


def _candidate_targets(unet_config: Mapping[str, Any], vae_scale_factor: int) -> list[list[FeatureShape]]:
    """Feature lists the UNet consumes completely: every down block and the mid block, or only the down blocks."""
    down, mid = unet_residual_shapes(unet_config, vae_scale_factor)
    return ([down + [mid]] if mid is not None else []) + [down]


def _kwargs_matching(kind: str, target: list[FeatureShape], num_res_blocks: int | None) -> dict[str, Any] | None:
    if kind == "light_adapter":
        if len(target) < 2:
            return None
        channels = [s.channels for s in target[:-1]]
    else:
        channels = [s.channels for s in target]
    kwargs = {
        "in_channels": 3,
        "channels": channels,
        "num_res_blocks": num_res_blocks if num_res_blocks is not None else DEFAULT_NUM_RES_BLOCKS[kind],
        "downscale_factor": target[0].stride,
        "adapter_type": kind,
    }
    if adapter_feature_shapes(kwargs) != target or _fit_problems(kind, channels):
        return None
    return kwargs


def adapter_kwargs_for(
    unet_config: Mapping[str, Any],
    vae_scale_factor: int,
    *,
    adapter_type: str | None = None,
    num_res_blocks: int | None = None,
) -> dict[str, Any]:
    """`T2IAdapter(**kwargs)` for a new adapter whose every feature map the UNet consumes.

    SDXL (block_out_channels (320, 640, 1280), vae factor 8) gives full_adapter_xl with channels
    [320, 640, 1280, 1280] and downscale_factor 16, i.e. the published SDXL adapters' config.
    Without `adapter_type`, tries full_adapter_xl then full_adapter; raises ValueError saying what
    the UNet consumes when no diffusers adapter type produces exactly that.
    """
    if adapter_type is not None and adapter_type not in ADAPTER_TYPES:
        raise ValueError(f"adapter_type {adapter_type!r} is not one of {list(ADAPTER_TYPES)}")
    if num_res_blocks is not None and num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    targets = _candidate_targets(unet_config, vae_scale_factor)
    for kind in (adapter_type,) if adapter_type else AUTO_ADAPTER_TYPES:
        for target in targets:
            kwargs = _kwargs_matching(kind, target, num_res_blocks)
            if kwargs is not None:
                return kwargs
    wanted = " or ".join("[" + ", ".join(map(str, t)) + "]" for t in targets)
    tried = adapter_type or " / ".join(AUTO_ADAPTER_TYPES)
    raise ValueError(
        f"no {tried} T2I-Adapter fits this UNet: it consumes features {wanted} "
        f"(channels, stride in image pixels with vae_scale_factor={vae_scale_factor}), "
        f"down_block_types={list(unet_config.get('down_block_types') or [])}; "
        "name another adapter_type or pass a pre-made adapter"
    )


def check_adapter_fits(
    adapter_config: Mapping[str, Any],
    unet_config: Mapping[str, Any],
    vae_scale_factor: int,
    *,
    what: str = "adapter",
) -> None:
    """Raise ValueError unless the UNet consumes every feature map of this adapter, in order."""
    cfg = _cfg(adapter_config)
    problems = []
    if int(cfg.get("in_channels", 3)) != 3:
        problems.append(f"in_channels is {cfg.get('in_channels')}, but conditioning images are RGB (3)")
    try:
        produced = adapter_feature_shapes(cfg)
        problems += _fit_problems(cfg.get("adapter_type", "full_adapter"), [s.channels for s in produced])
    except ValueError as e:
        produced = None
        problems.append(str(e))
    targets = _candidate_targets(unet_config, vae_scale_factor)
    if produced is not None and produced not in targets:
        wanted = " or ".join("[" + ", ".join(map(str, t)) + "]" for t in targets)
        problems.append(
            f"it emits [{', '.join(map(str, produced))}] but the UNet consumes {wanted} "
            f"(channels, stride in image pixels with vae_scale_factor={vae_scale_factor})"
        )
    if problems:
        raise ValueError(f"{what} does not fit the UNet:\n  - " + "\n  - ".join(problems))


def build_adapter(
    unet_config: Mapping[str, Any],
    vae_scale_factor: int,
    *,
    path: str | Path | None = None,
    config: Mapping[str, Any] | None = None,
    adapter_type: str | None = None,
    num_res_blocks: int | None = None,
    cache_dir: str | None = None,
) -> T2IAdapter:
    """A new fp32 T2IAdapter shaped for the UNet, or the one saved at `path` (checked to fit), in fp32.

    `path` is a `T2IAdapter.save_pretrained` folder or a hub id (resolved by diffusers, from the
    local hub cache when offline); `config` is its config.json when the caller has read it
    already. A new adapter is created on the current default device, so `with
    torch.device("meta"):` sizes a full SDXL adapter without allocating it. Loading reads
    safetensors only (never pickle).
    """
    if path is None:
        kwargs = adapter_kwargs_for(
            unet_config, vae_scale_factor, adapter_type=adapter_type, num_res_blocks=num_res_blocks
        )
        return T2IAdapter(**kwargs)
    local = Path(path).expanduser()
    source = str(local) if local.exists() else str(path)
    if config is None:
        # The shapes are checked from the config before any weight is read.
        try:
            config = T2IAdapter.load_config(source, cache_dir=cache_dir)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"adapter {path}: no config.json there (expected a T2IAdapter.save_pretrained folder or a hub "
                f"id): {e}"
            ) from e
    check_adapter_fits(config, unet_config, vae_scale_factor, what=f"adapter {path}")
    if adapter_type is not None and config.get("adapter_type") != adapter_type:
        raise ValueError(f"adapter {path} is a {config.get('adapter_type')!r}, not the requested {adapter_type!r}")
    try:
        adapter = T2IAdapter.from_pretrained(source, use_safetensors=True, cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"adapter {path}: cannot load safetensors weights: {e}") from e
    return adapter.to(torch.float32)


# --------------------------------------------------------------------------------------------
# UNet handling


def freeze_unet(unet: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Frozen UNet: no weight gradients are ever allocated; eval mode; weights in `dtype`.

    Gradients still flow *through* it to the adapter's features (autograd records the ops that
    have an input requiring grad, and the adapter's features do).
    """
    unet.requires_grad_(False)
    unet.eval()
    # nn.Module.to, not ModelMixin.to: the latter warns on every dtype cast. Modules the model
    # class asks to keep in fp32 (none for UNet2DConditionModel) are put back, as from_pretrained does.
    torch.nn.Module.to(unet, dtype=dtype)
    keep_fp32 = getattr(unet, "_keep_in_fp32_modules", None) or []
    for name, module in unet.named_modules():
        if name and any(k in name for k in keep_fp32):  # diffusers matches by substring
            torch.nn.Module.to(module, dtype=torch.float32)
    return unet


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = frozen = 0
    for p in module.parameters():
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


# --------------------------------------------------------------------------------------------
# Objective


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, generator: torch.Generator, device: torch.device | str
) -> torch.Tensor:
    """The reference's cubic sampling: t = (1 - u**3) * T, u ~ U(0, 1), as long, clamped to [0, T-1].

    More weight on large t (noisy steps), where the conditioning decides the layout
    (T2I-Adapter paper, section 3.4). E[t/T] = 1 - E[u**3] = 0.75.
    """
    u = torch.rand((batch_size,), generator=generator, device=device)
    t = ((1 - u**3) * num_train_timesteps).long()
    return t.clamp(0, num_train_timesteps - 1)


class Objective:
    """The reference's denoising objective on a frozen UNet, vectorised and in fp32.

    loss = mean_b mean(sigma_b**-2 * (denoised_b - latents_b)**2), where
    noisy = latents + noise * sigma (EulerDiscreteScheduler.add_noise), the UNet sees
    noisy / sqrt(sigma**2 + 1), and denoised = model_pred * (-sigma) + noisy (epsilon prediction).
    """

    def __init__(self, scheduler_config: Mapping[str, Any], device: torch.device | str):
        config = dict(_cfg(scheduler_config))
        config.pop("_class_name", None)
        config.pop("_diffusers_version", None)
        scheduler = EulerDiscreteScheduler.from_config(config)
        prediction_type = scheduler.config.prediction_type
        if prediction_type != "epsilon":
            # The reference's denoised = model_pred * (-sigma) + noisy is the epsilon formula; a
            # v-prediction UNet trained with it would silently learn the wrong thing.
            raise ValueError(
                f"scheduler prediction_type is {prediction_type!r}; the T2I-Adapter objective here is "
                "defined for epsilon-prediction UNets (SDXL base) only"
            )
        T = int(scheduler.config.num_train_timesteps)
        # sigma_of_t[t] = scheduler.sigmas[index of t in scheduler.timesteps], the same lookup
        # add_noise and the reference do per sample, done once here on the host.
        schedule = scheduler.timesteps.to(torch.float64)
        t_all = torch.arange(T, dtype=torch.float64)
        match = schedule[None, :] == t_all[:, None]  # (T, len(schedule))
        missing = (~match.any(dim=1)).nonzero().flatten().tolist()
        if missing:
            raise ValueError(
                f"scheduler timesteps do not contain every training timestep 0..{T - 1} (missing e.g. "
                f"{missing[:5]}); timestep_type={scheduler.config.get('timestep_type', 'discrete')!r} is not supported"
            )
        # The index of t in the schedule as diffusers' index_for_timestep (which add_noise uses)
        # picks it: the only match, or the second of several (the training schedule lists every
        # t once; a duplicated t would occur only in schedules made for sampling).
        matches = match.to(torch.int64)
        nth = torch.where(matches.sum(dim=1) > 1, 2, 1)
        index = (matches.cumsum(dim=1) == nth[:, None]).to(torch.int8).argmax(dim=1)
        self.scheduler = scheduler
        self.num_train_timesteps = T
        self.device = torch.device(device)
        self.sigmas = scheduler.sigmas.to(torch.float32)[index].to(self.device)  # (T,)

    def _check(self, batch: Batch, generator: torch.Generator) -> None:
        device = batch.latent_mean.device
        if device.type != self.device.type:
            raise ValueError(f"batch is on {device} but the Objective was built for {self.device}")
        if generator.device.type != device.type:
            raise ValueError(
                f"generator is on {generator.device} but the batch is on {device}; create it with "
                f"torch.Generator(device={device.type!r}) so noise is drawn where it is used"
            )

    def draw(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, noise, timesteps) for this step, fp32/fp32/long, in the documented draw order."""
        self._check(batch, generator)
        mean = batch.latent_mean.float()
        if batch.latent_std is not None:
            # A fresh posterior sample, as the reference's latent_dist.sample(); the stored
            # moments are already scaled by the VAE factor, so this equals sample() * factor.
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
            latents = mean + batch.latent_std.float() * eps
        else:
            latents = mean
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
        timesteps = sample_timesteps(latents.shape[0], self.num_train_timesteps, generator, latents.device)
        return latents, noise, timesteps

    def per_sample_loss(
        self,
        unet: torch.nn.Module,
        adapter: torch.nn.Module,
        batch: Batch,
        generator: torch.Generator,
        *,
        weight_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss per sample (B,) fp32, timesteps (B,)). `weight_dtype` defaults to the UNet's dtype."""
        latents, noise, timesteps = self.draw(batch, generator)
        return self.loss_at(unet, adapter, batch, latents, noise, timesteps, weight_dtype=weight_dtype), timesteps

    def loss_at(
        self,
        unet: torch.nn.Module,
        adapter: torch.nn.Module,
        batch: Batch,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        weight_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Loss per sample (B,) fp32 for given draws: `latents` and `noise` (B, C, h, w) fp32 and
        `timesteps` (B,) long, on the batch's device. `per_sample_loss` draws them from a generator;
        `train.evaluate` passes fixed ones (its validation loss is this very objective)."""
        dtype = weight_dtype if weight_dtype is not None else unet.dtype
        sigma = self.sigmas[timesteps].view(-1, *([1] * (latents.ndim - 1)))  # gather: no host sync
        noisy = latents + noise * sigma  # == EulerDiscreteScheduler.add_noise
        unet_input = noisy / torch.sqrt(sigma**2 + 1)

        adapter_dtype = next(adapter.parameters()).dtype
        features = adapter(batch.cond.to(adapter_dtype))
        # A fresh list: the UNet pops from it, and what is left was silently ignored.
        residuals = [f.to(dtype) for f in features]
        model_pred = unet(
            unet_input.to(dtype),
            timesteps,
            encoder_hidden_states=batch.prompt_embeds.to(dtype),
            added_cond_kwargs={
                "text_embeds": batch.pooled_prompt_embeds.to(dtype),
                # fp32: sizes like 1023 are not exact in bf16; the UNet embeds them in fp32 anyway.
                "time_ids": batch.add_time_ids.float(),
            },
            down_intrablock_additional_residuals=residuals,
            return_dict=False,
        )[0]
        if residuals:
            raise ValueError(
                f"the UNet ignored {len(residuals)} adapter feature map(s) of shape "
                f"{[tuple(r.shape) for r in residuals]}: the conditioning image "
                f"{tuple(batch.cond.shape[-2:])} does not match the latent {tuple(latents.shape[-2:])} "
                "times the VAE factor, or the adapter does not fit the UNet"
            )

        denoised = model_pred.float() * (-sigma) + noisy
        weighting = sigma**-2.0
        return (weighting * (denoised - latents) ** 2).flatten(1).mean(dim=1)

    def loss(
        self,
        unet: torch.nn.Module,
        adapter: torch.nn.Module,
        batch: Batch,
        generator: torch.Generator,
        *,
        weight_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Scalar fp32 loss of one batch (mean over samples), differentiable w.r.t. the adapter."""
        return self.per_sample_loss(unet, adapter, batch, generator, weight_dtype=weight_dtype)[0].mean()
