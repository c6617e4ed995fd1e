"""Aspect-ratio buckets: the target sizes of a multi-aspect cache, and which one an image gets.

SDXL was fine-tuned on buckets of about 1024² pixels with sides in multiples of 64 (SDXL paper,
section 2.3 and appendix I); a batch holds one bucket, and the bucket is the `target_size` of SDXL's
micro-conditioning. This module owns:

- the bucket sets: `sdxl` (the nine sizes SDXL is usually run at: 1024x1024, 1152x896, 1216x832,
  1344x768, 1536x640 and their transposes), `sdxl-full` (the 41 sizes of the paper's appendix, up
  to 4:1), or an explicit list `"HxW,HxW,..."` (height first, like every size in this project);
- scaling a preset to another resolution: each side times resolution/1024, rounded to the nearest
  multiple of the bucket step, sizes that collapse onto each other kept once;
- the step: by default the smallest multiple of the model's granularity that is >= 64 *
  resolution / 1024, so 64 at 1024 as SDXL has it, and 32 at 512, where every SDXL bucket halves
  exactly. The granularity is what the UNet needs so that adapter features meet its down blocks:
  vae_scale_factor * 2 ** (number of UNet down blocks - 1), 32 for SDXL;
- choosing: the bucket nearest an image's aspect ratio in log space (`nearest_bucket`), and how far
  off it is (`aspect_mismatch`, which `max_aspect` bounds: the crop keeps 1/mismatch of the
  resized image's area). Comparisons are exact (fractions), so ties never depend on rounding.

Geometry (resize so the bucket is covered, then crop) lives in `precompute.preprocess`.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

# (h, w) pairs at 1024 px. SDXL's commonly used set (the list) ...
SDXL_BUCKETS: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (896, 1152), (1152, 896),
    (832, 1216), (1216, 832),
    (768, 1344), (1344, 768),
    (640, 1536), (1536, 640),
)
# ... and every size of the SDXL paper's multi-aspect fine-tuning table (appendix I), 4:1 to 1:4.
_SDXL_LANDSCAPE = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
    (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024),
)
SDXL_FULL_BUCKETS: tuple[tuple[int, int], ...] = (
    _SDXL_LANDSCAPE + ((1024, 1024),) + tuple((w, h) for h, w in reversed(_SDXL_LANDSCAPE))
)
PRESETS: dict[str, tuple[tuple[int, int], ...]] = {"sdxl": SDXL_BUCKETS, "sdxl-full": SDXL_FULL_BUCKETS}
PRESET_RESOLUTION = 1024  # the resolution the presets are written for
PRESET_STEP = 64  # their side granularity at that resolution
# SDXL's UNet has 3 down blocks (2 downsamplers): used when the model's UNet config is unreadable.
DEFAULT_UNET_DOWN_BLOCKS = 3

_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def vae_scale_factor(block_out_channels) -> int:
    """Pixels per latent cell of a diffusers VAE: one downsample per encoder block but the last,
    as diffusers' pipelines compute it (8 for SDXL's 4 blocks)."""
    return 2 ** (len(block_out_channels) - 1)


def model_granularity(vae_scale_factor: int, unet_down_blocks: int | None = None) -> int:
    """Pixels an image side must be a multiple of for this model: the coarsest UNet feature the
    adapter feeds has stride vae_scale_factor * 2 ** (down blocks - 1) (32 for SDXL)."""
    blocks = DEFAULT_UNET_DOWN_BLOCKS if unet_down_blocks is None else unet_down_blocks
    return vae_scale_factor * 2 ** max(0, blocks - 1)


def auto_step(resolution: int, granularity: int) -> int:
    """The smallest multiple of `granularity` >= 64 * resolution / 1024 (64 at 1024 for SDXL)."""
    wanted = Fraction(PRESET_STEP * resolution, PRESET_RESOLUTION)
    return max(1, math.ceil(wanted / granularity)) * granularity


def parse_sizes(spec: str) -> list[tuple[int, int]] | None:
    """'1024x1024, 832x1216' -> [(1024, 1024), (832, 1216)] (height x width); None if malformed."""
    out = []
    for part in spec.split(","):
        m = _SIZE.match(part)
        if m is None:
            return None
        out.append((int(m.group(1)), int(m.group(2))))
    return out or None


def _by_aspect(sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Distinct sizes, tallest aspect first (then larger area first): a stable, readable order."""
    unique = list(dict.fromkeys(sizes))
    return sorted(unique, key=lambda s: (Fraction(s[1], s[0]), -s[0] * s[1]))


def scale_size(size: tuple[int, int], resolution: int, step: int) -> tuple[int, int]:
    """A preset size (at 1024) for `resolution`: each side * resolution / 1024, rounded half up to a
    multiple of `step`, at least one step. Exact integer arithmetic."""
    def side(x: int) -> int:
        n = (2 * x * resolution + PRESET_RESOLUTION * step) // (2 * PRESET_RESOLUTION * step)
        return max(1, n) * step

    return side(size[0]), side(size[1])


def bucket_problems(spec: str | None, resolution: int, step: int | None, granularity: int) -> list[str]:
    """Every problem with these bucket settings (empty when valid)."""
    if spec is None or spec == "none":
        return [] if step is None else ["--bucket-step only applies with --buckets"]
    p: list[str] = []
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 1):
        p.append(f"--bucket-step must be a positive integer, got {step!r}")
    elif step is not None and step % granularity:
        p.append(
            f"--bucket-step {step} is not a multiple of {granularity} px, the model's granularity (VAE factor x "
            f"2^(UNet down blocks - 1)): adapter features would not meet the UNet's; try "
            f"{max(1, round(step / granularity)) * granularity}"
        )
    if spec in PRESETS:
        return p
    sizes = parse_sizes(spec)
    if sizes is None:
        return p + [
            f"--buckets must be none, {', '.join(PRESETS)} or a list of HEIGHTxWIDTH sizes like "
            f"'1024x1024,832x1216', got {spec!r}"
        ]
    bad = [f"{h}x{w}" for h, w in sizes if h < 1 or w < 1 or h % granularity or w % granularity]
    if bad:
        p.append(f"--buckets sizes {bad} are not positive multiples of {granularity} px, the model's granularity")
    return p


def resolve_buckets(
    spec: str | None, resolution: int, *, step: int | None = None, granularity: int = 32
) -> list[tuple[int, int]] | None:
    """The bucket sizes (h, w) for `spec` at `resolution`, tallest first; None without buckets.

    A preset is scaled from 1024 px (see `scale_size`); an explicit list is used as given.
    Raises ValueError listing every problem.
    """
    problems = bucket_problems(spec, resolution, step, granularity)
    if problems:
        raise ValueError("invalid bucket settings: " + "; ".join(problems))
    if spec is None or spec == "none":
        return None
    if spec in PRESETS:
        s = auto_step(resolution, granularity) if step is None else step
        return _by_aspect([scale_size(size, resolution, s) for size in PRESETS[spec]])
    sizes = parse_sizes(spec)
    assert sizes is not None
    return _by_aspect(sizes)


def aspect_mismatch(image_size: tuple[int, int], bucket: tuple[int, int]) -> Fraction:
    """How much more elongated (either way) the image is than the bucket, >= 1, exact.

    Resized to cover the bucket, the image keeps 1/mismatch of its area in the crop.
    """
    (h, w), (bh, bw) = image_size, bucket
    r = Fraction(w * bh, h * bw)  # image aspect / bucket aspect
    return r if r >= 1 else 1 / r


def nearest_bucket(image_size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's in log space (smallest mismatch);
    ties go to the earlier bucket in `buckets`."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    best, best_m = buckets[0], aspect_mismatch(image_size, buckets[0])
    for b in buckets[1:]:
        m = aspect_mismatch(image_size, b)
        if m < best_m:
            best, best_m = b, m
    return best


def resize_to_cover(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the smallest resize of `size` (aspect kept) that covers `target`.

    The side that limits is set exactly to the target's; the other is truncated as torchvision's
    Resize does, int(target_side * other / side), which never falls below the target's (the
    comparison that picks the limiting side is exact). For a square target this is exactly
    torchvision's Resize(side): the short side becomes `side`, the long one truncated.
    """
    (h, w), (th, tw) = size, target
    if tw * h >= th * w:  # width limits (tw / w >= th / h): scale by tw / w
        return int(tw * h / w), tw
    return th, int(th * w / h)


def bucket_label(size: tuple[int, int] | list[int]) -> str:
    """'832x1216' (height x width), the manifest's name for a bucket."""
    return f"{int(size[0])}x{int(size[1])}"
