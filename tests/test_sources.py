"""precompute.sources: folder metadata (jsonl / json / csv / fill50k) and WebDataset tars."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from precompute.preprocess import SKIP_REASONS, Skip, prepare_views
from precompute.sources import (
    FolderSource,
    RawItem,
    SourceError,
    WebDatasetSource,
    open_source,
)


def prepare(item: RawItem, **kwargs):
    """The primary view alone (what a one-view cache stores)."""
    return prepare_views(item, **kwargs)[0]

def png(seed: int, size=(8, 8)) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def make_images(root: Path, n: int) -> None:
    """root/img/i.png and root/cond/i.png (distinct content per file)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "cond").mkdir(exist_ok=True)
    for i in range(n):
        (root / "img" / f"{i}.png").write_bytes(png(i))
        (root / "cond" / f"{i}.png").write_bytes(png(1000 + i))


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def items(source) -> list[RawItem]:
    out = [it for i in range(source.num_units()) for it in source.iter_unit(i)]
    for it in out:
        if it.error:
            assert it.error[0] in SKIP_REASONS, it.error
    return out


def rows(n: int, image="file_name", cond="conditioning_image", caption="text") -> list[dict]:
    return [{image: f"img/{i}.png", cond: f"cond/{i}.png", caption: f"caption {i}"} for i in range(n)]


# ----------------------------------------------------------------------------------- folder


def test_jsonl_default_columns(tmp_path):
    make_images(tmp_path, 3)
    write_jsonl(tmp_path / "metadata.jsonl", rows(3))
    src = open_source(tmp_path)
    assert isinstance(src, FolderSource) and src.kind == "folder"
    got = items(src)
    assert [i.source_id for i in got] == ["img/0.png", "img/1.png", "img/2.png"]
    assert [i.captions for i in got] == [["caption 0"], ["caption 1"], ["caption 2"]]
    assert got[1].image == png(1) and got[1].cond == png(1001) and got[1].cond_id == "cond/1.png"
    assert all(i.error is None for i in got)
    d = src.describe()
    assert d["kind"] == "folder" and d["format"] == "jsonl" and d["path"] == str(tmp_path.resolve())
    assert d["columns"] == {"image": "file_name", "conditioning_image": "conditioning_image", "caption": "text"}
    assert "rows" not in d and "metadata_sha256" not in d  # contents are per-item fingerprints, not identity


def test_image_column_prefers_image_over_file_name(tmp_path):
    make_images(tmp_path, 2)
    write_jsonl(tmp_path / "metadata.jsonl", [{**r, "image": "img/1.png"} for r in rows(1)])
    assert items(open_source(tmp_path))[0].image == png(1)


def test_json_list_custom_columns_and_caption_lists(tmp_path):
    make_images(tmp_path, 3)
    data = rows(3, image="photo", cond="hint", caption="captions")
    data[0]["captions"] = ["first", "", "second"]
    data[1]["captions"] = 42
    data[2]["photo"] = str((tmp_path / "img" / "2.png").resolve())  # absolute paths work too
    (tmp_path / "metadata.json").write_text(json.dumps(data, indent=1))
    src = open_source(tmp_path, image_column="photo", conditioning_image_column="hint", caption_column="captions")
    assert src.describe()["format"] == "json"
    a, b, c = items(src)
    # the source keeps the list as written; preprocess drops the empty caption
    assert a.captions == ["first", "", "second"] and a.error is None
    assert prepare(a, resolution=8).captions == ["first", "second"]
    assert b.error[0] == "caption_invalid" and "row 2" in b.error[1]
    with pytest.raises(Skip) as ei:
        prepare(b, resolution=8)
    assert ei.value.reason == "caption_invalid"
    assert c.image == png(2) and c.captions == ["caption 2"]


def test_json_file_holding_json_lines(tmp_path):
    make_images(tmp_path, 2)
    write_jsonl(tmp_path / "metadata.json", rows(2))
    src = open_source(tmp_path)
    assert src.describe()["format"] == "jsonl" and len(items(src)) == 2


def test_csv_custom_columns_json_list_captions_and_quoting(tmp_path):
    make_images(tmp_path, 4)
    with open(tmp_path / "metadata.csv", "w", newline="", encoding="utf-8-sig") as f:  # with a BOM
        w = csv.writer(f)
        w.writerow(["path", "control", "prompt"])
        w.writerow(["img/0.png", "cond/0.png", '["a cat", "", "a small cat"]'])
        w.writerow(["img/1.png", "cond/1.png", "[sic] not a list"])
        w.writerow(["img/2.png", "cond/2.png", "two\nlines, and a comma"])
        w.writerow(["img/3.png", "cond/3.png", ""])
    src = open_source(
        tmp_path / "metadata.csv", image_column="path", conditioning_image_column="control", caption_column="prompt"
    )
    got = items(src)
    assert [i.captions for i in got] == [
        ["a cat", "", "a small cat"],
        ["[sic] not a list"],
        ["two\nlines, and a comma"],
        [""],
    ]
    assert [i.image for i in got] == [png(i) for i in range(4)]
    assert src.describe()["columns"]["image"] == "path"
    with pytest.raises(Skip) as ei:
        prepare(got[3], resolution=8)
    assert ei.value.reason == "caption_missing" and "img/3.png" in ei.value.detail


def test_missing_files_and_bad_rows_become_error_items(tmp_path):
    make_images(tmp_path, 6)
    data = rows(6)
    data[1]["file_name"] = "img/nope.png"
    data[2]["conditioning_image"] = "cond/nope.png"
    del data[3]["file_name"]
    data[4]["conditioning_image"] = ""
    lines = [json.dumps(r) for r in data]
    lines.insert(5, '{"file_name": "img/0.png", broken')  # becomes row 6
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    src = open_source(tmp_path, samples_per_shard=4)
    got = items(src)
    assert len(got) == 7  # one item per row, bad or not: positions never shift
    reasons = [i.error and i.error[0] for i in got]
    assert reasons == [
        None, "image_missing", "cond_missing", "metadata_invalid", "cond_missing", "metadata_invalid", None
    ]
    assert str(tmp_path / "img" / "nope.png") in got[1].error[1]
    assert str(tmp_path / "cond" / "nope.png") in got[2].error[1] and got[2].image == png(2)
    assert "row 4 (line 4)" in got[3].error[1] and "'file_name'" in got[3].error[1]
    assert "row 6 (line 6)" in got[5].error[1] and "not valid JSON" in got[5].error[1]
    for it in got[1:6]:
        with pytest.raises(Skip) as ei:
            prepare(it, resolution=8)
        assert ei.value.reason == it.error[0]


def test_url_paths_in_a_dataset_folder(tmp_path):
    """A file:// URL is its path; an http(s)/s3 URL is a row that names no file here, said so."""
    make_images(tmp_path, 3)
    (tmp_path / "img" / "0.png").rename(tmp_path / "img" / "my photo é.png")
    data = rows(3)
    data[0]["file_name"] = (tmp_path / "img" / "my photo é.png").as_uri()  # percent-escaped
    data[1]["file_name"] = "https://example.org/images/1.png"
    data[2]["conditioning_image"] = "s3://bucket/cond/2.png"
    write_jsonl(tmp_path / "metadata.jsonl", data)
    got = items(open_source(tmp_path))
    assert got[0].error is None and got[0].image == png(0)
    data[0]["file_name"] = "file://other-host/img/0.png"
    write_jsonl(tmp_path / "metadata.jsonl", data)
    assert items(open_source(tmp_path))[0].error[1].endswith("is a file:// URL of another host")
    assert open_source(tmp_path.as_uri()).num_items() == 3  # --data as a file:// URL
    for item, what, url in ((got[1], "image", "https://example.org/images/1.png"),
                            (got[2], "cond", "s3://bucket/cond/2.png")):
        assert item.error[0] == "metadata_invalid"
        assert f"{what} {url!r} is a URL: a dataset folder's rows name files on this machine" in item.error[1]


def test_a_metadata_json_of_columns_is_refused_not_read_as_one_row(tmp_path):
    """pandas' DataFrame.to_json() default writes {column: {index: value}}: no rows at all."""
    make_images(tmp_path, 2)
    table = {"file_name": {"0": "img/0.png", "1": "img/1.png"}, "conditioning_image": {"0": "cond/0.png", "1": "cond/1.png"},
             "text": {"0": "a", "1": "b"}}
    (tmp_path / "metadata.json").write_text(json.dumps(table, indent=1))
    with pytest.raises(SourceError) as err:
        open_source(tmp_path)
    assert "metadata.json: one JSON object of 3 columns or keyed rows (file_name, conditioning_image, text...), " \
           "not rows: write one object per row" in str(err.value)
    write_jsonl(tmp_path / "metadata.json", rows(2))  # JSON lines under a .json name: read as rows
    assert len(items(open_source(tmp_path))) == 2
    # A hostile one, 200,000 objects deep: never parsed whole (no RecursionError), judged as rows.
    (tmp_path / "metadata.json").write_text('{"a":' * 200_000 + "1" + "}" * 200_000)
    with pytest.raises(SourceError, match="no image column"):
        open_source(tmp_path)


def test_a_path_the_os_rejects_is_one_invalid_row_not_a_crash(tmp_path):
    """A NUL byte in a path makes open() raise ValueError, not OSError: that row is
    metadata_invalid (naming the row and the path) and the rows after it are read as usual."""
    make_images(tmp_path, 4)
    data = rows(4)
    data[1]["file_name"] = "img/1\u0000.png"
    data[2]["conditioning_image"] = "cond/\u00002.png"
    write_jsonl(tmp_path / "metadata.jsonl", data)
    got = items(open_source(tmp_path, samples_per_shard=3))
    assert [i.error and i.error[0] for i in got] == [None, "metadata_invalid", "metadata_invalid", None]
    assert "row 2 (line 2)" in got[1].error[1] and "image path 'img/1\\x00.png'" in got[1].error[1]
    assert "row 3 (line 3)" in got[2].error[1] and "cond path 'cond/\\x002.png'" in got[2].error[1]
    assert got[2].image == png(2) and got[3].image == png(3) and got[3].cond is not None
    with pytest.raises(Skip) as ei:
        prepare(got[1], resolution=8)
    assert ei.value.reason == "metadata_invalid"


def test_csv_rows_with_wrong_field_counts(tmp_path):
    make_images(tmp_path, 2)
    (tmp_path / "metadata.csv").write_text(
        "file_name,conditioning_image,text\nimg/0.png,cond/0.png,a\nimg/1.png,cond/1.png\nimg/1.png,cond/1.png,b\n"
    )
    got = items(open_source(tmp_path))
    assert [i.error and i.error[0] for i in got] == [None, "metadata_invalid", None]
    assert "2 fields, the header has 3" in got[1].error[1] and "line 3" in got[1].error[1]


def test_units_are_chunks_in_file_order(tmp_path):
    make_images(tmp_path, 10)
    lines = [json.dumps(r) for r in rows(10)]
    lines.insert(3, "")  # blank lines are not rows
    lines.insert(7, "   ")
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    src = open_source(tmp_path, samples_per_shard=4)
    assert src.num_units() == 3 and src.num_items() == 10
    units = [[i.source_id for i in src.iter_unit(u)] for u in range(3)]
    assert units == [[f"img/{i}.png" for i in r] for r in (range(0, 4), range(4, 8), range(8, 10))]
    assert src.unit_name(1) == "metadata.jsonl rows 5-8"
    # units are independent and deterministic: read out of order, from a fresh source
    again = open_source(tmp_path, samples_per_shard=4)
    assert [i.source_id for i in again.iter_unit(2)] == units[2]
    assert [i.image for i in again.iter_unit(1)] == [png(i) for i in range(4, 8)]
    with pytest.raises(IndexError):
        list(src.iter_unit(3))
    small = open_source(tmp_path, samples_per_shard=4, max_samples=5)
    assert small.num_units() == 2 and small.num_items() == 5 and small.describe()["max_samples"] == 5
    assert [i.source_id for i in small.iter_unit(1)] == ["img/4.png"]


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_units_for_csv_and_json(tmp_path, fmt):
    make_images(tmp_path, 7)
    data = rows(7)
    data[4]["text"] = "multi\nline\ncaption"  # a quoted CSV record spanning lines, at a unit start
    if fmt == "csv":
        with open(tmp_path / "metadata.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]))
            w.writeheader()
            w.writerows(data)
    else:
        (tmp_path / "metadata.json").write_text(json.dumps(data))
    src = open_source(tmp_path, samples_per_shard=2, max_samples=6)
    assert src.num_units() == 3
    got = [[(i.source_id, i.captions) for i in src.iter_unit(u)] for u in (2, 0, 1)]
    assert got[0] == [("img/4.png", ["multi\nline\ncaption"]), ("img/5.png", ["caption 5"])]
    assert got[1] == [("img/0.png", ["caption 0"]), ("img/1.png", ["caption 1"])]
    assert [s for s, _ in got[2]] == ["img/2.png", "img/3.png"]


def test_describe_names_the_input_and_fingerprints_name_its_contents(tmp_path):
    """The identity says which dataset (path, format, columns), never its contents or mtimes:
    an edited caption is a stale shard (its items' fingerprints), not another cache."""
    make_images(tmp_path, 2)
    meta = tmp_path / "metadata.jsonl"
    write_jsonl(meta, rows(2))
    before, prints = open_source(tmp_path).describe(), open_source(tmp_path).unit_fingerprints(0)
    os.utime(meta, (1_000_000, 1_000_000))
    assert open_source(tmp_path).describe() == before
    data = rows(2)
    data[1]["text"] = "caption X"  # same length, other content
    write_jsonl(meta, data)
    assert open_source(tmp_path).describe() == before
    after = open_source(tmp_path).unit_fingerprints(0)
    assert after[0] == prints[0] and after[1] != prints[1]


def test_fill50k_preset(tmp_path):
    (tmp_path / "source").mkdir()
    (tmp_path / "target").mkdir()
    prompts = ["red circle with blue background", "green circle with white background"]
    for i, p in enumerate(prompts):
        circle = Image.new("RGB", (16, 16), "black")
        circle.putpixel((8, 8), (255, 255, 255))
        circle.save(tmp_path / "source" / f"{i}.png")
        Image.new("RGB", (16, 16), (i * 100, 0, 0)).save(tmp_path / "target" / f"{i}.png")
    fill_rows = [{"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": p} for i, p in enumerate(prompts)]
    write_jsonl(tmp_path / "prompt.json", fill_rows)
    for spec in (tmp_path, tmp_path / "prompt.json"):
        src = open_source(spec)
        assert src.kind == "fill50k"
        assert src.describe()["columns"] == {"image": "target", "conditioning_image": "source", "caption": "prompt"}
        got = items(src)
        assert [i.captions for i in got] == [[p] for p in prompts]
        assert got[1].image == (tmp_path / "target" / "1.png").read_bytes()
        assert got[1].cond == (tmp_path / "source" / "1.png").read_bytes()
    p = prepare(got[1], resolution=16, min_size=0)
    assert p.cond[8, 8].tolist() == [255, 255, 255] and p.cond[0, 0].tolist() == [0, 0, 0]
    assert float(p.pixels[0, 0, 0]) == pytest.approx(100 / 127.5 - 1)
    # columns can still be overridden on top of the preset
    src = open_source(tmp_path, caption_column="source")
    assert items(src)[0].captions == ["source/0.png"]


def test_a_metadata_name_that_is_no_regular_file_is_named_not_waited_on(tmp_path):
    """prompt.json as a FIFO (opening it would wait for a writer), a device link or a folder:
    refused by name, and nothing is opened."""
    os.mkfifo(tmp_path / "prompt.json")
    with pytest.raises(SourceError, match=rf"{tmp_path}/prompt.json: not a regular file \(a FIFO\), so it is not "
                                          "read as the dataset's metadata"):
        open_source(tmp_path)
    (tmp_path / "prompt.json").unlink()
    os.symlink("/dev/zero", tmp_path / "prompt.json")
    with pytest.raises(SourceError, match=r"prompt.json: not a regular file \(a character device\)"):
        open_source(tmp_path)
    (tmp_path / "prompt.json").unlink()
    (tmp_path / "metadata.jsonl").mkdir()
    with pytest.raises(SourceError, match=r"metadata.jsonl: not a regular file \(a folder\)"):
        open_source(tmp_path)


def test_open_errors_list_every_problem(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "nothing")
    with pytest.raises(SourceError, match="no metadata file"):
        open_source(tmp_path)
    make_images(tmp_path, 1)
    write_jsonl(tmp_path / "metadata.jsonl", [{"picture": "img/0.png", "hint": "cond/0.png"}])
    with pytest.raises(SourceError) as ei:
        open_source(tmp_path)
    msg = str(ei.value)
    assert "'image' or 'file_name'" in msg and "'conditioning_image'" in msg and "'text'" in msg
    assert "'picture'" in msg  # the columns that do exist are listed
    with pytest.raises(SourceError, match="samples_per_shard.*\n.*max_samples"):
        open_source(tmp_path, samples_per_shard=0, max_samples=0)
    (tmp_path / "metadata.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match="several metadata files"):
        open_source(tmp_path)
    with pytest.raises(SourceError, match="no rows"):
        open_source(tmp_path / "metadata.csv")
    with pytest.raises(SourceError, match="unknown URL scheme"):
        open_source("ftp://host/data")
    with pytest.raises(SourceError, match="remote inputs are WebDataset tars.*kind='folder'"):
        open_source("s3://bucket/data", kind="folder")
    with pytest.raises(SourceError, match="http\\(s\\) has no listing"):
        open_source("https://host/data/")
    (tmp_path / "metadata.json").write_text('[{"a": 1}')
    with pytest.raises(SourceError, match="not valid JSON"):
        open_source(tmp_path / "metadata.json")


# ----------------------------------------------------------------------------------- webdataset


def write_tar(path: Path, samples: list[dict[str, bytes]], *, compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            for suffix, data in s.items():
                if suffix == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{suffix}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    data = gzip.compress(buf.getvalue(), mtime=0) if compress else buf.getvalue()
    path.write_bytes(data)
    return data


def test_a_hub_dataset_repository_keeps_its_tars_under_data(tmp_path):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text("a dataset card")
    write_tar(repo / "data" / "00000.tar", [img2dataset_sample("000000", 0), img2dataset_sample("000001", 1)])
    src = open_source(repo)
    assert isinstance(src, WebDatasetSource) and src.num_units() == 1 and src.unit_name(0) == "data/00000.tar"
    assert [i.source_id for i in src.iter_unit(0)] == ["data/00000.tar:000000", "data/00000.tar:000001"]


def img2dataset_sample(key: str, seed: int, **extra: bytes) -> dict[str, bytes]:
    meta = {"url": f"http://x/{key}.jpg", "key": key, "caption": f"json caption {key}", "status": "success"}
    return {
        "__key__": key,
        "jpg": png(seed),
        "txt": f"caption {key}".encode(),
        "json": json.dumps(meta).encode(),
        "cond.png": png(seed + 500),
        **extra,
    }


def test_webdataset_folder_units_are_sorted_tars(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "00001.tar", [img2dataset_sample("000010", 10), img2dataset_sample("000011", 11)])
    write_tar(d / "00000.tar", [img2dataset_sample("000000", 0), img2dataset_sample("000001", 1)])
    (d / "00000.parquet").write_bytes(b"not a tar")  # img2dataset's side files are ignored
    (d / "00000_stats.json").write_text("{}")
    src = open_source(d)
    assert isinstance(src, WebDatasetSource) and src.num_units() == 2
    assert [src.unit_name(i) for i in range(2)] == ["00000.tar", "00001.tar"]
    u0, u1 = list(src.iter_unit(0)), list(src.iter_unit(1))
    ids = [i.source_id for i in u0 + u1]
    assert ids == ["00000.tar:000000", "00000.tar:000001", "00001.tar:000010", "00001.tar:000011"]
    assert u0[1].image == png(1) and u0[1].cond == png(501) and u0[1].captions == ["caption 000001"]
    assert u0[1].cond_id == "00000.tar:000001.cond.png" and u0[1].error is None
    d1 = src.describe()
    assert d1["kind"] == "webdataset" and d1["path"] == str(d.resolve()) and src.num_units() == 2
    # A rewritten tar is the same input with other contents: its items' fingerprints change.
    before = src.unit_fingerprints(1)
    write_tar(d / "00001.tar", [img2dataset_sample(f"0000{k}", k) for k in range(10, 20)])
    assert open_source(d).describe() == d1 and open_source(d).unit_fingerprints(1) != before


def test_webdataset_members_captions_and_missing_parts(tmp_path):
    no_txt = img2dataset_sample("a", 1)
    del no_txt["txt"]  # caption from the .json member
    caption_list = {"__key__": "b", "png": png(2), "json": b'{"text": ["one", "two"]}', "cond.png": png(3)}
    no_image = {"__key__": "c", "txt": b"hello", "cond.png": png(4)}
    no_cond = {"__key__": "d", "webp": png(5), "txt": b"x"}
    unsafe = img2dataset_sample("e", 6, pyd=b"\x80\x04 pickle bytes", pth=b"PK torch zip")  # never unpickled
    no_caption = {"__key__": "f", "jpeg": png(7), "conditioning.png": png(8), "json": b"{not json"}
    nested = {"__key__": "dir/g", "jpg": png(9), "txt": b"nested", "source.png": png(10)}
    notepad = {"__key__": "h", "jpg": png(11), "txt": "\ufeffsaved by notepad".encode(), "cond.png": png(12)}
    unicode = {"__key__": "i", "jpg": png(13), "txt": "café ☕, saved as Unicode".encode("utf-16"), "cond.png": png(14)}
    latin1 = {"__key__": "j", "jpg": png(15), "txt": "café".encode("latin-1"), "cond.png": png(16)}
    write_tar(tmp_path / "x.tar", [no_txt, caption_list, no_image, no_cond, unsafe, no_caption, nested, notepad,
                                   unicode, latin1])
    got = {i.source_id: i for i in items(open_source(tmp_path / "x.tar"))}
    assert list(got) == ["x.tar:a", "x.tar:b", "x.tar:c", "x.tar:d", "x.tar:e", "x.tar:f", "x.tar:dir/g", "x.tar:h",
                         "x.tar:i", "x.tar:j"]
    assert got["x.tar:h"].captions == ["saved by notepad"]  # a UTF-8 BOM is no part of the caption
    assert got["x.tar:i"].captions == ["café ☕, saved as Unicode"]  # UTF-16, by its byte order mark
    assert got["x.tar:j"].error == ("caption_invalid", "x.tar:j.txt: not valid UTF-8 (nor UTF-16 with a byte order "
                                                       "mark)")
    assert got["x.tar:a"].captions == ["json caption a"] and got["x.tar:a"].error is None
    assert got["x.tar:b"].captions == ["one", "two"] and got["x.tar:b"].image == png(2)
    assert got["x.tar:c"].error[0] == "image_missing" and ".txt" in got["x.tar:c"].error[1]
    assert got["x.tar:d"].error[0] == "cond_missing" and got["x.tar:d"].image == png(5)
    assert got["x.tar:e"].error is None and got["x.tar:e"].image == png(6)
    assert got["x.tar:f"].error[0] == "metadata_invalid" and got["x.tar:f"].cond == png(8)
    assert got["x.tar:dir/g"].cond == png(10) and got["x.tar:dir/g"].captions == ["nested"]


def test_webdataset_custom_suffixes(tmp_path):
    s = {"__key__": "k", "png": png(1), "jpg": png(2), "hint.png": png(3), "prompt.txt": b"p", "cond.png": png(4)}
    write_tar(tmp_path / "x.tar", [s])
    src = open_source(
        tmp_path / "x.tar", image_column="png,jpg", conditioning_image_column=["hint.png"], caption_column="prompt.txt"
    )
    it = items(src)[0]
    assert (it.image, it.cond, it.captions) == (png(1), png(3), ["p"])
    d = open_source(tmp_path / "x.tar", image_column="png").describe()
    assert d["columns"]["image"] == ["png"]


def test_webdataset_brace_pattern_and_gzip(tmp_path):
    for i in range(3):
        samples = [img2dataset_sample(f"{i}{k}", 10 * i + k) for k in range(2)]
        write_tar(tmp_path / f"{i:03d}.tar.gz", samples, compress=True)
    src = open_source(str(tmp_path / "{000..002}.tar.gz"))
    assert src.num_units() == 3 and src.unit_name(2).endswith("002.tar.gz")
    assert [i.image for i in src.iter_unit(2)] == [png(20), png(21)]
    with pytest.raises(SourceError, match="1 of 4 tars do not exist.*003.tar.gz"):
        open_source(str(tmp_path / "{000..003}.tar.gz"))


def test_webdataset_max_samples_spans_tars(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"{i}.tar", [img2dataset_sample(f"{i}{k}", 10 * i + k) for k in range(3)])
    src = open_source(tmp_path, max_samples=4)
    assert src.num_units() == 2 and src.num_items() == 4
    assert [len(list(src.iter_unit(u))) for u in range(2)] == [3, 1]
    assert open_source(tmp_path, max_samples=2).num_units() == 1
    assert open_source(tmp_path).num_items() is None and open_source(tmp_path).num_units() == 3


def test_corrupt_tars_yield_an_error_item_naming_the_tar(tmp_path):
    data = write_tar(tmp_path / "0.tar", [img2dataset_sample(f"{k}", k) for k in range(3)])
    members = tarfile.open(fileobj=io.BytesIO(data)).getmembers()
    per_sample = len(img2dataset_sample("0", 0)) - 1  # members per sample
    (tmp_path / "1.tar").write_bytes(data[: members[per_sample + 1].offset_data + 10])  # cut inside a member
    (tmp_path / "2.tar").write_bytes(data[: members[2 * per_sample].offset])  # cut at a sample boundary
    flipped = bytearray(data)
    flipped[members[per_sample].offset + 3] ^= 0xFF  # a damaged header reads as end-of-archive to tarfile
    (tmp_path / "3.tar").write_bytes(bytes(flipped))
    (tmp_path / "4.tar").write_bytes(b"this is not a tar file at all" * 40)
    (tmp_path / "5.tar").write_bytes(b"")
    (tmp_path / "6.tar").write_bytes(gzip.compress(data, mtime=0)[:300])
    src = open_source(tmp_path)
    assert src.num_units() == 7
    outcome = {}
    for u in range(7):
        got = list(src.iter_unit(u))
        outcome[src.unit_name(u)] = [i.error[0] if i.error else "ok" for i in got]
        if got[-1].error:
            assert got[-1].error[0] in SKIP_REASONS and str(tmp_path / src.unit_name(u)) in got[-1].error[1]
    assert outcome == {
        "0.tar": ["ok", "ok", "ok"],
        "1.tar": ["ok", "tar_corrupt"],
        "2.tar": ["ok", "tar_corrupt"],  # the sample before the cut may be incomplete: dropped
        "3.tar": ["tar_corrupt"],
        "4.tar": ["tar_corrupt"],
        "5.tar": ["tar_corrupt"],
        "6.tar": ["tar_corrupt"],
    }
    assert open_source(tmp_path, max_samples=5).num_items() == 5  # counting survives corrupt tars


def test_kind_mismatches(tmp_path):
    write_tar(tmp_path / "x.tar", [img2dataset_sample("a", 1)])
    with pytest.raises(SourceError, match="tar shard"):
        open_source(tmp_path / "x.tar", kind="folder")
    with pytest.raises(SourceError, match="kind must be one of"):
        open_source(tmp_path, kind="parquet")
    assert open_source(tmp_path, kind="webdataset").num_units() == 1


def test_the_project_fill_generator_reads_as_fill50k(fill_data):
    """The generator's output (conftest's fill_data) goes through source and preprocess cleanly."""
    src = open_source(fill_data, samples_per_shard=5)
    assert src.kind == "fill50k" and src.num_items() == 16 and src.num_units() == 4
    for it in items(src):
        p = prepare(it, resolution=64)
        assert p.captions and " circle with " in p.captions[0]
        assert p.pixels.shape == (3, 64, 64) and p.cond.shape == (64, 64, 3) and not p.cond_resized
        assert p.cond[0, 0].tolist() == [0, 0, 0]  # outline on black


def test_missing_member_messages_list_every_member_of_the_sample(tmp_path):
    """The members a sample has but we do not read (.hint.png, .depth.png) are named too, so the
    flag to pass is obvious from the message."""
    no_cond = {"__key__": "a", "jpg": png(1), "txt": b"x", "hint.png": png(2), "depth.png": png(3), "json": b"{}"}
    no_image = {"__key__": "b", "tif": png(4), "txt": b"y", "cond.png": png(5)}
    write_tar(tmp_path / "x.tar", [no_cond, no_image])
    a, b = items(open_source(tmp_path / "x.tar"))
    assert a.error[0] == "cond_missing"
    assert "found .jpg, .txt, .hint.png, .depth.png, .json)" in a.error[1]
    assert "--conditioning-image-column" in a.error[1] and "--condition canny|gray|sketch" in a.error[1]
    assert b.error[0] == "image_missing" and "found .tif, .txt, .cond.png)" in b.error[1]
    assert "--image-column" in b.error[1]


def test_missing_conditioning_column_suggests_computing_it(tmp_path):
    make_images(tmp_path, 1)
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "img/0.png", "text": "a"}])
    with pytest.raises(SourceError) as ei:
        open_source(tmp_path)
    assert "no conditioning image column: looked for 'conditioning_image' or 'conditioning_image_file_name'" \
        in str(ei.value)
    assert "--condition canny|gray|sketch" in str(ei.value)
    assert items(open_source(tmp_path, require_conditioning=False))[0].cond is None


def test_an_hf_imagefolder_metadata_file_reads_as_a_folder(tmp_path):
    """HF imagefolder's metadata.jsonl: `file_name` for the image, `<name>_file_name` for another
    image column, as the reference script's --train_data_dir loads it."""
    make_images(tmp_path, 2)
    write_jsonl(tmp_path / "metadata.jsonl", [
        {"file_name": f"img/{i}.png", "conditioning_image_file_name": f"cond/{i}.png", "text": f"p{i}"}
        for i in range(2)])
    got = items(open_source(tmp_path))
    assert [i.captions for i in got] == [["p0"], ["p1"]]
    assert got[1].image == (tmp_path / "img" / "1.png").read_bytes()
    assert got[1].cond == (tmp_path / "cond" / "1.png").read_bytes()
    # The same layout one level down, as split folders: the error says how to read a split.
    root = tmp_path / "splits"
    shutil.copytree(tmp_path, root / "train", ignore=shutil.ignore_patterns("splits"))
    with pytest.raises(SourceError, match=rf"Its subfolders train/ hold metadata files \(dataset splits\?\): pass "
                                          rf"--data {root}/train, or --dataset-name {root} --dataset-split train"):
        open_source(root)
