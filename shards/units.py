"""Byte sizes: the one parser of sizes users type and the one way sizes are printed.

`parse_size` reads every size setting of the tool: `--local-cache-max`, SHARDS_S3_PART_SIZE,
SHARDS_S3_MULTIPART_THRESHOLD, SHARDS_MIN_RATE (bytes a second), the SHARDS_MAX_* caps. Units
follow the usual conventions: K/M/G/T (or KB/MB/...) are decimal (10**3...), Ki/Mi/Gi/Ti (or
KiB/...) binary (2**10...); case does not matter; a bare number is bytes. A fraction is allowed
when the result is a whole number of bytes ("1.5GiB").
"""

from __future__ import annotations

import re
from decimal import Decimal

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgtp])(i)?)?(b)?\s*", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(text: str, what: str | None = None) -> int:
    """'4096', '64MiB', '64 mib', '200GB', '1.5TiB', '5M' -> bytes.

    `what` names the setting in the error (e.g. "SHARDS_S3_PART_SIZE"), which is a ValueError.
    """
    m = _SIZE.fullmatch(str(text))
    whole = None
    if m:
        prefix = (m.group(2) or "").lower()
        base = 1024 if m.group(3) else 1000
        value = Decimal(m.group(1)) * base ** _POWERS[prefix]
        whole = int(value) if value == value.to_integral_value() else None
    if whole is None:
        subject = f"{what}={text!r}" if what else f"{text!r}"
        reason = "is not a whole number of bytes" if m else "is not a size"
        raise ValueError(f"{subject} {reason} (e.g. 1048576, 64MiB, 500GB, 1.5TiB)")
    return whole


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, for messages and `shards ls/stats`)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
