"""precompute.hf_source: Hugging Face datasets (parquet hub layout, save_to_disk, by name) as inputs.

Everything is offline and tiny: a fill50k-shaped dataset (`image`, `conditioning_image` as
`datasets.Image` features holding PNG bytes, `text`) of 10 rows from the project's own fill
generator, written in each format into tmp_path, with the datasets cache in tmp_path too.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from precompute.config import PrecomputeConfig
from precompute.fill import make_fill_dataset
from precompute.hf_source import HFSource
from precompute.preprocess import SKIP_REASONS
from precompute.runner import run
from precompute.sources import FolderSource, SourceError, open_source
from shards.manifest import Manifest
from shards.reader import iter_shard
from shards.stores import open_store

N = 10
RES = 64
FEATURES = datasets.Features(
    {"image": datasets.Image(), "conditioning_image": datasets.Image(), "text": datasets.Value("string")}
)


@pytest.fixture(scope="module")
def fill(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The fill generator's 10 items: (folder, rows of {"image", "conditioning_image", "text"} bytes)."""
    root = make_fill_dataset(tmp_path_factory.mktemp("hf") / "fill", n=N, resolution=RES, seed=0)
    rows = []
    for line in (root / "prompt.json").read_text().splitlines():
        r = json.loads(line)
        rows.append({"image": (root / r["target"]).read_bytes(), "conditioning_image": (root / r["source"]).read_bytes(),
                     "text": r["prompt"], "image_path": r["target"], "cond_path": r["source"]})
    return root, rows


def hf_dataset(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "image": [{"bytes": r["image"], "path": None} for r in rows],
        "conditioning_image": [{"bytes": r["conditioning_image"], "path": None} for r in rows],
        "text": [r["text"] for r in rows],
    }, features=FEATURES)


def hub_layout(folder: Path, ds: datasets.Dataset) -> Path:
    (folder / "data").mkdir(parents=True)
    ds.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def all_items(src):
    out = [it for i in range(src.num_units()) for it in src.iter_unit(i)]
    assert all(it.error is None or it.error[0] in SKIP_REASONS for it in out)
    return out


def check_fill_items(src, rows, prefix: str) -> None:
    got = all_items(src)
    assert [it.image for it in got] == [r["image"] for r in rows]
    assert [it.cond for it in got] == [r["conditioning_image"] for r in rows]
    assert [it.captions for it in got] == [[r["text"]] for r in rows]
    assert [it.source_id for it in got] == [f"{prefix} row {i}" for i in range(N)]
    assert all(it.error is None for it in got)


@pytest.mark.parametrize("fmt", ["parquet", "save_to_disk", "name"])
def test_each_format_reads_the_same_items_units_and_identity(fill, tmp_path, fmt):
    _, rows = fill
    ds = hf_dataset(rows)
    cache_dir = str(tmp_path / "hf-cache")
    if fmt == "parquet":
        spec = hub_layout(tmp_path / "fill-parquet", ds)
        src = open_source(spec, samples_per_shard=4, cache_dir=cache_dir)
        prefix, ident = "fill-parquet[train]", {"dataset": str(spec.resolve()), "format": "parquet", "split": "train"}
    elif fmt == "save_to_disk":
        spec = tmp_path / "fill-disk"
        ds.save_to_disk(str(spec))
        src = open_source(spec, samples_per_shard=4, cache_dir=cache_dir)
        prefix, ident = "fill-disk", {"dataset": str(spec.resolve()), "format": "save_to_disk", "split": None}
    else:
        spec = hub_layout(tmp_path / "fill-by-name", ds)
        src = open_source(None, dataset_name=str(spec), samples_per_shard=4, cache_dir=cache_dir)
        prefix = f"{spec.resolve()}[train]"
        ident = {"dataset": str(spec.resolve()), "config": None, "revision": None, "split": "train"}
    assert isinstance(src, HFSource) and src.kind == "hf"
    check_fill_items(src, rows, prefix)
    # Units are fixed row ranges: 4 + 4 + 2, readable out of order by a fresh source.
    assert src.num_units() == 3 and [src.unit_size(i) for i in range(3)] == [4, 4, 2] and src.num_items() == N
    assert src.unit_name(1) == f"{prefix} rows 4-7"
    again = open_source(spec, samples_per_shard=4, cache_dir=cache_dir) if fmt != "name" else open_source(
        None, dataset_name=str(spec), samples_per_shard=4, cache_dir=cache_dir)
    assert [it.image for it in again.iter_unit(2)] == [r["image"] for r in rows[8:]]
    with pytest.raises(IndexError):
        list(src.iter_unit(3))
    d = src.describe()
    assert {k: d[k] for k in ident} == ident
    assert d["kind"] == "hf" and "rows" not in d and d["max_samples"] is None and src.num_items() == N
    assert d["columns"] == {"image": "image", "conditioning_image": "conditioning_image", "caption": "text"}
    assert d["features"] == {"image": {"_type": "Image"}, "conditioning_image": {"_type": "Image"},
                             "text": {"dtype": "string", "_type": "Value"}}
    assert "files_sha256" not in d  # what the files hold is in each item's fingerprint
    assert d == again.describe()
    text = json.dumps(d)  # the identity never names the download cache (it differs between machines)
    assert cache_dir not in text and "hf-cache" not in text
    # max_samples keeps the first rows
    small = open_source(spec if fmt != "name" else None, dataset_name=str(spec) if fmt == "name" else None,
                        samples_per_shard=4, max_samples=5, cache_dir=cache_dir)
    assert small.num_units() == 2 and small.num_items() == 5 and small.describe()["max_samples"] == 5
    assert [it.image for it in small.iter_unit(1)] == [rows[4]["image"]]


def test_a_dataset_dict_folder_needs_its_split(fill, tmp_path):
    _, rows = fill
    dd = datasets.DatasetDict({"train": hf_dataset(rows[:6]), "test": hf_dataset(rows[6:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    train = open_source(tmp_path / "dd")
    assert train.num_items() == 6 and train.describe()["split"] == "train"
    test = open_source(tmp_path / "dd", dataset_split="test")
    assert [it.image for it in all_items(test)] == [r["image"] for r in rows[6:]]
    assert all_items(test)[0].source_id == "dd[test] row 0"
    with pytest.raises(SourceError, match=r"no split 'validation' \(splits: 'train', 'test'\)"):
        open_source(tmp_path / "dd", dataset_split="validation")
    # Sliced splits, as load_dataset takes them, read the same rows of the saved splits.
    for spec, want in (("train[:3]", rows[:3]), ("train[50%:]", rows[3:6]), ("train[:1]+test[-1:]", [rows[0], rows[-1]])):
        src = open_source(tmp_path / "dd", dataset_split=spec)
        assert [it.image for it in all_items(src)] == [r["image"] for r in want], spec
        assert src.describe()["split"] == spec
    with pytest.raises(SourceError, match=r"cannot read the split 'valid\[:2\]': Unknown split \"valid\""):
        open_source(tmp_path / "dd", dataset_split="valid[:2]")


def test_a_missing_split_by_name_and_offline_names_are_one_clear_error(fill, tmp_path):
    _, rows = fill
    folder = hub_layout(tmp_path / "hub", hf_dataset(rows))
    with pytest.raises(SourceError) as ei:
        open_source(None, dataset_name=str(folder), dataset_split="validation", cache_dir=str(tmp_path / "c"))
    assert "validation" in str(ei.value) and str(folder) in str(ei.value) and "--dataset-split" in str(ei.value)
    # conftest sets HF_DATASETS_OFFLINE=1: a hub id that is not cached is a SourceError naming it.
    with pytest.raises(SourceError) as ei:
        open_source(None, dataset_name="fusing/fill50k", cache_dir=str(tmp_path / "c"))
    msg = str(ei.value)
    assert msg.startswith("--dataset-name fusing/fill50k: cannot load the dataset") and "offline" in msg
    assert str(tmp_path / "c") in msg
    with pytest.raises(SourceError, match="exactly one of"):
        open_source(folder, dataset_name=str(folder))


def test_caption_lists_binary_and_path_columns_and_bad_rows(fill, tmp_path):
    _, rows = fill
    root, _ = fill
    features = datasets.Features({
        "photo": datasets.Image(), "hint": datasets.Value("binary"), "prompts": datasets.List(datasets.Value("string")),
    })
    table = {
        "photo": [{"bytes": r["image"], "path": None} for r in rows[:5]],
        "hint": [r["conditioning_image"] for r in rows[:5]],
        "prompts": [[r["text"], "another caption"] for r in rows[:5]],
    }
    table["photo"][1] = {"bytes": None, "path": str(root / rows[1]["image_path"])}  # only a path: read the file
    table["photo"][2] = None  # an empty cell
    gone = tmp_path / "gone.png"  # only a path, to a file removed since
    gone.write_bytes(rows[3]["image"])
    table["photo"][3] = {"bytes": None, "path": str(gone)}
    table["hint"][4] = None
    table["prompts"][0] = []
    # In memory: save_to_disk and to_parquet would embed the files' bytes, and these rows must
    # keep only their paths.
    ds = datasets.Dataset.from_dict(table, features=features)
    gone.unlink()
    src = HFSource(ds, label="mem", root=None, ident={"split": "train"}, image_column="photo",
                   conditioning_image_column="hint", caption_column="prompts", samples_per_shard=2)
    got = all_items(src)
    assert [it.error and it.error[0] for it in got] == [None, None, "image_missing", "image_missing", "cond_missing"]
    assert got[0].captions == [] and got[1].captions == [rows[1]["text"], "another caption"]
    assert got[1].image == rows[1]["image"] and got[1].cond == rows[1]["conditioning_image"]
    assert "mem[train] row 2: column 'photo' has no bytes and no path" in got[2].error[1]
    assert f"{gone}: file not found" in got[3].error[1]
    assert got[4].image == rows[4]["image"] and "mem[train] row 4" in got[4].error[1]
    # Saved, the same rows read the same (the path-only row now carries the file's bytes).
    # A string column of paths, relative to the dataset folder.
    shutil.copytree(root / "target", tmp_path / "paths" / "target")
    datasets.Dataset.from_dict({"image": [rows[0]["image_path"]], "text": ["x"]}).save_to_disk(str(tmp_path / "paths"))
    it = all_items(open_source(tmp_path / "paths", require_conditioning=False))[0]
    assert it.image == rows[0]["image"] and it.cond is None and it.error is None


def test_missing_columns_are_listed_and_computed_conditions_need_none(fill, tmp_path):
    _, rows = fill
    ds = hf_dataset(rows).remove_columns("conditioning_image").rename_column("text", "caption")
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(SourceError) as ei:
        open_source(tmp_path / "ds")
    msg = str(ei.value)
    assert "no conditioning image column 'conditioning_image'" in msg and "--condition canny|gray|sketch" in msg
    assert "no caption column 'text' (columns found: 'image', 'caption')" in msg
    src = open_source(tmp_path / "ds", caption_column="caption", require_conditioning=False)
    assert [it.image for it in all_items(src)] == [r["image"] for r in rows]
    assert src.describe()["columns"]["conditioning_image"] is None


def test_arrow_and_parquet_files_directly(fill, tmp_path):
    _, rows = fill
    ds = hf_dataset(rows)
    ds.to_parquet(str(tmp_path / "one.parquet"))
    src = open_source(tmp_path / "one.parquet", cache_dir=str(tmp_path / "c"))
    assert src.kind == "hf" and [it.image for it in all_items(src)] == [r["image"] for r in rows]
    ds.save_to_disk(str(tmp_path / "disk"))
    arrow = next((tmp_path / "disk").glob("*.arrow"))
    src = open_source(arrow)
    assert src.describe()["format"] == "arrow" and [it.cond for it in all_items(src)] == [
        r["conditioning_image"] for r in rows]


def test_an_arrow_file_in_the_ipc_file_format_reads_as_the_stream_format_does(fill, tmp_path):
    """`.arrow` is either Arrow IPC format: the stream one (save_to_disk's) or the file one
    (Feather v2, pyarrow.ipc.new_file), which `datasets` reads too."""
    import pyarrow as pa

    _, rows = fill
    table = hf_dataset(rows).data.table
    with pa.ipc.new_file(str(tmp_path / "file.arrow"), table.schema) as writer:
        writer.write_table(table)
    src = open_source(tmp_path / "file.arrow", cache_dir=str(tmp_path / "c"))
    assert [it.image for it in all_items(src)] == [r["image"] for r in rows]


def test_empty_and_mismatched_datasets_say_what_is_wrong(fill, tmp_path):
    _, rows = fill
    empty = hf_dataset(rows).select([])
    empty.save_to_disk(str(tmp_path / "empty_disk"))
    empty.to_parquet(str(tmp_path / "one.parquet"))
    with pytest.raises(SourceError, match=rf"--dataset-name {tmp_path}/one.parquet: a file, not a dataset name or "
                                          rf"folder: give a .parquet / .arrow file .* with --data {tmp_path}/one.parquet"):
        open_source(None, dataset_name=str(tmp_path / "one.parquet"))
    with pytest.raises(SourceError, match="empty_disk: a save_to_disk folder of an empty dataset"):
        open_source(tmp_path / "empty_disk")
    (tmp_path / "empty_pq").mkdir()
    empty.to_parquet(str(tmp_path / "empty_pq" / "e.parquet"))
    with pytest.raises(SourceError, match=r"the dataset has no rows"):
        open_source(tmp_path / "empty_pq", cache_dir=str(tmp_path / "c"))
    (tmp_path / "mixed").mkdir()
    hf_dataset(rows[:2]).to_parquet(str(tmp_path / "mixed" / "a.parquet"))
    hf_dataset(rows[2:4]).rename_column("text", "caption").to_parquet(str(tmp_path / "mixed" / "b.parquet"))
    with pytest.raises(SourceError, match=r"cannot load the dataset: .* \(because \w+: .*column names don't match\)"):
        open_source(tmp_path / "mixed", cache_dir=str(tmp_path / "c"))


def test_the_fill50k_download_layout_is_a_folder_dataset(fill, tmp_path):
    root, rows = fill
    (tmp_path / "images").mkdir()
    (tmp_path / "conditioning_images").mkdir()
    lines = []
    for i, r in enumerate(rows):
        (tmp_path / "images" / f"{i}.png").write_bytes(r["image"])
        (tmp_path / "conditioning_images" / f"{i}.png").write_bytes(r["conditioning_image"])
        lines.append(json.dumps({"text": r["text"], "image": f"images/{i}.png",
                                 "conditioning_image": f"conditioning_images/{i}.png"}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    src = open_source(tmp_path)
    assert isinstance(src, FolderSource) and src.describe()["metadata"] == "train.jsonl"
    got = all_items(src)
    assert [it.image for it in got] == [r["image"] for r in rows] and got[3].captions == [rows[3]["text"]]


def test_data_and_dataset_name_are_mutually_exclusive(fill, tiny_model, tmp_path):
    root, _ = fill
    both = PrecomputeConfig(model=str(tiny_model), data=str(root), dataset_name="fusing/fill50k",
                            cache=str(tmp_path / "c"), resolution=RES, device="cpu")
    assert any("mutually exclusive" in p for p in both.problems())
    neither = PrecomputeConfig(model=str(tiny_model), cache=str(tmp_path / "c"), resolution=RES, device="cpu")
    assert any(p.startswith("--data or --dataset-name is required") for p in neither.problems())
    stray = PrecomputeConfig(model=str(tiny_model), data=str(root), dataset_revision="main",
                             cache=str(tmp_path / "c"), resolution=RES, device="cpu")
    assert "--dataset-revision only applies to --dataset-name" in stray.problems()


# ----------------------------------------------------------------------------------------------
# End to end: the same images as a parquet dataset and as a metadata folder give the same cache


def _samples(cache: Path):
    store = open_store(cache)
    manifest = Manifest.load(store)
    return manifest, [s for r in manifest.shards for s in iter_shard(store, r)]


def test_precompute_of_a_dataset_equals_the_same_images_as_a_folder(fill, tiny_model, tmp_path):
    root, rows = fill
    broken = list(rows) + [dict(rows[0], image=b"this is not a png", text="broken")]
    hub = hub_layout(tmp_path / "hub", hf_dataset(broken))
    folder = tmp_path / "folder"
    shutil.copytree(root, folder)
    meta = [{"image": r["image_path"], "conditioning_image": r["cond_path"], "text": r["text"]} for r in rows]
    (folder / "broken.png").write_bytes(b"this is not a png")
    meta.append({"image": "broken.png", "conditioning_image": rows[0]["cond_path"], "text": "broken"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    common = dict(model=str(tiny_model), resolution=RES, samples_per_shard=4, batch_size=2, num_workers=0,
                  device="cpu")
    a = run(PrecomputeConfig(dataset_name=str(hub), cache=str(tmp_path / "cache-hf"),
                             cache_dir=str(tmp_path / "hf-cache"), **common))
    b = run(PrecomputeConfig(data=str(folder), cache=str(tmp_path / "cache-folder"), **common))
    assert (a.samples, a.shards, a.skipped) == (N, 3, {"image_corrupt": 1})
    assert (b.samples, b.shards, b.skipped) == (N, 3, {"image_corrupt": 1})
    ma, sa = _samples(tmp_path / "cache-hf")
    mb, sb = _samples(tmp_path / "cache-folder")
    assert ma.identity.section("source")["kind"] == "hf" and sum(r.samples for r in ma.shards) + 1 == N + 1
    skipped = [i for r in ma.shards for i in r.skipped_items]
    assert [(i["source_id"], i["reason"]) for i in skipped] == [(f"{hub.resolve()}[train] row 10", "image_corrupt")]
    assert [s.key for s in sa] == [s.key for s in sb]
    for x, y in zip(sa, sb):
        assert x.meta.captions == y.meta.captions and x.meta.add_time_ids == y.meta.add_time_ids
        for t in ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds"):
            assert torch.equal(getattr(x, t), getattr(y, t)), (x.key, t)
        assert x.cond_png == y.cond_png
    first = np.asarray(Image.open(io.BytesIO(sa[0].cond_png)).convert("RGB"))
    assert first.shape == (RES, RES, 3)


def test_a_split_asked_of_a_dataset_without_splits_is_refused(fill, tmp_path):
    """--dataset-split on one table, or a folder or tar dataset: refused, never silently the whole."""
    root, rows = fill
    hf_dataset(rows).to_parquet(str(tmp_path / "one.parquet"))
    hf_dataset(rows).save_to_disk(str(tmp_path / "disk"))
    for path, what in ((tmp_path / "one.parquet", "is one table (parquet), without splits"),
                       (tmp_path / "disk", "is one table (save_to_disk), without splits"),
                       (root, "is a folder or tar dataset, without splits")):
        with pytest.raises(SourceError) as err:
            open_source(path, dataset_split="test", cache_dir=str(tmp_path / "c"))
        assert f"--dataset-split test: {path} {what}" in str(err.value) and "leave --dataset-split out" in str(err.value)
    assert open_source(tmp_path / "disk").num_items() == N  # the default split name asks for nothing


def test_a_save_to_disk_folder_by_name_is_pointed_to_data(fill, tmp_path):
    _, rows = fill
    hf_dataset(rows).save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": hf_dataset(rows)}).save_to_disk(str(tmp_path / "dict"))
    for folder in (tmp_path / "disk", tmp_path / "dict"):
        with pytest.raises(SourceError) as err:
            open_source(None, dataset_name=str(folder))
        assert f"--dataset-name {folder}: a save_to_disk folder, which load_dataset cannot read: give it with --data " \
               f"{folder}" in str(err.value)
