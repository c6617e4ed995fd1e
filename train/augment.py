"""Train-time augmentation of cached conditioning images: the random threshold of soft maps.

A cache made with `precompute --condition-soft` stores soft conditioning maps (e.g. `--condition
sketch`, a soft edge map). The T2I-Adapter authors trained their sketch adapter on edge maps
binarised with a random threshold, so the adapter learns from thin and thick, sparse and dense
strokes alike; this module does the same to every sample each time it is drawn:

    binary = (cond >= t),  t ~ U(low, high), one t per sample per draw,

on every channel (soft maps are gray, so the channels agree). The default range is the authors'
(0.3, 0.8). `t` is a pure function of (seed, epoch, sample key) (`train.plan.key_rng`), like the
caption choice, so the same sample gets a new threshold every epoch and a resumed run draws
exactly the thresholds the uninterrupted run would have.

Where it runs. Conditioning images leave the loader workers as uint8 (4x fewer bytes through
worker shared memory, pinning and the host-to-device copy than fp32) together with one uint8
*level* per sample, `threshold_level(t)`; `prepare_cond` then makes the float image on the device:
`cond / 255`, or for soft maps `cond >= level` in integers. The integer comparison equals
`cond / 255 >= t` in exact arithmetic and gives the same bits on every device.
"""

from __future__ import annotations

import math
import torch

from shards.identity import Condition
from train.plan import Draw, key_rng

DEFAULT_SOFT_THRESHOLD_RANGE = (0.3, 0.8)


def soft_threshold(*, seed: int, epoch: int, key: str, low: float, high: float) -> float:
    """The threshold of sample `key` in `epoch`: uniform in [low, high), a pure function."""
    rng = key_rng(seed=seed, epoch=epoch, draw=Draw.SOFT_THRESHOLD, key=key)
    return float(low + (high - low) * rng.random())


def threshold_level(threshold: float) -> int:
    """The 8-bit level of a threshold in [0, 1]: the smallest v in 0..255 with v / 255 >= threshold
    in exact arithmetic (up to the float64 rounding of threshold * 255), so that `v >= level` is
    the binarisation of the 8-bit image itself, with no float intermediate."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"a soft threshold must be in [0, 1], got {threshold!r}")
    return math.ceil(threshold * 255)


def binarize(cond: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """A conditioning image in [0, 1] -> {0, 1} (same dtype and shape): 1 where cond >= threshold.
    `threshold` may be a tensor broadcasting against `cond`, e.g. (B, 1, 1, 1) for one per sample."""
    return (cond >= threshold).to(cond.dtype)


def prepare_cond(cond_u8: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
    """The adapter's input from the loader's uint8 images (B, 3, H, W), on their device: float32
    in [0, 1] (`/ 255`), or for soft maps {0, 1} with `cond >= levels[i]` per sample (`levels`:
    (B,) uint8 from `threshold_level`). The one place the loader's wire format becomes floats."""
    if cond_u8.dtype != torch.uint8 or cond_u8.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) uint8 conditioning images, got {tuple(cond_u8.shape)} {cond_u8.dtype}")
    if levels is None:
        return cond_u8.to(torch.float32).div_(255.0)
    if levels.dtype != torch.uint8 or levels.shape != cond_u8.shape[:1]:
        raise ValueError(f"expected ({cond_u8.shape[0]},) uint8 threshold levels, got {tuple(levels.shape)} "
                         f"{levels.dtype}")
    return (cond_u8 >= levels.view(-1, 1, 1, 1)).to(torch.float32)


def soft_threshold_range_for(condition: Condition, requested: tuple[float, float] | None) -> tuple[float, float] | None:
    """The range train uses for this cache: `requested` (already checked by `train.config.resolve`)
    or the default when the cache stores soft conditions, None when it does not. Asking for a range
    on a cache without soft conditions is a ValueError (it would silently do nothing)."""
    if not condition.soft:
        if requested is not None:
            raise ValueError("a soft threshold range was given, but the cache does not store soft conditioning maps "
                             "(precompute it with --condition-soft)")
        return None
    return DEFAULT_SOFT_THRESHOLD_RANGE if requested is None else (float(requested[0]), float(requested[1]))
