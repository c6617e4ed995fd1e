"""The sample layout: the one definition both stages use.

One sample is one group of tar members sharing a key (the stem):

    <key>.safetensors   latent_mean, latent_std (C x h x w, already times the VAE scaling
                        factor), prompt_embeds (k x 77 x D), pooled_prompt_embeds (k x P)
    <key>.cond.png      conditioning image, RGB, lossless, same geometry as the latent
    <key>.json          captions, original_size, crop_top_left, target_size, source_id, flip

Everything here is pure bytes <-> tensors; no file or network access. Tensors are parsed with
safetensors and PNGs with PIL; nothing is ever unpickled. torch is imported where a tensor is
made or read, not with this module: what only reads a manifest (`shards ls`, `make train`'s look
at its cache) starts without it.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from . import limits
from .errors import ShardError

if TYPE_CHECKING:
    import torch

FORMAT = "sdxl-adapter-cache"
FORMAT_VERSION = 1  # the shards' and samples' layout (recorded in the identity)
# manifest.json's layout. 2: the identity section is the one place of the latent, text, geometry
# and dtype facts (1 repeated them at the top level; still read).
MANIFEST_VERSION = 2
MANIFEST_VERSIONS_READ = (1, 2)

TENSOR_MEMBER = "safetensors"
COND_MEMBER = "cond.png"
META_MEMBER = "json"
MEMBERS = (TENSOR_MEMBER, COND_MEMBER, META_MEMBER)

LATENT_MEAN = "latent_mean"
LATENT_STD = "latent_std"
PROMPT_EMBEDS = "prompt_embeds"
POOLED_PROMPT_EMBEDS = "pooled_prompt_embeds"

# latent_store modes: "mean_std" keeps the whole posterior (train draws mean + std * eps every
# step, exactly as the reference's latent_dist.sample()); "mean" halves latent bytes.
LATENT_STORES = ("mean_std", "mean")

# The dtype names every flag, identity and manifest uses (and the only dtypes a cache stores).
DTYPES = ("bf16", "fp16", "fp32")


def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_of(dtype: str | torch.dtype) -> torch.dtype:
    """'bf16' | 'fp16' | 'fp32' or one of those torch dtypes -> the torch dtype; ValueError otherwise."""
    named = _torch_dtypes()
    if isinstance(dtype, str):
        if dtype not in named:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
        return named[dtype]
    if dtype in named.values():
        return dtype
    raise ValueError(f"unsupported dtype {dtype!r}; expected one of {list(DTYPES)} or the matching torch dtype")


def dtype_name(dtype: torch.dtype) -> str | None:
    """The name ('bf16', 'fp16', 'fp32') of a dtype a cache stores; None for any other."""
    return next((name for name, d in _torch_dtypes().items() if d == dtype), None)


EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
MANIFEST_FILE = "manifest.json"
IDENTITY_FILE = "identity.json"
SHARD_DIR = "shards"
RECORD_DIR = "records"


class SampleError(ShardError, ValueError):
    """A sample whose members are missing, unknown or malformed. The message names the key."""


def shard_name(index: int) -> str:
    """Relative path of output shard `index` inside a cache."""
    return f"{SHARD_DIR}/shard-{index:06d}.tar"


def record_name(index: int) -> str:
    """Relative path of the per-shard record (its 'done' marker, written after the shard)."""
    return f"{RECORD_DIR}/shard-{index:06d}.json"


def index_of(rel: str, folder: str = SHARD_DIR) -> int | None:
    """The index of `rel` when it is exactly `shard_name(i)` (folder SHARD_DIR) or `record_name(i)`
    (RECORD_DIR), else None: any other file there is not the cache's to judge."""
    name = rel.removeprefix(f"{folder}/")
    digits = name.removeprefix("shard-").removesuffix(".tar" if folder == SHARD_DIR else ".json")
    if not digits.isdigit():
        return None
    index = int(digits)
    return index if (shard_name if folder == SHARD_DIR else record_name)(index) == rel else None


def sample_key(shard_index: int, position: int) -> str:
    """Deterministic key of the `position`-th source item of planned shard `shard_index`.

    Keys depend only on the plan (not on which items were skipped), so a resumed or
    multi-process run produces the same keys as a single uninterrupted one.
    """
    return f"{shard_index:06d}-{position:06d}"


# The largest pixel size or offset a sample's json may state. These numbers become SDXL's
# add_time_ids, a float32 tensor, which holds whole numbers exactly only up to 2**24; no image
# precompute can decode comes near it (PIL refuses anything over ~179 megapixels).
MAX_SIDE = 1 << 24


def _size_pair(d: dict, name: str, *, low: int) -> tuple[int, int]:
    """d[name] as two whole numbers in [low, MAX_SIDE]; ValueError saying what is wrong otherwise.
    JSON floats (1024.0, Infinity, NaN, 1e400), strings and booleans are refused, never rounded."""
    value = d[name]
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{name} must be two whole numbers [h, w], got {value!r:.80}")
    if not all(low <= v <= MAX_SIDE for v in value):
        raise ValueError(f"{name} {value!r:.80} is outside [{low}, {MAX_SIDE}] (add_time_ids must be sane pixel "
                         "sizes)")
    return value[0], value[1]


def crop_problem(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                 target_size: tuple[int, int]) -> str | None:
    """Why this crop cannot come from precompute, or None.

    Precompute resizes the image of `original_size` to the smallest size that covers
    `target_size` with its aspect kept (`precompute.buckets.resize_to_cover`: the limiting side
    becomes the target's exactly, the other is scaled and truncated) and crops `target_size` out
    of that resize at `crop_top_left`; flipped views and extra random crops stay inside the same
    resize. So the crop starts at 0 along the limiting side and ends within the scaled other side
    (one pixel of slack for rounding). The crop need not lie inside `original_size`: small images
    are upscaled first. Exact integer arithmetic, so any size is safe.
    """
    (h, w), (top, left), (th, tw) = original_size, crop_top_left, target_size
    if tw * h >= th * w:  # the width limits: resized to (tw * h / w, tw)
        fits = left == 0 and (top + th - 1) * w <= tw * h
        resized = f"{tw * h // w}x{tw}"
    else:  # the height limits: resized to (th, th * w / h)
        fits = top == 0 and (left + tw - 1) * h <= th * w
        resized = f"{th}x{th * w // h}"
    if fits:
        return None
    return (f"crop_top_left {list(crop_top_left)} with target_size {list(target_size)} does not fit in original_size "
            f"{list(original_size)} resized to cover the target ({resized})")


@dataclass
class SampleMeta:
    key: str
    source_id: str
    captions: list[str]
    original_size: tuple[int, int]  # (h, w) of the image as decoded, after EXIF orientation
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target_size: tuple[int, int]  # (h, w) of the crop = latent size * VAE factor
    flip: bool = False
    extra: dict = field(default_factory=dict)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["original_size"] = list(self.original_size)
        d["crop_top_left"] = list(self.crop_top_left)
        d["target_size"] = list(self.target_size)
        return json.dumps(d, sort_keys=True, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, key: str) -> "SampleMeta":
        try:
            d = limits.loads(data, f"sample {key}: {META_MEMBER} member", "SHARDS_MAX_JSON_MEMBER_BYTES")
            if not isinstance(d["captions"], list) or not all(isinstance(c, str) for c in d["captions"]):
                raise ValueError(f"captions must be a list of strings, got {str(d['captions'])[:80]}")
            if not isinstance(d.get("flip", False), bool):
                raise ValueError(f"flip must be true or false, got {d['flip']!r:.40}")
            meta = cls(
                key=str(d["key"]),
                source_id=str(d["source_id"]),
                captions=[str(c) for c in d["captions"]],
                original_size=_size_pair(d, "original_size", low=1),
                crop_top_left=_size_pair(d, "crop_top_left", low=0),
                target_size=_size_pair(d, "target_size", low=1),
                flip=bool(d.get("flip", False)),
                extra=dict(d.get("extra", {})),
            )
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise SampleError(f"sample {key}: bad {META_MEMBER} member: {e}") from e
        problem = crop_problem(meta.original_size, meta.crop_top_left, meta.target_size)
        if problem:
            raise SampleError(f"sample {key}: bad {META_MEMBER} member: {problem}")
        return meta

    @property
    def add_time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL micro-conditioning: original_size + crop_top_left + target_size, (h, w) order."""
        return (*self.original_size, *self.crop_top_left, *self.target_size)


@dataclass
class Sample:
    meta: SampleMeta
    latent_mean: torch.Tensor  # (C, h, w)
    latent_std: torch.Tensor | None  # (C, h, w) or None when the cache stores the mean only
    prompt_embeds: torch.Tensor  # (k, 77, D)
    pooled_prompt_embeds: torch.Tensor  # (k, P)
    cond_png: bytes  # lossless PNG, RGB, (h * f, w * f)

    @property
    def key(self) -> str:
        return self.meta.key

    def cond_image(self, expected_size: tuple[int, int] | None = None) -> np.ndarray:
        """Decode the conditioning image to uint8 (H, W, 3) (see `decode_png` for `expected_size`)."""
        return decode_png(self.cond_png, self.key, expected_size=expected_size)


def encode_png(rgb: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes. Fixed compression level and no metadata: same input, same bytes."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def png_size(data: bytes, key: str = "?") -> tuple[int, int]:
    """(h, w) of a PNG from its header alone: PIL parses the header on open and decodes nothing
    until asked, so a hostile 13000 x 13000 image costs nothing here."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                raise SampleError(f"sample {key}: {COND_MEMBER} is {im.format}, not PNG")
            return im.height, im.width
    except SampleError:
        raise
    except Exception as e:  # PIL raises many types for broken data
        raise SampleError(f"sample {key}: cannot decode {COND_MEMBER}: {e}") from e


def decode_png(data: bytes, key: str = "?", *, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """PNG bytes -> uint8 (H, W, 3). With `expected_size` (h, w) the size in the PNG header is
    checked before any pixel is decoded, so a hostile 13000 x 13000 image costs nothing."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                raise SampleError(f"sample {key}: {COND_MEMBER} is {im.format}, not PNG")
            if expected_size is not None and (im.height, im.width) != tuple(expected_size):
                raise SampleError(f"sample {key}: {COND_MEMBER} is {im.height}x{im.width}, the latent needs "
                                  f"{expected_size[0]}x{expected_size[1]}")
            # IHDR, the first chunk: bit depth at byte 24, colour type at 25 (2: truecolour). A
            # writer stores 8-bit RGB only; any other layout would be converted silently (16-bit
            # values clipped, a palette's indices mapped), so it is refused as not written here.
            if data[24:26] != b"\x08\x02" or im.mode != "RGB":
                raise SampleError(f"sample {key}: {COND_MEMBER} is not an 8-bit RGB PNG (mode {im.mode}, bit depth "
                                  f"{data[24] if len(data) > 24 else '?'}): a cache stores only those")
            return np.array(im)
    except SampleError:
        raise
    except Exception as e:  # PIL raises many types for broken data
        raise SampleError(f"sample {key}: cannot decode {COND_MEMBER}: {e}") from e


def encode_sample(sample: Sample, dtype: torch.dtype | str = "bf16") -> dict[str, bytes]:
    """Sample -> {member suffix: bytes}. Tensors are stored contiguous in `dtype`."""
    from safetensors.torch import save as st_save

    dtype = dtype_of(dtype)
    tensors = {
        LATENT_MEAN: sample.latent_mean,
        PROMPT_EMBEDS: sample.prompt_embeds,
        POOLED_PROMPT_EMBEDS: sample.pooled_prompt_embeds,
    }
    if sample.latent_std is not None:
        tensors[LATENT_STD] = sample.latent_std
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    validate_tensors(tensors, sample.key)
    return {
        TENSOR_MEMBER: st_save(tensors),
        COND_MEMBER: sample.cond_png,
        META_MEMBER: sample.meta.to_json(),
    }


def validate_tensors(tensors: dict[str, torch.Tensor], key: str) -> None:
    """Shape rules every sample must satisfy, whatever the model size."""
    for name in (LATENT_MEAN, PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS):
        if name not in tensors:
            raise SampleError(f"sample {key}: tensor {name!r} missing")
    unknown = set(tensors) - {LATENT_MEAN, LATENT_STD, PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS}
    if unknown:
        raise SampleError(f"sample {key}: unknown tensors {sorted(unknown)}")
    mean = tensors[LATENT_MEAN]
    if mean.ndim != 3:
        raise SampleError(f"sample {key}: {LATENT_MEAN} must be (C, h, w), got {tuple(mean.shape)}")
    std = tensors.get(LATENT_STD)
    if std is not None and std.shape != mean.shape:
        raise SampleError(f"sample {key}: {LATENT_STD} {tuple(std.shape)} != {LATENT_MEAN} {tuple(mean.shape)}")
    pe, pooled = tensors[PROMPT_EMBEDS], tensors[POOLED_PROMPT_EMBEDS]
    if pe.ndim != 3 or pooled.ndim != 2 or pe.shape[0] != pooled.shape[0] or pe.shape[0] < 1:
        raise SampleError(
            f"sample {key}: {PROMPT_EMBEDS} must be (k, L, D) and {POOLED_PROMPT_EMBEDS} (k, P) with the "
            f"same k >= 1, got {tuple(pe.shape)} and {tuple(pooled.shape)}"
        )


def decode_sample(key: str, members: dict[str, bytes]) -> Sample:
    """{member suffix: bytes} -> Sample. Rejects missing and unknown members (never unpickles)."""
    missing = [m for m in MEMBERS if m not in members]
    if missing:
        raise SampleError(f"sample {key}: missing members {missing}")
    unknown = sorted(set(members) - set(MEMBERS))
    if unknown:
        raise SampleError(f"sample {key}: unknown members {unknown} (only {list(MEMBERS)} are allowed)")
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(members[TENSOR_MEMBER])
    except Exception as e:
        raise SampleError(f"sample {key}: cannot parse {TENSOR_MEMBER} member: {e}") from e
    validate_tensors(tensors, key)
    meta = SampleMeta.from_json(members[META_MEMBER], key)
    if meta.key != key:
        raise SampleError(f"sample {key}: {META_MEMBER} says key {meta.key!r}")
    return Sample(
        meta=meta,
        latent_mean=tensors[LATENT_MEAN],
        latent_std=tensors.get(LATENT_STD),
        prompt_embeds=tensors[PROMPT_EMBEDS],
        pooled_prompt_embeds=tensors[POOLED_PROMPT_EMBEDS],
        cond_png=members[COND_MEMBER],
    )


def split_member_name(name: str) -> tuple[str, str]:
    """'000001-000002.cond.png' -> ('000001-000002', 'cond.png'). Keys never contain dots."""
    key, dot, suffix = name.partition(".")
    if not dot or not key or not suffix:
        raise SampleError(f"tar member {name!r} is not <key>.<member>")
    return key, suffix
