"""Views: several stored versions of one source image (flips, other crops), named by their keys.

A cache may hold more than one *view* of an image (precompute's `--flip` and `--crops K`): each
view is a full sample with its own latents, conditioning image and micro-conditioning. Train uses
one view of each image per epoch, and it decides which from the shard records' keys alone (no
shard is opened to plan an epoch), so the view is encoded in the key:

    000003-000017        view 0 of the 17th source item of shard 3 (= schema.sample_key)
    000003-000017-v1     view 1 of the same item
    000003-000017-v2     ...

View 0 keeps the plain sample key, so a cache without views has exactly the keys it always had and
every key still starts with f"{shard:06d}-" (the rule `shards verify` checks). Keys never contain
dots, so webdataset's member naming (`<key>.<suffix>`) is unaffected. A view's sample also records
`extra["view"]` in its json member ({"index", "crop", "flip"}) for humans and tools; the key is
the authority.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from . import schema
from .units import human_bytes

VIEW_SEPARATOR = "-v"
_VIEW_SUFFIX = re.compile(r"^(?P<base>.+)-v(?P<view>[1-9][0-9]*)$")


def view_key(shard_index: int, position: int, view: int) -> str:
    """Key of view `view` of the `position`-th source item of shard `shard_index`."""
    if not isinstance(view, int) or isinstance(view, bool) or view < 0:
        raise ValueError(f"view must be an integer >= 0, got {view!r}")
    base = schema.sample_key(shard_index, position)
    return base if view == 0 else f"{base}{VIEW_SEPARATOR}{view}"


def split_view_key(key: str) -> tuple[str, int]:
    """'000003-000017-v2' -> ('000003-000017', 2); a key without a view suffix is view 0."""
    m = _VIEW_SUFFIX.match(key)
    if m is None:
        return key, 0
    return m.group("base"), int(m.group("view"))


def has_views(keys: Iterable[str]) -> bool:
    """True when any key names a view other than view 0 (a cache made with --flip or --crops)."""
    return any(VIEW_SEPARATOR in k and _VIEW_SUFFIX.match(k) for k in keys)


def group_views(keys: list[str]) -> list[list[int]]:
    """Positions of `keys` grouped by source item, in first-appearance order; each group lists its
    positions in view order. Raises ValueError when a source's views are not 0..n-1."""
    groups: dict[str, dict[int, int]] = {}
    for pos, key in enumerate(keys):
        base, view = split_view_key(key)
        views = groups.setdefault(base, {})
        if view in views:
            raise ValueError(f"key {key!r} appears twice")
        views[view] = pos
    out = []
    for base, views in groups.items():
        if sorted(views) != list(range(len(views))):
            raise ValueError(f"source {base} has views {sorted(views)}; expected 0..{len(views) - 1}")
        out.append([views[v] for v in range(len(views))])
    return out


def count_sources(keys: Iterable[str]) -> int:
    """Distinct source items among `keys` (equal to the number of keys in a cache without views)."""
    return len({split_view_key(k)[0] for k in keys})


def stats_lines(totals: dict) -> list[str]:
    """What `shards stats` says about views and buckets, from the manifest's totals.

    Views: every view is a whole sample (latents, conditioning image, and its own copy of the
    prompt embeddings), so a cache with V views per image costs about V times the bytes of one
    without, and train reads all of them every epoch while using one per image.
    """
    lines = []
    samples, sources, size = totals.get("samples", 0), totals.get("sources"), totals.get("bytes", 0)
    if sources:
        per_image = size / sources
        lines.append(
            f"views      {samples} samples of {sources} images ({samples / sources:.2f} views per image): "
            f"{human_bytes(per_image)} per image, {human_bytes(size / max(samples, 1))} per view; one view per image is "
            f"{100 * sources / max(samples, 1):.0f}% of the bytes train reads each epoch"
        )
    buckets = totals.get("buckets")
    if buckets:
        shown = ", ".join(f"{label} {n}" for label, n in sorted(buckets.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"buckets    {len(buckets)} used (HxW samples): {shown}")
    return lines
