"""shards.units (the one size parser and printer), shards.store.file_sha256 and schema.dtype_of."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch

from shards import schema
from shards.store import file_sha256, stream_sha256
from shards.units import human_bytes, parse_size


@pytest.mark.parametrize("text, want", [
    ("4096", 4096), (" 4096 ", 4096), ("0", 0), ("5B", 5),
    ("64KiB", 64 << 10), ("64 mib", 64 << 20), ("5MiB", 5 << 20), ("1GiB", 1 << 30), ("2TiB", 2 << 40),
    ("1.5GiB", 3 << 29), ("1.5TiB", 3 << 39), ("2Ki", 2048),
    ("200GB", 200 * 10**9), ("500MB", 500 * 10**6), ("5M", 5 * 10**6), ("1.5KB", 1500), ("3k", 3000),
])
def test_parse_size_grammar(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text, why", [
    ("lots", "is not a size"), ("5 parsecs", "is not a size"), ("-1", "is not a size"), ("5iB", "is not a size"),
    ("", "is not a size"), ("1.5", "is not a whole number of bytes"), ("1.0001KB", "is not a whole number of bytes"),
])
def test_parse_size_errors_name_the_setting(text, why):
    with pytest.raises(ValueError) as e:
        parse_size(text)
    assert str(e.value).startswith(f"{text!r} {why} (e.g. ")
    with pytest.raises(ValueError) as e:
        parse_size(text, "SHARDS_S3_PART_SIZE")
    assert str(e.value).startswith(f"SHARDS_S3_PART_SIZE={text!r} {why}")


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 5 << 20, 3 << 30, 5 << 40, 5 << 50)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 GiB", "5.0 TiB", "5120.0 TiB"]


def test_sha256_helpers(tmp_path):
    data = bytes(range(256)) * 40_000  # 10 MB: more than one 4 MiB chunk
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    f = io.BytesIO(data)
    f.read(100)
    assert stream_sha256(f) == hashlib.sha256(data[100:]).hexdigest()  # what is left to read


def test_dtype_of():
    assert [schema.dtype_of(n) for n in ("bf16", "fp16", "fp32")] == [torch.bfloat16, torch.float16, torch.float32]
    assert schema.dtype_of(torch.float16) is torch.float16
    for bad in ("float16", "fp8", torch.int8, 16, None):
        with pytest.raises(ValueError, match=r"expected one of \['bf16', 'fp16', 'fp32'\]"):
            schema.dtype_of(bad)
