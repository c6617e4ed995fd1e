"""ShardWriter and LocalStore: round trip, reproducible bytes, atomic create-if-absent publish,
resume markers, staging and the one clean-up of what killed writers leave."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from shards import schema
from shards.cli import cli as shards_cli
from shards.errors import PublishConflictError, ShardError
from shards.manifest import ShardRecord
from shards.reader import TarSampleStream, iter_shard
from shards.store import TEMP_PREFIX, LocalStore
from shards.stores import open_store
from shards.synthetic import synthetic_identity, synthetic_sample
from shards.writer import ShardWriter, completed_record, is_complete, shard_state

REPO = Path(__file__).resolve().parents[1]


# The kill test's random delays come from one seeded generator: every run of the suite kills at
# the same points, and a failure can be replayed.
KILL_DELAYS = random.Random(20261207)

def make_samples(index: int, n: int, *, seed: int = 0, **identity_kwargs) -> list[schema.Sample]:
    identity = synthetic_identity(**identity_kwargs)
    g = torch.Generator().manual_seed(seed)
    return [synthetic_sample(schema.sample_key(index, i), identity, g, captions=1 + i % 3) for i in range(n)]


def write_shard(store, index, samples, skipped=None, items=None, **kw) -> ShardRecord:
    with ShardWriter(store, index, **kw) as w:
        for s in samples:
            w.write(s)
        return w.commit(skipped or {}, items or [])


def visible_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_round_trip_is_exact_in_storage_dtype(tmp_path):
    store = open_store(tmp_path)
    samples = make_samples(3, 4)
    record = write_shard(store, 3, samples, {"image_corrupt": 2}, [{"source_id": "x.png", "reason": "image_corrupt", "detail": "bad"}])

    assert record.name == "shards/shard-000003.tar" and record.index == 3
    assert record.samples == 4 and record.keys == [s.key for s in samples]
    data = (tmp_path / record.name).read_bytes()
    assert record.bytes == len(data) and record.sha256 == hashlib.sha256(data).hexdigest()
    assert record.skipped == {"image_corrupt": 2} and record.skipped_items[0]["source_id"] == "x.png"
    assert ShardRecord.from_json((tmp_path / schema.record_name(3)).read_bytes()) == record

    got = list(iter_shard(store, record))
    assert len(got) == 4
    for a, b in zip(samples, got):
        assert b.meta == a.meta
        assert b.cond_png == a.cond_png
        for name in ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds"):
            want, have = getattr(a, name).to(torch.bfloat16), getattr(b, name)
            assert have.dtype == torch.bfloat16 and have.shape == want.shape
            assert torch.equal(have, want), name


def test_mean_only_and_fp16_storage(tmp_path):
    store = open_store(tmp_path)
    samples = make_samples(0, 2, store="mean")
    record = write_shard(store, 0, samples, storage_dtype="fp16")
    got = list(iter_shard(store, record))
    assert [s.latent_std for s in got] == [None, None]
    assert got[1].latent_mean.dtype == torch.float16
    assert torch.equal(got[1].latent_mean, samples[1].latent_mean.half())


def test_identical_input_gives_identical_bytes_and_pinned_headers(tmp_path, monkeypatch):
    a, b = open_store(tmp_path / "a"), open_store(tmp_path / "b")
    ra = write_shard(a, 1, make_samples(1, 3, seed=5))
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 86400)  # a leaked wall clock would differ
    rb = write_shard(b, 1, make_samples(1, 3, seed=5))
    assert (tmp_path / "a" / ra.name).read_bytes() == (tmp_path / "b" / rb.name).read_bytes()
    assert ra == rb
    assert (tmp_path / "a" / schema.record_name(1)).read_bytes() == (tmp_path / "b" / schema.record_name(1)).read_bytes()

    with tarfile.open(tmp_path / "a" / ra.name) as tf:
        infos = tf.getmembers()
    assert [i.name for i in infos] == [f"{k}.{m}" for k in ra.keys for m in schema.MEMBERS]
    for i in infos:
        assert (i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode, i.type) == (0, 0, 0, "", "", 0o444, tarfile.REGTYPE)
    # Different content must give different bytes (the test above is not vacuous).
    rc = write_shard(open_store(tmp_path / "c"), 1, make_samples(1, 3, seed=6))
    assert rc.sha256 != ra.sha256


def test_exception_inside_with_publishes_nothing(tmp_path):
    store = open_store(tmp_path)
    samples = make_samples(0, 3)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(store, 0) as w:
            w.write(samples[0])
            w.write(samples[1])
            assert [p.parent for p in tmp_path.rglob(f"{TEMP_PREFIX}*")] == [store.staging_dir()]
            raise RuntimeError("boom")
    assert visible_files(tmp_path) == []  # no shard, no record, no temp file left behind
    assert completed_record(store, 0) is None


def test_leaving_with_without_commit_is_an_error_and_publishes_nothing(tmp_path):
    store = open_store(tmp_path)
    with pytest.raises(RuntimeError, match="without commit"):
        with ShardWriter(store, 0) as w:
            w.write(make_samples(0, 1)[0])
    assert visible_files(tmp_path) == []


def test_bad_sample_is_rejected_and_writer_stays_usable(tmp_path):
    store = open_store(tmp_path)
    good, bad = make_samples(0, 2)
    bad.latent_mean = bad.latent_mean[0]  # 2-D: not (C, h, w)
    with ShardWriter(store, 0) as w:
        with pytest.raises(schema.SampleError, match="000000-000001"):
            w.write(bad)
        w.write(good)
        with pytest.raises(ValueError, match="duplicate key"):
            w.write(good)
        record = w.commit({"latent_nan": 1}, [])
    assert record.keys == [good.key]
    assert [s.key for s in iter_shard(store, record)] == [good.key]


def test_record_is_written_after_the_shard(tmp_path):
    calls = []

    class SpyStore(LocalStore):
        def put_file(self, rel, local_path):
            calls.append(("put_file", rel, self.exists(schema.record_name(0))))
            super().put_file(rel, local_path)

        def write_bytes(self, rel, data):
            calls.append(("write_bytes", rel, self.exists(schema.shard_name(0))))
            super().write_bytes(rel, data)

    store = SpyStore(tmp_path)
    write_shard(store, 0, make_samples(0, 2))
    # put_file saw no record yet; write_bytes(record) saw the shard already in place.
    assert calls == [("put_file", "shards/shard-000000.tar", False), ("write_bytes", "records/shard-000000.json", True)]


def test_failed_publish_leaves_nothing(tmp_path):
    class BrokenStore(LocalStore):
        def put_file(self, rel, local_path):
            raise OSError("disk gone")

    store = BrokenStore(tmp_path)
    with pytest.raises(OSError, match="disk gone"):
        write_shard(store, 0, make_samples(0, 1))
    assert visible_files(tmp_path) == []


def test_empty_shard_is_committed(tmp_path):
    store = open_store(tmp_path)
    record = write_shard(store, 7, [], {"image_missing": 4}, [])
    assert record.samples == 0 and record.keys == [] and record.bytes == 10240  # one tar record of zeros
    assert list(iter_shard(store, record)) == []
    assert completed_record(store, 7) == record


def test_tmp_dir_stages_in_a_per_cache_subfolder(tmp_path):
    store = open_store(tmp_path / "cache")
    user_tmp = tmp_path / "tmp"
    staging = store.staging_dir(tmp_dir=user_tmp)
    assert staging.parent == user_tmp / "shards-staging" and len(staging.name) == 16
    assert staging != open_store(tmp_path / "other").staging_dir(tmp_dir=user_tmp)  # one folder per cache
    assert store.staging_dir() == tmp_path / "cache" / ".staging"  # default: inside the cache, same filesystem
    with ShardWriter(store, 0, tmp_dir=user_tmp) as w:
        assert w.tmp_path.parent == staging and w.tmp_path.name.startswith(f"{TEMP_PREFIX}shard-000000.tar.")
        w.write(make_samples(0, 1)[0])
        record = w.commit()
    assert list(staging.iterdir()) == []  # the temp file was published (linked into place, then removed)
    assert is_complete(store, 0) and (tmp_path / "cache" / record.name).stat().st_size == record.bytes
    assert visible_files(tmp_path / "cache") == sorted([record.name, schema.record_name(0)])


def test_completed_record_and_resume_overwrite(tmp_path):
    store = open_store(tmp_path)
    samples = make_samples(2, 2)
    assert completed_record(store, 2) is None
    record = write_shard(store, 2, samples)
    assert completed_record(store, 2) == record

    # Orphan shard (killed between publishing the shard and writing its record): not done...
    (tmp_path / schema.record_name(2)).unlink()
    assert completed_record(store, 2) is None
    # ...and a re-run overwrites it with the same bytes.
    assert write_shard(store, 2, samples) == record

    # A damaged record or a shard of the wrong size means "not done" too.
    (tmp_path / schema.record_name(2)).write_bytes(b'{"index": 2, "na')
    assert completed_record(store, 2) is None
    assert shard_state(store, 2).damage.startswith("its record is damaged (")  # the rebuild removes the shard
    write_shard(store, 2, samples)
    with open(tmp_path / record.name, "r+b") as f:
        f.truncate(record.bytes - 512)
    assert completed_record(store, 2) is None
    (tmp_path / record.name).unlink()
    assert completed_record(store, 2) is None


def test_local_store_basics(tmp_path):
    store = open_store(f"file://{tmp_path}")
    assert isinstance(store, LocalStore) and store.url == str(tmp_path)
    store.write_bytes("a/b.json", b"1")
    store.write_bytes("a/b.json", b"22")
    assert store.read_bytes("a/b.json") == b"22" and store.size("a/b.json") == 2
    with store.open_read("a/b.json") as f:
        assert f.read() == b"22"
    src = tmp_path / "src.bin"
    src.write_bytes(b"xyz")
    store.put_file("c/d.bin", src)
    assert not src.exists() and store.read_bytes("c/d.bin") == b"xyz"
    (tmp_path / "a" / f"{TEMP_PREFIX}junk").write_bytes(b"")
    assert store.list() == ["a/b.json", "c/d.bin"]
    assert store.list("a") == ["a/b.json"]
    assert f"a/{TEMP_PREFIX}junk" in store.list("a", include_temp=True)
    store.delete("a/b.json")
    store.delete("a/b.json")
    assert not store.exists("a/b.json")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/b.json")
    with pytest.raises(FileNotFoundError):
        store.size("nope")
    for bad in ("../x", "/etc/passwd", "a//b", "a/./b", ""):
        with pytest.raises(ValueError, match="invalid cache path"):
            store.exists(bad)
    assert open_store("s3://bucket/prefix").url == "s3://bucket/prefix"  # no I/O until first use (tests/test_s3*.py)
    with pytest.raises(ValueError, match="unknown URL scheme"):
        open_store("ftp://host/x")


def test_sigkill_never_leaves_a_partial_shard(tmp_path):
    """A real writer process killed at a random moment: every visible shard is complete and
    every record matches its shard; only hidden temp files may be left over."""
    cache = tmp_path / "cache"
    child = textwrap.dedent(
        f"""
        import itertools, torch
        from shards import schema
        from shards.stores import open_store
        from shards.synthetic import synthetic_identity, synthetic_sample
        from shards.writer import ShardWriter
        store = open_store({str(cache)!r})
        identity = synthetic_identity(resolution=128)
        for index in itertools.count():
            g = torch.Generator().manual_seed(index % 6)  # reproducible: a 2nd round re-publishes the same bytes
            with ShardWriter(store, index % 6) as w:
                for pos in range(8):
                    w.write(synthetic_sample(schema.sample_key(index % 6, pos), identity, g, captions=2))
                w.commit({{}}, [])
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while len(list((cache / "records").glob("*.json")) if (cache / "records").exists() else []) < 2:
            assert proc.poll() is None, "writer process died"
            assert time.monotonic() < deadline, "writer too slow"
            time.sleep(0.05)
        time.sleep(KILL_DELAYS.random() * 0.3)  # seeded: a failure replays with the same delay
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    store = open_store(cache)
    shards = sorted((cache / "shards").glob("shard-*.tar"))
    assert shards
    for path in shards:
        with open(path, "rb") as f:
            stream = TarSampleStream(f, path.name)
            assert len([schema.decode_sample(k, m) for k, m in stream]) == 8
    for index in range(6):
        record = completed_record(store, index)
        if record is not None:
            assert hashlib.sha256((cache / record.name).read_bytes()).hexdigest() == record.sha256


def test_cleanup_incomplete_removes_every_temp_file_of_this_cache_and_nothing_else(tmp_path):
    store = open_store(tmp_path / "cache")
    record = write_shard(store, 0, make_samples(0, 1))
    user_tmp = tmp_path / "tmp"
    ours = store.staging_dir(tmp_dir=user_tmp)
    theirs = open_store(tmp_path / "other").staging_dir(tmp_dir=user_tmp)
    left = {  # what killed writers of this cache leave
        store.staging_dir() / f"{TEMP_PREFIX}shard-000001.tar.77.abcd": "cache",
        tmp_path / "cache" / "records" / f"{TEMP_PREFIX}shard-000000.json.77.abcd": "cache",
        tmp_path / "cache" / f"{TEMP_PREFIX}manifest.json.77.abcd": "cache",
        ours / f"{TEMP_PREFIX}shard-000002.tar.77.abcd": "tmp_dir",
    }
    kept = [  # not ours: another cache's staging folder, other programs' files in a shared tmp dir
        theirs / f"{TEMP_PREFIX}shard-000002.tar.77.abcd",
        user_tmp / f"{TEMP_PREFIX}shard-000002.tar.77.abcd",
        user_tmp / "notes.txt",
    ]
    for p in [*left, *kept]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    in_cache = sorted(p.relative_to(tmp_path / "cache").as_posix() for p, where in left.items() if where == "cache")
    want = in_cache + [str(ours / f"{TEMP_PREFIX}shard-000002.tar.77.abcd")]

    assert store.cleanup_incomplete(tmp_dir=user_tmp, dry_run=True) == want
    assert all(p.exists() for p in left)
    assert store.cleanup_incomplete() == in_cache  # without tmp_dir: the cache (and its .staging) only
    assert store.cleanup_incomplete(tmp_dir=user_tmp) == want[len(in_cache):]
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)
    assert visible_files(tmp_path / "cache") == sorted([record.name, schema.record_name(0)])
    assert store.cleanup_incomplete(tmp_dir=user_tmp) == []

    # `shards gc --tmp-dir` is the same clean-up, from the command line.
    (ours / f"{TEMP_PREFIX}shard-000003.tar.9.ff").write_bytes(b"")
    (store.staging_dir() / f"{TEMP_PREFIX}shard-000004.tar.9.ff").write_bytes(b"")
    store.write_bytes(schema.IDENTITY_FILE, b"{}")  # a cache's first file: gc refuses a folder without one
    result = CliRunner().invoke(shards_cli, ["gc", str(tmp_path / "cache"), "--tmp-dir", str(user_tmp)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"removed temp file: .staging/{TEMP_PREFIX}shard-000004.tar.9.ff",
        f"removed staged temp file: {ours}/{TEMP_PREFIX}shard-000003.tar.9.ff",
        f"gc {tmp_path / 'cache'}: removed 1 temp file(s), 1 staged temp file(s)",
    ]


def test_a_published_shard_is_never_replaced_by_other_bytes(tmp_path, caplog):
    """Two writers of one shard (two runs wrongly sharing a cache): the first publish wins; the
    second fails naming both files and writes no record; the same bytes again are a resume."""
    store = open_store(tmp_path)
    a = ShardWriter(store, 4)
    b = ShardWriter(store, 4)
    for s in make_samples(4, 2, seed=1):
        a.write(s)
    for s in make_samples(4, 2, seed=2):
        b.write(s)
    record = a.commit()
    published = (tmp_path / record.name).read_bytes()
    b_tmp = b.tmp_path
    with pytest.raises(PublishConflictError) as e:
        b.commit()
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / record.name}: already exists with other content ({record.bytes} bytes, sha256 {record.sha256}; ")
    assert f"this upload: {b_tmp} with " in msg and "Never run two precomputes" in msg
    assert f"python -m shards gc --orphans {tmp_path}" in msg
    assert (tmp_path / record.name).read_bytes() == published and completed_record(store, 4) == record
    assert not b_tmp.exists() and visible_files(tmp_path) == sorted([record.name, schema.record_name(4)])

    # The same bytes again (a resumed run re-encoding an orphan shard): success, nothing replaced.
    inode = (tmp_path / record.name).stat().st_ino
    (tmp_path / schema.record_name(4)).unlink()
    with caplog.at_level(logging.INFO, logger="shards.store"):
        assert write_shard(store, 4, make_samples(4, 2, seed=1)) == record
    assert "already present with the same content" in caplog.text
    assert (tmp_path / record.name).stat().st_ino == inode and completed_record(store, 4) == record


def test_publish_without_hard_links_still_refuses_other_bytes(tmp_path, monkeypatch):
    """Filesystems without hard links (some FUSE/SMB mounts): check, then rename."""
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted", str(src))

    monkeypatch.setattr(os, "link", no_links)
    store = open_store(tmp_path)
    record = write_shard(store, 1, make_samples(1, 2, seed=1))
    assert completed_record(store, 1) == record and list(store.staging_dir().iterdir()) == []
    assert write_shard(store, 1, make_samples(1, 2, seed=1)) == record
    with pytest.raises(PublishConflictError, match="already exists with other content"):
        write_shard(store, 1, make_samples(1, 2, seed=3))
    assert hashlib.sha256((tmp_path / record.name).read_bytes()).hexdigest() == record.sha256


def test_a_failed_record_write_names_the_shard(tmp_path):
    class FullDisk(LocalStore):
        def write_bytes(self, rel, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    store = FullDisk(tmp_path)
    with pytest.raises(ShardError) as e:
        write_shard(store, 3, make_samples(3, 1))
    assert str(e.value) == (
        f"shards/shard-000003.tar: published to {tmp_path}/shards/shard-000003.tar, but writing its record "
        "records/shard-000003.json failed (OSError: [Errno 28] No space left on device); the shard counts as "
        "not done and a re-run rebuilds it"
    )
    assert isinstance(e.value.__cause__, OSError) and completed_record(LocalStore(tmp_path), 3) is None


def test_storage_dtype_comes_from_the_schema(tmp_path):
    store = open_store(tmp_path)
    for bad in ("fp8", torch.int8, "float32"):
        with pytest.raises(ValueError, match=r"expected one of \['bf16', 'fp16', 'fp32'\]"):
            ShardWriter(store, 0, storage_dtype=bad)
    assert not store.staging_dir().exists()  # refused before anything was created
    with ShardWriter(store, 0, storage_dtype=torch.float16) as w:
        assert w.storage_dtype is torch.float16
        w.abort()


def test_latent_shapes_for_bucketed_caches(tmp_path):
    store = open_store(tmp_path)
    g = torch.Generator().manual_seed(0)
    small, large = synthetic_identity(resolution=64), synthetic_identity(resolution=128)
    samples = [synthetic_sample(schema.sample_key(0, i), ident, g) for i, ident in enumerate([small, large, small])]
    record = write_shard(store, 0, samples, record_latent_shapes=True)
    assert record.latent_shapes == [[8, 8], [16, 16], [8, 8]]
    assert ShardRecord.from_json(record.to_json()) == record
    assert completed_record(store, 0) == record
    plain = write_shard(open_store(tmp_path / "plain"), 0, samples)
    assert plain.latent_shapes is None and "latent_shapes" not in plain.to_dict()
