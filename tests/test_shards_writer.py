"""ShardWriter and LocalStore: round trip, reproducible bytes, atomic publish, resume markers."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from shards import schema
from shards.manifest import ShardRecord
from shards.reader import TarSampleStream, iter_shard
from shards.store import LocalStore, TEMP_PREFIX, open_store
from shards.synthetic import synthetic_identity, synthetic_sample
from shards.writer import ShardWriter, completed_record, is_complete

REPO = Path(__file__).resolve().parents[1]


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
            assert any(p.name.startswith(TEMP_PREFIX) for p in (tmp_path / "shards").iterdir())
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


def test_tmp_dir_elsewhere(tmp_path):
    store = open_store(tmp_path / "cache")
    staging = tmp_path / "staging"
    record = write_shard(store, 0, make_samples(0, 1), tmp_dir=staging)
    assert list(staging.iterdir()) == []  # the temp file was moved into place
    assert is_complete(store, 0) and (tmp_path / "cache" / record.name).stat().st_size == record.bytes


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
        from shards.store import open_store
        from shards.synthetic import synthetic_identity, synthetic_sample
        from shards.writer import ShardWriter
        store = open_store({str(cache)!r})
        identity = synthetic_identity(resolution=128)
        g = torch.Generator().manual_seed(0)
        for index in itertools.count():
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
        time.sleep(torch.rand(1).item() * 0.3)
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


def test_stale_temps_of_the_same_shard_are_removed(tmp_path):
    store = open_store(tmp_path)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    stale_0 = shard_dir / f"{TEMP_PREFIX}shard-000000.tar.123.abcd"
    other_1 = shard_dir / f"{TEMP_PREFIX}shard-000001.tar.123.abcd"
    stale_0.write_bytes(b"partial")
    other_1.write_bytes(b"partial")
    write_shard(store, 0, make_samples(0, 1))
    assert not stale_0.exists() and other_1.exists()
    assert store.list("shards") == ["shards/shard-000000.tar"]


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
