"""Validation images: prompts embedded once, VAE loaded only to decode, grids to disk and tracker.

- `embed_validation_prompts`: at start, with MODEL's text encoders (loaded once by `train.checks`
  for the fingerprint check, then freed by the caller). Embedding goes through diffusers'
  `StableDiffusionXLPipeline.encode_prompt` on a pipeline holding only tokenizers and text
  encoders, so prompts and the negative (zeros when the model's `force_zeros_for_empty_prompt`,
  as SDXL base sets, else the empty prompt) are embedded exactly as at inference.
- `Validator.run`: loads the VAE, renders every (conditioning image, prompt) pair with
  `StableDiffusionXLAdapterPipeline` built from the training UNet, a copy of the adapter (the
  trained weights, or their EMA) in the UNet's dtype and the VAE (no text encoders: it renders
  from the embeddings), frees the VAE and the copy, and writes one grid per pair,
  `OUT/validation/step-000100-0.png`: the conditioning image, then the samples, in a row; and one
  labelled sheet per step, `OUT/validation/step-000100.png`, for people: a title line (step and
  weights), then per pair a line with the prompt (and the condition adherence of each sample)
  above its row.
- Sizes: `--validation-resolution N` renders N x N; by default each pair renders at the cache's
  bucket nearest its conditioning image's aspect ratio (`precompute.buckets.nearest_bucket`; the
  square cache resolution for a cache without buckets), the conditioning image resized to cover
  it and centre-cropped, as precompute crops training images.
- Condition adherence (`train.adherence`): for a cache whose conditions are edges (canny,
  sketch), every sample is scored against its conditioning image by rerunning the detector.

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

from train.errors import TrainError

logger = logging.getLogger(__name__)

VALIDATION_DIR = "validation"
LABEL_COLOUR = (235, 235, 235)
BAND_COLOUR = (24, 24, 24)


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


def validation_size(image_size: tuple[int, int], sizes: list[tuple[int, int]],
                    resolution: int | None = None) -> tuple[int, int]:
    """(h, w) to render a conditioning image of PIL size (w, h) at: `resolution` square when given,
    else the size in `sizes` (the cache's buckets) nearest its aspect ratio."""
    from precompute.buckets import nearest_bucket

    if resolution is not None:
        return resolution, resolution
    w, h = image_size
    return nearest_bucket((h, w), list(sizes))


class ConditionImageError(TrainError):
    """A validation conditioning image that cannot be used; `detail` says why, without the path."""

    def __init__(self, path: str | Path, detail: str):
        super().__init__(f"validation image {str(path)!r}: {detail}")
        self.detail = detail


def load_condition(path: str | Path) -> Image.Image:
    """A validation conditioning image, decoded as precompute decodes the cache's (every pixel,
    EXIF orientation applied, 16-bit and float images rescaled, transparency on white): the
    adapter is shown in validation what it learnt from. The user's own file, so no pixel cap
    beyond PIL's decompression-bomb guard (validation renders it at the cache's sizes)."""
    from precompute.preprocess import Skip, load_rgb

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConditionImageError(path, f"cannot be read: {e.strerror or e}") from None
    try:
        return load_rgb(data, "cond", str(path), max_pixels=None)
    except Skip as e:
        raise ConditionImageError(path, e.detail.removeprefix(f"{path}: ")) from None


def fit_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` resized to cover (h, w) = `size` (aspect kept) and centre-cropped to it; a plain
    resize when the aspect ratios agree."""
    from precompute.buckets import resize_to_cover

    th, tw = size
    w, h = image.size
    ch, cw = resize_to_cover((h, w), (th, tw))
    image = image.convert("RGB").resize((cw, ch), Image.Resampling.BICUBIC)
    top, left = (ch - th) // 2, (cw - tw) // 2
    return image.crop((left, top, left + tw, top + th)) if (ch, cw) != (th, tw) else image


# TrueType fonts tried for labels before PIL's own (whose glyphs are ASCII only, so ü or é
# would show as boxes); found by name in the system's font folders where installed.
LABEL_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "LiberationSans-Regular.ttf", "Arial.ttf")
MAX_LABEL_CHARS = 300  # a prompt's label, cut: the text encoders read 77 tokens of it anyway


def label_font(height: int):
    """A font for labels at a size that suits images `height` pixels high."""
    from PIL import ImageFont

    size = max(10, min(28, height // 16))
    for name in LABEL_FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def label_band(lines: list[str], width: int, font) -> Image.Image:
    """Light text on a dark band `width` wide: each line wrapped at word boundaries to fit."""
    from PIL import ImageDraw

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(2, int(font.size) // 4)
    wrapped: list[str] = []
    for line in lines:
        words, current = line.split(" "), ""
        for word in words:
            candidate = word if not current else f"{current} {word}"
            if current and measure.textlength(candidate, font=font) > width - 2 * pad:
                wrapped.append(current)
                current = word
            else:
                current = candidate
        wrapped.append(current)
    line_height = int(font.size * 1.25)
    band = Image.new("RGB", (width, 2 * pad + line_height * len(wrapped)), BAND_COLOUR)
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(wrapped):
        draw.text((pad, pad + i * line_height), line, fill=LABEL_COLOUR, font=font)
    return band


def make_sheet(title: str, rows: list[tuple[str, list[Image.Image]]]) -> Image.Image:
    """A labelled page: `title` on top, then per row its label and its images (conditioning
    image first), left-aligned on a dark background."""
    width = max(sum(img.width for img in images) for _, images in rows)
    font = label_font(max(images[0].height for _, images in rows))
    parts = [label_band([title], width, font)]
    for label, images in rows:
        parts.append(label_band([label], width, font))
        strip = Image.new("RGB", (width, max(img.height for img in images)), BAND_COLOUR)
        x = 0
        for img in images:
            strip.paste(img.convert("RGB"), (x, 0))
            x += img.width
        parts.append(strip)
    sheet = Image.new("RGB", (width, sum(p.height for p in parts)), BAND_COLOUR)
    y = 0
    for part in parts:
        sheet.paste(part, (0, y))
        y += part.height
    return sheet


@dataclass
class ValidationResult:
    """What one validation wrote and measured."""

    step: int
    grids: list[Path]  # one row per pair
    sheet: Path  # the labelled page of the step
    adherence: list[list[float]] | None  # per pair, per sample: edge F1; None without a detector
    weights: str

    @property
    def mean_adherence(self) -> float | None:
        if self.adherence is None:
            return None
        scores = [v for row in self.adherence for v in row]
        return sum(scores) / len(scores)

    def record(self) -> dict | None:
        """The metrics.jsonl record of the adherence (None without a detector)."""
        if self.adherence is None:
            return None
        return {"step": self.step, "adherence": self.mean_adherence,
                "adherence_per_pair": [sum(row) / len(row) for row in self.adherence],
                "adherence_per_image": self.adherence,
                "validation_weights": self.weights}


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
        resolution: int | None,
        num_images: int,
        inference_steps: int,
        guidance_scale: float,
        seed: int,
        sizes: list[tuple[int, int]] | None = None,
        detector: Any = None,
    ):
        """`resolution`: render N x N; None: each pair at the entry of `sizes` (the cache's
        buckets, (h, w)) nearest its conditioning image's aspect. `detector`: a
        `train.adherence.EdgeDetector` to score every sample, or None."""
        if resolution is None and not sizes:
            raise ValueError("validation needs a resolution or the cache's sizes")
        self.prompts = prompts
        self.dir = Path(output_dir) / VALIDATION_DIR
        self.vae_location, self.vae_kwargs = vae_location, vae_kwargs
        self.scheduler_config = dict(scheduler_config)
        self.force_zeros = force_zeros
        self.resolution, self.num_images = resolution, num_images
        self.inference_steps, self.guidance_scale, self.seed = inference_steps, guidance_scale, seed
        self.detector = detector
        # Decoded once: a missing or broken file fails at start, not after hours of training.
        self.cond_images = []
        self.sizes = []
        for path, _ in prompts.pairs:
            image = load_condition(path)
            size = validation_size(image.size, list(sizes or []), resolution)
            self.sizes.append(size)
            self.cond_images.append(fit_to(image, size))

    def _scheduler(self):
        import diffusers

        name = self.scheduler_config.get("_class_name", "EulerDiscreteScheduler")
        cls = getattr(diffusers, name, diffusers.EulerDiscreteScheduler)
        return cls.from_config(self.scheduler_config)

    def run(self, step: int, *, unet: torch.nn.Module, adapter: torch.nn.Module, accelerator: Any,
            weights: str = "raw") -> ValidationResult:
        """Render every pair, score it, write the grids and the sheet. `adapter` is the unwrapped
        training adapter or the EMA's (`weights` says which, for the labels and records)."""
        device = accelerator.device
        fork_devices = [device] if device.type == "cuda" else []
        # Everything here, the copies' random init included, draws from a forked RNG.
        with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
            rows = self._render(unet, adapter, accelerator)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        scores = None
        if self.detector is not None:
            scores = [[self.detector.score(np.asarray(img.convert("RGB")), np.asarray(row[0]))
                       for img in row[1:]] for _, row, _ in rows]
        self.dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, (_, _, grid) in enumerate(rows):
            paths.append(self.dir / f"step-{step:06d}-{i}.png")
            grid.save(paths[-1])
        sheet = self.dir / f"step-{step:06d}.png"
        make_sheet(self.title(step, weights),
                   [(self.row_label(prompt, None if scores is None else scores[i]), row)
                    for i, (prompt, row, _) in enumerate(rows)]).save(sheet)
        self._to_trackers(step, rows, accelerator)
        logger.info("validation images at step %d: %s", step, ", ".join(str(x) for x in [sheet, *paths]))
        result = ValidationResult(step=step, grids=paths, sheet=sheet, adherence=scores, weights=weights)
        if scores is not None:
            logger.info("condition adherence at step %d: edge F1 %.4f (%s)", step, result.mean_adherence,
                        self.detector.describe())
        return result

    def title(self, step: int, weights: str) -> str:
        what = "EMA weights" if weights == "ema" else "trained weights"
        return f"step {step} - {what} - first column: the conditioning image"

    @staticmethod
    def row_label(prompt: str, scores: list[float] | None) -> str:
        if len(prompt) > MAX_LABEL_CHARS:
            prompt = prompt[:MAX_LABEL_CHARS].rstrip() + " …"
        if scores is None:
            return prompt
        return f"{prompt}  [edge F1 " + " ".join(f"{v:.2f}" for v in scores) + "]"

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
        # (torch's own cast: diffusers' ModelMixin.to warns about fp32 modules even when the
        # adapter has none to keep.)
        torch.nn.Module.to(render_adapter, device=device, dtype=dtype).eval()
        pipe = StableDiffusionXLAdapterPipeline(
            vae=vae, unet=unet, adapter=render_adapter, scheduler=self._scheduler(),
            text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
            force_zeros_for_empty_prompt=self.force_zeros,
        )
        pipe.set_progress_bar_config(disable=True)
        p, rows = self.prompts, []
        for i, ((_, prompt), cond, (height, width)) in enumerate(zip(p.pairs, self.cond_images, self.sizes)):
            with accelerator.autocast():  # denoise as training runs the UNet
                latents = pipe(
                    image=cond,
                    prompt_embeds=p.prompt_embeds[i : i + 1].to(device, dtype),
                    pooled_prompt_embeds=p.pooled_prompt_embeds[i : i + 1].to(device, dtype),
                    negative_prompt_embeds=p.negative_prompt_embeds[i : i + 1].to(device, dtype),
                    negative_pooled_prompt_embeds=p.negative_pooled_prompt_embeds[i : i + 1].to(device, dtype),
                    height=height, width=width,
                    num_inference_steps=self.inference_steps, guidance_scale=self.guidance_scale,
                    num_images_per_prompt=self.num_images,
                    generator=torch.Generator(device=device).manual_seed(self.seed + i),
                    output_type="latent",
                ).images
            # Decode in fp32 outside autocast: SDXL's VAE overflows in fp16 (black/NaN images).
            images = pipe.image_processor.postprocess(_decode(vae, latents), output_type="pil")
            row = [cond] + list(images)
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
