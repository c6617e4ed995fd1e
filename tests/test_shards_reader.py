"""The verifying reader: every silent tar failure of docs/background.md section 3 becomes a ShardError."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile

import pytest
import torch

from shards import reader as reader_mod
from shards import schema
from shards.errors import ShardError
from shards.reader import (
    iter_shard,
    iter_shard_members,
    load_empty_prompt,
    write_empty_prompt,
)
from shards.store import LocalStore
from shards.stores import open_store
from shards.synthetic import synthetic_identity, synthetic_sample
from shards.writer import ShardWriter

NAME = "shards/shard-000003.tar"


@pytest.fixture
def shard(tmp_path):
    """(store, record, tar path) of a 4-sample shard number 3."""
    store = open_store(tmp_path)
    identity = synthetic_identity()
    g = torch.Generator().manual_seed(0)
    with ShardWriter(store, 3) as w:
        for i in range(4):
            w.write(synthetic_sample(schema.sample_key(3, i), identity, g))
        record = w.commit({}, [])
    return store, record, tmp_path / record.name


def members(path):
    with tarfile.open(path) as tf:
        return tf.getmembers()


def read_all(store, record, check=True):
    return [s.key for s in iter_shard(store, record, check=check)]


def rewrite(path, entries):
    """Write a tar of (name, bytes) like the writer does, returning its bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def entries_of(path):
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def test_reads_clean_shard(shard):
    store, record, _ = shard
    assert read_all(store, record) == record.keys
    assert [k for k, _ in iter_shard_members(store, record, check=False)] == record.keys


def test_streams_without_reading_the_whole_shard(shard, monkeypatch):
    store, record, path = shard
    monkeypatch.setattr(reader_mod, "_READ_CHUNK", 4096)
    pulled = []

    class CountingStore(LocalStore):
        def open_read(self, rel):
            f = super().open_read(rel)
            raw_read = f.read

            def read(n=-1):
                data = raw_read(n)
                pulled.append(len(data))
                return data

            f.read = read
            return f

    it = iter_shard(CountingStore(store.url), record)
    first = next(it)
    assert first.key == record.keys[0]
    assert 0 < sum(pulled) < record.bytes / 2
    assert [s.key for s in it] == record.keys[1:]
    assert sum(pulled) == record.bytes  # consumed to the last byte (for the hash)


@pytest.mark.parametrize("where", ["member_boundary", "mid_member", "end_marker"])
def test_truncated_shard(shard, where):
    store, record, path = shard
    ms = members(path)
    cut = {
        "member_boundary": ms[6].offset,  # after two complete samples (the 2nd not yet delivered)
        "mid_member": ms[4].offset_data + 100,
        "end_marker": ms[-1].offset_data + ms[-1].size + 512 + 100,
    }[where]
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ShardError, match=rf"^{NAME}: truncated") as e:
        read_all(store, record)
    if where == "member_boundary":
        assert "after delivering 1 of the 4 expected samples" in str(e.value)


def test_shorter_but_valid_tar_is_caught_by_the_count(shard):
    """A writer that unwound mid-shard through an ordinary tar sink leaves a valid, shorter tar."""
    store, record, path = shard
    rewrite(path, entries_of(path)[:6])
    with pytest.raises(ShardError, match=rf"^{NAME}: expected 4 samples, read 2 \(truncated\?\)"):
        read_all(store, record)


def test_flipped_data_byte_is_a_sha256_mismatch(shard):
    store, record, path = shard
    data = bytearray(path.read_bytes())
    m = members(path)[0]  # the first .safetensors: its last byte is tensor data
    data[m.offset_data + m.size - 1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"^{NAME}: sha256 mismatch"):
        read_all(store, record)
    # check=False skips only the hash: the flipped value itself then goes unnoticed.
    assert read_all(store, record, check=False) == record.keys


@pytest.mark.parametrize("where", [1, 5, "end_block", "padding"])
def test_flipped_header_byte_is_not_read_as_end_of_archive(shard, where):
    store, record, path = shard
    data = bytearray(path.read_bytes())
    ms = members(path)
    end = ms[-1].offset_data + -(-ms[-1].size // 512) * 512  # the first end-of-archive block
    offset = {"end_block": end + 3, "padding": end + 2048}.get(where) or ms[where].offset + 3
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))
    pattern = "after the end-of-archive marker" if where == "padding" else "corrupt tar header"
    for check in (True, False):
        with pytest.raises(ShardError, match=rf"^{NAME}: .*{pattern}"):
            read_all(store, record, check=check)


def test_data_after_end_marker(shard):
    store, record, path = shard
    with open(path, "ab") as f:
        f.write(b"\0" * 10 + b"payload")
    # Past the record's size the reader stops at once; a record rewritten to the new size lets it
    # read on, to the data behind the end-of-archive marker.
    with pytest.raises(ShardError, match=rf"^{NAME}: longer than the {record.bytes} bytes its record lists"):
        read_all(store, record, check=False)
    matching = _with_matching_record(record, path.read_bytes())
    with pytest.raises(ShardError, match=rf"^{NAME}: data at byte {record.bytes + 10} after the end-of-archive"):
        read_all(store, matching, check=False)


def test_missing_shard(shard):
    store, record, path = shard
    path.unlink()
    with pytest.raises(ShardError, match=rf"^{NAME}: missing from"):
        read_all(store, record)


def _with_matching_record(record, raw: bytes, keys=None):
    """What a malicious or buggy producer would also do: make the record agree with the bytes."""
    keys = record.keys if keys is None else keys
    return dataclasses.replace(
        record, bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest(), samples=len(keys), keys=keys
    )


def test_unknown_member_is_rejected_even_with_a_matching_record(shard):
    store, record, path = shard
    entries = entries_of(path)
    entries.insert(3, (f"{record.keys[1]}.pyd", b"\x80\x04K\x01."))  # a pickle payload
    raw = rewrite(path, entries)
    with pytest.raises(ShardError, match=rf"^{NAME}: unknown member '000003-000001.pyd'"):
        read_all(store, _with_matching_record(record, raw))


def test_duplicate_scattered_and_incomplete_keys(shard):
    store, record, path = shard
    entries = entries_of(path)
    # key 0 again after key 1
    raw = rewrite(path, entries[:6] + entries[:3])
    with pytest.raises(ShardError, match=r"key 000003-000000 appears twice"):
        list(iter_shard_members(store, _with_matching_record(record, raw, record.keys[:2] + record.keys[:1])))
    # a member repeated inside one key
    raw = rewrite(path, entries[:3] + entries[2:3])
    with pytest.raises(ShardError, match=r"member '000003-000000.json' appears twice"):
        list(iter_shard_members(store, _with_matching_record(record, raw, record.keys[:1])))
    # a key without its .cond.png
    raw = rewrite(path, [entries[0], entries[2]])
    with pytest.raises(ShardError, match=r"sample 000003-000000 lacks members \['.cond.png'\]"):
        list(iter_shard_members(store, _with_matching_record(record, raw, record.keys[:1])))
    # a directory entry
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        d = tarfile.TarInfo("000003-000000.json")
        d.type = tarfile.SYMTYPE
        d.linkname = "/etc/passwd"
        tf.addfile(d)
    path.write_bytes(buf.getvalue())
    with pytest.raises(ShardError, match=r"has tar type .*only plain"):
        list(iter_shard_members(store, _with_matching_record(record, buf.getvalue(), [])))


def test_record_disagreement(shard):
    store, record, _ = shard
    wrong_sha = dataclasses.replace(record, sha256="0" * 64)
    with pytest.raises(ShardError, match=rf"^{NAME}: sha256 mismatch: read {record.sha256}, record says 0000"):
        read_all(store, wrong_sha)
    wrong_keys = dataclasses.replace(record, keys=record.keys[:1] + ["000003-000099"] + record.keys[2:])
    with pytest.raises(ShardError, match=rf"^{NAME}: sample #1 has key 000003-000001, its record says 000003-000099"):
        read_all(store, wrong_keys, check=False)
    fewer = dataclasses.replace(record, samples=3, keys=record.keys[:3])
    with pytest.raises(ShardError, match=r"more samples than the 3 its record lists"):
        read_all(store, fewer, check=False)
    more = dataclasses.replace(record, samples=5, keys=record.keys + ["000003-000004"])
    with pytest.raises(ShardError, match=r"expected 5 samples, read 4"):
        read_all(store, more, check=False)


def test_undecodable_member_names_the_shard_and_sample(shard):
    store, record, path = shard
    entries = entries_of(path)
    entries[0] = (entries[0][0], b"not safetensors")
    raw = rewrite(path, entries)
    with pytest.raises(ShardError, match=rf"^{NAME}: sample 000003-000000: cannot parse safetensors"):
        read_all(store, _with_matching_record(record, raw))


def test_empty_prompt_round_trip(tmp_path):
    store = open_store(tmp_path)
    with pytest.raises(ShardError, match=r"^empty_prompt.safetensors: missing from .*run precompute first"):
        load_empty_prompt(store)
    pe, pooled = torch.randn(1, 77, 64), torch.randn(1, 32)
    write_empty_prompt(store, pe, pooled, torch.bfloat16)
    got_pe, got_pooled = load_empty_prompt(store)
    assert got_pe.dtype == torch.bfloat16 and torch.equal(got_pe, pe.bfloat16())
    assert torch.equal(got_pooled, pooled.bfloat16())
    with pytest.raises(ValueError, match=r"expected prompt_embeds \(1, L, D\)"):
        write_empty_prompt(store, pe[0], pooled, "bf16")
    with pytest.raises(ValueError, match=r"unknown dtype 'int8'; expected one of \['bf16', 'fp16', 'fp32'\]"):
        write_empty_prompt(store, pe, pooled, "int8")
    (tmp_path / schema.EMPTY_PROMPT_FILE).write_bytes(b"garbage!!")
    with pytest.raises(ShardError, match=r"^empty_prompt.safetensors: cannot parse"):
        load_empty_prompt(store)


def test_member_claiming_a_huge_size_is_refused_before_buffering(shard):
    store, record, path = shard
    info = tarfile.TarInfo("000003-000000.safetensors")
    info.size = reader_mod.MAX_MEMBER_BYTES + 1
    path.write_bytes(info.tobuf(tarfile.USTAR_FORMAT) + bytes(4096))  # valid checksum, tiny file
    with pytest.raises(ShardError, match=rf"^{NAME}: member '000003-000000.safetensors' at byte 0 claims"):
        read_all(store, record)


def test_webdataset_reads_a_cache_as_documented(shard):
    """The cache is a plain WebDataset: webdataset's own reader yields each sample as its key and
    the three documented members, with the very bytes our verifying reader yields; decoding them
    with the project's schema (safetensors, PNG, JSON: no pickle) gives the same sample."""
    import webdataset as wds

    store, record, path = shard
    ours = list(iter_shard_members(store, record))
    theirs = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in theirs] == record.keys == [k for k, _ in ours]
    for sample, (key, members) in zip(theirs, ours):
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"safetensors", "cond.png", "json"}
        for member in schema.MEMBERS:
            assert sample[member] == members[member]
        decoded = schema.decode_sample(sample["__key__"], {m: sample[m] for m in schema.MEMBERS})
        assert decoded.key == key and decoded.latent_mean.dtype == torch.bfloat16
        assert decoded.cond_image().shape[2] == 3
