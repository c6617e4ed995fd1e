"""Test shorthand for building a rank's stream from keyword settings.

`cache_stream(store, records, batch_size=2, seed=0, epoch=0, rank=1, ...)` splits the keywords into a
`train.plan.DataSpec` (the settings) and the stream's own position (epoch, rank, start_batch), so
tests read as one call while the code keeps the spec as the one validated object.
"""

from __future__ import annotations

import dataclasses

from shards.manifest import Manifest
from train.data import CacheStream, make_loader, stream_identity
from train.plan import DataSpec, EpochPlan

_POSITION = ("epoch", "rank", "start_batch")
_LOADER = ("pin_memory", "prefetch_factor")


def _split(kw: dict) -> tuple[DataSpec, dict, dict]:
    spec = {k: v for k, v in kw.items() if k in {f.name for f in dataclasses.fields(DataSpec)}}
    position = {k: v for k, v in kw.items() if k in _POSITION}
    loader = {k: v for k, v in kw.items() if k in _LOADER}
    unknown = set(kw) - set(spec) - set(position) - set(loader)
    if unknown:
        raise TypeError(f"unknown stream settings {sorted(unknown)}")
    return DataSpec(**spec), position, loader


def _stream_args(records, kw: dict) -> tuple[EpochPlan, dict, dict]:
    spec, position, extra = _split(kw)
    plan = EpochPlan(records, spec, position.pop("epoch"))
    return plan, {"manifest": records if isinstance(records, Manifest) else None, **position}, extra


def cache_stream(store, records, **kw) -> CacheStream:
    plan, position, _ = _stream_args(records, kw)
    return CacheStream(store, plan, **position)


def cache_loader(store, records, **kw):
    """(loader, steps of its epoch), as the training loop sees them."""
    plan, position, extra = _stream_args(records, kw)
    return make_loader(store, plan, **position, **extra), plan.steps


def epoch_plan_of(records, **kw) -> EpochPlan:
    spec, position, _ = _split(kw)
    return EpochPlan(records, spec, position["epoch"])


def stats_of(records, **kw):
    spec, position, _ = _split(kw)
    return EpochPlan(records, spec, position["epoch"]).stats


def identity_of(records, **kw) -> dict:
    spec, _, _ = _split(kw)
    return stream_identity(records, spec)
