"""Validation images: prompts embedded once, VAE loaded only to decode, grids to disk and tracker.

- `embed_validation_prompts`: at start, with MODEL's text encoders (loaded once by `train.checks`
  for the fingerprint check, then freed by the caller). Embedding goes through diffusers'
  `StableDiffusionXLPipeline.encode_prompt` on a pipeline holding only tokenizers and text
  encoders, so prompts and the negative (zeros when the model's `force_zeros_for_empty_prompt`,
  as SDXL base sets, else the empty prompt) are embedded exactly as at inference.
- `Validator.run`: loads the VAE, renders every (conditioning image, prompt) pair with
  `StableDiffusionXLAdapterPipeline` built from the training UNet, a copy of the adapter in the
  UNet's dtype and the VAE (no text encoders: it renders from the embeddings), frees the VAE and
  the copy, and writes one grid per pair, `OUT/validation/step-000100-0.png`: the conditioning
  image, then the samples, in a row.

Rendering uses its own seeded generator inside `torch.random.fork_rng`, so validating (or not)
never changes the training run's random stream: resume stays exact whatever the schedule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

VALIDATION_DIR = "validation"


@dataclass
class ValidationPrompts:
    """Per pair: (image path, prompt) and its embeddings, fp32 on the CPU."""

    pairs: list[tuple[str, str]]
    prompt_embeds: torch.Tensor  # (N, 77, D)
    pooled_prompt_embeds: torch.Tensor  # (N, P)
    negative_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor


def force_zeros_for_empty_prompt(model: str, *, cache_dir: str | None = None) -> bool:
    """The pipeline's negative-prompt convention from model_index.json (SDXL base: True)."""
    from diffusers import DiffusionPipeline

    from train.checks import model_root

    try:
        config = DiffusionPipeline.load_config(model_root(model), cache_dir=cache_dir)
        return bool(config.get("force_zeros_for_empty_prompt", True))
    except (OSError, ValueError):
        return True


@torch.no_grad()
def embed_validation_prompts(text_stack: Any, pairs: list[tuple[str, str]], *, force_zeros: bool,
                             device: torch.device | str = "cpu") -> ValidationPrompts:
    """Embed each pair's prompt (and the negative) with the SDXL pipeline's own encode_prompt."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=None, unet=None, scheduler=None,
        text_encoder=text_stack.text_encoder.to(device), text_encoder_2=text_stack.text_encoder_2.to(device),
        tokenizer=text_stack.tokenizer, tokenizer_2=text_stack.tokenizer_2,
        force_zeros_for_empty_prompt=force_zeros,
    )
    prompts = [prompt for _, prompt in pairs]
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts, device=torch.device(device), num_images_per_prompt=1, do_classifier_free_guidance=True,
    )
    del pipe
    return ValidationPrompts(
        pairs=list(pairs),
        prompt_embeds=embeds.float().cpu(),
        pooled_prompt_embeds=pooled.float().cpu(),
        negative_prompt_embeds=negative.float().cpu(),
        negative_pooled_prompt_embeds=negative_pooled.float().cpu(),
    )


def make_grid(images: list[Image.Image]) -> Image.Image:
    """One row, left to right, all resized to the first image's size."""
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images), h))
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB").resize((w, h), Image.Resampling.BICUBIC), (i * w, 0))
    return grid


def _decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents in the UNet's space -> images in [-1, 1], fp32, as the SDXL pipelines decode them."""
    with torch.autocast(latents.device.type, enabled=False):
        z = latents.to(torch.float32) / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            z = z + shift
        return vae.decode(z.to(vae.dtype), return_dict=False)[0].float()


class Validator:
    """Renders the validation grids; run on the main process only."""

    def __init__(
        self,
        prompts: ValidationPrompts,
        *,
        output_dir: str | Path,
        vae_location: tuple[str, str | None],
        vae_kwargs: dict[str, Any],
        scheduler_config: dict,
        force_zeros: bool,
        resolution: int,
        num_images: int,
        inference_steps: int,
        guidance_scale: float,
        seed: int,
    ):
        self.prompts = prompts
        self.dir = Path(output_dir) / VALIDATION_DIR
        self.vae_location, self.vae_kwargs = vae_location, vae_kwargs
        self.scheduler_config = dict(scheduler_config)
        self.force_zeros = force_zeros
        self.resolution, self.num_images = resolution, num_images
        self.inference_steps, self.guidance_scale, self.seed = inference_steps, guidance_scale, seed
        # Decoded once: a missing or broken file fails at start, not after hours of training.
        self.cond_images = [Image.open(path).convert("RGB") for path, _ in prompts.pairs]

    def _scheduler(self):
        import diffusers

        name = self.scheduler_config.get("_class_name", "EulerDiscreteScheduler")
        cls = getattr(diffusers, name, diffusers.EulerDiscreteScheduler)
        return cls.from_config(self.scheduler_config)

    def run(self, step: int, *, unet: torch.nn.Module, adapter: torch.nn.Module, accelerator: Any) -> list[Path]:
        """Render every pair; return the grid paths. `adapter` is the unwrapped training adapter."""
        device = accelerator.device
        fork_devices = [device] if device.type == "cuda" else []
        # Everything here, the copies' random init included, draws from a forked RNG.
        with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
            rows = self._render(unet, adapter, accelerator)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, (_, _, grid) in enumerate(rows):
            paths.append(self.dir / f"step-{step:06d}-{i}.png")
            grid.save(paths[-1])
        self._to_trackers(step, rows, accelerator)
        logger.info("validation images at step %d: %s", step, ", ".join(str(x) for x in paths))
        return paths

    def _render(self, unet: torch.nn.Module, adapter: torch.nn.Module, accelerator: Any) -> list:
        from diffusers import StableDiffusionXLAdapterPipeline

        from train.checks import load_vae

        device = accelerator.device
        vae = load_vae(self.vae_location, **self.vae_kwargs).to(device).requires_grad_(False)
        # Embeddings (hence latents) and adapter features in the UNet's dtype, as a pipeline
        # loaded with torch_dtype has them and as training feeds the UNet (fp32 tensors meeting
        # bf16 norm weights fail under CPU autocast). Rendered with a plain copy of the adapter:
        # the fp32 master weights stay untouched, and the copy has none of the forward wrappers
        # accelerate adds in mixed precision (they return fp32 features).
        dtype = unet.dtype
        render_adapter = type(adapter).from_config(adapter.config)
        render_adapter.load_state_dict(adapter.state_dict())
        render_adapter.to(device=device, dtype=dtype).eval()
        pipe = StableDiffusionXLAdapterPipeline(
            vae=vae, unet=unet, adapter=render_adapter, scheduler=self._scheduler(),
            text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
            force_zeros_for_empty_prompt=self.force_zeros,
        )
        pipe.set_progress_bar_config(disable=True)
        p, rows = self.prompts, []
        for i, ((_, prompt), cond) in enumerate(zip(p.pairs, self.cond_images)):
            with accelerator.autocast():  # denoise as training runs the UNet
                latents = pipe(
                    image=cond,
                    prompt_embeds=p.prompt_embeds[i : i + 1].to(device, dtype),
                    pooled_prompt_embeds=p.pooled_prompt_embeds[i : i + 1].to(device, dtype),
                    negative_prompt_embeds=p.negative_prompt_embeds[i : i + 1].to(device, dtype),
                    negative_pooled_prompt_embeds=p.negative_pooled_prompt_embeds[i : i + 1].to(device, dtype),
                    height=self.resolution, width=self.resolution,
                    num_inference_steps=self.inference_steps, guidance_scale=self.guidance_scale,
                    num_images_per_prompt=self.num_images,
                    generator=torch.Generator(device=device).manual_seed(self.seed + i),
                    output_type="latent",
                ).images
            # Decode in fp32 outside autocast: SDXL's VAE overflows in fp16 (black/NaN images).
            images = pipe.image_processor.postprocess(_decode(vae, latents), output_type="pil")
            row = [cond.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)] + list(images)
            rows.append((prompt, row, make_grid(row)))
        return rows

    @staticmethod
    def _to_trackers(step: int, rows: list, accelerator: Any) -> None:
        for tracker in getattr(accelerator, "trackers", []):
            if tracker.name == "tensorboard":
                for i, (prompt, row, _) in enumerate(rows):
                    stack = np.stack([np.asarray(img.convert("RGB")) for img in row])
                    tracker.writer.add_images(f"validation/{i}: {prompt}", stack, step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(grid, caption=prompt) for prompt, _, grid in rows]},
                            step=step)
