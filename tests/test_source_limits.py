"""Bounded input reading: nothing a dataset names may block, read forever, escape its folder or
blow the stack. FIFOs, devices and folders, symlinks out of the root, over-size files and tar
members, huge image headers, long and many captions, and pathological JSON rows."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import pytest
from PIL import Image
from test_sources import (
    img2dataset_sample,
    items,
    make_images,
    png,
    rows,
    write_jsonl,
    write_tar,
)

from precompute.config import PrecomputeConfig
from precompute.preprocess import SKIP_REASONS, Skip, load_rgb, prepare_views
from precompute.runner import run
from precompute.source_base import MAX_JSON_DEPTH, ReadLimits, json_problem
from precompute.sources import SourceError, open_source
from shards.manifest import Manifest
from shards.stores import open_store


def _read_with_timeout(fn, seconds: float = 20.0):
    """Run fn in a thread; fail (instead of hanging the suite) if it blocks."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised in the test thread
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"reading blocked for more than {seconds}s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_only_regular_files_are_read_and_nothing_blocks(tmp_path):
    make_images(tmp_path, 4)
    os.mkfifo(tmp_path / "img" / "fifo.png")  # opening it for reading would wait for a writer
    (tmp_path / "img" / "folder.png").mkdir()
    data = rows(4)
    data[0]["file_name"] = "img/fifo.png"
    data[1]["file_name"] = "img/folder.png"
    data[2]["conditioning_image"] = "/dev/zero"  # endless: refused by type, never read
    write_jsonl(tmp_path / "metadata.jsonl", data)
    got = _read_with_timeout(lambda: items(open_source(tmp_path, limits=ReadLimits(follow_symlinks=True))))
    assert [i.error and i.error[0] for i in got] == ["image_unreadable", "image_unreadable", "cond_unreadable", None]
    assert got[0].error[1].endswith("fifo.png: not a regular file (a FIFO)")
    assert got[1].error[1].endswith("folder.png: not a regular file (a folder)")
    assert got[2].error[1] == "/dev/zero: not a regular file (a character device)" and got[2].image == png(2)
    # Without --follow-symlinks, /dev/zero is first of all outside the dataset folder.
    got = _read_with_timeout(lambda: items(open_source(tmp_path)))
    assert got[2].error[0] == "cond_outside_root"


def test_files_outside_the_root_are_skipped_unless_following_symlinks(tmp_path):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    make_images(root, 5)
    elsewhere.mkdir()
    (elsewhere / "secret.png").write_bytes(png(99))
    (root / "img" / "link-out.png").symlink_to(elsewhere / "secret.png")
    (root / "img" / "link-in.png").symlink_to(root / "img" / "0.png")  # inside: fine
    data = rows(5)
    data[0]["file_name"] = "img/link-out.png"
    data[1]["file_name"] = "../elsewhere/secret.png"
    data[2]["file_name"] = str(elsewhere / "secret.png")
    data[3]["file_name"] = "img/link-in.png"
    data[4]["conditioning_image"] = "img/../../elsewhere/secret.png"
    write_jsonl(root / "metadata.jsonl", data)
    got = items(open_source(root))
    reasons = [i.error and i.error[0] for i in got]
    assert reasons == ["image_outside_root"] * 3 + [None, "cond_outside_root"]
    assert f"resolves to {elsewhere / 'secret.png'}, outside the dataset folder {root}" in got[0].error[1]
    assert "--follow-symlinks" in got[0].error[1]
    assert got[3].image == png(0)
    followed = items(open_source(root, limits=ReadLimits(follow_symlinks=True)))
    assert [i.error for i in followed] == [None] * 5
    assert [i.image for i in followed[:3]] == [png(99)] * 3 and followed[4].cond == png(99)
    for reason in ("image_outside_root", "cond_outside_root", "image_too_large", "cond_too_large"):
        assert reason in SKIP_REASONS


def test_over_size_files_are_skipped_without_being_read(tmp_path, monkeypatch):
    make_images(tmp_path, 3)
    (tmp_path / "img" / "big.png").write_bytes(b"\x89PNG" + bytes(5000))
    data = rows(3)
    data[0]["file_name"] = "img/big.png"
    data[1]["conditioning_image"] = "img/big.png"
    write_jsonl(tmp_path / "metadata.jsonl", data)
    opened: dict[int, str] = {}  # fd -> the path it was last opened for
    all_opened: list[str] = []
    read_from: list[str] = []
    real_open, real_read = os.open, os.read

    def open_(path, *a, **kw):
        fd = real_open(path, *a, **kw)
        opened[fd] = str(path)
        all_opened.append(str(path))
        return fd

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "read", lambda fd, n: read_from.append(opened.get(fd, "?")) or real_read(fd, n))
    got = items(open_source(tmp_path, limits=ReadLimits(max_file_bytes=1000)))
    assert [i.error and i.error[0] for i in got] == ["image_too_large", "cond_too_large", None]
    assert "big.png: 5,004 bytes, over the 1,000-byte cap" in got[0].error[1]
    assert "--max-input-bytes" in got[0].error[1]
    assert got[1].image == png(1) and got[2].cond == png(1002)
    # The big file was opened (to fstat it) but not one byte of it was read.
    assert sum(p.endswith("big.png") for p in all_opened) == 2
    assert read_from and not any(p.endswith("big.png") for p in read_from)
    with pytest.raises(SourceError, match="max_file_bytes must be an integer >= 1"):
        open_source(tmp_path, limits=ReadLimits(max_file_bytes=0))


def test_over_size_tar_members_and_deep_json_members(tmp_path):
    big = img2dataset_sample("a", 1, jpg=bytes(20000))
    big_cond = img2dataset_sample("b", 2, **{"cond.png": bytes(20000)})
    deep = img2dataset_sample("c", 3, json=b"[" * 200_000)
    del deep["txt"]
    ok = img2dataset_sample("d", 4)
    write_tar(tmp_path / "x.tar", [big, big_cond, deep, ok])
    got = items(open_source(tmp_path / "x.tar", limits=ReadLimits(max_file_bytes=10000)))
    assert [i.error and i.error[0] for i in got] == ["image_too_large", "cond_too_large", "metadata_invalid", None]
    assert "x.tar:a.jpg: 20,000 bytes, over the 10,000-byte cap" in got[0].error[1]
    assert "x.tar:b.cond.png" in got[1].error[1] and got[1].image == png(2)
    assert "nested 200000 levels deep" in got[2].error[1]
    assert got[3].image == png(4)


def test_huge_image_headers_are_skipped_before_decoding(tmp_path):
    buf = io.BytesIO()
    Image.new("1", (13000, 13000)).save(buf, format="PNG")  # 169 MP, a few KB compressed
    data = buf.getvalue()
    assert len(data) < 200_000
    with pytest.raises(Skip) as ei:
        load_rgb(data, "cond", "huge.png")
    assert ei.value.reason == "cond_too_large"
    assert ei.value.detail == (
        "huge.png: 13000x13000 px = 169,000,000 pixels, over --max-image-pixels 64,000,000 (checked before decoding)")
    item = items_from_bytes(tmp_path, data)
    with pytest.raises(Skip) as ei:
        prepare_views(item, resolution=8, min_size=0)
    assert ei.value.reason == "image_too_large"
    with pytest.raises(Skip, match="image_too_large: x.png: 8x8 px = 64 pixels, over --max-image-pixels 63 "):
        prepare_views(items_from_bytes(tmp_path, png(0)), resolution=8, min_size=0, max_image_pixels=63)


def items_from_bytes(tmp_path: Path, image: bytes):
    from precompute.source_base import RawItem

    return RawItem("x.png", image, png(1000), ["a caption"])


def test_long_and_many_captions_are_bounded(tmp_path):
    from precompute.preprocess import MAX_CAPTION_CHARS, MAX_CAPTIONS_PER_ITEM
    from precompute.source_base import RawItem

    long = "a" * (MAX_CAPTION_CHARS + 500)
    view = prepare_views(RawItem("x", png(0), png(1), [long, "short"]), resolution=8, min_size=0)[0]
    assert [len(c) for c in view.captions] == [MAX_CAPTION_CHARS, 5] and view.captions_cut == [True, False]
    many = [f"caption {k}" for k in range(MAX_CAPTIONS_PER_ITEM + 36)]
    view = prepare_views(RawItem("x", png(0), png(1), many), resolution=8, min_size=0)[0]
    assert view.captions == many[:MAX_CAPTIONS_PER_ITEM] and view.captions_dropped == 36


def test_pathological_json_rows_are_skipped_rows_never_recursion_errors(tmp_path):
    make_images(tmp_path, 3)
    lines = [json.dumps(r) for r in rows(3)]
    lines.insert(1, "[" * 200_000)
    lines.insert(2, json.dumps({"file_name": "img/1.png", "text": "x" * (1 << 20)}))  # over 1 MiB
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    got = items(open_source(tmp_path, samples_per_shard=2))
    assert [i.error and i.error[0] for i in got] == [None, "metadata_invalid", "metadata_invalid", None, None]
    assert "row 2 (line 2): not valid JSON: JSON nested 200000 levels deep, over the cap of 64" in got[1].error[1]
    assert "over the 1,048,576-byte cap" in got[2].error[1]
    assert got[3].image == png(1)
    # A JSON list is parsed whole: a deep one stops the file with a message saying what to do.
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.json").write_text(json.dumps(rows(3))[:-1] + ", " + "[" * 5000 + "]" * 5000 + "]")
    with pytest.raises(SourceError, match="nested 5001 levels deep.*JSON lines"):
        open_source(tmp_path)
    # The depth check counts brackets inside strings as text, not nesting.
    assert json_problem(json.dumps({"text": "[" * 1000}).encode()) is None
    assert json_problem(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)) is not None


def test_precompute_counts_the_new_skips_and_caption_notes(tiny_model, fill_data, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rows_ = [json.loads(line) for line in (fill_data / "prompt.json").read_text().splitlines()][:4]
    for r in rows_:
        for k in ("source", "target"):
            (root / r[k]).parent.mkdir(exist_ok=True)
            (root / r[k]).write_bytes((fill_data / r[k]).read_bytes())
    os.mkfifo(root / "fifo.png")
    (root / "out.png").symlink_to(fill_data / rows_[0]["target"])
    meta = [{"image": r["target"], "conditioning_image": r["source"], "text": r["prompt"]} for r in rows_]
    meta[1]["text"] = "long " * 1000  # 5000 characters
    meta.append({"image": "fifo.png", "conditioning_image": rows_[0]["source"], "text": "x"})
    meta.append({"image": "out.png", "conditioning_image": rows_[0]["source"], "text": "x"})
    write_jsonl(root / "metadata.jsonl", meta)
    cfg = PrecomputeConfig(model=str(tiny_model), data=str(root), cache=str(tmp_path / "cache"), resolution=64,
                           samples_per_shard=3, batch_size=2, num_workers=0, device="cpu")
    summary = _read_with_timeout(lambda: run(cfg), 300)
    assert summary.samples == 4 and summary.skipped == {"image_unreadable": 1, "image_outside_root": 1}
    manifest = Manifest.load(open_store(tmp_path / "cache"))
    assert sum(r.notes.get("caption_truncated", 0) for r in manifest.shards) == 1
    assert manifest.identity.section("input_limits") == {"max_input_bytes": 256 << 20, "max_image_pixels": 64_000_000,
                                                 "follow_symlinks": False}


def test_tars_linked_from_outside_the_dataset_folder_obey_follow_symlinks(tmp_path):
    root, elsewhere = tmp_path / "tars", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    write_tar(root / "00000.tar", [img2dataset_sample("a", 1)])
    write_tar(elsewhere / "secret.tar", [img2dataset_sample("s", 2)])
    (root / "00001.tar").symlink_to(elsewhere / "secret.tar")  # planted: points out
    (root / "00002.tar").symlink_to(root / "00000.tar")  # inside: fine
    for spec in (str(root), str(root / "{00000..00002}.tar")):
        with pytest.raises(SourceError) as err:
            open_source(spec)
        message = str(err.value)
        assert f"1 tar(s) resolves outside the dataset folder {root}" in message, message
        assert f"{root / '00001.tar'} -> {elsewhere / 'secret.tar'}" in message and "--follow-symlinks" in message
        followed = items(open_source(spec, limits=ReadLimits(follow_symlinks=True)))
        assert [i.image for i in followed] == [png(1), png(2), png(1)]
    (root / "00001.tar").unlink()
    assert [i.image for i in items(open_source(root))] == [png(1), png(1)]
    # One tar named on its own is the user's explicit choice, wherever it lives (as a metadata file).
    (tmp_path / "named.tar").symlink_to(elsewhere / "secret.tar")
    assert [i.image for i in items(open_source(tmp_path / "named.tar"))] == [png(2)]


def test_hf_folders_with_links_pointing_out_obey_follow_symlinks(tmp_path):
    import datasets

    def table(seed: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"image": [png(seed)], "conditioning_image": [png(seed + 500)],
                                           "text": [f"caption {seed}"]})

    root, elsewhere = tmp_path / "hub", tmp_path / "elsewhere"
    (root / "data").mkdir(parents=True)
    elsewhere.mkdir()
    table(1).to_parquet(str(root / "data" / "train-00000-of-00002.parquet"))
    table(2).to_parquet(str(elsewhere / "private.parquet"))
    (root / "data" / "train-00001-of-00002.parquet").symlink_to(elsewhere / "private.parquet")
    cache = tmp_path / "hf-cache"
    with pytest.raises(SourceError) as err:
        open_source(root, cache_dir=str(cache))
    message = str(err.value)
    assert "1 file(s) or folder(s) resolves outside the dataset folder" in message, message
    assert f"{root / 'data' / 'train-00001-of-00002.parquet'} -> {elsewhere / 'private.parquet'}" in message
    followed = open_source(root, cache_dir=str(cache), limits=ReadLimits(follow_symlinks=True))
    assert sorted(i.image for i in items(followed)) == sorted([png(1), png(2)])
    # A linked folder is refused the same way; a save_to_disk folder too.
    (root / "data" / "train-00001-of-00002.parquet").unlink()
    (root / "data" / "more").symlink_to(elsewhere)
    with pytest.raises(SourceError, match=r"data/more -> .*elsewhere"):
        open_source(root, cache_dir=str(cache))
    table(3).save_to_disk(str(elsewhere / "saved"))
    saved = tmp_path / "saved"
    saved.mkdir()
    for p in (elsewhere / "saved").iterdir():
        (saved / p.name).symlink_to(p)
    with pytest.raises(SourceError, match="resolve outside the dataset folder"):
        open_source(saved)
    assert [i.image for i in items(open_source(saved, limits=ReadLimits(follow_symlinks=True)))] == [png(3)]


def test_json_caps_are_settings_and_a_long_line_is_never_read_whole(tmp_path):
    import tracemalloc

    make_images(tmp_path, 3)
    lines = [json.dumps(r) for r in rows(3)]
    lines.insert(1, json.dumps({"file_name": "img/1.png", "text": "x" * (32 << 20)}))  # one 32 MiB line
    lines.insert(2, json.dumps({**rows(3)[1], "tags": [[["deep"]]]}))  # 4 deep
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    limits = ReadLimits(max_json_bytes=64 << 10, max_json_depth=3)
    tracemalloc.start()
    try:
        got = items(open_source(tmp_path, samples_per_shard=2, limits=limits))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Held at once: the metadata file's sha256 reads 4 MiB chunks (~8 MiB peak); the line itself
    # goes by in 1 MiB chunks. Read whole, it alone would be 32 MiB.
    assert peak < 16 << 20, f"{peak:,} bytes held while reading a 32 MiB line past a 64 KiB cap"
    assert [i.error and i.error[0] for i in got] == [None, "metadata_invalid", "metadata_invalid", None, None]
    length = len(lines[1]) + 1  # its newline included, as json_problem counts a line
    assert got[1].error[1] == (f"metadata.jsonl row 2 (line 2): not valid JSON: {length:,} bytes of JSON, over the "
                               "65,536-byte cap (--max-json-bytes) (checked before parsing)")
    assert "row 3 (line 3): not valid JSON: JSON nested 4 levels deep, over the cap of 3 (--max-json-depth)" \
        in got[2].error[1]
    assert [i.image for i in got[3:]] == [png(1), png(2)]
    # The defaults let the deep row through; the long line is still over 1 MiB.
    assert [i.error and i.error[0] for i in items(open_source(tmp_path))][1:3] == ["metadata_invalid", None]
    with pytest.raises(SourceError, match="max_json_bytes must be an integer >= 1, got 0"):
        open_source(tmp_path, limits=ReadLimits(max_json_bytes=0))


def test_a_json_list_is_held_to_the_input_file_cap_and_a_csv_line_to_the_row_cap(tmp_path):
    make_images(tmp_path, 3)
    (tmp_path / "metadata.json").write_text(json.dumps(rows(3)))
    size = (tmp_path / "metadata.json").stat().st_size
    assert [i.image for i in items(open_source(tmp_path))] == [png(0), png(1), png(2)]
    with pytest.raises(SourceError) as err:
        open_source(tmp_path, limits=ReadLimits(max_file_bytes=100))
    assert str(err.value).startswith(f"{tmp_path / 'metadata.json'}: {size:,} bytes, over the 100-byte cap of an "
                                     "input file (--max-input-bytes); a JSON list is parsed whole: write the metadata "
                                     "as JSON lines"), str(err.value)
    (tmp_path / "metadata.json").unlink()
    text = "file_name,conditioning_image,text\n" + "".join(f"img/{i}.png,cond/{i}.png,caption {i}\n" for i in range(3))
    (tmp_path / "metadata.csv").write_text(text + "img/0.png,cond/0.png," + "y" * 5000 + "\n")
    with pytest.raises(SourceError) as err:
        open_source(tmp_path, limits=ReadLimits(max_json_bytes=1000))
    assert str(err.value) == (f"{tmp_path / 'metadata.csv'} line 5: longer than 1,000 bytes (--max-json-bytes, the cap "
                              "of a metadata row): damaged, or not a metadata file; fix that line or raise "
                              "--max-json-bytes")
    assert len(items(open_source(tmp_path))) == 4


def test_tar_text_members_follow_the_json_caps(tmp_path):
    sample = img2dataset_sample("a", 1, json=json.dumps({"caption": "c", "tags": [[["x"]]]}).encode())
    del sample["txt"]
    write_tar(tmp_path / "x.tar", [sample, img2dataset_sample("b", 2)])
    got = items(open_source(tmp_path / "x.tar", limits=ReadLimits(max_json_depth=2)))
    assert got[0].error[0] == "metadata_invalid" and "over the cap of 2 (--max-json-depth)" in got[0].error[1]
    assert got[1].error is None
    # A caption member over the cap is never read: the item says how big it was.
    write_tar(tmp_path / "y.tar", [img2dataset_sample("c", 3, txt=b"a caption of 30 bytes, exactly")])
    got = items(open_source(tmp_path / "y.tar", limits=ReadLimits(max_json_bytes=20)))
    assert got[0].error == ("caption_invalid", "y.tar:c.txt: 30 bytes, over the 20-byte cap")


def test_caption_and_json_caps_are_precompute_settings_in_the_identity(tiny_model, fill_data, tmp_path):
    import click

    from precompute.errors import ConfigError
    from precompute.settings import resolve
    from shards.reader import iter_shard
    from train.__main__ import main as train_main

    root = tmp_path / "data"
    root.mkdir()
    rows_ = [json.loads(line) for line in (fill_data / "prompt.json").read_text().splitlines()][:4]
    for r in rows_:
        for k in ("source", "target"):
            (root / r[k]).parent.mkdir(exist_ok=True)
            (root / r[k]).write_bytes((fill_data / r[k]).read_bytes())
    meta = [{"image": r["target"], "conditioning_image": r["source"], "text": r["prompt"] * 3} for r in rows_]
    meta[2]["notes"] = "n" * 600  # a row over --max-json-bytes 512
    write_jsonl(root / "metadata.jsonl", meta)
    cache = tmp_path / "cache"
    base = dict(model=str(tiny_model), data=str(root), cache=str(cache), resolution=64, samples_per_shard=4,
                batch_size=2, num_workers=0, device="cpu")
    summary = run(PrecomputeConfig(**base, max_caption_chars=20, max_json_bytes=512, max_json_depth=8))
    assert summary.samples == 3 and summary.skipped == {"metadata_invalid": 1}
    manifest = Manifest.load(open_store(cache))
    captions = [s.meta.captions for r in manifest.shards for s in iter_shard(open_store(cache), r)]
    assert captions == [[(r["prompt"] * 3)[:20]] for r in (rows_[0], rows_[1], rows_[3])]
    assert all(len(r["prompt"] * 3) > 20 for r in rows_)
    assert manifest.identity.section("captions") == {"allow_empty": False, "max_chars": 20}
    assert manifest.identity.section("input_limits") == {
        "max_input_bytes": 256 << 20, "max_image_pixels": 64_000_000, "follow_symlinks": False,
        "max_json_bytes": 512, "max_json_depth": 8}
    assert manifest.config["max_caption_chars"] == 20 and manifest.config["max_json_bytes"] == 512
    # They decide the cache's bytes and which items it holds: a resume with other values is refused.
    with pytest.raises(Exception, match=r"(?s)captions.max_chars.*input_limits.max_json_bytes"):
        run(PrecomputeConfig(**base))
    with pytest.raises(ConfigError, match="--max-caption-chars must be an integer >= 1, got 0"):
        resolve(PrecomputeConfig(**{**base, "cache": str(tmp_path / "other")}, max_caption_chars=0))
    with pytest.raises(click.UsageError, match="--max-json-bytes is fixed at precompute"):
        train_main.make_context("train", ["--max-json-bytes", "2MiB"])
