"""`--local-cache`: a folder shared by several runs (and people) on one node. Whatever someone
plants in it (a bucket folder or a copy that is a symbolic link, a FIFO), nothing outside the
folder is ever served, written, or deleted: eviction, publishing, verification and the clean-up
of stale temp files all stay inside it.

Every test builds a small synthetic cache as the "remote", reads every shard through the
CachingStore with the reader's own count and sha256 checks, and compares a folder outside the
local cache byte for byte (and mtime for mtime) before and after.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import pytest

from shards.errors import ShardError
from shards.localcache import CachingStore
from shards.reader import iter_shard
from shards.store import TEMP_PREFIX
from shards.stores import open_store
from shards.synthetic import write_synthetic_cache
from clirun import run_cli

REPO = Path(__file__).resolve().parents[1]
LONG_AGO = 1_000_000_000  # 2001: older than anything the cache writes, first in line for eviction


@pytest.fixture
def remote(tmp_path):
    store = open_store(tmp_path / "remote")
    manifest = write_synthetic_cache(store, shards=4, samples_per_shard=2)
    return store, manifest


@pytest.fixture
def outside(tmp_path) -> Path:
    """Files a planted link could lead to: someone else's data, outside the local cache."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work\n")
    (folder / "old-big.tar").write_bytes(os.urandom(200_000))
    (folder / f"{TEMP_PREFIX}looks-like-ours").write_bytes(b"not a temp file of the cache")
    for p in folder.iterdir():
        os.utime(p, (LONG_AGO, LONG_AGO))
    return folder


def _state(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _read_all(store, manifest) -> int:
    """Every shard read to its end through `store` (count, keys, bytes and sha256 checked)."""
    return sum(1 for r in manifest.shards for _ in iter_shard(store, r))


def _link(link: Path, target: Path, *, mtime: int | None = None) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    if mtime is not None:
        os.utime(link, (mtime, mtime), follow_symlinks=False)


def test_a_linked_bucket_folder_is_never_served_written_or_evicted(remote, outside, tmp_path, caplog):
    store, manifest = remote
    first = manifest.shards[0]
    # A valid copy of shard 0 waits outside, under its content name, in a bucket linked from the
    # local cache: following the link would serve it (and evict or clean up what lies beside it).
    (outside / f"{first.sha256}.tar").write_bytes((tmp_path / "remote" / first.name).read_bytes())
    os.utime(outside / f"{first.sha256}.tar", (LONG_AGO, LONG_AGO))
    local = tmp_path / "local"
    _link(local / "objects" / first.sha256[:2], outside)
    before = _state(outside)
    biggest = max(r.bytes for r in manifest.shards)
    with caplog.at_level(logging.INFO, logger="shards.localcache"):
        cache = CachingStore(store, local, max_bytes=biggest, records=manifest.shards)
        assert _read_all(cache, manifest) == 8
        assert _read_all(cache, manifest) == 8
    assert _state(outside) == before  # nothing read from, written to or deleted in it
    events = [e for rel, e in cache.events if rel == first.name]
    assert events == ["fetched", "fetched"]  # streamed each time: never a hit, never saved
    # Eviction did run (each copy pushes the older ones out), inside the cache only.
    assert any("evicted" in r.getMessage() for r in caplog.records)
    assert 0 < cache.total_bytes() <= biggest
    assert all(p.is_relative_to(local / "objects") for _, _, p in cache.entries())


def test_a_copy_planted_as_a_link_is_replaced_never_followed(remote, outside, tmp_path):
    store, manifest = remote
    first = manifest.shards[0]
    (outside / "shard-copy.tar").write_bytes((tmp_path / "remote" / first.name).read_bytes())
    local = tmp_path / "local"
    planted = local / "objects" / first.sha256[:2] / f"{first.sha256}.tar"
    _link(planted, outside / "shard-copy.tar")
    before = _state(outside)
    cache = CachingStore(store, local, records=manifest.shards)
    assert _read_all(cache, manifest) == 8
    assert [e for rel, e in cache.events if rel == first.name] == ["corrupt", "fetched"]
    # The link itself was replaced by a verified regular file; its target is untouched.
    assert not planted.is_symlink() and planted.is_file()
    assert hashlib.sha256(planted.read_bytes()).hexdigest() == first.sha256
    assert _state(outside) == before
    assert _read_all(cache, manifest) == 8
    assert [e for rel, e in cache.events if rel == first.name][-1] == "hit"


def test_eviction_and_temp_cleanup_delete_links_never_their_targets(remote, outside, tmp_path):
    store, manifest = remote
    local = tmp_path / "local"
    # A link that looks like the oldest copy, and one that looks like a stale temp file of ours.
    _link(local / "objects" / "ee" / f"{'e' * 64}.tar", outside / "old-big.tar", mtime=LONG_AGO)
    _link(local / "objects" / "ee" / f"{TEMP_PREFIX}{'e' * 64}.tar", outside / f"{TEMP_PREFIX}looks-like-ours",
          mtime=LONG_AGO)
    before = _state(outside)
    smallest = min(r.bytes for r in manifest.shards)
    cache = CachingStore(store, local, max_bytes=smallest * 2, records=manifest.shards)
    # The stale-temp clean-up at start removed the link, not what it points to.
    assert not (local / "objects" / "ee" / f"{TEMP_PREFIX}{'e' * 64}.tar").is_symlink()
    assert _read_all(cache, manifest) == 8
    assert cache.total_bytes() <= smallest * 2  # eviction ran ...
    assert (local / "objects" / "ee" / f"{'e' * 64}.tar").is_symlink()  # ... and skipped the link
    names = {f"{r.sha256}.tar" for r in manifest.shards}
    assert cache.entries() and all(p.name in names and not p.is_symlink() for _, _, p in cache.entries())
    assert _state(outside) == before


def test_a_linked_objects_folder_is_refused(remote, outside, tmp_path):
    store, manifest = remote
    local = tmp_path / "local"
    local.mkdir()
    (local / "objects").symlink_to(outside)
    before = _state(outside)
    with pytest.raises(ShardError, match=rf"{local / 'objects'} is a symbolic link; refusing to follow it"):
        CachingStore(store, local, max_bytes=1, records=manifest.shards)
    assert _state(outside) == before
    (local / "objects").unlink()
    (local / "objects").write_text("a file")
    with pytest.raises(ShardError, match=rf"{local / 'objects'} is not a folder"):
        CachingStore(store, local, max_bytes=1, records=manifest.shards)


def test_folders_planted_under_a_copys_or_a_temp_files_name_are_left_alone_and_streamed_past(remote, tmp_path):
    """A folder named like a shard's copy (or like an old temp file) in a shared local cache:
    never a crash; the shard streams from the remote, and the folder stays as it was."""
    store, manifest = remote
    first = manifest.shards[0]
    local = tmp_path / "local"
    copy = local / "objects" / first.sha256[:2] / f"{first.sha256}.tar"
    copy.mkdir(parents=True)
    (copy / "inside.txt").write_text("x")
    stale = local / "objects" / "ee" / f"{TEMP_PREFIX}old"
    stale.mkdir(parents=True)
    os.utime(stale, (1, 1))
    cache = CachingStore(store, local, records=manifest.shards)
    assert _read_all(cache, manifest) == 8
    assert (first.name, "corrupt") in cache.events
    assert (copy / "inside.txt").read_text() == "x" and stale.is_dir()


def test_a_fifo_planted_as_a_copy_never_blocks(remote, tmp_path):
    store, manifest = remote
    first = manifest.shards[0]
    local = tmp_path / "local"
    fifo = local / "objects" / first.sha256[:2] / f"{first.sha256}.tar"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    cache = CachingStore(store, local, records=manifest.shards)
    done: list[int] = []
    reader = threading.Thread(target=lambda: done.append(_read_all(cache, manifest)), daemon=True)
    reader.start()
    reader.join(60)
    assert done == [8], "reading blocked on a FIFO planted in the local cache"
    assert [e for rel, e in cache.events if rel == first.name] == ["corrupt", "fetched"]
    assert fifo.is_file() and hashlib.sha256(fifo.read_bytes()).hexdigest() == first.sha256


def test_train_with_a_shared_local_cache_full_of_planted_links(tiny_model, fill_cache, outside, tmp_path):
    """The CLI as a user runs it: a tiny training whose --local-cache someone else filled with
    links (a bucket, a copy, an old 'copy' first in line for eviction) and a size limit that makes
    every new copy evict the older ones."""
    from shards.manifest import Manifest

    manifest = Manifest.load(open_store(fill_cache))
    local = tmp_path / "local"
    shards = manifest.shards
    _link(local / "objects" / shards[0].sha256[:2], outside)  # a linked bucket
    if shards[1].sha256[:2] != shards[0].sha256[:2]:
        _link(local / "objects" / shards[1].sha256[:2] / f"{shards[1].sha256}.tar", outside / "thesis.txt")
    _link(local / "objects" / "ee" / f"{'e' * 64}.tar", outside / "old-big.tar", mtime=LONG_AGO)
    before = _state(outside)
    out = tmp_path / "out"
    proc = run_cli("train", ["--model", tiny_model, "--cache", fill_cache, "--output-dir", out, "--max-steps", "4",
                             "--batch-size", "2", "--num-workers", "0", "--local-cache", local,
                             "--local-cache-max", max(r.bytes for r in shards)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _state(outside) == before
    kept = [p for p in (local / "objects").rglob("*.tar") if not p.is_symlink() and p.is_file()]
    assert kept and all(p.resolve().is_relative_to(local.resolve()) for p in kept)
    assert sum(p.stat().st_size for p in kept) <= max(r.bytes for r in shards)
    assert "smaller than the cache's largest shard" not in proc.stderr  # exactly one shard fits: no warning


def test_a_local_cache_limit_below_one_shard_trains_and_says_nothing_can_be_kept(tiny_model, fill_cache, tmp_path):
    from shards.manifest import Manifest

    largest = max(r.bytes for r in Manifest.load(open_store(fill_cache)).shards)
    proc = run_cli("train", ["--model", tiny_model, "--cache", fill_cache, "--output-dir", tmp_path / "out",
                             "--max-steps", "2", "--batch-size", "2", "--num-workers", "0",
                             "--local-cache", tmp_path / "local", "--local-cache-max", "10KB"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"--local-cache-max 10KB is smaller than the cache's largest shard ({largest} bytes): shards that do not "
            "fit are streamed every epoch and not kept") in proc.stderr
    assert not [p for p in (tmp_path / "local").rglob("*.tar")]
