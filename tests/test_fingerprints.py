"""Per-item source fingerprints: content ("sha256:...") and stat ("stat:...") modes, for every source.

Same content -> same fingerprint (across runs, copies of the dataset, and formats); an edit changes
exactly the edited item's fingerprint; `unit_fingerprints(i)` equals what `iter_unit(i)` items carry
(error items included); stat mode lists a unit without opening a single image file.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
import tarfile

import datasets
import pytest
from test_sources import (
    img2dataset_sample,
    make_images,
    png,
    rows,
    write_jsonl,
    write_tar,
)

from precompute.source_base import RawItem, content_fingerprint
from precompute.sources import SourceError, open_source


def expected_content(image: bytes | None, cond: bytes | None, captions: list[str] | None,
                     reason: str | None = None) -> str:
    """The documented recipe, spelled out independently of the implementation."""
    h = hashlib.sha256()
    caption_bytes = json.dumps(captions, ensure_ascii=False, separators=(",", ":")).encode()
    for part in (image, cond, caption_bytes, reason.encode() if reason else None):
        h.update(b"\xff" * 8 if part is None else len(part).to_bytes(8, "big") + part)
    return "sha256:" + h.hexdigest()


def caption_hash(*captions: str) -> str:
    return hashlib.sha256(json.dumps(list(captions), separators=(",", ":")).encode()).hexdigest()[:16]


def fingerprints(src) -> list[str]:
    return [it.fingerprint for u in range(src.num_units()) for it in src.iter_unit(u)]


def listed(src) -> list[str]:
    return [fp for u in range(src.num_units()) for fp in src.unit_fingerprints(u)]


def folder(root, n=5):
    make_images(root, n)
    data = rows(n)
    data[3]["file_name"] = "img/missing.png"  # an error item has a fingerprint too
    write_jsonl(root / "metadata.jsonl", data)
    return root


def test_content_fingerprints_follow_the_recipe_and_survive_a_copy(tmp_path):
    root = folder(tmp_path / "a")
    src = open_source(root, samples_per_shard=2)
    got = [it for u in range(src.num_units()) for it in src.iter_unit(u)]
    assert got[0].fingerprint == expected_content(png(0), png(1000), ["caption 0"])
    assert got[3].error[0] == "image_missing"
    assert got[3].fingerprint == expected_content(None, None, None, "image_missing")
    assert listed(src) == fingerprints(src) == [it.fingerprint for it in got]
    assert len(set(fingerprints(src))) == 5
    shutil.copytree(root, tmp_path / "b")  # another path, new mtimes: same content
    assert fingerprints(open_source(tmp_path / "b", samples_per_shard=3)) == fingerprints(src)
    assert content_fingerprint(RawItem("x", b"ab", b"c", ["d"])) != content_fingerprint(RawItem("x", b"a", b"bc", ["d"]))


def test_an_edit_changes_exactly_that_items_fingerprint(tmp_path):
    root = folder(tmp_path)
    before = fingerprints(open_source(root))
    (root / "cond" / "2.png").write_bytes(png(77))  # an edited conditioning image
    data = rows(5)
    data[3]["file_name"] = "img/missing.png"
    data[4]["text"] = "caption 4, edited"
    write_jsonl(root / "metadata.jsonl", data)
    after = fingerprints(open_source(root))
    assert [k for k in range(5) if before[k] != after[k]] == [2, 4]


def test_stat_mode_lists_fingerprints_without_opening_an_image(tmp_path, monkeypatch):
    root = folder(tmp_path / "a")
    src = open_source(root, samples_per_shard=2, fingerprint_mode="stat")
    items = fingerprints(src)
    st0, c0 = os.stat(root / "img" / "0.png"), os.stat(root / "cond" / "0.png")
    assert items[0] == f"stat:{st0.st_size}:{st0.st_mtime_ns}/{c0.st_size}:{c0.st_mtime_ns}/{caption_hash('caption 0')}"
    c3 = os.stat(root / "cond" / "3.png")
    assert items[3] == f"stat:-/{c3.st_size}:{c3.st_mtime_ns}/{caption_hash('caption 3')}"

    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **kw: opened.append(str(f)) or real_open(f, *a, **kw))
    monkeypatch.setattr(os, "open", lambda f, *a, **kw: opened.append(str(f)) or real_os_open(f, *a, **kw))
    assert listed(src) == items
    monkeypatch.undo()
    assert opened and all(p.endswith("metadata.jsonl") for p in opened), opened  # the metadata, nothing else

    # mtimes matter in stat mode (not in content mode); a copy that keeps them (copy2) keeps them.
    shutil.copytree(root, tmp_path / "b", copy_function=shutil.copy2)
    assert fingerprints(open_source(tmp_path / "b", fingerprint_mode="stat")) == items
    os.utime(root / "img" / "1.png", ns=(1, 1))
    touched = fingerprints(open_source(root, fingerprint_mode="stat"))
    assert [k for k in range(5) if touched[k] != items[k]] == [1]
    assert fingerprints(open_source(root)) == fingerprints(open_source(tmp_path / "b"))
    with pytest.raises(SourceError, match="fingerprint_mode must be one of"):
        open_source(root, fingerprint_mode="mtime")


def test_tar_fingerprints_in_both_modes(tmp_path):
    samples = [img2dataset_sample(f"{k}", k) for k in range(3)]
    del samples[1]["cond.png"]  # an error item
    write_tar(tmp_path / "a.tar", samples)
    content = open_source(tmp_path / "a.tar")
    fps = fingerprints(content)
    assert fps[0] == expected_content(png(0), png(500), ["caption 0"])
    assert fps[1] == expected_content(png(1), None, ["caption 1"], "cond_missing")
    assert listed(content) == fps
    shutil.copy(tmp_path / "a.tar", tmp_path / "b.tar")
    assert fingerprints(open_source(tmp_path / "b.tar")) == fps

    stat = open_source(tmp_path / "a.tar", fingerprint_mode="stat")
    sfps = fingerprints(stat)
    assert listed(stat) == sfps
    st = os.stat(tmp_path / "a.tar")
    members = {m.name: m for m in tarfile.open(tmp_path / "a.tar")}
    img, cond = members["0.jpg"], members["0.cond.png"]
    assert sfps[0] == (f"stat:tar:{st.st_size}:{st.st_mtime_ns}:{img.offset_data}:{img.size}/"
                       f"{cond.offset_data}:{cond.size}/{caption_hash('caption 0')}")
    assert sfps[1].endswith(f"/-/{caption_hash('caption 1')}")
    (tmp_path / "c.tar").write_bytes((tmp_path / "a.tar").read_bytes()[:3000])  # corrupt: its error item
    corrupt = open_source(tmp_path / "c.tar", fingerprint_mode="stat")
    assert listed(corrupt) == fingerprints(corrupt) and fingerprints(corrupt)[-1].endswith(":tar_corrupt")


def test_a_dataset_has_the_content_fingerprints_of_the_same_files_in_a_folder(tmp_path):
    root = tmp_path / "folder"
    make_images(root, 4)
    write_jsonl(root / "metadata.jsonl", rows(4, image="image"))
    ds = datasets.Dataset.from_dict({
        "image": [{"bytes": png(i), "path": None} for i in range(4)],
        "conditioning_image": [{"bytes": png(1000 + i), "path": None} for i in range(4)],
        "text": [f"caption {i}" for i in range(4)],
    }, features=datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                   "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    hf = open_source(tmp_path / "ds", samples_per_shard=3, fingerprint_mode="stat")  # stat: ignored, content
    assert hf.describe()["fingerprint_mode"] == "content"
    assert fingerprints(hf) == listed(hf) == fingerprints(open_source(root))
