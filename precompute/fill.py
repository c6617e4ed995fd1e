"""Synthetic fill dataset in the fill50k layout: the offline stand-in for real training data.

Owns `make_fill_dataset` (and `python -m precompute.fill OUT --n N --resolution R --seed S`).
Each item is a conditioning image (`source/i.png`: a light circle outline on black), a target
image (`target/i.png`: the same circle filled with one colour on a background of another) and a
caption naming both colours ("red circle with blue background"). `OUT/prompt.json` holds one JSON
object per line: {"source": "source/i.png", "target": "target/i.png", "prompt": "..."}.

Item i depends only on (seed, i): a dataset of n items is a prefix of a larger one with the same
seed, and any item can be regenerated alone. PIL and numpy only.

`aspect="mixed"` (`--aspect mixed`) gives items of several aspect ratios, so a demo exercises
aspect-ratio buckets: item i is `mixed_size(i, resolution)` (h, w), cycling through
R x R, R x 1.5R, 1.5R x R and R x 2R (height x width, R the resolution).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

from shards.store import apply_umask

# Named colours (CSS values). Names may have two words, as in fill50k's captions.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "orange": (255, 165, 0),
    "purple": (128, 0, 128),
    "pink": (255, 192, 203),
    "brown": (165, 42, 42),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "teal": (0, 128, 128),
    "navy": (0, 0, 128),
    "maroon": (128, 0, 0),
    "olive": (128, 128, 0),
    "lime": (0, 255, 0),
    "gold": (255, 215, 0),
    "silver": (192, 192, 192),
    "violet": (238, 130, 238),
    "indigo": (75, 0, 130),
    "turquoise": (64, 224, 208),
    "beige": (245, 245, 220),
    "light blue": (173, 216, 230),
    "dark green": (0, 100, 0),
    "sky blue": (135, 206, 235),
    "dark red": (139, 0, 0),
}
_NAMES = list(PALETTE)

PROMPT_FILE = "prompt.json"
ASPECTS = ("square", "mixed")
# (height, width) as multiples of the resolution, cycled by item index in the mixed layout.
MIXED_SHAPES = ((1.0, 1.0), (1.0, 1.5), (1.5, 1.0), (1.0, 2.0))
OUTLINE_MIN = 200  # outline brightness per channel: "white-ish", varies a little per item


def outline_width(resolution: int) -> int:
    """Outline thickness in pixels: about 3% of the side, at least 2 so it survives resizing."""
    return max(2, round(resolution / 32))


def mixed_size(i: int, resolution: int) -> tuple[int, int]:
    """(h, w) of item i in the mixed-aspect layout."""
    fh, fw = MIXED_SHAPES[i % len(MIXED_SHAPES)]
    return round(fh * resolution), round(fw * resolution)


def _item(
    rng: np.random.Generator, resolution: int, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    h, w = size or (resolution, resolution)
    short = min(h, w)
    width = outline_width(short)
    radius = rng.uniform(0.15, 0.35) * short
    # Keep the whole outline inside the frame so the condition always shows a complete circle.
    margin = radius + width
    if h == w:
        cy, cx = rng.uniform(margin, h - margin, size=2)
    else:
        cy, cx = rng.uniform(margin, h - margin), rng.uniform(margin, w - margin)
    fill, background = rng.choice(len(_NAMES), size=2, replace=False)
    outline = rng.integers(OUTLINE_MIN, 256, size=3)

    # Distance of each pixel centre from the circle centre; shapes come from thresholds on it,
    # so source and target describe exactly the same circle.
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    dist = np.hypot(yy - cy, xx - cx)

    source = np.zeros((h, w, 3), np.uint8)
    source[np.abs(dist - radius) <= width / 2] = outline
    target = np.empty((h, w, 3), np.uint8)
    target[:] = PALETTE[_NAMES[background]]
    target[dist <= radius] = PALETTE[_NAMES[fill]]
    prompt = f"{_NAMES[fill]} circle with {_NAMES[background]} background"
    return source, target, prompt


def make_fill_dataset(out_dir: str | Path, n: int, resolution: int, seed: int = 0, aspect: str = "square") -> Path:
    """Write n fill items at resolution x resolution px (aspect "square") or of mixed aspect
    ratios (`mixed_size`) to `out_dir` (fill50k layout); return it.

    Written into a temporary sibling and renamed into place, so `out_dir` is absent or complete.
    An existing `out_dir` is replaced only if empty or an earlier fill dataset (has prompt.json).
    """
    problems = []
    if n < 1:
        problems.append(f"n must be >= 1, got {n}")
    if resolution < 16:
        problems.append(f"resolution must be >= 16 px, got {resolution}")
    if aspect not in ASPECTS:
        problems.append(f"aspect must be one of {list(ASPECTS)}, got {aspect!r}")
    if problems:
        raise ValueError("make_fill_dataset: " + "; ".join(problems))
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / PROMPT_FILE).is_file())):
        raise FileExistsError(
            f"{out} exists and is not a fill dataset (no {PROMPT_FILE}); refusing to overwrite it. "
            "Choose another OUT or remove it."
        )

    def build(tmp: Path) -> None:
        (tmp / "source").mkdir()
        (tmp / "target").mkdir()
        lines = []
        for i in tqdm(range(n), desc="fill", unit="img", disable=n < 1000):
            size = mixed_size(i, resolution) if aspect == "mixed" else None
            source, target, prompt = _item(np.random.default_rng([seed, i]), resolution, size)
            Image.fromarray(source).save(tmp / "source" / f"{i}.png")
            Image.fromarray(target).save(tmp / "target" / f"{i}.png")
            record = {"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": prompt}
            lines.append(json.dumps(record) + "\n")
        (tmp / PROMPT_FILE).write_text("".join(lines), encoding="utf-8")

    return write_folder_atomically(out, build)


def write_folder_atomically(out: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` on a temporary sibling of `out`, then swap it into place, so `out` is
    either absent, the previous version, or complete: a killed build leaves no half-written
    dataset or model (also used by `tiny`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build(tmp)
        make_readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def make_readable(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder and some writers make 0600 files; a generated dataset
    or model is an ordinary artifact: the user's umask decides (also used by `tiny`)."""
    apply_umask(folder)


@click.command(help="Write a synthetic fill dataset (fill50k layout) to OUT.")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n", "n", type=click.IntRange(min=1), default=64, show_default=True, help="Number of items.")
@click.option("--resolution", type=click.IntRange(min=16), default=64, show_default=True, help="Image side in px.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same files.")
@click.option("--aspect", type=click.Choice(ASPECTS), default="square", show_default=True,
              help="square: every item RxR. mixed: cycle RxR, Rx1.5R, 1.5RxR, Rx2R (height x width) to exercise "
                   "aspect-ratio buckets.")
def main(out: Path, n: int, resolution: int, seed: int, aspect: str) -> None:
    path = make_fill_dataset(out, n=n, resolution=resolution, seed=seed, aspect=aspect)
    shape = f"{resolution} px" if aspect == "square" else f"mixed aspect ratios (base {resolution} px)"
    click.echo(f"{n} fill items at {shape} written to {path} (seed {seed})")


if __name__ == "__main__":
    main()
