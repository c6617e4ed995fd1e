"""Inputs that changed, and inputs that repeat: what a re-run notices before it trusts a cache.

Every shard record lists, per position of its source unit, the item's input fingerprint
(`ShardRecord.sources`: a content sha256 of image, conditioning image and captions, or file size
+ mtime with --source-fingerprint stat) and a digest of its source id (`source_keys`). With them:

- `stale_shards`: a complete shard whose unit's fingerprints now differ (an image edited in
  place, a caption changed, rows added to or removed from its range) was made from other inputs.
  A re-run lists such shards and refuses to call the cache complete (its manifest is withdrawn)
  until they are rebuilt with --rebuild-stale; "0 to encode" over edited inputs is never said.
  With --dedupe, a shard whose repeated items would now be different ones is stale too.
- `repeated_items`: items that repeat an earlier one, by inputs (the same fingerprint) or by name
  (the same source id: a metadata row naming the same file again, a tar key seen again), in unit
  order. Counted and warned about after every run; `plan_dedupe` (--dedupe) finds them before
  encoding so they are skipped as `duplicate`, naming the item they repeat.

Pure functions of the source and the records; the runner decides who calls them (rank 0) and
shares the results (tensor broadcasts).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping

from precompute.source_base import Source, content_fingerprint
from shards import schema
from shards.manifest import ShardRecord

log = logging.getLogger(__name__)

# (unit, position) -> (unit, position) of the earlier item it repeats
Drops = dict[tuple[int, int], tuple[int, int]]


def source_key(source_id: str) -> str:
    """16 hex digits naming an item's source id (a path, a tar key, a row) in records."""
    return hashlib.sha256(source_id.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _first_occurrences(marks: Iterable[tuple[int, int, str, str]]) -> Drops:
    """(unit, position, fingerprint, source key) in unit order -> the later repeats."""
    seen: dict[str, tuple[int, int]] = {}
    drops: Drops = {}
    for unit, pos, fingerprint, key in marks:
        first = seen.get("f" + fingerprint) or seen.get("k" + key)
        if first is not None:
            drops[(unit, pos)] = first
            continue
        seen.setdefault("f" + fingerprint, (unit, pos))
        seen.setdefault("k" + key, (unit, pos))
    return drops


def plan_dedupe(source: Source, units: int) -> tuple[Drops, dict[int, list[str]]]:
    """(the items --dedupe drops, each unit's fingerprints): one read of every input."""
    marks, prints = [], {}
    for unit in range(units):
        prints[unit] = []
        for pos, item in enumerate(source.iter_unit(unit)):
            fingerprint = item.fingerprint or content_fingerprint(item)
            prints[unit].append(fingerprint)
            marks.append((unit, pos, fingerprint, source_key(item.source_id)))
    return _first_occurrences(marks), prints


def _recorded_drops(record: ShardRecord) -> dict[int, str]:
    """position -> the key it repeats, for the items a shard skipped as duplicates."""
    out = {}
    for item in record.skipped_items:
        if item.get("reason") == "duplicate" and isinstance(item.get("position"), int):
            out[item["position"]] = str(item.get("repeats"))
    return out


def stale_shards(source: Source, records: Mapping[int, ShardRecord], *, drops: Drops | None = None,
                 prints: Mapping[int, list[str]] | None = None) -> dict[int, str]:
    """{shard index: why it is stale} among the complete shards `records`, from their units'
    fingerprints now (`prints` when already read, else `source.unit_fingerprints`)."""
    stale = {}
    for index, record in sorted(records.items()):
        if record.sources is None:
            stale[index] = "its record has no source fingerprints (written by an older version)"
            continue
        now = prints[index] if prints is not None and index in prints else source.unit_fingerprints(index)
        if len(now) != len(record.sources):
            stale[index] = f"its unit ({source.unit_name(index)}) has {len(now)} items now, {len(record.sources)} then"
            continue
        changed = [pos for pos, (a, b) in enumerate(zip(now, record.sources)) if a != b]
        if changed:
            shown = ", ".join(schema.sample_key(index, p) for p in changed[:5]) + (" ..." if len(changed) > 5 else "")
            stale[index] = (f"{len(changed)} of its {len(now)} items changed since it was made ({source.unit_name(index)}:"
                            f" {shown})")
            continue
        if drops is not None:
            want = {pos: schema.sample_key(*first) for (unit, pos), first in drops.items() if unit == index}
            if want != _recorded_drops(record):
                stale[index] = "the items --dedupe drops from it are other ones now"
    return stale


def repeated_items(records: Iterable[ShardRecord]) -> list[tuple[str, str]]:
    """(key, key of the earlier item it repeats) for every encoded item that repeats one, by inputs
    or by name, in shard order; from the records alone."""
    marks = []
    encoded: set[tuple[int, int]] = set()
    for r in sorted(records, key=lambda r: r.index):
        if r.sources is None or r.source_keys is None:
            continue
        for key in r.keys:
            parts = key.split("-")
            encoded.add((r.index, int(parts[1])))
        marks += [(r.index, pos, f, k) for pos, (f, k) in enumerate(zip(r.sources, r.source_keys))]
    marks = [m for m in marks if (m[0], m[1]) in encoded]
    return [(schema.sample_key(*later), schema.sample_key(*first))
            for later, first in sorted(_first_occurrences(marks).items())]


def check_inputs(source: Source, records: Mapping[int, ShardRecord], *, dedupe: bool) -> tuple[dict[int, str], Drops]:
    """(stale shards with why, the items --dedupe drops): what rank 0 works out before encoding."""
    drops, prints = (plan_dedupe(source, source.num_units()) if dedupe else ({}, None))
    if records:
        log.info("checking the inputs of %d complete shard(s) against their records", len(records))
    return stale_shards(source, records, drops=drops if dedupe else None, prints=prints), drops


__all__ = ["Drops", "check_inputs", "plan_dedupe", "repeated_items", "source_key", "stale_shards"]
