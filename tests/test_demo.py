"""`make demo` is the newcomer's first command: run the real target end to end and check what it
leaves on disk (a verified cache, a loadable adapter, validation grids, the loss curve)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from clirun import run_cli

pytestmark = pytest.mark.slow  # several processes each: the longest cases (make test runs them)

REPO = Path(__file__).resolve().parents[1]


def test_make_demo_runs_end_to_end(tmp_path):
    paths = {
        "TINY": tmp_path / "tiny-sdxl",
        "DEMO_DATA": tmp_path / "fill-mixed",
        "DEMO_CACHE": tmp_path / "cache",
        "DEMO_OUT": tmp_path / "run",
    }
    cmd = ["make", "-C", str(REPO), "-o", "install", "demo", f"VENV={sys.prefix}", "FILL_N=48"]
    cmd += [f"{k}={v}" for k, v in paths.items()]
    proc = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # It tells the user where everything is, and each of those places holds what it says.
    assert "demo done:" in proc.stdout
    for path in paths.values():
        assert str(path) in proc.stdout

    manifest = json.loads((paths["DEMO_CACHE"] / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 2 * 48  # every image plus its flipped view
    assert len(manifest["totals"]["buckets"]) > 1  # the mixed-aspect data really uses buckets
    verify = run_cli("shards", ["verify", paths["DEMO_CACHE"]], timeout=300)
    assert verify.returncode == 0, verify.stderr

    out = paths["DEMO_OUT"]
    from diffusers import T2IAdapter

    adapter = T2IAdapter.from_pretrained(out)
    assert sum(p.numel() for p in adapter.parameters()) > 0
    grids = sorted((out / "validation").glob("*.png"))
    assert grids, "no validation grid"
    grid = np.asarray(Image.open(grids[-1]))
    assert grid.ndim == 3 and grid.shape[1] > grid.shape[0]  # conditioning image + samples side by side
    assert (out / "loss_curve.png").is_file() and (out / "README.md").is_file()
    losses = [json.loads(line)["loss"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) >= 1 and all(np.isfinite(losses))

    # The summary ends with how good the adapter is: the validation loss on held-out images and the
    # condition adherence of the validation images (the demo cache's conditions are canny edges).
    assert manifest["identity"]["condition"]["method"] == "canny"
    assert re.search(r"\n  validation loss +\d+\.\d{6} at step 40 \(best \d+\.\d{6} at step \d+; \d+ image", proc.stdout)
    assert re.search(r"\n  condition adherence +\d\.\d{4} edge F1 at step 40 \(best", proc.stdout)
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "validation_loss" in r] == [0, 20, 40]
    assert [r["step"] for r in records if "adherence" in r] == [20, 40]
    assert all(0.0 <= r["adherence"] <= 1.0 for r in records if "adherence" in r)


def test_make_train_precomputes_a_missing_cache_once(tiny_model, fill_data, tmp_path):
    """`make train DATA=... CACHE=...` is one command: it precomputes when CACHE has no manifest,
    and never again for a change of train settings."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    base = ["make", "-C", str(REPO), "-o", "install", "--no-print-directory", "train", f"VENV={sys.prefix}",
            f"MODEL={tiny_model}", "PRESET=tiny", f"DATA={fill_data}", f"CACHE={cache}", "STEPS=2", "BATCH=2",
            "PRECOMPUTE_ARGS=--samples-per-shard 8 --num-workers 0", "ARGS=--num-workers 0"]
    first = subprocess.run([*base, f"OUT={out}/a"], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "has no manifest yet: running precompute first" in first.stdout
    manifest = cache / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    second = subprocess.run([*base, f"OUT={out}/b", "LR=3e-4", "STEPS=3"], capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "running precompute" not in second.stdout and manifest.stat().st_mtime_ns == stamp
    assert (f"make train: {cache} is a cache already, so DATA, DATASET, RESOLUTION and PRECOMPUTE_ARGS (which make "
            "one) are not used") in second.stdout  # said, not silently dropped
    assert "is a cache already" not in first.stdout
    config = json.loads((out / "b" / "train_config.json").read_text())
    assert (config["learning_rate"], config["max_steps"], config["batch_size"]) == (3e-4, 3, 2)
    # A cache that cannot be read (here: a file; in the field, a wrong key or a server that is
    # down) is no "missing manifest": its error is shown and nothing is precomputed into it.
    broken = tmp_path / "not-a-cache"
    broken.write_text("x")
    third = subprocess.run([f"CACHE={broken}" if a.startswith("CACHE=") else a for a in base] + [f"OUT={out}/c"],
                           capture_output=True, text=True, timeout=300)
    assert third.returncode != 0 and "running precompute" not in third.stdout
    assert f"{broken}: is a file, not a cache folder" in third.stderr
    assert f"make train: cannot read {broken} (above), so precompute is not started into it" in third.stderr
    assert broken.read_text() == "x" and not (out / "c").exists()
    # A CACHE that does not exist, and no DATA or DATASET to build it from: a typo, refused (the
    # default CACHE alone builds the demo's fill data).
    typo = tmp_path / "cahce"
    fourth = subprocess.run([a for a in base if not a.startswith(("CACHE=", "DATA="))] + [f"CACHE={typo}", f"OUT={out}/d"],
                            capture_output=True, text=True, timeout=300)
    assert fourth.returncode != 0 and "running precompute" not in fourth.stdout
    assert (f"make train: {typo} has no manifest, and neither DATA nor DATASET says what to precompute into it (a "
            "typo in CACHE?): give DATA=... or DATASET=... to build it") in " ".join(fourth.stderr.split())
    assert not typo.exists() and not (out / "d").exists()


def test_make_passes_every_path_as_one_word_and_never_drops_data(fill_cache, tmp_path):
    """The commands make runs (`make -n` prints them): a path with spaces or an apostrophe is one
    argument as typed; DATA and DATASET together both reach precompute, which refuses the pair."""
    import shlex

    def command(target: str, *variables: str) -> list[str]:
        proc = subprocess.run(["make", "-C", str(REPO), "-n", "-o", "install", "--no-print-directory", target,
                               f"VENV={sys.prefix}", "MODEL=/models/o'brien sdxl", *variables],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.replace("\\\n", " ").splitlines()  # a command's continued lines, joined
        line = next(ln for ln in lines if f" -m {target} " in ln)
        return shlex.split(line)

    args = command("precompute", "DATA=/data/mom's photos", "CACHE=/caches/it's here")
    assert args[args.index("--model") + 1] == "/models/o'brien sdxl"
    assert args[args.index("--data") + 1] == "/data/mom's photos"
    assert args[args.index("--cache") + 1] == "/caches/it's here"
    args = command("precompute", "DATA=/data/a", "DATASET=org/set", "CACHE=/caches/c")
    assert args[args.index("--data") + 1] == "/data/a" and args[args.index("--dataset-name") + 1] == "org/set"
    cache = tmp_path / "it's a cache"  # make train looks at it (a line that runs $(MAKE) runs under -n)
    shutil.copytree(fill_cache, cache)
    args = command("train", f"CACHE={cache}", "OUT=/runs/don't stop")
    assert args[args.index("--cache") + 1] == str(cache) and args[args.index("--output-dir") + 1] == "/runs/don't stop"


def test_make_train_precomputes_again_into_a_cache_that_holds_no_sample(tmp_path):
    """A precompute that skipped every item leaves a manifest of 0 samples: no cache to train on,
    so `make train` with DATA precomputes again (with the settings now given), and without DATA
    says what to do. `make -n` runs the check and prints the commands it would run."""
    import torch  # noqa: F401  (the synthetic identity's dtypes)

    from shards.identity import CacheIdentity
    from shards.manifest import Manifest
    from shards.stores import open_store
    from shards.synthetic import synthetic_identity

    cache = tmp_path / "empty"
    Manifest.build(CacheIdentity.from_dict(synthetic_identity(resolution=16, prompt_dim=8, pooled_dim=4)), [], {},
                   code_version="test", created="").save(open_store(cache))
    base = ["make", "-C", str(REPO), "-n", "-o", "install", "--no-print-directory", "train", f"VENV={sys.prefix}",
            "MODEL=/models/m", f"CACHE={cache}", f"OUT={tmp_path / 'run'}"]
    again = subprocess.run([*base, "DATA=/data/fixed"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    said = f"make train: {cache} holds no samples (its precompute skipped every item): running precompute again"
    assert said in again.stdout.splitlines()  # (make -n also prints the recipe's text, echo and all)
    assert "--data /data/fixed" in again.stdout.replace("'", "")  # the precompute it would run
    alone = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert alone.returncode != 0 and said not in alone.stdout.splitlines()
    assert (f"make train: {cache} holds no samples (its precompute skipped every item): give DATA=... or DATASET=... "
            "(and PRECOMPUTE_ARGS with the fixed settings) to precompute it again") in " ".join(alone.stderr.split())
