"""Manifest, records and identity: building, loading, and the errors a user sees."""

from __future__ import annotations

import json

import pytest

from shards import schema
from shards.identity import CacheIdentity
from shards.manifest import (
    Manifest,
    ManifestError,
    ShardRecord,
    ensure_identity,
    identity_diff,
    read_identity,
)
from shards.stores import open_store
from shards.synthetic import synthetic_identity, write_synthetic_cache


def record(index, samples, nbytes, skipped=None):
    return ShardRecord(
        index=index,
        name=schema.shard_name(index),
        samples=samples,
        bytes=nbytes,
        sha256=f"{index:x}" * 64 if index < 16 else "a" * 64,
        keys=[schema.sample_key(index, i) for i in range(samples)],
        skipped=skipped or {},
        skipped_items=[],
    )


def test_build_totals_and_round_trip(tmp_path):
    store = open_store(tmp_path)
    records = [record(1, 2, 20480, {"image_corrupt": 1}), record(0, 3, 30720, {"image_corrupt": 2, "caption_empty": 1})]
    m = Manifest.build(CacheIdentity.from_dict(synthetic_identity()), records, {"resolution": (64, 64)}, code_version="1.2.3", created="2024-01-01T00:00:00Z")
    assert [r.index for r in m.shards] == [0, 1]  # sorted by index
    assert m.totals == {"shards": 2, "samples": 5, "bytes": 51200, "skipped": {"caption_empty": 1, "image_corrupt": 3},
                        "notes": {}}
    assert m.latent.channels == 4 and m.text.prompt_dim == 64 and m.has_latent_std
    assert m.config == {"resolution": [64, 64]}  # JSON-normalised: equal to what loading gives
    m.save(store)
    loaded = Manifest.load(store)
    assert loaded == m
    assert Manifest.load(str(tmp_path)) == m
    assert loaded.record(1) == records[0]


def test_created_honours_source_date_epoch(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "86400")
    m = Manifest.build(CacheIdentity.from_dict(synthetic_identity()), [], {})
    assert m.created == "1970-01-02T00:00:00Z"


def test_load_errors_are_clear(tmp_path):
    store = open_store(tmp_path)
    with pytest.raises(ManifestError, match=rf"no manifest.json in {tmp_path}: run precompute first, or it did not finish"):
        Manifest.load(store)
    (tmp_path / "manifest.json").write_bytes(b'{"format": "sdxl-adapter-cache", ')
    with pytest.raises(ManifestError, match=r"manifest.json is not valid JSON .*re-run precompute"):
        Manifest.load(store)
    good = Manifest.build(CacheIdentity.from_dict(synthetic_identity()), [record(0, 1, 10240)], {}, code_version="x").to_dict()

    def load_with(**changes):
        (tmp_path / "manifest.json").write_text(json.dumps({**good, **changes}))
        return Manifest.load(store)

    with pytest.raises(ManifestError, match=r"format_version 3 is not supported \(this code reads 1, 2\); .*newer version"):
        load_with(format_version=3)
    with pytest.raises(ManifestError, match=r"not a sdxl-adapter-cache manifest"):
        load_with(format="something-else")
    with pytest.raises(ManifestError, match=r"totals.samples is 7 but the shards add up to 1"):
        load_with(totals={**good["totals"], "samples": 7})
    bad_latent = {**good["identity"]["latent"], "channels": 0, "store": "both"}
    with pytest.raises(ManifestError, match=r"latent.channels must be .*latent.store must be one of"):
        load_with(identity={**good["identity"], "latent": bad_latent})
    bad_shard = {**good["shards"][0], "name": "shards/x.tar", "sha256": "nothex"}
    with pytest.raises(ManifestError, match=r"shards\[0\]: name 'shards/x.tar' does not match index 0.*sha256 must be"):
        load_with(shards=[bad_shard])
    broken = json.loads(json.dumps(good))
    del broken["identity"]["text"], broken["identity"]["dtypes"]
    (tmp_path / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(ManifestError, match=r"missing section 'text'; missing section 'dtypes'"):
        Manifest.load(store)


def test_record_json_round_trip_and_validation():
    r = record(5, 2, 4096, {"x": 1})
    assert ShardRecord.from_json(r.to_json()) == r
    assert r.to_json() == record(5, 2, 4096, {"x": 1}).to_json()  # deterministic bytes
    with pytest.raises(ManifestError, match=r"2 keys for 3 samples"):
        ShardRecord.from_dict({**r.to_dict(), "samples": 3})
    with pytest.raises(ManifestError, match=r"missing fields \['sha256'\]"):
        ShardRecord.from_dict({k: v for k, v in r.to_dict().items() if k != "sha256"})
    with pytest.raises(ManifestError, match=r"not valid JSON"):
        ShardRecord.from_json(b"\xff")
    # A key is printed in messages: a newline or escape sequence in it could forge output lines.
    with pytest.raises(ManifestError, match=r"keys must be a list of non-empty strings of printable characters"):
        ShardRecord.from_dict({**r.to_dict(), "keys": [r.keys[0], "000005-00\n0001"]})


def test_identity_diff_lists_every_difference_with_dotted_paths():
    old = synthetic_identity()
    new = json.loads(json.dumps(old))
    new["encoder"]["vae_fingerprint"] = "cd" * 32
    new["latent"]["store"] = "mean"
    new["geometry"]["buckets"] = [[64, 64]]
    new["source"]["columns"] = ["image", "text"]
    del new["seed"]
    new["extra"] = True
    assert identity_diff(old, new) == [
        "encoder.vae_fingerprint: '" + "0" * 64 + "' != '" + "cd" * 32 + "'",
        "extra: (absent) != True",
        "geometry.buckets: None != [[64, 64]]",
        "latent.store: 'mean_std' != 'mean'",
        "seed: 0 != (absent)",
        "source.columns: None != ['image', 'text']",
    ]
    assert identity_diff(old, json.loads(json.dumps(old))) == []
    # tuples and lists are the same thing once written as JSON; lists recurse by index
    assert identity_diff({"a": (1, 2)}, {"a": [1, 2]}) == []
    assert identity_diff({"a": [1, 2]}, {"a": [1, 3]}) == ["a[1]: 2 != 3"]
    assert identity_diff({"a": 1}, {"a": True}) == ["a: 1 != True"]


def test_ensure_identity_writes_then_refuses_a_different_one(tmp_path, caplog):
    store = open_store(tmp_path / "c")
    ident = synthetic_identity()
    assert read_identity(store) is None
    ensure_identity(store, CacheIdentity.from_dict(ident))
    ensure_identity(store, CacheIdentity.from_dict(ident))  # same identity: fine (a resumed run)
    assert read_identity(store) == ident
    other = synthetic_identity(resolution=128, prompt_dim=2048)
    # Nothing built yet (a run stopped before its first shard): the new settings replace the old...
    with caplog.at_level("WARNING", logger="shards.manifest"):
        assert ensure_identity(store, CacheIdentity.from_dict(other)) == (CacheIdentity.from_dict(other), True)
    assert read_identity(store) == other and "its identity is replaced by this run's" in caplog.text
    # ...but once a sample is built, another identity is refused, every difference listed.
    built = open_store(tmp_path / "built")
    write_synthetic_cache(built, shards=1, samples_per_shard=2)
    ident = read_identity(built)
    other = {**ident, "geometry": {**ident["geometry"], "resolution": 128}, "text": {**ident["text"], "prompt_dim": 2048}}
    with pytest.raises(ManifestError, match=r"refusing to mix them") as e:
        ensure_identity(built, CacheIdentity.from_dict(other))
    assert "geometry.resolution: 64 != 128" in str(e.value) and "text.prompt_dim: 64 != 2048" in str(e.value)
    assert read_identity(built) == ident


def test_a_version_1_manifest_still_loads_and_its_copies_must_agree(tmp_path):
    """Caches written before the identity became the one place of latent/text/geometry/dtypes
    (format_version 1 repeated them at the top level) still load; copies that disagree are refused,
    and a version 2 manifest may not carry them at all."""
    store = open_store(tmp_path)
    v2 = Manifest.build(CacheIdentity.from_dict(synthetic_identity()), [record(0, 1, 10240)], {},
                        code_version="x").to_dict()
    assert v2["format_version"] == 2 and not {"latent", "text", "geometry", "dtypes"} & set(v2)
    v1 = {**v2, "format_version": 1, **{k: v2["identity"][k] for k in ("latent", "text", "geometry", "dtypes")}}
    (tmp_path / "manifest.json").write_text(json.dumps(v1))
    loaded = Manifest.load(store)
    assert loaded.latent.channels == 4 and loaded.text.prompt_dim == 64 and loaded.geometry.resolution == 64
    (tmp_path / "manifest.json").write_text(json.dumps({**v1, "text": {**v1["text"], "prompt_dim": 2048}}))
    with pytest.raises(ManifestError, match=r"sections \['text'\] disagree with the identity's"):
        Manifest.load(store)
    (tmp_path / "manifest.json").write_text(json.dumps({**v2, "latent": v2["identity"]["latent"]}))
    with pytest.raises(ManifestError, match=r"keeps .* in the identity only, found \['latent'\]"):
        Manifest.load(store)


def test_identity_differences_never_print_a_secret():
    """An identity recorded before locations were redacted may hold a password or a signed URL:
    the refusal that lists the differences says where, never the secret."""
    old = {"source": {"path": "https://alice:pw-1234@host.example/tars/{0..3}.tar?sig=tok-5678"}}
    new = {"source": {"path": "https://alice:REDACTED@host.example/tars/{0..3}.tar?sig=REDACTED"}}
    (line,) = identity_diff(old, new)
    assert line.startswith("source.path: ") and "pw-1234" not in line and "tok-5678" not in line
    assert "https://alice:REDACTED@host.example/tars/{0..3}.tar?sig=REDACTED" in line
