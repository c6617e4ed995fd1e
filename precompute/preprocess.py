"""Preprocessing: raw image bytes -> model-ready pixels and a conditioning image of the same geometry.

This module owns everything between a `RawItem` (encoded bytes + captions, from `sources`) and the
encoders:

- `load_rgb`: decode fully (truncated or corrupt files are caught here, not in the VAE), apply the
  EXIF orientation, convert every PIL mode to 8-bit RGB (alpha composited on white, 16-bit and
  float images rescaled rather than clipped).
- `plan_geometry` / `apply_geometry`: the reference transform of diffusers'
  `train_t2i_adapter_sdxl.py` — torchvision `Resize(resolution, BILINEAR)` on a PIL image, then
  `CenterCrop(resolution)` — reproduced exactly (same integer rounding, same PIL resampling), with a
  seeded random crop as an option. The plan is data (`Geometry`) so that it can be recorded as
  SDXL's micro-conditioning (`original_size`, `crop_top_left`, `target_size`) and applied
  identically to the conditioning image. With aspect-ratio buckets (`precompute.buckets`) the
  target is the bucket nearest the image's aspect ratio instead of a square, and the resize is the
  smallest that covers it; for a square target that is exactly the reference's resize.
- `plan_views`: the extra views a cache may store per image (`--crops K` other random crops of the
  same bucket, `--flip` mirror images whose crop_top_left follows the flip), all as `Geometry`.
- `prepare_views`: ties it together and turns every per-item problem into
  `Skip(reason, detail)`; the reason is a slug from `SKIP_REASONS`, counted in the manifest, and
  the detail names the file. The conditioning image of each view is the dataset's, put through the
  view's geometry, or computed from the view's own pixels (`precompute.conditions`).

Per-item problems raise `Skip`; invalid settings (a resolution not divisible by the VAE factor, an
unknown crop mode) raise `ValueError`, because they are the caller's bug, not the data's.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from precompute.buckets import (
    aspect_mismatch,
    bucket_label,
    nearest_bucket,
    resize_to_cover,
)
from precompute.conditions import ConditionSpec, compute_condition
from precompute.sources import RawItem

# PIL warns (UserWarning) about oddities of files it still decodes (damaged EXIF, palette
# transparency): about the user's inputs, not the run, and printed with PIL's source paths. An item
# that cannot be decoded is skipped with its reason, which is what the log says.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")

# Every reason a source item can be skipped for. Slugs are stable: they are counted per shard in
# the manifest and `--strict` reports them, so renaming one is a format change.
SKIP_REASONS: dict[str, str] = {
    "metadata_invalid": "a metadata row (or a tar sample's .json member) could not be parsed or has no image path",
    "image_missing": "the image file or tar member does not exist",
    "image_unreadable": "the image file exists but could not be read (permissions, I/O error), or is not a regular "
                        "file (a FIFO, a device, a socket, a folder)",
    "image_outside_root": "the image file's real path is outside the dataset folder (a symlink pointing out, a ../ "
                          "escape, an absolute path elsewhere) and --follow-symlinks was not given",
    "image_empty": "the image file has zero bytes",
    "image_corrupt": "the image could not be decoded: not an image, truncated, or broken EXIF",
    "image_too_large": "the image is over --max-input-bytes, over --max-image-pixels (checked from its header, "
                       "before decoding), or over PIL's decompression-bomb pixel limit",
    "image_too_small": "the image's shortest side is below min_size",
    "aspect_extreme": "the image's long/short side ratio exceeds max_aspect",
    "cond_missing": "the conditioning image file or tar member does not exist",
    "cond_unreadable": "the conditioning image exists but could not be read, or is not a regular file",
    "cond_outside_root": "the conditioning image's real path is outside the dataset folder and --follow-symlinks was "
                         "not given",
    "cond_empty": "the conditioning image has zero bytes",
    "cond_corrupt": "the conditioning image could not be decoded",
    "cond_too_large": "the conditioning image is over --max-input-bytes, --max-image-pixels or PIL's "
                      "decompression-bomb limit",
    "cond_size_mismatch": "the conditioning image's aspect ratio differs from the image's",
    "caption_missing": "no caption, or only empty / whitespace-only captions",
    "caption_invalid": "the caption is neither a string nor a list of strings, or not UTF-8",
    "tar_corrupt": "an input tar is malformed or truncated (items after the damage are lost)",
    "tar_unreadable": "an input tar could not be opened or read",
    "latent_nonfinite": "the VAE encoded the image (one of its views) to inf/NaN (e.g. fp16 overflow)",
    "duplicate": "the item repeats an earlier one (the same inputs, or the same file / tar key) and --dedupe drops it",
}

CROP_MODES = ("center", "random")
# Views multiply storage (every view is a full sample) and read I/O per epoch; more than this many
# crops of one image is almost certainly a mistake.
MAX_CROPS = 16
# A 4:1 image keeps a quarter of its area in a square crop; beyond that the crop is mostly not the
# picture the caption describes (a 10:1 panorama keeps a tenth).
DEFAULT_MAX_ASPECT = 4.0
# Images whose shortest side is below resolution / 4 are skipped by default: the SDXL paper's cut
# (256 px at 1024) — upscaled further, the target is mostly interpolation blur.
DEFAULT_MIN_SIZE_DIVISOR = 4
# A conditioning image whose aspect ratio is within 2% of the image's (or that differs only by
# rounding of its own pixel dimensions) is the same picture at another scale and is resampled
# straight to the image's resized size; anything else would misalign condition and target.
COND_ASPECT_TOLERANCE = 0.02
# Pixels an image (or conditioning image) may have, checked from its header before any pixel is
# decoded: 64 MP is over 8000 x 8000, far above what any crop of it keeps, and a decoded RGB
# copy of it is ~190 MB per worker thread. (PIL's own bomb limit, ~179 MP, still applies above.)
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
# Captions: characters kept per caption (SDXL's text encoders see 77 tokens, a few hundred
# characters; the rest only costs tokenizer time; the default of precompute's --max-caption-chars)
# and captions kept per item (each is encoded and stored). Over these, captions are cut or dropped
# and the item is kept, counted as the shard record's caption_truncated / captions_dropped notes.
MAX_CAPTION_CHARS = 4096
MAX_CAPTIONS_PER_ITEM = 64


class Skip(Exception):
    """This item cannot be used. `reason` is a slug from SKIP_REASONS; `detail` names the file."""

    def __init__(self, reason: str, detail: str):
        if reason not in SKIP_REASONS:
            # A programming error: reasons are counted in manifests and must stay a closed set.
            raise ValueError(f"unknown skip reason {reason!r} ({detail}); add it to SKIP_REASONS")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Geometry:
    """Where the training pixels come from, in SDXL micro-conditioning terms. All pairs are (h, w).

    The image of `original_size` (after EXIF orientation) is resized to `resize_size`, mirrored
    left-right if `flip`, then cropped to `target_size` at `crop_top_left` (top, left), which is
    measured in that resized (and, for a flipped view, mirrored) image.
    """

    original_size: tuple[int, int]
    resize_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    flip: bool = False

    def __post_init__(self) -> None:
        (rh, rw), (top, left), (th, tw) = self.resize_size, self.crop_top_left, self.target_size
        if not (0 <= top <= rh - th and 0 <= left <= rw - tw):
            raise ValueError(f"crop {self.target_size} at {self.crop_top_left} does not fit in {self.resize_size}")

    @property
    def add_time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's `add_time_ids`: original_size + crop_top_left + target_size."""
        return (*self.original_size, *self.crop_top_left, *self.target_size)

    def mirrored(self) -> "Geometry":
        """The same pixels flipped left-right; the crop's left edge follows the flip."""
        left = self.resize_size[1] - self.crop_top_left[1] - self.target_size[1]
        return replace(self, crop_top_left=(self.crop_top_left[0], left), flip=not self.flip)


@dataclass
class Prepared:
    source_id: str
    captions: list[str]
    pixels: torch.Tensor  # (3, H, W) float32 in [-1, 1], the VAE input
    cond: np.ndarray  # uint8 (H, W, 3), same geometry as `pixels`
    geometry: Geometry
    # True when the conditioning image had another pixel size than the image (same aspect ratio)
    # and was resampled to the image's geometry; worth a warning, not a skip.
    cond_resized: bool = False
    # The image and its conditioning image carry different EXIF orientations (each is turned
    # upright by its own, as viewers and `datasets` do): kept, and noted, since a conditioning
    # image made from the image's stored pixels is then turned differently from it.
    orientation_differs: bool = False
    view: int = 0  # index among the item's stored views (0: the primary view)
    # Per caption: True when it was cut to max_caption_chars; and captions dropped over the
    # per-item cap. Kept-but-altered, counted as notes in the shard record.
    captions_cut: list[bool] = field(default_factory=list)
    captions_dropped: int = 0
    view_info: dict = field(default_factory=lambda: {"crop": 0, "flip": False})


# --------------------------------------------------------------------------------------- decoding


def load_rgb(data: bytes | None, what: str, name: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Encoded bytes -> fully decoded RGB image, EXIF orientation applied.

    `what` is "image" or "cond" and prefixes the skip reason (image_corrupt / cond_corrupt...);
    `name` (a file path or tar key) goes into every skip detail. An image of more than
    `max_pixels` pixels (None: no cap) is skipped from its header, before decoding.
    """
    if what not in ("image", "cond"):
        raise ValueError(f"what must be 'image' or 'cond', got {what!r}")
    if data is None:
        raise Skip(f"{what}_missing", f"{name}: no data")
    if len(data) == 0:
        raise Skip(f"{what}_empty", f"{name}: file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            # Image.open parsed only the header: refuse a huge image before a pixel is decoded.
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise Skip(f"{what}_too_large", f"{name}: {w}x{h} px = {w * h:,} pixels, over --max-image-pixels "
                                                f"{max_pixels:,} (checked before decoding)")
            # Decode every pixel now: Image.open only parses the header, and a truncated file
            # otherwise fails later (or, with LOAD_TRUNCATED_IMAGES, silently grey-fills).
            im.load()
            orientation = exif_orientation(im)
            oriented = ImageOps.exif_transpose(im)
    except Skip:
        raise
    except Image.DecompressionBombError as e:
        raise Skip(f"{what}_too_large", f"{name}: {e}") from None
    except UnidentifiedImageError:
        raise Skip(f"{what}_corrupt", f"{name}: not a recognised image format ({len(data)} bytes)") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for bad data
        raise Skip(f"{what}_corrupt", f"{name}: cannot decode: {type(e).__name__}: {e}") from None
    try:
        rgb = to_rgb(oriented)
    except Exception as e:
        raise Skip(f"{what}_corrupt", f"{name}: cannot convert mode {oriented.mode} to RGB: {e}") from None
    rgb.info[ORIENTATION_INFO] = orientation  # what was applied: an image and its condition should agree
    return rgb


ORIENTATION_INFO = "exif_orientation"


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 to 8; 1, upright, when absent or unreadable)."""
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # damaged EXIF: exif_transpose then leaves the image as stored as well
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _orientation_hint(image: int, cond: int) -> str:
    return (f"; the image is turned upright by its EXIF orientation {image}, the conditioning image by "
            f"{cond if cond != 1 else 'none'} (images are read as any viewer shows them): make the conditioning "
            "image from the upright image, or strip the orientation from both")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited on white; high bit depths are rescaled."""
    if im.mode == "RGB" and not im.has_transparency_data:
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit grayscale (PNG/TIFF open as I;16). PIL's own convert("L") clips at 255, which
        # turns a 16-bit photo white; scale 0..65535 onto 0..255 with rounding instead.
        return _gray_to_rgb(_rescale(np.clip(np.asarray(im).astype(np.int64), 0, 65535), 65535))
    if im.mode == "I":
        # 32-bit integer grayscale: 16-bit PNGs on some Pillow versions, TIFFs of 8- or 16-bit
        # data. Values all within 0..255 are read as 8-bit (under the 16-bit reading they would be
        # black); otherwise as 16-bit, as above, clipped (negative values are black).
        a = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        if a.size and a.max() <= 255:
            return _gray_to_rgb(a.astype(np.uint8))
        return _gray_to_rgb(_rescale(a, 65535))
    if im.mode == "F":
        # Float images (depth maps, scientific TIFFs) come either in [0, 1] or in 0..255 (PIL's
        # own convention). An image whose values all lie in [0, 1] is read as the former; under the
        # 0..255 reading it would be black anyway, so the guess never hides a real picture.
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if a.size and a.max() <= 1.0 and a.min() >= 0.0:
            a = a * 255.0
        return _gray_to_rgb(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if im.mode == "La":  # premultiplied alpha: un-premultiply first (PIL converts La only to LA)
        im = im.convert("LA")
    if im.has_transparency_data:
        # LA, PA, RGBA, RGBa, P or L/RGB with a tRNS entry. convert("RGBA") resolves palettes
        # and transparency keys; composite on white as (c * a + 255 * (255 - a)) / 255, rounded.
        rgba = np.asarray(im.convert("RGBA")).astype(np.uint32)
        alpha = rgba[..., 3:4]
        rgb = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX: PIL's conversions are the standard ones.
    return im.convert("RGB")


def _rescale(a: np.ndarray, full: int) -> np.ndarray:
    """Integers in 0..full onto 0..255, rounded half up."""
    return ((a * 255 + full // 2) // full).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), mode="RGB")


# --------------------------------------------------------------------------------------- geometry


def geometry_problems(
    *,
    resolution: int,
    crop: str = "center",
    vae_scale_factor: int = 8,
    min_size: int | None = None,
    max_aspect: float | None = DEFAULT_MAX_ASPECT,
) -> list[str]:
    """Every problem with these settings (empty when valid), for a config to report in one error."""
    problems = []
    if not isinstance(vae_scale_factor, int) or vae_scale_factor < 1:
        problems.append(f"vae_scale_factor must be a positive integer, got {vae_scale_factor!r}")
    if not isinstance(resolution, int) or resolution < 1:
        problems.append(f"resolution must be a positive integer, got {resolution!r}")
    elif isinstance(vae_scale_factor, int) and vae_scale_factor >= 1 and resolution % vae_scale_factor:
        problems.append(
            f"resolution {resolution} is not divisible by the VAE scale factor {vae_scale_factor} "
            f"(the latent would not cover the crop); try {resolution - resolution % vae_scale_factor}"
        )
    if crop not in CROP_MODES:
        problems.append(f"--crop must be one of {list(CROP_MODES)}, got {crop!r}")
    if min_size is not None and (not isinstance(min_size, int) or min_size < 0):
        problems.append(f"--min-size must be an integer >= 0 (0 = upscale anything) or unset, got {min_size!r}")
    if max_aspect is not None and not (isinstance(max_aspect, (int, float)) and max_aspect >= 1.0):
        problems.append(f"--max-aspect must be a number >= 1, or 0 for no limit, got {max_aspect!r}")
    return problems


def effective_min_size(resolution: int, min_size: int | None) -> int:
    """The shortest side an image needs: min_size, or resolution // 4 when min_size is None."""
    return resolution // DEFAULT_MIN_SIZE_DIVISOR if min_size is None else min_size


def crop_offsets(
    resize_size: tuple[int, int],
    target_size: tuple[int, int],
    crop: str,
    rng: np.random.Generator | None,
) -> tuple[int, int]:
    """(top, left) of a `target_size` crop in a `resize_size` image.

    "center" matches torchvision's center_crop: int(round((h - th) / 2)) with Python's round
    (half to even). "random" draws top and left uniformly from every valid position.
    """
    (rh, rw), (th, tw) = resize_size, target_size
    if th > rh or tw > rw:
        raise ValueError(f"crop {target_size} is larger than the resized image {resize_size}")
    if crop == "center":
        return int(round((rh - th) / 2.0)), int(round((rw - tw) / 2.0))
    if crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs an rng (np.random.Generator), e.g. item_rng(seed, shard, position)")
        return int(rng.integers(0, rh - th + 1)), int(rng.integers(0, rw - tw + 1))
    raise ValueError(f"crop must be one of {list(CROP_MODES)}, got {crop!r}")


def plan_geometry(
    original_size: tuple[int, int],
    resolution: int,
    *,
    crop: str = "center",
    rng: np.random.Generator | None = None,
    vae_scale_factor: int = 8,
    min_size: int | None = None,
    max_aspect: float | None = DEFAULT_MAX_ASPECT,
    name: str = "image",
    buckets: Sequence[tuple[int, int]] | None = None,
) -> Geometry:
    """Plan the transform for an image of `original_size` (h, w, after EXIF).

    The target is a square of `resolution`, or with `buckets` the bucket nearest the image's
    aspect ratio (`buckets.nearest_bucket`). The image is resized so that it just covers the
    target (`buckets.resize_to_cover`; for a square target this is the reference's shortest-side
    resize with torchvision's rounding), then cropped to it (centre, or seeded random).

    `max_aspect` bounds how much more elongated the image is than its target (the crop keeps
    1/ratio of the resized image): for a square target that is the image's long/short ratio;
    with buckets an extreme image first goes to the most extreme bucket and is then held to the
    same bound (10:1 against SDXL's 1536x640 is 4.17 > 4: skipped). None accepts any aspect ratio.
    `min_size` None means resolution // 4, 0 accepts any size. Raises Skip("aspect_extreme" /
    "image_too_small") naming `name`, ValueError for invalid settings.
    """
    problems = geometry_problems(
        resolution=resolution, crop=crop, vae_scale_factor=vae_scale_factor, min_size=min_size, max_aspect=max_aspect
    )
    if problems:
        raise ValueError("invalid geometry settings: " + "; ".join(problems))
    h, w = int(original_size[0]), int(original_size[1])
    if h < 1 or w < 1:
        raise Skip("image_corrupt", f"{name}: image has no pixels ({w}x{h})")
    if buckets is not None:
        bad = [b for b in buckets if b[0] % vae_scale_factor or b[1] % vae_scale_factor or min(b) < 1]
        if not buckets or bad:
            raise ValueError(
                f"buckets must be a non-empty list of (h, w) multiples of {vae_scale_factor}, got {bad or buckets}"
            )
        target_size = tuple(int(x) for x in nearest_bucket((h, w), list(buckets)))
    else:
        target_size = (resolution, resolution)
    short, long = min(h, w), max(h, w)
    mismatch = float(aspect_mismatch((h, w), target_size))
    if max_aspect is not None and mismatch > max_aspect:
        kept = 100.0 / mismatch
        against = "a square crop" if buckets is None else f"its nearest bucket {bucket_label(target_size)} (h x w)"
        raise Skip(
            "aspect_extreme",
            f"{name}: {w}x{h} px is {mismatch:.2f}x more elongated than {against} > max_aspect {max_aspect:g} "
            f"(aspect ratio {long / short:.2f}:1; the crop would keep {kept:.0f}% of it)",
        )
    need = effective_min_size(resolution, min_size)
    if short < need:
        raise Skip(
            "image_too_small",
            f"{name}: {w}x{h} px, shortest side {short} < min_size {need} "
            f"(would be upscaled {resolution / short:.1f}x to {resolution}); set min_size 0 to keep it",
        )
    resize_size = resize_to_cover((h, w), target_size)
    # The latent covers the crop exactly (checked for buckets above, by geometry_problems for squares).
    assert target_size[0] % vae_scale_factor == 0 and target_size[1] % vae_scale_factor == 0
    top_left = crop_offsets(resize_size, target_size, crop, rng)
    return Geometry(original_size=(h, w), resize_size=resize_size, crop_top_left=top_left, target_size=target_size)


def apply_geometry(img: Image.Image, g: Geometry) -> np.ndarray:
    """Resize `img` (any size: a conditioning image may differ) to g.resize_size with PIL's
    BILINEAR (what torchvision's Resize calls on PIL images), mirror if g.flip, crop.
    Returns uint8 (H, W, 3)."""
    rh, rw = g.resize_size
    if img.size != (rw, rh):
        img = img.resize((rw, rh), resample=Image.Resampling.BILINEAR)
    if g.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    (top, left), (th, tw) = g.crop_top_left, g.target_size
    # np.array (not asarray) copies: the result is writable and owns its memory.
    out = np.array(img.convert("RGB"), dtype=np.uint8)[top : top + th, left : left + tw]
    return np.ascontiguousarray(out)


def to_model_input(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1].

    x / 127.5 - 1 is bitwise equal to the reference's ToTensor() + Normalize([0.5], [0.5]) for
    every uint8 value (a test checks all 256).
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if not rgb.flags.writeable:  # torch.from_numpy warns on read-only arrays (e.g. views of PIL images)
        rgb = rgb.copy()
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 127.5 - 1.0


@dataclass(frozen=True)
class ViewSpec:
    """Which views of each image a cache stores: `crops` crops, each also mirrored with `flip`."""

    crops: int = 1
    flip: bool = False

    def problems(self) -> list[str]:
        if not isinstance(self.crops, int) or isinstance(self.crops, bool) or not 1 <= self.crops <= MAX_CROPS:
            return [f"--crops must be an integer in [1, {MAX_CROPS}], got {self.crops!r}"]
        return []

    @property
    def max_views(self) -> int:
        return self.crops * (2 if self.flip else 1)


def plan_views(base: Geometry, spec: ViewSpec, rng: np.random.Generator | None) -> list[tuple[Geometry, dict]]:
    """The geometries of an item's views, in key order, each with {"crop": c, "flip": bool}.

    Crop 0 is `base` (centre or random, as planned). Crops 1..K-1 are random positions of the
    same target in the same resized image, drawn from `rng` after whatever `base` drew; a position
    equal to an earlier crop's is not stored twice (an image with its target's exact aspect ratio
    has one crop). With `flip` each crop is followed by its mirror image, whose crop_top_left
    follows the flip (`Geometry.mirrored`).
    """
    if spec.problems():
        raise ValueError("; ".join(spec.problems()))
    crops = [base]
    if spec.crops > 1:
        if rng is None:
            raise ValueError("crops > 1 needs an rng (np.random.Generator), e.g. item_rng(seed, shard, position)")
        for _ in range(spec.crops - 1):
            top_left = crop_offsets(base.resize_size, base.target_size, "random", rng)
            if all(top_left != c.crop_top_left for c in crops):
                crops.append(replace(base, crop_top_left=top_left))
    out = []
    for c, g in enumerate(crops):
        out.append((g, {"crop": c, "flip": False}))
        if spec.flip:
            out.append((g.mirrored(), {"crop": c, "flip": True}))
    return out


def item_rng(seed: int, shard_index: int, position: int) -> np.random.Generator:
    """The random-crop generator of one item: a pure function of (seed, shard, position), so a
    resumed or multi-process run draws the same crops as one uninterrupted process."""
    return np.random.default_rng([seed, shard_index, position])


# --------------------------------------------------------------------------------------- captions


def bound_captions(
    captions: list[str], *, max_chars: int = MAX_CAPTION_CHARS, max_captions: int = MAX_CAPTIONS_PER_ITEM
) -> tuple[list[str], list[bool], int]:
    """(captions cut to max_chars and at most max_captions of them, which were cut, how many dropped)."""
    kept = captions[:max_captions]
    return [c[:max_chars] for c in kept], [len(c) > max_chars for c in kept], len(captions) - len(kept)


def clean_captions(captions: list[str] | None, *, allow_empty: bool = False, name: str = "item") -> list[str]:
    """Drop empty / whitespace-only captions (order kept); Skip("caption_missing") when none is
    left, unless `allow_empty`, which keeps the item with the single caption "".

    Captions are otherwise returned untouched (`bound_captions` caps their length and number);
    over-long ones are also the tokenizer's business (it truncates at 77 tokens as SDXL does).
    """
    if captions is not None and (not isinstance(captions, list) or not all(isinstance(c, str) for c in captions)):
        raise Skip("caption_invalid", f"{name}: captions must be a list of strings, got {captions!r:.80}")
    kept = [c for c in (captions or []) if c.strip()]
    if kept:
        return kept
    if allow_empty:
        return [""]
    what = "no caption" if not captions else f"only empty captions ({len(captions)})"
    raise Skip("caption_missing", f"{name}: {what}; allow_empty_captions keeps such items with the caption ''")


# --------------------------------------------------------------------------------------- prepare


def _cond_aspect_matches(image_size: tuple[int, int], cond_size: tuple[int, int]) -> bool:
    (h, w), (ch, cw) = image_size, cond_size
    if abs(math.log((w / h) / (cw / ch))) <= COND_ASPECT_TOLERANCE:
        return True
    # Small conditioning images cannot hit the ratio exactly; accept any that differ from the
    # image's shape only by rounding one of their sides.
    return abs(cw - ch * w / h) <= 1.0 or abs(ch - cw * h / w) <= 1.0


def prepare_views(
    item: RawItem,
    *,
    resolution: int,
    crop: str = "center",
    rng: np.random.Generator | None = None,
    vae_scale_factor: int = 8,
    min_size: int | None = None,
    max_aspect: float | None = DEFAULT_MAX_ASPECT,
    allow_empty_captions: bool = False,
    buckets: Sequence[tuple[int, int]] | None = None,
    views: ViewSpec = ViewSpec(),
    condition: ConditionSpec | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_caption_chars: int = MAX_CAPTION_CHARS,
) -> list[Prepared]:
    """RawItem -> one Prepared per view (`plan_views` order), or Skip. Checks run cheapest first
    (source error, captions, decode); the image is decoded once for all views.

    The conditioning image gets exactly each view's geometry. If its pixel size differs but its
    aspect ratio matches (see COND_ASPECT_TOLERANCE), it is resampled straight to the image's
    resized size (one resampling, not two) and `cond_resized` is set; a different aspect ratio is
    Skip("cond_size_mismatch"), since no resize could align it with the image. With `condition`,
    the dataset's conditioning image is not used: each view's is computed from its own pixels.
    Images over `max_image_pixels` are skipped before decoding; captions are bounded by
    `bound_captions` to `max_caption_chars` characters each (the item is kept, `captions_cut` /
    `captions_dropped` say what changed).
    """
    if item.error is not None:
        raise Skip(*item.error)
    name = item.source_id
    captions = clean_captions(item.captions, allow_empty=allow_empty_captions, name=name)
    captions, captions_cut, captions_dropped = bound_captions(captions, max_chars=max_caption_chars)
    if item.image is None:
        raise Skip("image_missing", f"{name}: no image")
    cond_name = item.cond_id or f"{name} (conditioning image)"
    if condition is None and item.cond is None:
        raise Skip("cond_missing", f"{cond_name}: no conditioning image")
    img = load_rgb(item.image, "image", name, max_image_pixels)
    geometry = plan_geometry(
        (img.height, img.width),
        resolution,
        crop=crop,
        rng=rng,
        vae_scale_factor=vae_scale_factor,
        min_size=min_size,
        max_aspect=max_aspect,
        name=name,
        buckets=buckets,
    )
    cond = None
    cond_resized = orientation_differs = False
    if condition is None:
        cond = load_rgb(item.cond, "cond", cond_name, max_image_pixels)
        cond_resized = cond.size != img.size
        turned = (img.info.get(ORIENTATION_INFO, 1), cond.info.get(ORIENTATION_INFO, 1))
        orientation_differs = turned[0] != turned[1]
        if cond_resized and not _cond_aspect_matches((img.height, img.width), (cond.height, cond.width)):
            raise Skip(
                "cond_size_mismatch",
                f"{cond_name}: {cond.width}x{cond.height} px does not have the aspect ratio of the image "
                f"{name} ({img.width}x{img.height} px)" + (_orientation_hint(*turned) if orientation_differs else ""),
            )
        if cond_resized:  # resample once, to the resize every view shares
            rh, rw = geometry.resize_size
            cond = cond.resize((rw, rh), resample=Image.Resampling.BILINEAR)
    if img.size != (geometry.resize_size[1], geometry.resize_size[0]):  # resize once for every view
        img = img.resize((geometry.resize_size[1], geometry.resize_size[0]), resample=Image.Resampling.BILINEAR)
    out = []
    for index, (g, info) in enumerate(plan_views(geometry, views, rng)):
        rgb = apply_geometry(img, g)
        out.append(Prepared(
            source_id=name,
            captions=captions,
            pixels=to_model_input(rgb),
            cond=compute_condition(rgb, condition) if condition is not None else apply_geometry(cond, g),
            geometry=g,
            cond_resized=cond_resized,
            orientation_differs=orientation_differs,
            view=index,
            view_info=info,
            captions_cut=captions_cut,
            captions_dropped=captions_dropped,
        ))
    return out
