"""Train-time augmentation of cached conditioning images: the random threshold of soft maps.

A cache made with `precompute --condition-soft` stores soft conditioning maps (e.g. `--condition
sketch`, a soft edge map). The T2I-Adapter authors trained their sketch adapter on edge maps
binarised with a random threshold, so the adapter learns from thin and thick, sparse and dense
strokes alike; this module does the same to every sample each time it is drawn:

    binary = (cond >= t),  t ~ U(low, high), one t per sample per draw,

on every channel (soft maps are gray, so the channels agree). The default range is the authors'
(0.3, 0.8). `t` is a pure function of (seed, epoch, sample key), like the caption choice in
`train.data`, so the same sample gets a new threshold every epoch and a resumed run draws exactly
the thresholds the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

DEFAULT_SOFT_THRESHOLD_RANGE = (0.3, 0.8)
_SOFT_THRESHOLD_TAG = 3  # separates this stream from train.data's (0 to 2) for the same seed


def soft_threshold(*, seed: int, epoch: int, key: str, low: float, high: float) -> float:
    """The threshold of sample `key` in `epoch`: uniform in [low, high), a pure function."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    rng = np.random.default_rng([seed, epoch, _SOFT_THRESHOLD_TAG, int.from_bytes(digest, "little")])
    return float(low + (high - low) * rng.random())


def binarize(cond: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """A conditioning image in [0, 1] -> {0, 1} (same dtype and shape): 1 where cond >= threshold.
    `threshold` may be a tensor broadcasting against `cond`, e.g. (B, 1, 1, 1) for one per sample."""
    return (cond >= threshold).to(cond.dtype)


def range_problems(value: Any) -> list[str]:
    """Problems with a (low, high) threshold range; empty when 0 <= low <= high <= 1."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        return [f"the soft threshold range must be two numbers (low, high), got {value!r}"]
    if not 0.0 <= low <= high <= 1.0:
        return [f"the soft threshold range must satisfy 0 <= low <= high <= 1, got ({low:g}, {high:g})"]
    return []


def parse_range(text: str) -> tuple[float, float]:
    """'0.3,0.8' (or '0.3 0.8') -> (0.3, 0.8); ValueError naming the problem."""
    parts = text.replace(",", " ").split()
    if len(parts) != 2:
        raise ValueError(f"the soft threshold range must be 'LOW,HIGH', e.g. '0.3,0.8', got {text!r}")
    try:
        value = (float(parts[0]), float(parts[1]))
    except ValueError:
        raise ValueError(f"the soft threshold range must be two numbers 'LOW,HIGH', got {text!r}") from None
    problems = range_problems(value)
    if problems:
        raise ValueError(problems[0])
    return value


def cache_has_soft_conditions(identity: dict) -> bool:
    """True when precompute stored soft maps for train to threshold (`--condition-soft`)."""
    condition = identity.get("condition") if isinstance(identity, dict) else None
    return bool(isinstance(condition, dict) and condition.get("soft"))


def soft_threshold_range_for(identity: dict, requested: tuple[float, float] | None) -> tuple[float, float] | None:
    """The range train uses for this cache: `requested` or the default when the cache stores soft
    conditions, None when it does not. Asking for a range on a cache without soft conditions is a
    ValueError (it would silently do nothing)."""
    if not cache_has_soft_conditions(identity):
        if requested is not None:
            raise ValueError("a soft threshold range was given, but the cache does not store soft conditioning maps "
                             "(precompute it with --condition-soft)")
        return None
    if requested is None:
        return DEFAULT_SOFT_THRESHOLD_RANGE
    problems = range_problems(requested)
    if problems:
        raise ValueError(problems[0])
    return (float(requested[0]), float(requested[1]))
