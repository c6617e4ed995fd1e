"""Knowing when the adapter is good, end to end on the tiny SDXL and real caches (issue 12).

The validation loss on held-out images (--validation-split) and on another cache
(--validation-cache): when it is measured, that it is the same number for any batch size and
world size (two gloo processes), and where it goes (metrics.jsonl, tracker, loss curve, card,
train_config.json). The EMA (--ema-decay): checkpointed, resumed bitwise after a kill, written
as OUT/ema or as the adapter (--save-ema). Condition adherence and labelled, non-square grids on
a canny cache with aspect buckets, pairs from --validation-file. `python -m train compare` and
`summary` over the finished runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.checkpoint import CheckpointError
from train.checks import CacheMismatchError
from train.config import TrainConfig
from train.loop import DEBUG_EXIT_AFTER_CHECKPOINT, train
from train.plan import held_out_images
from clirun import config_args, run_cli, run_launched
from ports import free_port

REPO = Path(__file__).resolve().parents[1]
PROMPT = "red circle with blue background"


def _cfg(model, cache, out, **kw) -> TrainConfig:
    base = dict(model=str(model), cache=str(cache), output_dir=str(out), batch_size=2, num_workers=0,
                learning_rate=1e-3, lr_scheduler="constant", log_every=2, checkpointing_steps=100)
    return TrainConfig(**{**base, **kw})


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _records(out: Path, key: str) -> list[dict]:
    return [r for r in _jsonl(out / "logs/metrics.jsonl") if key in r]


# ---------------------------------------------------------------------------------------------
# One run with everything on: 5 steps, a quarter of the 16 images held out, the validation loss
# every 2 steps, an EMA with warm-up, validation images at step 4 and the end, tensorboard.


def _split_cfg(tiny_model, fill_data, cache, out, **kw) -> TrainConfig:
    return _cfg(tiny_model, cache, out, max_steps=5, validation_split=0.25, validation_loss_steps=2,
                ema_decay=0.9, ema_warmup_steps=2, checkpointing_steps=2, log_samples=True, report_to="tensorboard",
                validation_image=(str(fill_data / "source/0.png"),), validation_prompt=(PROMPT,),
                num_validation_images=1, validation_steps=4, validation_inference_steps=2, **kw)


@pytest.fixture(scope="module")
def split_run(tiny_model, fill_data, fill_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("split") / "split-run"
    result = train(_split_cfg(tiny_model, fill_data, fill_cache, out))
    return out, result


def test_validation_loss_is_measured_at_the_start_on_schedule_and_at_the_end(split_run, fill_cache):
    from shards.manifest import Manifest

    out, result = split_run
    records = _records(out, "validation_loss")
    assert [r["step"] for r in records] == [0, 2, 4, 5]
    assert all(r["validation_images"] == 4 and r["validation_weights"] == "ema" for r in records)
    assert [int(t) for t in records[0]["validation_loss_by_timestep"]] == [999, 993, 969, 916, 822, 675, 463, 176]
    for r in records:
        per_t = list(r["validation_loss_by_timestep"].values())
        assert r["validation_loss"] == pytest.approx(sum(per_t) / len(per_t), rel=1e-12)
    assert result.validation_loss == records[-1]["validation_loss"]
    assert len({r["validation_loss"] for r in records}) == 4  # the EMA moved it at every evaluation
    # The held-out images were never trained on: 5 of the 6 batches of 2 the 12 others make.
    manifest = Manifest.load(fill_cache)
    held = held_out_images(manifest, 0.25)
    trained = [k for s in _jsonl(out / "logs/samples-rank00000.jsonl") for k in s["keys"]]
    everything = {k for r in manifest.shards for k in r.keys}
    assert len(held) == 4 and len(trained) == len(set(trained)) == 10 and set(trained) <= everything - held
    # The per-step records are as before: one per step, in order, each with a loss.
    assert [r["step"] for r in _records(out, "loss")] == [1, 2, 3, 4, 5]


def test_validation_loss_goes_to_the_tracker_the_curve_the_card_and_the_config(split_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = split_run
    records = _records(out, "validation_loss")
    events = EventAccumulator(str(out / "logs/t2i-adapter-sdxl"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Scalars("validation_loss")
    assert [e.step for e in scalars] == [0, 2, 4, 5]
    assert [e.value for e in scalars] == pytest.approx([r["validation_loss"] for r in records], rel=1e-6)
    assert [e.step for e in events.Scalars("validation_loss/t0999")] == [0, 2, 4, 5]
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5]

    resolved = json.loads((out / "train_config.json").read_text())["resolved"]
    assert resolved["validation_set"]["images"] == 4 and resolved["validation_set"]["timesteps"] == 8
    assert resolved["evaluated_weights"] == "ema" and resolved["output_weights"] == "raw"
    best = min(records, key=lambda r: r["validation_loss"])
    assert resolved["results"]["validation_loss"] == {
        "last": records[-1]["validation_loss"], "last_step": 5, "best": best["validation_loss"],
        "best_step": best["step"], "evaluations": 4, "weights": "ema"}
    assert resolved["results"]["adherence"] is None  # the fill cache's conditions came with the dataset

    card = (out / "README.md").read_text()
    assert (f"- validation loss: last {records[-1]['validation_loss']:.6f} (step 5), best "
            f"{best['validation_loss']:.6f} (step {best['step']}); 4 image(s), --validation-split 0.25") in card
    assert "- weights: this folder's adapter is the trained weights; their EMA (decay 0.9) is in ema/; validation " \
           "images and loss use the EMA weights" in card
    assert "- condition adherence: not measured: the cache's conditioning images are not computed edges" in card
    with Image.open(out / "loss_curve.png") as curve:
        assert curve.size == (800, 450)


def test_the_ema_is_saved_beside_the_adapter_and_in_every_checkpoint(split_run):
    from diffusers import T2IAdapter
    from safetensors.torch import load_file

    out, _ = split_run
    ema = load_file(out / "ema/diffusion_pytorch_model.safetensors")
    trained = load_file(out / "diffusion_pytorch_model.safetensors")
    assert ema.keys() == trained.keys() and any(not torch.equal(ema[k], trained[k]) for k in ema)
    assert sum(p.numel() for p in T2IAdapter.from_pretrained(out / "ema").parameters()) > 0  # a loadable adapter
    last = out / "checkpoints/step-000005"
    assert _sha(last / "ema/diffusion_pytorch_model.safetensors") == _sha(out / "ema/diffusion_pytorch_model.safetensors")
    listing = json.loads((last / "COMPLETE").read_text())["files"]
    assert "ema/diffusion_pytorch_model.safetensors" in listing  # proven by sha256 like every file


def test_kill_and_resume_gives_bitwise_the_same_ema_and_validation_losses(tiny_model, fill_data, fill_cache,
                                                                          split_run, tmp_path):
    a, _ = split_run
    b = tmp_path / "b"
    cfg = _split_cfg(tiny_model, fill_data, fill_cache, b)
    killed = run_cli("train", config_args(cfg), env={**os.environ, DEBUG_EXIT_AFTER_CHECKPOINT: "2"})
    assert killed.returncode == 75, killed.stderr[-4000:]
    assert not (b / "ema").exists() and (b / "checkpoints/step-000002/ema").is_dir()
    train(dataclasses.replace(cfg, resume="latest"))
    for name in ("ema/diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors"):
        assert _sha(a / name) == _sha(b / name), name
    assert _records(a, "validation_loss") == _records(b, "validation_loss")  # step 2's from before the kill
    assert [r["loss"] for r in _records(a, "loss")] == [r["loss"] for r in _records(b, "loss")]


def test_a_run_without_ema_leaves_no_earlier_ema_in_its_output(tiny_model, fill_cache, split_run, tmp_path):
    """OUT/ema is this run's or nothing: starting over without --ema-decay removes an earlier
    session's, which would otherwise pass for this run's EMA (and be pushed with it)."""
    out = tmp_path / "again"
    shutil.copytree(split_run[0], out)
    assert (out / "ema").is_dir()
    train(_cfg(tiny_model, fill_cache, out, max_steps=1, resume="none"))
    assert not (out / "ema").exists() and (out / "diffusion_pytorch_model.safetensors").is_file()


def test_resume_refuses_another_ema_or_split(tiny_model, fill_data, fill_cache, split_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(split_run[0], out)
    cfg = _split_cfg(tiny_model, fill_data, fill_cache, out, resume="latest")
    with pytest.raises(CheckpointError) as err:
        train(dataclasses.replace(cfg, max_steps=6, ema_decay=0.5, ema_warmup_steps=0, validation_split=0.5))
    message = str(err.value)
    assert "--ema-decay: checkpoint 0.9, now 0.5" in message
    assert "--ema-warmup-steps: checkpoint 2, now 0" in message
    assert "--validation-split (which images are held out of training): checkpoint 0.25, now 0.5" in message


# ---------------------------------------------------------------------------------------------
# The same number for any batch size and world size


@pytest.fixture(scope="module")
def batch4_run(tiny_model, fill_cache, tmp_path_factory):
    """Batch 4, an EMA written as the adapter (--save-ema)."""
    out = tmp_path_factory.mktemp("batch4") / "batch4-run"
    train(_cfg(tiny_model, fill_cache, out, batch_size=4, max_steps=2, validation_split=0.25, validation_loss_steps=1,
               ema_decay=0.5, save_ema=True))
    return out


@pytest.mark.slow
def test_the_validation_loss_is_the_same_for_any_batch_size_and_world_size(tiny_model, fill_cache, split_run,
                                                                          batch4_run, tmp_path):
    """Step 0 evaluates the same initial adapter (the seed decides it) in every run: batch 2 or 4,
    one process or two (accelerate launch, gloo), the very same float."""
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = run_launched(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()),
         "-m", "train", "--model", str(tiny_model), "--cache", str(fill_cache), "--output-dir", str(out),
         "--max-steps", "2", "--batch-size", "2", "--num-workers", "0", "--learning-rate", "1e-3",
         "--validation-split", "0.25", "--validation-loss-steps", "100", "--log-samples"],
        cwd=REPO, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    start = {name: _records(run, "validation_loss")[0] for name, run in
             (("batch 2", split_run[0]), ("batch 4", batch4_run), ("2 processes", out))}
    assert {r["step"] for r in start.values()} == {0}
    assert len({r["validation_loss"] for r in start.values()}) == 1, start
    assert len({json.dumps(r["validation_loss_by_timestep"]) for r in start.values()}) == 1
    # Both ranks trained, neither on a held-out image; the loss at the end is one number.
    held = set(json.loads((split_run[0] / "train_config.json").read_text())["resolved"]["validation_set"].items())
    assert held == set(json.loads((out / "train_config.json").read_text())["resolved"]["validation_set"].items())
    assert [r["step"] for r in _records(out, "validation_loss")] == [0, 2]


def test_save_ema_writes_the_ema_as_the_adapter(batch4_run):
    out = batch4_run
    assert _sha(out / "diffusion_pytorch_model.safetensors") == _sha(
        out / "checkpoints/step-000002/ema/diffusion_pytorch_model.safetensors")
    assert _sha(out / "diffusion_pytorch_model.safetensors") != _sha(
        out / "checkpoints/step-000002/adapter/diffusion_pytorch_model.safetensors")
    assert not (out / "ema").exists()
    assert "this folder's adapter is the EMA of the trained weights (decay 0.5)" in (out / "README.md").read_text()
    assert json.loads((out / "train_config.json").read_text())["resolved"]["output_weights"] == "ema"


# ---------------------------------------------------------------------------------------------
# A validation cache


@pytest.fixture(scope="module")
def validation_cache(tiny_model, fill_data, tmp_path_factory) -> Path:
    """4 images of the fill data in shards of 2: another cache, the same identity for train."""
    out = tmp_path_factory.mktemp("val-cache") / "cache"
    made = run_cli("precompute", ["--model", tiny_model, "--data", fill_data, "--cache", out, "--resolution", "64",
                                  "--samples-per-shard", "2", "--max-samples", "4", "--num-workers", "0",
                                  "--device", "cpu"])
    assert made.returncode == 0, made.stderr[-3000:]
    return out


def test_validation_loss_on_another_cache(tiny_model, fill_cache, validation_cache, tmp_path):
    from shards.manifest import Manifest

    out = tmp_path / "out"
    train(_cfg(tiny_model, fill_cache, out, max_steps=2, validation_cache=str(validation_cache)))
    records = _records(out, "validation_loss")
    assert [r["step"] for r in records] == [0, 2] and all(r["validation_images"] == 4 for r in records)
    resolved = json.loads((out / "train_config.json").read_text())["resolved"]
    assert resolved["validation_set"]["manifest_id"] == Manifest.load_with_id(validation_cache)[1]
    assert resolved["validation_set"]["manifest_id"] != resolved["manifest_id"]
    assert resolved["data"]["samples_per_epoch"] == 16  # nothing held out of the training cache


def test_a_validation_cache_that_copies_the_training_cache_is_warned_about(tiny_model, fill_cache, tmp_path, caplog):
    import shutil

    copy = shutil.copytree(fill_cache, tmp_path / "copy")
    with caplog.at_level("WARNING", logger="train"):
        train(_cfg(tiny_model, fill_cache, tmp_path / "out", max_steps=1, validation_cache=str(copy)))
    assert any("holds the training cache itself (the same manifest id" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# A canny cache with aspect buckets: adherence, non-square labelled grids, --validation-file


@pytest.fixture(scope="module")
def canny_cache(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """(data, cache): 8 mixed-aspect fill images, precomputed with --buckets sdxl --condition canny."""
    from precompute.fill import make_fill_dataset

    root = tmp_path_factory.mktemp("canny")
    data = make_fill_dataset(root / "data", n=8, resolution=64, seed=0, aspect="mixed")
    cache = root / "cache"
    made = run_cli("precompute", ["--model", tiny_model, "--data", data, "--cache", cache, "--resolution", "64",
                                  "--samples-per-shard", "4", "--num-workers", "0", "--device", "cpu",
                                  "--buckets", "sdxl", "--condition", "canny"])
    assert made.returncode == 0, made.stderr[-3000:]
    return data, cache


@pytest.fixture(scope="module")
def canny_run(tiny_model, canny_cache, tmp_path_factory):
    data, cache = canny_cache
    (data / "validation.jsonl").write_text(
        json.dumps({"image": "source/1.png", "prompt": "pink circle with sky blue background"}) + "\n"
        + json.dumps({"conditioning_image": str(data / "source/3.png"), "text": "a wide circle"}) + "\n")
    out = tmp_path_factory.mktemp("canny-run") / "canny-run"
    result = train(_cfg(tiny_model, cache, out, max_steps=3, validation_split=0.25, validation_loss_steps=2,
                        validation_image=(str(data / "source/0.png"),), validation_prompt=(PROMPT,),
                        validation_file=str(data / "validation.jsonl"), num_validation_images=2,
                        validation_steps=2, validation_inference_steps=2))
    return out, result


def test_condition_adherence_is_scored_logged_and_in_the_card(canny_run):
    out, _ = canny_run
    records = _records(out, "adherence")
    assert [r["step"] for r in records] == [2, 3]
    for r in records:
        assert len(r["adherence_per_pair"]) == 3 and all(0.0 <= v <= 1.0 for v in r["adherence_per_pair"])
        assert r["adherence"] == pytest.approx(sum(r["adherence_per_pair"]) / 3)
    # A random adapter's samples follow the circle no better than chance: far from 1.
    assert 0.05 < records[-1]["adherence"] < 0.6
    card = (out / "README.md").read_text()
    assert f"- condition adherence: last {records[-1]['adherence']:.4f} (step 3)" in card
    assert "edge F1 of the validation images, canny (low 100, high 200), 2 px tolerance, raw weights" in card
    # Bucketed cache: the validation loss runs on its held-out images (2 of 8), batches of one shape.
    assert [r["step"] for r in _records(out, "validation_loss")] == [0, 2, 3]
    assert _records(out, "validation_loss")[0]["validation_images"] == 2


def test_validation_decodes_its_conditioning_images_as_precompute_decodes_the_caches(tmp_path):
    """What validation shows the adapter is what it was trained on: a 16-bit depth map is a ramp
    (not white), an EXIF-rotated photo stands upright, transparency lies on white."""
    from precompute.preprocess import load_rgb
    from train.validation import ValidationPrompts, Validator

    ramp = np.tile(np.linspace(0, 65535, 96), (128, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "depth16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.fromarray(np.tile(np.linspace(0, 255, 128), (96, 1)).astype(np.uint8)).convert("RGB").save(
        tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    rgba = Image.new("RGBA", (96, 128), (22, 80, 33, 0))
    rgba.paste((200, 0, 0, 255), (0, 0, 48, 128))
    rgba.save(tmp_path / "alpha.png")
    names = ["depth16.png", "rotated.jpg", "alpha.png"]
    none = torch.zeros(len(names), 1)
    prompts = ValidationPrompts([(str(tmp_path / n), "p") for n in names], none, none, none, none)
    validator = Validator(prompts, output_dir=tmp_path / "run", vae_location=("unused", None), vae_kwargs={},
                          scheduler_config={}, force_zeros=True, resolution=None, sizes=[(128, 96), (96, 128)],
                          detector=None, num_images=1, inference_steps=1, guidance_scale=1.0, seed=0)
    assert validator.sizes == [(128, 96)] * 3  # portrait, each of them
    for name, shown in zip(names, validator.cond_images):
        cached = load_rgb((tmp_path / name).read_bytes(), "cond", name)
        assert np.array_equal(np.asarray(shown), np.asarray(cached)), name
    depth, rotated, alpha = (np.asarray(im).astype(int) for im in validator.cond_images)
    assert depth[0, 0, 0] == 0 and depth[0, -1, 0] == 255 and np.all(np.diff(depth[0, :, 0]) >= 0)
    assert rotated.shape == (128, 96, 3) and abs(rotated[0, 0, 0] - 0) < 8 and abs(rotated[-1, 0, 0] - 255) < 8
    assert alpha[0, -1].tolist() == [255, 255, 255] and alpha[0, 0].tolist() == [200, 0, 0]


def test_labels_show_accented_letters_and_cut_a_long_prompt_before_the_scores():
    from PIL import ImageDraw

    from train.validation import MAX_LABEL_CHARS, Validator, label_font

    font = label_font(256)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # The font has the glyphs (PIL's built-in font would draw ü as the box it draws for any
    # missing glyph, the same box as for a character no font has).
    assert draw.textbbox((0, 0), "ü", font=font) != draw.textbbox((0, 0), "\uffff", font=font)
    label = Validator.row_label("word " * 400, [0.5, 0.25])
    assert label.endswith(" …  [edge F1 0.50 0.25]") and len(label) < MAX_LABEL_CHARS + 30


def test_grids_are_non_square_and_labelled_with_the_prompt_and_the_step(canny_run, canny_cache):
    from train.validation import label_band, label_font

    out, result = canny_run
    data, _ = canny_cache
    # Pair 0: a square image; 1 (from the file): 64x96 -> the 64x96 bucket; 2: 64x128 -> nearest, 64x96.
    sizes = []
    for i in range(3):
        with Image.open(out / f"validation/step-000003-{i}.png") as grid:
            sizes.append(grid.size)
    assert sizes == [(64 * 3, 64), (96 * 3, 64), (96 * 3, 64)]
    with Image.open(out / "validation/step-000003.png") as sheet:
        page = np.asarray(sheet.convert("RGB"))
    assert page.shape[1] == 96 * 3
    font = label_font(64)
    title = np.asarray(label_band(["step 3 - trained weights - first column: the conditioning image"], 96 * 3, font))
    assert np.array_equal(page[: title.shape[0]], title)  # the title line says the step
    scores = _records(out, "adherence")[-1]["adherence_per_image"][0]  # pair 0's two samples
    row0 = np.asarray(label_band([f"{PROMPT}  [edge F1 {scores[0]:.2f} {scores[1]:.2f}]"], 96 * 3, font))
    y = title.shape[0] + row0.shape[0]
    assert np.array_equal(page[title.shape[0] : y], row0)  # the row's line: its prompt and scores
    # Below the prompt line: the conditioning image (first column), then the samples.
    with Image.open(data / "source/0.png") as cond:
        first = np.asarray(cond.convert("RGB").resize((64, 64)))
    assert np.abs(page[y : y + 64, :64].astype(int) - first.astype(int)).mean() < 8
    assert (row0 > 200).any() and row0.mean() < 80  # light text on a dark band
    assert result.validation_images == [out / f"validation/step-000003-{i}.png" for i in range(3)]
    assert "![validation images](validation/step-000003.png)" in (out / "README.md").read_text()


def test_a_validation_cache_with_another_identity_is_refused(tiny_model, fill_cache, canny_cache, tmp_path):
    _, cache = canny_cache
    with pytest.raises(CacheMismatchError) as err:
        train(_cfg(tiny_model, fill_cache, tmp_path / "out", max_steps=1, validation_cache=str(cache)))
    assert "--validation-cache" in str(err.value) and "condition.method" in str(err.value)
    assert not (tmp_path / "out/checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# Many runs, one cache


def test_compare_prints_the_runs_and_draws_their_curves(split_run, batch4_run, tmp_path):
    png = tmp_path / "cmp.png"
    proc = run_cli("train", ["compare", split_run[0], batch4_run, "-o", png], timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = lines[0].split()
    assert header[:3] == ["run", "steps", "samples"] and "batch_size" in header and "max_steps" in header
    assert "validation_loss_steps" in header and "save_ema" in header
    assert "model" not in header and "validation_split" not in header  # the same in both
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    assert rows["split-run"][:3] == ["split-run", "5", "10"] and rows["batch4-run"][:3] == ["batch4-run", "2", "8"]
    for name, run in (("split-run", split_run[0]), ("batch4-run", batch4_run)):
        loss = json.loads((run / "train_config.json").read_text())["resolved"]["results"]["validation_loss"]
        assert rows[name][3:9] == [f"{loss['best']:.6f}", f"@{loss['best_step']}", f"{loss['last']:.6f}",
                                   f"@{loss['last_step']}", "-", "-"]  # no adherence: dataset conditions
        assert float(rows[name][9]) > 0  # samples/s
    settings = header[header.index("samples/s") + 1:]
    differ = {name: dict(zip(settings, row[10:])) for name, row in rows.items()}
    assert differ["split-run"]["batch_size"] == "2" and differ["batch4-run"]["batch_size"] == "4"
    assert differ["split-run"]["ema_decay"] == "0.9" and differ["batch4-run"]["save_ema"] == "True"
    with Image.open(png) as image:
        assert image.size == (900, 500)
    assert f"curves: {png}" in proc.stdout


def test_compare_tells_runs_of_one_folder_name_apart(split_run, tmp_path):
    import shutil

    from train.compare import compare

    for parent in ("x", "y"):
        shutil.copytree(split_run[0], tmp_path / parent / "run")
    text = compare([str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")], output=tmp_path / "c.png")
    assert [line.split()[0] for line in text.splitlines()[2:4]] == ["x/run", "y/run"]
    assert "note:" not in text
    # A resume of y/run is going on (its log runs ahead of its train_config.json): said, not hidden.
    recorded = json.loads((tmp_path / "y/run/train_config.json").read_text())["resolved"]["results"]["global_step"]
    with (tmp_path / "y/run/logs/metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": recorded + 7, "loss": 0.5}) + "\n")
    said = (f"note: y/run: its log goes on to step {recorded + 7}, past the {recorded} steps its train_config.json "
            "records (a resume is running, or stopped before it finished)")
    assert said in compare([str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")], output=tmp_path / "c.png")
    from train.compare import summary

    assert f"note: run: its log goes on to step {recorded + 7}" in summary(tmp_path / "y" / "run")


def test_compare_refuses_runs_of_different_caches_and_folders_that_are_not_runs(split_run, canny_run, tmp_path):
    from click.testing import CliRunner

    from train.compare import tools

    runner = CliRunner()
    result = runner.invoke(tools, ["compare", str(split_run[0]), str(canny_run[0]), "-o", str(tmp_path / "c.png")])
    assert result.exit_code == 1 and "these runs trained on different caches" in result.output
    assert "--allow-different-caches" in result.output and not (tmp_path / "c.png").exists()
    allowed = runner.invoke(tools, ["compare", str(split_run[0]), str(canny_run[0]), "-o", str(tmp_path / "c.png"),
                                    "--allow-different-caches"])
    assert allowed.exit_code == 0, allowed.output
    assert "note: the runs trained on different caches" in allowed.output
    assert "note: the runs measured their validation loss on different validation sets" in allowed.output
    unfinished = tmp_path / "unfinished"
    shutil.copytree(split_run[0] / "checkpoints", unfinished / "checkpoints")
    for folder, message in ((unfinished, "is a run that has not finished"), (tmp_path / "none", "no such folder"),
                            (split_run[0] / "logs", "is not a training run")):
        result = runner.invoke(tools, ["compare", str(folder)])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output
    # Where the curves cannot go: one line each, before any run is read where it can be told.
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for output, message in ((tmp_path / "c.xyz", f"--output {tmp_path / 'c.xyz'}: .xyz is no image format this can "
                                                 "write; use one of "),
                            (a_file / "c.png", f"--output {a_file / 'c.png'}: cannot write it")):
        result = runner.invoke(tools, ["compare", str(split_run[0]), "-o", str(output)])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output
    result = runner.invoke(tools, ["compare", str(split_run[0]), "-o", str(tmp_path / "curves")])
    assert result.exit_code == 0 and f"curves: {tmp_path / 'curves.png'}" in result.output  # the file written
    assert (tmp_path / "curves.png").is_file()


def test_summary_prints_the_last_validation_loss_and_adherence(canny_run, split_run):
    from train.compare import summary

    text = summary(canny_run[0])
    loss = _records(canny_run[0], "validation_loss")[-1]["validation_loss"]
    adherence = _records(canny_run[0], "adherence")[-1]["adherence"]
    assert f"  validation loss       {loss:.6f} at step 3 (best " in text
    assert f"  condition adherence   {adherence:.4f} edge F1 at step 3 (best " in text
    assert "condition adherence   not measured" in summary(split_run[0])


def test_in_mixed_precision_the_ema_is_evaluated_as_the_trained_adapter_is(tiny_model, fill_cache, tmp_path):
    """At the start the EMA is the adapter itself: under bf16 both evaluate to the same bits (the
    EMA runs under the autocast the trained adapter's forward carries)."""
    common = dict(max_steps=1, validation_split=0.25, validation_loss_steps=1, mixed_precision="bf16")
    for name, extra in (("raw", {}), ("ema", {"ema_decay": 0.9})):  # a process each: its own precision
        result = run_cli("train", config_args(_cfg(tiny_model, fill_cache, tmp_path / name, **common, **extra)))
        assert result.returncode == 0, result.stderr[-3000:]
    raw, ema = (_records(tmp_path / name, "validation_loss")[0] for name in ("raw", "ema"))
    assert raw["step"] == ema["step"] == 0 and ema["validation_weights"] == "ema"
    assert raw["validation_loss"] == ema["validation_loss"]
