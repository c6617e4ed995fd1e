"""Loopback ports for the servers tests start (rendezvous stores, SeaweedFS) that nothing else
takes in the meantime.

A port found with bind(0) comes from the kernel's ephemeral range, which every outgoing
connection also draws from: between the moment a test releases it and the moment a launcher
binds it (seconds, for `accelerate launch`), a client socket of any test running beside it may
take it, and a two-node launch then waits for a store that never started. So ports are drawn
below that range, where the kernel never hands out ports on its own, and each pytest-xdist
worker draws from a band of its own, so two workers never pick the same one.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

_LOW = 10000  # below: ports services commonly claim
_BAND = 4000  # ports per xdist worker


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _band() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    top = max(_ephemeral_low(), _LOW + _BAND)
    bands = max(1, (top - _LOW) // _BAND)
    start = _LOW + (index % bands) * _BAND
    return range(start, min(start + _BAND, top))


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports, free right now and outside the ephemeral range (all held open
    together while chosen, so distinct)."""
    band = list(_band())
    random.SystemRandom().shuffle(band)
    chosen: list[socket.socket] = []
    try:
        for port in band:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            chosen.append(s)
            if len(chosen) == n:
                return [c.getsockname()[1] for c in chosen]
        raise RuntimeError(f"no {n} free loopback ports in {min(band)}..{max(band)}")
    finally:
        for s in chosen:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]
