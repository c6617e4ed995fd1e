"""Changed and repeated inputs: a re-run over edited inputs names the stale shards and will not
call the cache complete until --rebuild-stale rebuilds them; repeated rows and tar keys are
counted (and dropped with --dedupe).

The real runner on the tiny model, over copies of the fill dataset edited in place.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from precompute.config import PrecomputeConfig
from precompute.errors import PrecomputeError
from precompute.runner import run
from shards.manifest import Manifest, read_record
from shards.reader import iter_shard
from shards.stores import open_store
from shards.verify import verify_cache


def _cfg(model, data, cache, **kw) -> PrecomputeConfig:
    base = dict(model=str(model), data=str(data), cache=str(cache), resolution=64, samples_per_shard=4,
                num_workers=0, device="cpu", batch_size=4)
    return PrecomputeConfig(**{**base, **kw})


@pytest.fixture
def data(fill_data, tmp_path) -> Path:
    """A private copy of the 16-item fill dataset, to edit."""
    return Path(shutil.copytree(fill_data, tmp_path / "data"))


def _shard_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache / "shards").iterdir())}


@pytest.mark.parametrize("mode", ["content", "stat"])
def test_an_image_edited_in_place_makes_its_shard_stale_until_rebuilt(tiny_model, data, tmp_path, mode):
    cache = tmp_path / "cache"
    run(_cfg(tiny_model, data, cache, source_fingerprint=mode))
    before = _shard_bytes(cache)
    record = read_record(open_store(cache), 1)
    assert record.sources is not None and len(record.sources) == len(record.source_keys) == 4
    assert all(s.startswith(("sha256:" if mode == "content" else "stat:")) for s in record.sources)
    manifest_entry = Manifest.load(open_store(cache)).shards[1]
    assert manifest_entry.sources is None  # the manifest stays small: fingerprints live in records

    rows = [json.loads(line) for line in (data / "prompt.json").read_text().splitlines()]
    target = data / rows[5]["target"]  # item 5 = shard 1, position 1
    pixels = np.asarray(Image.open(target).convert("RGB")).copy()
    pixels[:8] = 255 - pixels[:8]
    Image.fromarray(pixels).save(target)  # edited in place: same name, other bytes (and mtime)

    with pytest.raises(PrecomputeError) as err:
        run(_cfg(tiny_model, data, cache, source_fingerprint=mode))
    message = str(err.value)
    assert "1 shard(s) were made from inputs that changed since" in message
    assert "shards/shard-000001.tar: 1 of its 4 items changed since it was made" in message and "000001-000001" in message
    assert "--rebuild-stale" in message and "manifest.json was withdrawn" in message
    assert not (cache / "manifest.json").exists()  # nothing trains on it meanwhile
    assert _shard_bytes(cache) == before  # nothing else touched

    summary = run(_cfg(tiny_model, data, cache, source_fingerprint=mode, rebuild_stale=True))
    assert (summary.shards_written, summary.shards_resumed) == (1, 3)
    after = _shard_bytes(cache)
    assert {k for k in after if after[k] != before[k]} == {"shard-000001.tar"}
    verify_cache(open_store(cache))
    again = run(_cfg(tiny_model, data, cache, source_fingerprint=mode))  # fresh now: nothing to do
    assert again.shards_written == 0


def _edit_item_5(data: Path) -> None:
    rows = [json.loads(line) for line in (data / "prompt.json").read_text().splitlines()]
    target = data / rows[5]["target"]  # item 5 = shard 1, position 1
    pixels = np.asarray(Image.open(target).convert("RGB")).copy()
    pixels[:8] = 255 - pixels[:8]
    Image.fromarray(pixels).save(target)


def test_a_stale_cache_is_refused_before_the_model_loads(tiny_model, data, tmp_path, monkeypatch):
    """Source fingerprints need no model: the refusal comes before any weight is read."""
    import precompute.runner as runner

    cache = tmp_path / "cache"
    run(_cfg(tiny_model, data, cache))
    before = _shard_bytes(cache)
    _edit_item_5(data)
    loads: list[str] = []
    real_load = runner.load_encoders
    monkeypatch.setattr(runner, "load_encoders", lambda *a, **kw: loads.append("loaded") or real_load(*a, **kw))
    with pytest.raises(PrecomputeError) as err:
        run(_cfg(tiny_model, data, cache))
    assert loads == []  # refused without loading the encoders
    message = str(err.value)
    assert "shards/shard-000001.tar: 1 of its 4 items changed since it was made" in message
    assert "--rebuild-stale" in message and "manifest.json was withdrawn" in message
    assert not (cache / "manifest.json").exists() and _shard_bytes(cache) == before
    # --rebuild-stale reuses that check: the model loads once, the stale shard alone is rebuilt.
    summary = run(_cfg(tiny_model, data, cache, rebuild_stale=True))
    assert loads == ["loaded"] and (summary.shards_written, summary.shards_resumed) == (1, 3)
    verify_cache(open_store(cache))


def test_a_cache_of_another_dataset_is_refused_for_its_identity_with_nothing_touched(tiny_model, data, tmp_path):
    """Against another dataset every shard would look stale: that cache is refused for its
    identity (after the model loads, as before), and its manifest is not withdrawn."""
    from shards.errors import ManifestError

    cache = tmp_path / "cache"
    run(_cfg(tiny_model, data, cache))
    before = {p.relative_to(cache): p.read_bytes() for p in cache.rglob("*") if p.is_file() and ".staging" not in p.parts}
    other = Path(shutil.copytree(data, tmp_path / "other"))
    _edit_item_5(other)
    with pytest.raises(ManifestError, match="(?s)built with different settings or encoders.*source.path"):
        run(_cfg(tiny_model, other, cache))
    after = {p.relative_to(cache): p.read_bytes() for p in cache.rglob("*") if p.is_file() and ".staging" not in p.parts}
    assert after == before and (cache / "manifest.json").exists()


def test_an_edited_caption_is_noticed_without_reading_images_in_stat_mode(tiny_model, data, tmp_path):
    cache = tmp_path / "cache"
    run(_cfg(tiny_model, data, cache, source_fingerprint="stat"))
    lines = (data / "prompt.json").read_text().splitlines()
    row = json.loads(lines[14])
    row["prompt"] = "a different caption"
    lines[14] = json.dumps(row)
    (data / "prompt.json").write_text("\n".join(lines) + "\n")
    with pytest.raises(PrecomputeError, match=r"shard-000003.tar: 1 of its 4 items changed.*000003-000002"):
        run(_cfg(tiny_model, data, cache, source_fingerprint="stat"))


def test_repeated_rows_are_counted_and_dropped_with_dedupe(tiny_model, data, tmp_path, caplog):
    lines = (data / "prompt.json").read_text().splitlines()
    (data / "prompt.json").write_text("\n".join(lines + [lines[2], lines[7]]) + "\n")  # two rows again
    cache = tmp_path / "counted"
    with caplog.at_level("WARNING"):
        summary = run(_cfg(tiny_model, data, cache))
    assert summary.samples == 18
    assert Manifest.load(open_store(cache)).totals["repeated_items"] == 2
    warning = [r.getMessage() for r in caplog.records if "repeat an earlier one" in r.getMessage()]
    assert warning and "000004-000000 repeats 000000-000002" in warning[0] and "--dedupe" in warning[0]

    deduped = tmp_path / "deduped"
    summary = run(_cfg(tiny_model, data, deduped, dedupe=True))
    manifest = Manifest.load(open_store(deduped))
    assert summary.samples == 16 and manifest.totals["skipped"] == {"duplicate": 2}
    assert manifest.totals["repeated_items"] == 0
    items = [i for r in manifest.shards for i in r.skipped_items]
    assert [(i["reason"], i["repeats"]) for i in items] == [("duplicate", "000000-000002"), ("duplicate", "000001-000003")]
    assert manifest.identity.section("inputs") == {"fingerprint": "content", "dedupe": True}
    # The kept samples are the very ones of the plain cache.
    plain = {s.key: s.latent_mean for r in Manifest.load(open_store(cache)).shards
             for s in iter_shard(open_store(cache), r)}
    for r in manifest.shards:
        for s in iter_shard(open_store(deduped), r):
            assert (plain[s.key] == s.latent_mean).all()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


def test_a_tar_key_seen_again_is_counted_and_dropped_with_dedupe(tiny_model, fill_data, tmp_path):
    rows = [json.loads(line) for line in (fill_data / "prompt.json").read_text().splitlines()]

    def sample(key: str, i: int) -> list[tuple[str, bytes]]:
        r = rows[i]
        return [(f"{key}.png", (fill_data / r["target"]).read_bytes()), (f"{key}.txt", r["prompt"].encode()),
                (f"{key}.cond.png", (fill_data / r["source"]).read_bytes())]

    tars = tmp_path / "tars"
    tars.mkdir()
    # Key 0001 appears twice, apart (with other content the second time): two items of one name.
    _tar(tars / "00000.tar", sample("0000", 0) + sample("0001", 1) + sample("0002", 2) + sample("0001", 3))
    counted = run(_cfg(tiny_model, tars, tmp_path / "counted"))
    assert counted.samples == 4
    assert Manifest.load(open_store(tmp_path / "counted")).totals["repeated_items"] == 1
    deduped = run(_cfg(tiny_model, tars, tmp_path / "deduped", dedupe=True))
    assert deduped.samples == 3 and deduped.skipped == {"duplicate": 1}


def test_shards_damaged_after_they_were_written_are_rebuilt(tiny_model, fill_data, fill_cache, tmp_path, caplog):
    """A shard cut short is rebuilt by any re-run (a plain re-run used to refuse it as a publish
    conflict); one with a flipped byte at its recorded size by a re-run with --verify-existing.
    The rebuilt cache equals the original byte for byte."""
    cache = Path(shutil.copytree(fill_cache, tmp_path / "cache"))
    original = _shard_bytes(cache)
    manifest = (cache / "manifest.json").read_bytes()
    flipped = bytearray(original["shard-000001.tar"])
    flipped[len(flipped) // 2] ^= 0x01
    (cache / "shards/shard-000001.tar").write_bytes(bytes(flipped))
    (cache / "shards/shard-000002.tar").write_bytes(original["shard-000002.tar"][:1000])
    cfg = _cfg(tiny_model, fill_data, cache, batch_size=8)  # the fixture's settings (its batch does not matter)

    with caplog.at_level("WARNING", logger="precompute.runner"):
        stats = run(cfg)
    assert stats.shards_written == 1  # the short one; the flipped one has its recorded size
    assert "shards/shard-000002.tar: rebuilding it: it has 1000 bytes, its record says" in caplog.text
    assert _shard_bytes(cache)["shard-000002.tar"] == original["shard-000002.tar"]
    with pytest.raises(Exception, match="shard-000001.tar: sha256 mismatch"):
        verify_cache(open_store(cache), Manifest.load(open_store(cache)))

    caplog.clear()
    with caplog.at_level("WARNING", logger="precompute.runner"):
        stats = run(dataclasses.replace(cfg, verify_existing=True))
    assert stats.shards_written == 1
    assert "shards/shard-000001.tar: rebuilding it: its sha256 is" in caplog.text
    assert _shard_bytes(cache) == original and (cache / "manifest.json").read_bytes() == manifest
    verify_cache(open_store(cache), Manifest.load(open_store(cache)))

    # A damaged record beside a shard holding other bytes (as another machine's rebuild would
    # make them): the shard goes with its record, so the rebuilt bytes are no publish conflict.
    (cache / "records/shard-000000.json").write_text("<html>garbage</html>")
    (cache / "shards/shard-000000.tar").write_bytes(original["shard-000002.tar"])
    caplog.clear()
    with caplog.at_level("WARNING", logger="precompute.runner"):
        stats = run(cfg)
    assert stats.shards_written == 1
    assert "shards/shard-000000.tar: rebuilding it: its record is damaged (" in caplog.text
    assert _shard_bytes(cache) == original
