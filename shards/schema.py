"""The sample layout: the one definition both stages use.

One sample is one group of tar members sharing a key (the stem):

    <key>.safetensors   latent_mean, latent_std (C x h x w, already times the VAE scaling
                        factor), prompt_embeds (k x 77 x D), pooled_prompt_embeds (k x P)
    <key>.cond.png      conditioning image, RGB, lossless, same geometry as the latent
    <key>.json          captions, original_size, crop_top_left, target_size, source_id, flip

Everything here is pure bytes <-> tensors; no file or network access. Tensors are parsed with
safetensors and PNGs with PIL; nothing is ever unpickled.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import limits
from .errors import ShardError

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
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_of(dtype: str | torch.dtype) -> torch.dtype:
    """'bf16' | 'fp16' | 'fp32' or one of those torch dtypes -> the torch dtype; ValueError otherwise."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES:
        return dtype
    raise ValueError(f"unsupported dtype {dtype!r}; expected one of {list(DTYPES)} or the matching torch dtype")

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


def sample_key(shard_index: int, position: int) -> str:
    """Deterministic key of the `position`-th source item of planned shard `shard_index`.

    Keys depend only on the plan (not on which items were skipped), so a resumed or
    multi-process run produces the same keys as a single uninterrupted one.
    """
    return f"{shard_index:06d}-{position:06d}"


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
            return cls(
                key=str(d["key"]),
                source_id=str(d["source_id"]),
                captions=[str(c) for c in d["captions"]],
                original_size=(int(d["original_size"][0]), int(d["original_size"][1])),
                crop_top_left=(int(d["crop_top_left"][0]), int(d["crop_top_left"][1])),
                target_size=(int(d["target_size"][0]), int(d["target_size"][1])),
                flip=bool(d.get("flip", False)),
                extra=dict(d.get("extra", {})),
            )
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise SampleError(f"sample {key}: bad {META_MEMBER} member: {e}") from e

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
            return np.asarray(im.convert("RGB"))
    except SampleError:
        raise
    except Exception as e:  # PIL raises many types for broken data
        raise SampleError(f"sample {key}: cannot decode {COND_MEMBER}: {e}") from e


def encode_sample(sample: Sample, dtype: torch.dtype = torch.bfloat16) -> dict[str, bytes]:
    """Sample -> {member suffix: bytes}. Tensors are stored contiguous in `dtype`."""
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
