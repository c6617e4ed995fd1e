"""precompute.fill: the synthetic fill50k-layout dataset (files, captions, pictures, determinism)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FILL_N, FILL_RESOLUTION
from PIL import Image

from precompute.fill import OUTLINE_MIN, PALETTE, main, make_fill_dataset, outline_width

PROMPT = re.compile(r"^(?P<fill>.+) circle with (?P<background>.+) background$")


def _records(folder: Path) -> list[dict]:
    lines = (folder / "prompt.json").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _rgb(folder: Path, rel: str) -> np.ndarray:
    with Image.open(folder / rel) as img:
        assert img.mode == "RGB" and img.format == "PNG"
        return np.asarray(img)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_prompt_format(fill_data):
    records = _records(fill_data)
    assert len(records) == FILL_N
    assert sorted(p.name for p in fill_data.iterdir()) == ["prompt.json", "source", "target"]
    for i, record in enumerate(records):
        assert record == {"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": record["prompt"]}
        match = PROMPT.match(record["prompt"])
        assert match, record["prompt"]
        assert match["fill"] in PALETTE and match["background"] in PALETTE
        assert match["fill"] != match["background"]
        for rel in (record["source"], record["target"]):
            assert _rgb(fill_data, rel).shape == (FILL_RESOLUTION, FILL_RESOLUTION, 3)
    assert len(list((fill_data / "source").iterdir())) == len(list((fill_data / "target").iterdir())) == FILL_N
    # Captions vary: a generator stuck on one colour pair would teach the adapter nothing.
    assert len({r["prompt"] for r in records}) > FILL_N // 2


def test_target_is_the_captioned_filled_circle_and_source_its_outline(fill_data):
    res = FILL_RESOLUTION
    yy, xx = np.mgrid[0:res, 0:res] + 0.5
    for record in _records(fill_data):
        names = PROMPT.match(record["prompt"])
        fill, background = PALETTE[names["fill"]], PALETTE[names["background"]]
        target = _rgb(fill_data, record["target"])
        source = _rgb(fill_data, record["source"])

        # Target: exactly two colours, those the caption names; the fill is one round blob.
        inside = np.all(target == fill, axis=-1)
        assert np.all(inside | np.all(target == background, axis=-1))
        assert np.all(target[0, 0] == background) and np.all(target[-1, -1] == background)
        area = inside.sum()
        cy, cx = yy[inside].mean(), xx[inside].mean()
        radius = np.sqrt(area / np.pi)
        assert 0.15 * res - 1 <= radius <= 0.35 * res + 1
        assert np.all(target[int(cy), int(cx)] == fill)
        # Round: every filled pixel lies within the radius the area implies (plus a pixel).
        assert np.hypot(yy - cy, xx - cx)[inside].max() <= radius + 1.0

        # Source: a light ring on black at the same circle; centre and outside dark.
        dist = np.hypot(yy - cy, xx - cx)
        brightness = source.max(axis=-1)
        on_ring = np.abs(dist - radius) <= 0.5
        assert on_ring.any()
        assert (brightness[on_ring] >= OUTLINE_MIN).mean() > 0.9
        far_inside = dist < radius - outline_width(res)
        far_outside = dist > radius + outline_width(res)
        assert far_inside.any() and far_outside.any()
        assert brightness[far_inside].max() == 0 and brightness[far_outside].max() == 0
        # Pixels are either black or the one outline colour (no anti-aliasing noise).
        lit = brightness > 0
        assert len(np.unique(source[lit], axis=0)) == 1
        assert np.all(source[lit] >= OUTLINE_MIN)


def test_same_seed_same_bytes_prefix_stable_other_seed_differs(fill_data, tmp_path):
    again = make_fill_dataset(tmp_path / "again", n=FILL_N, resolution=FILL_RESOLUTION, seed=0)
    assert _files(again) == _files(fill_data)

    prefix = make_fill_dataset(tmp_path / "prefix", n=4, resolution=FILL_RESOLUTION, seed=0)
    full = _files(fill_data)
    for rel, data in _files(prefix).items():
        if rel != "prompt.json":
            assert data == full[rel], rel
    assert _records(prefix) == _records(fill_data)[:4]

    other = make_fill_dataset(tmp_path / "other", n=FILL_N, resolution=FILL_RESOLUTION, seed=1)
    ours, theirs = _files(fill_data), _files(other)
    differing = [rel for rel in ours if rel.startswith("target/") and ours[rel] != theirs[rel]]
    assert len(differing) == FILL_N


def test_cli_writes_requested_size(tmp_path):
    result = CliRunner().invoke(main, [str(tmp_path / "cli"), "--n", "3", "--resolution", "32", "--seed", "7"])
    assert result.exit_code == 0, result.output
    assert "3 fill items at 32 px" in result.output
    records = _records(tmp_path / "cli")
    assert len(records) == 3
    assert _rgb(tmp_path / "cli", records[2]["target"]).shape == (32, 32, 3)
    assert _files(tmp_path / "cli") == _files(make_fill_dataset(tmp_path / "api", n=3, resolution=32, seed=7))


def test_rerun_replaces_own_output_refuses_foreign_folder(tmp_path):
    out = make_fill_dataset(tmp_path / "data", n=5, resolution=32)
    make_fill_dataset(out, n=2, resolution=32)
    assert len(_records(out)) == 2 and len(list((out / "source").iterdir())) == 2, "no stale items left"

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="photos"):
        make_fill_dataset(foreign, n=2, resolution=32)
    assert (foreign / "holiday.jpg").read_bytes() == b"not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "photos"], "no temporary folder left"


def test_invalid_arguments_are_all_reported(tmp_path):
    with pytest.raises(ValueError) as err:
        make_fill_dataset(tmp_path / "bad", n=0, resolution=8)
    assert "n must be >= 1" in str(err.value) and "resolution must be >= 16" in str(err.value)
    assert not (tmp_path / "bad").exists()
    result = CliRunner().invoke(main, [str(tmp_path / "bad"), "--n", "0"])
    assert result.exit_code != 0 and "--n" in result.output
