"""train.loop end to end on the tiny SDXL and a real cache made by `python -m precompute`.

Exact resume (a run killed right after a checkpoint and resumed vs. the same run uninterrupted,
with a decaying LR schedule, gradient accumulation, an epoch boundary and validation on one side
only; extending a constant-schedule run with 2 loader workers), two processes with accelerate
launch (gloo on the CPU), every refusal before weights, what the tracker receives, that the loss
falls through the real loop, and what OUT holds: an adapter that StableDiffusionXLAdapterPipeline
loads and renders with, the validation grids, the model card, the loss curve.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.checkpoint import CheckpointError
from train.checks import CacheMismatchError, StartupError
from train.config import TrainConfig
from train.loop import DEBUG_EXIT_AFTER_CHECKPOINT, DEBUG_REPLICA_DIR, train
from clirun import config_args, run_cli
from ports import free_port

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ("red circle with blue background", "green circle with yellow background")


@pytest.fixture(scope="module")
def cache(fill_cache) -> Path:
    """16 samples at 64 px in 4 shards of 4, encoded by the real precompute CLI (conftest)."""
    return fill_cache


def _cfg(model, cache, out, **kw) -> TrainConfig:
    base = dict(model=str(model), cache=str(cache), output_dir=str(out), batch_size=2, num_workers=0,
                learning_rate=1e-3, lr_scheduler="constant_with_warmup", lr_warmup_steps=3, log_samples=True,
                log_every=2, checkpointing_steps=100)
    return TrainConfig(**{**base, **kw})


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_run(a: Path, b: Path, steps: int) -> None:
    assert _sha(a / "diffusion_pytorch_model.safetensors") == _sha(b / "diffusion_pytorch_model.safetensors")
    samples_a, samples_b = _jsonl(a / "logs/samples-rank00000.jsonl"), _jsonl(b / "logs/samples-rank00000.jsonl")
    assert samples_a == samples_b and samples_a[-1]["step"] == steps
    losses_a = [m["loss"] for m in _jsonl(a / "logs/metrics.jsonl")]
    assert losses_a == [m["loss"] for m in _jsonl(b / "logs/metrics.jsonl")] and len(losses_a) == steps


def test_resume_from_no_loader_worker_to_one_is_the_same_stream(tiny_model, cache, tmp_path):
    """0 workers (read in the training process) and 1 worker read one stream alike: a resume may
    switch between them and stays bitwise; 1 -> 2 changes the streams and is refused."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg(tiny_model, cache, a, max_steps=5, num_workers=0, lr_scheduler="constant"))
    train(_cfg(tiny_model, cache, b, max_steps=3, num_workers=0, lr_scheduler="constant"))
    train(_cfg(tiny_model, cache, b, max_steps=4, num_workers=1, lr_scheduler="constant", resume="latest"))
    with pytest.raises(CheckpointError, match="--num-workers: checkpoint 1, now 2"):
        train(_cfg(tiny_model, cache, b, max_steps=5, num_workers=2, lr_scheduler="constant", resume="latest"))
    train(_cfg(tiny_model, cache, b, max_steps=5, num_workers=0, lr_scheduler="constant", resume="latest"))  # and back
    _assert_same_run(a, b, steps=5)


# ---------------------------------------------------------------------------------------------
# One reference run, shared: accumulation 3 over 8 batches per epoch gives optimizer steps of
# 3, 3, 2 batches, so 4 steps cross into epoch 1. A cosine schedule (its value at a step depends
# on the run's total steps), validation images and a tensorboard tracker.


def _run_a_cfg(tiny_model, fill_data, cache, out, **kw) -> TrainConfig:
    return _cfg(tiny_model, cache, out, max_steps=4, gradient_accumulation_steps=3, checkpointing_steps=1,
                checkpoints_total_limit=2, lr_scheduler="cosine", lr_warmup_steps=1, report_to="tensorboard",
                validation_image=(str(fill_data / "source/0.png"),), validation_prompt=PROMPTS,
                num_validation_images=2, validation_steps=2, validation_inference_steps=2, **kw)


@pytest.fixture(scope="module")
def run_a(tiny_model, fill_data, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run-a") / "out"
    result = train(_run_a_cfg(tiny_model, fill_data, cache, out))
    return out, result


def test_resume_after_a_kill_is_bitwise_identical(tiny_model, fill_data, cache, run_a, tmp_path, caplog):
    """Run B is run A's very command, killed (os._exit, nothing flushed or written after) right
    after its checkpoint at step 2, then the same command with --resume latest. Same adapter
    bytes, sample order and losses as A, whose cosine schedule depends on the total step count.
    A also rendered validation images at step 2 (which must not touch the training random
    stream); B died before it could. B's logs end as a crash or a full disk can leave them (a
    torn line, NUL bytes): the resume says so and leaves those lines out."""
    a, result = run_a
    assert result.global_step == 4 and result.samples_seen == (3 + 3 + 2 + 3) * 2
    b = tmp_path / "b"
    cfg = _run_a_cfg(tiny_model, fill_data, cache, b)
    killed = run_cli("train", config_args(cfg), env={**os.environ, DEBUG_EXIT_AFTER_CHECKPOINT: "2"})
    assert killed.returncode == 75, killed.stderr[-4000:]
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert not (b / "diffusion_pytorch_model.safetensors").exists() and not (b / "validation").exists()
    with (b / "logs/metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 1.1')
    with (b / "logs/samples-rank00000.jsonl").open("ab") as f:
        f.write(b"\0" * 100)

    with caplog.at_level(logging.WARNING):
        resumed = train(dataclasses.replace(cfg, resume="latest"))
    assert resumed.global_step == 4 and resumed.samples_seen == result.samples_seen
    _assert_same_run(a, b, steps=4)
    assert (f"{b / 'logs/metrics.jsonl'}: left out 1 unreadable line(s) (line 3), what a crash or a full disk leaves; "
            "the other records are kept") in caplog.text
    assert f"{b / 'logs/samples-rank00000.jsonl'}: left out 1 unreadable line(s)" in caplog.text
    samples = _jsonl(a / "logs/samples-rank00000.jsonl")
    assert [s["epoch"] for s in samples] == [0] * 8 + [1] * 3  # micro-batches: the epoch boundary was crossed
    epoch0 = [k for s in samples[:8] for k in s["keys"]]
    assert len(set(epoch0)) == 16  # every sample once per epoch
    lrs = [m["lr"] for m in _jsonl(a / "logs/metrics.jsonl")]
    # warm-up 1 step, then half a cosine over the 3 remaining: 1, (1 + cos(pi/3))/2, (1 + cos(2pi/3))/2
    assert lrs == pytest.approx([0.0, 1e-3, 0.75e-3, 0.25e-3])


def test_resume_refuses_a_decaying_schedule_with_another_length_or_changed_adam(tiny_model, fill_data, cache,
                                                                               run_a, tmp_path):
    """Extending a cosine run would continue another schedule; changed AdamW settings would be
    overwritten by the checkpoint's param groups. Both refused, before any weight is read."""
    out = tmp_path / "copy"
    shutil.copytree(run_a[0], out)
    cfg = _run_a_cfg(tiny_model, fill_data, cache, out, resume="latest")
    with pytest.raises(CheckpointError) as err:
        train(dataclasses.replace(cfg, max_steps=8, adam_beta2=0.99, adam_weight_decay=0.0))
    message = str(err.value)
    assert "shape the cosine learning-rate schedule: checkpoint 4, now 8" in message
    assert "--adam-beta2: checkpoint 0.999, now 0.99" in message
    assert "--adam-weight-decay: checkpoint 0.01, now 0.0" in message
    assert len([line for line in message.splitlines() if line.startswith("  - ")]) == 3


def test_resuming_a_finished_run_says_there_is_nothing_to_do(tiny_model, fill_data, cache, run_a, tmp_path, caplog):
    out = tmp_path / "copy"
    shutil.copytree(run_a[0], out)
    outputs = lambda: {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    before = outputs()
    with caplog.at_level("INFO"):
        result = train(_run_a_cfg(tiny_model, fill_data, cache, out, resume="latest"))
    assert result.global_step == 4 and result.samples_seen == run_a[1].samples_seen
    assert any("nothing to do" in r.getMessage() and "finished all 4 steps" in r.getMessage() for r in caplog.records)
    assert not any("parameters:" in r.getMessage() for r in caplog.records)  # no weights were loaded
    assert outputs() == before  # nothing rewritten (only the writer lock was taken and released)


def test_a_warm_up_longer_than_the_run_is_warned(tiny_model, cache, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        train(_cfg(tiny_model, cache, tmp_path / "out", max_steps=2, lr_scheduler="cosine", lr_warmup_steps=500))
    assert any("--lr-warmup-steps 500 is not shorter than the run's 2 optimizer steps" in r.getMessage()
               for r in caplog.records)


def test_resume_is_bitwise_identical_with_two_loader_workers(tiny_model, cache, tmp_path):
    """Resuming at an odd batch with 2 workers: the worker rotation must give the same order. The
    schedule is constant after warm-up, so training a finished 3-step run on to 4 steps is the
    same as 4 steps from the start (a constant schedule does not depend on the total)."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg(tiny_model, cache, a, max_steps=4, num_workers=2))
    train(_cfg(tiny_model, cache, b, max_steps=3, num_workers=2))
    train(_cfg(tiny_model, cache, b, max_steps=4, num_workers=2, resume="latest"))
    _assert_same_run(a, b, steps=4)
    state = json.loads((b / "checkpoints/step-000003/state.json").read_text())
    assert state["state"] == {"global_step": 3, "epoch": 0, "batches_done": 3, "samples_seen": 6}


# ---------------------------------------------------------------------------------------------
# What OUT holds


def test_keeps_the_last_two_checkpoints(run_a):
    out, _ = run_a
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    # the final adapter is the last checkpoint's adapter
    assert _sha(out / "diffusion_pytorch_model.safetensors") == _sha(
        out / "checkpoints/step-000004/adapter/diffusion_pytorch_model.safetensors")


def test_saved_adapter_renders_in_the_sdxl_adapter_pipeline(tiny_model, run_a):
    from diffusers import StableDiffusionXLAdapterPipeline, T2IAdapter

    out, _ = run_a
    adapter = T2IAdapter.from_pretrained(out)
    pipe = StableDiffusionXLAdapterPipeline.from_pretrained(tiny_model, adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    cond = Image.new("RGB", (64, 64))
    image = pipe("red circle with blue background", image=cond, num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0


def test_validation_grids(run_a):
    out, result = run_a
    for step in (2, 4):
        for i in range(len(PROMPTS)):
            with Image.open(out / f"validation/step-{step:06d}-{i}.png") as grid:
                assert grid.size == (64 * (1 + 2), 64)  # conditioning image + 2 samples, 64 px each
    assert [p.name for p in result.validation_images] == ["step-000004-0.png", "step-000004-1.png"]
    with Image.open(out / "validation/step-000004-0.png") as grid:
        first = np.asarray(grid)[:, :64]
    with Image.open(_validation_image(out)) as cond:  # the row starts with the conditioning image
        assert np.abs(first.astype(int) - np.asarray(cond.convert("RGB").resize((64, 64))).astype(int)).mean() < 8


def test_tracker_receives_metrics_and_validation_images(run_a):
    """--report-to tensorboard: every step's loss, lr, samples/s and data wait, and each validation
    grid, read back from the event files with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run_a
    run_dir = out / "logs" / "t2i-adapter-sdxl"  # --logging-dir / --tracker-project-name
    assert list(run_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    metrics = _jsonl(out / "logs/metrics.jsonl")
    for name in ("loss", "lr", "samples_per_s", "data_wait_s", "grad_norm"):
        scalars = events.Scalars(name)
        assert [e.step for e in scalars] == [1, 2, 3, 4], name
        assert [e.value for e in scalars] == pytest.approx([m[name] for m in metrics], rel=1e-6), name
    assert all(m["data_wait_s"] >= 0 and m["samples_per_s"] > 0 for m in metrics)
    assert all("peak_memory_gib" not in m for m in metrics)  # CPU: no CUDA peak to report
    image_tags = sorted(events.Tags()["images"])
    assert image_tags == [f"validation/{i}: {prompt}" for i, prompt in enumerate(PROMPTS)]
    for tag in image_tags:
        images = events.Images(tag)
        assert [e.step for e in images] == [2, 4]
        with Image.open(io.BytesIO(images[-1].encoded_image_string)) as img:
            # the row as logged: conditioning image + 2 samples of 64 px (grid of 3 with padding)
            assert img.size[1] >= 64 and img.size[0] >= 3 * 64


def _validation_image(out: Path) -> Path:
    return Path(json.loads((out / "train_config.json").read_text())["validation_image"][0])


def test_model_card_config_and_loss_curve(tiny_model, cache, run_a):
    out, _ = run_a
    card = (out / "README.md").read_text()
    manifest_id = _sha(cache / "manifest.json")
    assert f"base_model: \"{tiny_model}\"" in card
    assert manifest_id in card
    assert "![red circle with blue background](validation/step-000004-0.png)" in card
    assert "![loss curve](loss_curve.png)" in card and "T2IAdapter.from_pretrained" in card
    resolved = json.loads((out / "train_config.json").read_text())
    assert resolved["max_steps"] == 4 and resolved["resolved"]["total_steps"] == 4
    assert resolved["resolved"]["manifest_id"] == manifest_id
    assert resolved["resolved"]["batches_per_epoch_per_rank"] == [8, 8]
    assert resolved["resolved"]["data"] == {  # 16 samples in batches of 2 on one rank: nothing dropped
        "epochs_planned": 2, "samples_per_epoch": 16, "samples_dropped": 0, "samples_dropped_in_partial_batches": 0,
        "samples_dropped_for_equal_steps": 0, "samples_dropped_fraction": 0.0, "samples_repeated": 0}
    assert "- samples dropped by the epoch plans: 0 over 2 planned epoch(s) of 16 samples (0.0%" in card
    assert f'"manifest_id": "{manifest_id}"' in card  # the resolved config is in the card
    with Image.open(out / "loss_curve.png") as curve:
        assert curve.format == "PNG" and curve.size[0] >= 400
    metrics = _jsonl(out / "logs/metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) and m["loss"] > 0 and m["samples_per_s"] > 0 for m in metrics)
    adapter_cfg = json.loads((out / "config.json").read_text())
    assert adapter_cfg["_class_name"] == "T2IAdapter" and adapter_cfg["adapter_type"] == "full_adapter_xl"


def test_continue_from_a_hub_adapter(tiny_model, cache, run_a, tmp_path, monkeypatch):
    """--adapter ORG/NAME resolves through the hub (here: a hub cache holding it, offline), before
    the UNet loads, with safetensors weights."""
    import huggingface_hub.constants
    from safetensors.torch import load_file

    hub = tmp_path / "hub"
    snapshot = hub / "models--someone--tiny-adapter" / "snapshots" / ("0" * 40)
    shutil.copytree(run_a[0], snapshot, ignore=lambda _, names: [n for n in names if n not in (
        "config.json", "diffusion_pytorch_model.safetensors")])
    (hub / "models--someone--tiny-adapter" / "refs").mkdir()
    (hub / "models--someone--tiny-adapter" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    out = tmp_path / "from-hub"
    train(_cfg(tiny_model, cache, out, max_steps=1, adapter="someone/tiny-adapter", learning_rate=1e-12,
               lr_scheduler="constant"))
    before = load_file(snapshot / "diffusion_pytorch_model.safetensors")
    after = load_file(out / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-9, rtol=0) for k in before)

    with pytest.raises(StartupError, match="--adapter someone/missing: cannot read its config.json"):
        train(_cfg(tiny_model, cache, tmp_path / "missing", max_steps=1, adapter="someone/missing"))


def test_continue_from_a_saved_adapter(tiny_model, cache, run_a, tmp_path):
    """--adapter starts from those weights: one step at a negligible rate leaves them in place."""
    from safetensors.torch import load_file

    start, _ = run_a
    out = tmp_path / "continued"
    train(_cfg(tiny_model, cache, out, max_steps=1, adapter=str(start), learning_rate=1e-12, lr_scheduler="constant"))
    before = load_file(start / "diffusion_pytorch_model.safetensors")
    after = load_file(out / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-9, rtol=0) for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it did take a step
    # A checkpoint folder given as the adapter: pointed to its adapter/ folder.
    step = sorted((start / "checkpoints").glob("step-*"))[-1]
    with pytest.raises(StartupError) as err:
        train(_cfg(tiny_model, cache, tmp_path / "from-checkpoint", max_steps=1, adapter=str(step)))
    assert f"--adapter {step}: cannot read its config.json" in str(err.value)
    assert f"a checkpoint's adapter is its adapter/ folder: --adapter {step / 'adapter'}" in str(err.value)


def test_cli_bf16_with_gradient_checkpointing_and_validation(tiny_model, fill_data, cache, tmp_path):
    """The CLI end to end in mixed precision (bf16 autocast on the CPU): UNet weights in bf16,
    adapter kept in fp32, validation rendered under autocast, N:N pairs (image i with prompt i)."""
    out = tmp_path / "bf16"
    proc = run_cli("train", [
        "--model", tiny_model, "--cache", cache, "--output-dir", out,
        "--max-steps", "2", "--batch-size", "2", "--num-workers", "0", "--mixed-precision", "bf16",
        "--gradient-checkpointing", "--lr-scheduler", "cosine", "--lr-warmup-steps", "1",
        "--validation-image", fill_data / "source/1.png", "--validation-prompt", PROMPTS[0],
        "--validation-image", fill_data / "source/2.png", "--validation-prompt", PROMPTS[1],
        "--num-validation-images", "1", "--validation-inference-steps", "2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "frozen (UNet, bfloat16)" in proc.stderr and "trainable (adapter, fp32)" in proc.stderr
    from safetensors.torch import load_file

    weights = load_file(out / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    metrics = _jsonl(out / "logs/metrics.jsonl")
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
    for i, source in enumerate(("source/1.png", "source/2.png")):
        with Image.open(out / f"validation/step-000002-{i}.png") as grid, Image.open(fill_data / source) as cond:
            assert grid.size == (128, 64)
            first = np.asarray(grid.convert("RGB"))[:, :64].astype(int)
            assert np.abs(first - np.asarray(cond.convert("RGB").resize((64, 64))).astype(int)).mean() < 8
    with Image.open(fill_data / "source/1.png") as one, Image.open(fill_data / "source/2.png") as two:
        assert np.abs(np.asarray(one).astype(int) - np.asarray(two).astype(int)).mean() > 8  # rows told apart


# ---------------------------------------------------------------------------------------------
# Refusals, all before the UNet weights are read


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    # Unreadable UNet weights: any refusal below must come before they are read.
    for f in (dst / "unet").glob("*.safetensors"):
        f.write_bytes(b"not weights")
    return dst


def test_refuses_a_cache_whose_widths_do_not_fit_the_unet(tiny_model, cache, tmp_path):
    model = _copy_model(tiny_model, tmp_path / "wider")
    config_path = model / "unet/config.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] += 16
    config["addition_time_embed_dim"] += 2
    config_path.write_text(json.dumps(config))
    with pytest.raises(CacheMismatchError) as err:
        train(_cfg(model, cache, tmp_path / "out", max_steps=1))
    message = str(err.value)
    assert f"prompt width: cache prompt_embeds 64 != UNet cross_attention_dim {config['cross_attention_dim']}" in message
    assert "pooled width: cache pooled_prompt_embeds 32 + 6 x addition_time_embed_dim 10 = 92" in message
    assert "fingerprint" not in message  # the encoders are the cache's own
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_refuses_other_encoders_unless_accepted(cache, tmp_path):
    from precompute.tiny import build_tiny_sdxl

    other = build_tiny_sdxl(tmp_path / "tiny-seed-1", seed=1)  # same shapes, other weights
    with pytest.raises(CacheMismatchError) as err:
        train(_cfg(_copy_model(other, tmp_path / "unreadable-unet"), cache, tmp_path / "refused", max_steps=1))
    message = str(err.value)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert f"- {name} fingerprint: cache " in message
    assert "--accept-encoder-mismatch" in message
    result = train(_cfg(other, cache, tmp_path / "accepted", max_steps=1, accept_encoder_mismatch=True))
    assert result.global_step == 1 and (tmp_path / "accepted/diffusion_pytorch_model.safetensors").is_file()


def test_a_ctrl_c_swallowed_by_a_destructor_still_stops_training(tiny_model, cache, tmp_path, monkeypatch):
    """Ctrl-C arriving while a DataLoader iterator is being torn down (an epoch's end) raises its
    KeyboardInterrupt inside a __del__, where Python only prints "Exception ignored": the signal
    is remembered, and the next step raises it again, so the run stops instead of training on."""
    import signal

    from shards import runtime

    class Swallows:
        def __del__(self):
            runtime._interrupt(signal.SIGINT, None)

    monkeypatch.setattr(runtime, "_stopped", None)
    Swallows()  # made and dropped at once: its __del__'s KeyboardInterrupt is printed, not raised
    assert runtime._stopped == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_model, cache, tmp_path / "out", max_steps=3))
    metrics = tmp_path / "out" / "logs" / "metrics.jsonl"
    assert not metrics.exists() or not [line for line in metrics.read_text().splitlines() if '"loss"' in line]


def test_an_accepted_encoder_mismatch_is_not_suggested_again_when_something_else_refuses():
    from train.checks import refusal_message

    problems, differences = ["prompt width: cache prompt_embeds 64 != UNet cross_attention_dim 80"], [
        "vae fingerprint: cache 0123... != this model's 4567..."]
    refused = refusal_message("c", "m", problems, differences)
    assert "vae fingerprint" in refused and "or pass --accept-encoder-mismatch" in refused
    accepted = refusal_message("c", "m", problems, differences, accepted=True)
    assert accepted == "cannot train m on the cache c:\n  - prompt width: cache prompt_embeds 64 != UNet " \
                       "cross_attention_dim 80"


def test_refuses_another_tokenizer_unless_accepted(tiny_model, cache, tmp_path):
    """Same weights, but tokenizer_2 pads with <|endoftext|> instead of "!": every prompt embedding
    the cache holds would differ from this model's, so train refuses it, naming tokenizer_2 only."""
    from transformers import CLIPTokenizer

    other = tmp_path / "other-pad"
    shutil.copytree(tiny_model, other)
    tok_2 = CLIPTokenizer.from_pretrained(other / "tokenizer_2")
    assert tok_2.pad_token == "!"
    tok_2.pad_token = "<|endoftext|>"
    tok_2.save_pretrained(other / "tokenizer_2")

    with pytest.raises(CacheMismatchError) as err:
        train(_cfg(_copy_model(other, tmp_path / "unreadable-unet"), cache, tmp_path / "refused", max_steps=1))
    message = str(err.value)
    assert "- tokenizer_2 fingerprint: cache " in message
    for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer"):
        assert f"- {name} fingerprint:" not in message  # only what differs is listed
    assert "likely cause" not in message  # a tokenizer is no weight variant
    assert "--accept-encoder-mismatch" in message
    assert not (tmp_path / "refused" / "checkpoints").exists()
    result = train(_cfg(other, cache, tmp_path / "accepted", max_steps=1, accept_encoder_mismatch=True))
    assert result.global_step == 1 and (tmp_path / "accepted/diffusion_pytorch_model.safetensors").is_file()


def test_refuses_a_batch_larger_than_the_cache(tiny_model, cache, tmp_path):
    with pytest.raises(CacheMismatchError, match=r"not one full batch per rank in epoch 0: 16 sample\(s\) make 0 "
                                                 r"batch\(es\) of 32 for 1 rank"):
        train(_cfg(tiny_model, cache, tmp_path / "out", max_steps=1, batch_size=32))


def test_refuses_to_overwrite_a_run_without_resume(tiny_model, cache, run_a):
    out, _ = run_a
    with pytest.raises(StartupError) as err:
        train(_cfg(tiny_model, cache, out, max_steps=8))
    assert not isinstance(err.value, CacheMismatchError)  # nothing is wrong with the cache
    assert str(err.value) == (f"cannot start training:\n  - {out} already holds checkpoints of a run: continue it "
                              "with --resume latest, start it over with --resume none, or choose another "
                              "--output-dir")


def test_resume_none_starts_over_with_the_earlier_checkpoints_set_aside(tiny_model, cache, run_a, tmp_path):
    """Left in place, run A's step-3 and step-4 would outlive a new 2-step run's pruning and be
    what --resume latest picks: they move aside, kept, and the new run's checkpoints are alone."""
    from train.checkpoint import resolve_resume, step_folders

    out = Path(shutil.copytree(run_a[0], tmp_path / "out"))
    assert [p.name for p in step_folders(out)] == ["step-000003", "step-000004"]
    result = train(_cfg(tiny_model, cache, out, max_steps=2, checkpointing_steps=1, checkpoints_total_limit=2,
                        resume="none"))
    assert result.global_step == 2
    assert [p.name for p in step_folders(out)] == ["step-000001", "step-000002"]
    aside = sorted(out.glob("checkpoints-replaced-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step-000003", "step-000004"]
    assert resolve_resume("latest", out, warn=print).name == "step-000002"


def test_refuses_a_validation_resolution_the_adapter_cannot_render(tiny_model, fill_data, cache, tmp_path):
    """The tiny UNet's coarsest adapter feature is at latent/4 = 1/32 of the image: 48 px would
    fail inside the pipeline at the first validation, hours in; refused at start instead."""
    model = _copy_model(tiny_model, tmp_path / "unreadable-unet")
    with pytest.raises(StartupError, match=r"--validation-resolution 48 is not a multiple of 32 px, the coarsest "
                                           r"adapter feature of this UNet \(e.g. 32\)"):
        train(_cfg(model, cache, tmp_path / "out", max_steps=1, validation_resolution=48,
                   validation_image=(str(fill_data / "source/0.png"),), validation_prompt=PROMPTS[:1]))


def test_cli_names_a_damaged_shard_read_in_a_loader_worker_without_a_traceback(tiny_model, cache, tmp_path):
    """A sha256 mismatch found inside a DataLoader worker: torch re-raises it in the training
    process wrapped in the worker's traceback; the CLI prints the original message only."""
    from click.testing import CliRunner

    from train.__main__ import main

    damaged = tmp_path / "cache"
    shutil.copytree(cache, damaged)
    shard = sorted((damaged / "shards").glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["--model", str(tiny_model), "--cache", str(damaged), "--output-dir",
                                       str(tmp_path / "out"), "--max-steps", "8", "--batch-size", "2",
                                       "--num-workers", "1"])
    assert result.exit_code == 1, result.output
    error = result.output[result.output.index("error: "):]
    assert shard.name in error and "sha256" in error
    assert "Traceback" not in error and "Caught" not in error and "DataLoader worker" not in error


def test_fingerprint_is_the_one_precompute_records(tiny_model, cache):
    """train hashes MODEL's encoders with shards.fingerprint; precompute wrote what it computed."""
    from transformers import CLIPTextModelWithProjection

    from precompute.encoders import module_fingerprint as precompute_fingerprint
    from shards.fingerprint import module_fingerprint

    te2 = CLIPTextModelWithProjection.from_pretrained(tiny_model, subfolder="text_encoder_2", dtype=torch.float32)
    identity = json.loads((cache / "identity.json").read_text())
    assert module_fingerprint(te2) == precompute_fingerprint(te2) == identity["encoder"]["text_encoder_2_fingerprint"]


# ---------------------------------------------------------------------------------------------
# Two processes


@pytest.mark.slow
def test_uneven_shards_drop_less_than_one_global_batch_per_epoch(tiny_model, fill_data, tmp_path):
    """A real run on shards of 8 + 2 samples, batch 3, 2 loader workers: each epoch takes 3
    batches (9 samples, both shards) and drops 1, the last partial batch; never the small shard's
    share of streams. Said per epoch in the log, per run in train_config.json and the card."""
    cache = tmp_path / "cache"
    made = run_cli("precompute", ["--model", tiny_model, "--data", fill_data, "--cache", cache, "--resolution", "64",
                                  "--samples-per-shard", "8", "--max-samples", "10", "--num-workers", "0",
                                  "--device", "cpu"])
    assert made.returncode == 0, made.stderr[-3000:]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert [shard["samples"] for shard in manifest["shards"]] == [8, 2]
    out = tmp_path / "out"
    proc = run_cli("train", ["--model", tiny_model, "--cache", cache, "--output-dir", out, "--max-steps", "6",
                             "--batch-size", "3", "--num-workers", "2", "--log-samples", "--log-every", "1",
                             "--checkpointing-steps", "100"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    for epoch in (0, 1):
        assert (f"epoch {epoch}: 3 batches of 3 per rank x 1 rank(s) from 10 samples in 2 shards (2 stream(s) per "
                "rank): 9 used, 1 dropped this epoch (10.0%: 1 in partial batches, 0 cut so every rank takes the "
                "same steps)") in proc.stderr
    assert [m["step"] for m in _jsonl(out / "logs/metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    samples = _jsonl(out / "logs/samples-rank00000.jsonl")
    for epoch in (0, 1):
        keys = [k for s in samples if s["epoch"] == epoch for k in s["keys"]]
        assert len(keys) == len(set(keys)) == 9  # 10 - 9 = 1 dropped, less than one global batch of 3
        assert {k.split("-")[0] for k in keys} == {"000000", "000001"}  # both shards are read
    resolved = json.loads((out / "train_config.json").read_text())["resolved"]
    assert resolved["batches_per_epoch_per_rank"] == [3, 3]
    assert resolved["data"] == {"epochs_planned": 2, "samples_per_epoch": 10, "samples_dropped": 2,
                                "samples_dropped_in_partial_batches": 2, "samples_dropped_for_equal_steps": 0,
                                "samples_dropped_fraction": 0.1, "samples_repeated": 0}
    assert ("- samples dropped by the epoch plans: 2 over 2 planned epoch(s) of 10 samples (10.0%: 2 in partial "
            "batches, 0 for equal steps per rank)") in (out / "README.md").read_text()


@pytest.fixture(scope="module")
def one_shard_cache(tiny_model, fill_data, tmp_path_factory) -> Path:
    """14 samples in a single shard: fewer shards than the 2 ranks x 2 loader workers reading it."""
    out = tmp_path_factory.mktemp("one-shard") / "cache"
    made = run_cli("precompute", ["--model", tiny_model, "--data", fill_data, "--cache", out, "--resolution", "64",
                                  "--samples-per-shard", "14", "--max-samples", "14", "--num-workers", "0",
                                  "--device", "cpu"])
    assert made.returncode == 0, made.stderr[-3000:]
    return out


def _launch(model, cache, out, *extra, env=None, check=True) -> subprocess.CompletedProcess:
    """`accelerate launch` of 2 gloo processes on the CPU: 4 steps of batch 2, 2 loader workers each."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           DEBUG_REPLICA_DIR: str(out.parent / "replicas"), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()),
         "-m", "train", "--model", str(model), "--cache", str(cache), "--output-dir", str(out),
         "--max-steps", "4", "--batch-size", "2", "--num-workers", "2", "--checkpointing-steps", "2",
         "--log-samples", "--log-every", "1", "--learning-rate", "1e-3", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def ddp_run(tiny_model, one_shard_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "out"
    _launch(tiny_model, one_shard_cache, out)
    return out


@pytest.mark.slow
def test_two_processes_agree(ddp_run):
    """Same step count on both ranks (3 per epoch: the smaller rank's), disjoint samples within
    each epoch, identical adapters at the end."""
    out = ddp_run
    ranks = [_jsonl(out / f"logs/samples-rank0000{r}.jsonl") for r in (0, 1)]
    for rank in ranks:
        assert [(s["step"], s["epoch"], s["batch"]) for s in rank] == [(1, 0, 0), (2, 0, 1), (3, 0, 2), (4, 1, 0)]
    for epoch in (0, 1):
        keys = [[k for s in rank if s["epoch"] == epoch for k in s["keys"]] for rank in ranks]
        assert len(set(keys[0])) == len(keys[0]) and len(set(keys[1])) == len(keys[1])
        assert not set(keys[0]) & set(keys[1])
    used = {k for rank in ranks for s in rank for k in s["keys"]}
    assert {k.split("-")[0] for k in used} == {"000000"}  # one shard, split between 4 loader streams
    resolved = json.loads((out / "train_config.json").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["batches_per_epoch_per_rank"] == [3, 3]
    # The 14 samples make 7 batches of 2: 3 per rank, the 7th cut so both ranks take the same
    # steps, in each of the 2 planned epochs; said in the card, not silently.
    assert resolved["data"]["samples_dropped"] == 4 and resolved["data"]["samples_dropped_for_equal_steps"] == 4
    assert "- samples dropped by the epoch plans: 4 over 2 planned epoch(s) of 14 samples (14.3%: 0 in partial " \
           "batches, 4 for equal steps per rank)" in (out / "README.md").read_text()
    # Identical adapters: each rank saved its own replica, compared here tensor by tensor, and the
    # one in OUT is that adapter.
    from safetensors.torch import load_file

    replicas = [load_file(out.parent / f"replicas/adapter-rank{r:05d}.safetensors") for r in (0, 1)]
    final = load_file(out / "diffusion_pytorch_model.safetensors")
    assert replicas[0].keys() == replicas[1].keys() == final.keys()
    assert all(torch.equal(replicas[0][k], replicas[1][k]) and torch.equal(replicas[0][k], final[k]) for k in final)
    initial = {k: v for k, v in load_file(out / "checkpoints/step-000002/adapter/diffusion_pytorch_model.safetensors"
                                          ).items()}
    assert any(not torch.equal(initial[k], final[k]) for k in final)  # steps 3 and 4 did change it
    ckpt = out / "checkpoints/step-000004"
    assert (ckpt / "rng-rank00000.json").is_file() and (ckpt / "rng-rank00001.json").is_file()


@pytest.mark.slow
def test_two_processes_resume_bitwise_after_a_kill(tiny_model, one_shard_cache, ddp_run, tmp_path):
    out = tmp_path / "out"
    killed = _launch(tiny_model, one_shard_cache, out, env={DEBUG_EXIT_AFTER_CHECKPOINT: "2"}, check=False)
    assert killed.returncode != 0 and (out / "checkpoints/step-000002/COMPLETE").is_file()
    assert not (out / "diffusion_pytorch_model.safetensors").exists()
    _launch(tiny_model, one_shard_cache, out, "--resume", "latest")
    assert _sha(out / "diffusion_pytorch_model.safetensors") == _sha(ddp_run / "diffusion_pytorch_model.safetensors")
    for r in (0, 1):
        name = f"logs/samples-rank0000{r}.jsonl"
        assert _jsonl(out / name) == _jsonl(ddp_run / name)
    assert [m["loss"] for m in _jsonl(out / "logs/metrics.jsonl")] == [m["loss"] for m in _jsonl(ddp_run / "logs/metrics.jsonl")]


def test_resume_with_another_world_size_or_worker_count_is_refused(tiny_model, one_shard_cache, ddp_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(ddp_run, out)
    with pytest.raises(CheckpointError) as err:
        train(_cfg(tiny_model, one_shard_cache, out, max_steps=8, num_workers=0, resume="latest"))
    message = str(err.value)
    assert "number of processes: checkpoint 2, now 1" in message
    assert "--num-workers: checkpoint 2, now 0" in message
    assert "--lr-scheduler: checkpoint 'constant', now 'constant_with_warmup'" in message
    newest = out / "checkpoints" / sorted(p.name for p in (out / "checkpoints").iterdir())[-1]
    assert message.endswith("To go on from these weights with the new settings instead, start a new run (another "
                            f"--output-dir) with --adapter {newest / 'adapter'}")
    assert (newest / "adapter" / "config.json").is_file()  # what the message points at loads as --adapter


# ---------------------------------------------------------------------------------------------
# Learning, through the real loop


@pytest.fixture(scope="module")
def louder_tiny_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny SDXL with its UNet's output conv scaled x4 (encoders and everything else as is).

    The loss is epsilon-MSE; a random frozen UNet cannot predict the noise, so its floor is ~1,
    and the untouched tiny UNet already starts next to it: no room to see learning. Scaled, it
    starts at ~2.3 and only the adapter's residuals can steer it back toward the floor (the same
    device as test_step's loss test, here through train() on the real cache)."""
    from diffusers import UNet2DConditionModel

    model = tmp_path_factory.mktemp("louder") / "tiny-sdxl"
    shutil.copytree(tiny_model, model)
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.weight.mul_(4)
        unet.conv_out.bias.mul_(4)
    shutil.rmtree(model / "unet")
    unet.save_pretrained(model / "unet", safe_serialization=True)
    return model


def test_loss_falls_clearly_on_8_fixed_samples(louder_tiny_model, cache, tmp_path):
    """40 steps on the cache's first 8 samples vs. the very same run with a learning rate of 1e-12
    (same seed: same sample order, timesteps and noise at every step, so the per-step noise of
    the loss cancels out of the comparison)."""
    def losses(name: str, learning_rate: float) -> np.ndarray:
        out = tmp_path / name
        train(_cfg(louder_tiny_model, cache, out, max_samples=8, batch_size=4, max_steps=40, log_every=10,
                   learning_rate=learning_rate, lr_scheduler="constant", adam_weight_decay=0.0, log_samples=False))
        return np.array([m["loss"] for m in _jsonl(out / "logs/metrics.jsonl")])

    trained, frozen = losses("trained", 2e-3), losses("untrained", 1e-12)
    assert len(trained) == len(frozen) == 40 and np.isfinite(trained).all()
    assert trained[0] == pytest.approx(frozen[0], rel=1e-5)  # step 1 uses the initial weights in both
    first, last = trained[:5].mean(), trained[-10:].mean()
    assert first > 2.0  # starts well above the ~1 floor of a UNet that cannot predict the noise
    assert last < 0.7 * first, trained
    assert last < 0.7 * frozen[-10:].mean(), (trained, frozen)


@pytest.mark.slow
def test_accelerate_launch_mixed_precision_is_honoured(tiny_model, cache, tmp_path):
    """`accelerate launch --mixed_precision bf16 -m train` without --mixed-precision trains in
    bf16: the start-up log says so and where it came from, and the UNet runs in bf16."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # no accelerate config here
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--mixed_precision",
         "bf16", "--dynamo_backend", "no", "-m", "train", "--model", str(tiny_model), "--cache", str(cache),
         "--output-dir", str(out), "--max-steps", "1", "--batch-size", "2", "--num-workers", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixed precision: bf16, from accelerate launch --mixed_precision" in proc.stderr
    assert "frozen (UNet, bfloat16)" in proc.stderr
    resolved = json.loads((out / "train_config.json").read_text())
    assert resolved["mixed_precision"] == "bf16" and resolved["resolved"]["weight_dtype"] == "bf16"


def test_push_to_hub_creates_a_private_repo_at_start_and_never_writes_the_token(tiny_model, cache, tmp_path,
                                                                                  monkeypatch):
    """No hub here: huggingface_hub's two calls are replaced by recorders. A refused token fails
    before any weight is loaded; an accepted one gets a private repository at start, the upload
    at the end, and appears in nothing the run writes."""
    import huggingface_hub

    calls = []

    def refuse(name, **kw):
        calls.append(("create", name, kw))
        raise RuntimeError("401 Client Error: Invalid credentials")

    monkeypatch.setattr(huggingface_hub, "create_repo", refuse)
    out = tmp_path / "refused"
    with pytest.raises(StartupError, match=r"--push-to-hub: cannot create the hub repository 'me/tiny' "
                                           r"\(RuntimeError: 401 Client Error: Invalid credentials\)"):
        train(_cfg(tiny_model, cache, out, max_steps=1, push_to_hub=True, hub_model_id="me/tiny",
                   hub_token="hf_SECRET123"))
    assert not (out / "diffusion_pytorch_model.safetensors").exists() and not (out / "checkpoints").exists()
    assert calls == [("create", "me/tiny", {"exist_ok": True, "private": True, "token": "hf_SECRET123"})]

    calls.clear()
    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda name, **kw: calls.append(("create", name, kw)) or types.SimpleNamespace(repo_id=name))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw["repo_id"], kw)))
    out = tmp_path / "pushed"
    train(_cfg(tiny_model, cache, out, max_steps=1, push_to_hub=True, hub_model_id="me/tiny", hub_token="hf_SECRET123",
               hub_public=True))
    assert [c[:2] for c in calls] == [("create", "me/tiny"), ("upload", "me/tiny")]
    assert calls[0][2]["private"] is False and calls[1][2]["token"] == "hf_SECRET123"
    assert calls[1][2]["ignore_patterns"] == ["checkpoints/**", "logs/**", ".lock", ".tmp-*"]
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hf_SECRET123" not in path.read_bytes(), path


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))  # same size: only the sha256 can tell


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_model, fill_data, cache, run_a, tmp_path,
                                                                    caplog):
    out = tmp_path / "copy"
    shutil.copytree(run_a[0], out)
    (out / "diffusion_pytorch_model.safetensors").unlink()  # not finished: resume must train
    _flip_a_byte(out / "checkpoints/step-000004/optimizer.safetensors")
    with caplog.at_level("WARNING"):
        result = train(_run_a_cfg(tiny_model, fill_data, cache, out, resume="latest"))
    warned = [r.getMessage() for r in caplog.records if "step-000004 is incomplete or damaged" in r.getMessage()]
    assert len(warned) == 1 and "optimizer.safetensors does not match its sha256" in warned[0]
    assert "resuming from step-000003 instead" in warned[0]
    # Step 4 trained again from step 3's state: the very adapter the uninterrupted run made.
    assert result.global_step == 4
    assert _sha(out / "diffusion_pytorch_model.safetensors") == _sha(run_a[0] / "diffusion_pytorch_model.safetensors")


def test_no_good_checkpoint_is_refused_unless_starting_over_knowingly(tiny_model, fill_data, cache, run_a, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run_a[0], out)
    for step in ("step-000003", "step-000004"):
        _flip_a_byte(out / "checkpoints" / step / "adapter/diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError) as err:
        train(_run_a_cfg(tiny_model, fill_data, cache, out, resume="latest"))
    message = str(err.value)
    assert "no checkpoint in" in message and "proves good" in message and "--resume none" in message
    assert message.count("does not match its sha256") == 2
    (out / "checkpoints/step-000003/COMPLETE").unlink()  # an interrupted save: still not a fresh start
    with pytest.raises(CheckpointError, match="no COMPLETE"):
        train(_run_a_cfg(tiny_model, fill_data, cache, out, resume="latest"))
    with pytest.raises(StartupError, match="already holds checkpoints"):
        train(_run_a_cfg(tiny_model, fill_data, cache, out))  # no --resume: refused, never overwritten
    result = train(_run_a_cfg(tiny_model, fill_data, cache, out, resume="none"))
    assert result.global_step == 4 and (out / "checkpoints/step-000004/COMPLETE").is_file()


def test_a_tampered_checkpoint_with_a_matching_listing_is_a_message(tiny_model, fill_data, cache, run_a, tmp_path):
    """Rewritten together with COMPLETE (so the hashes match), the optimizer state parses but does
    not fit: a CheckpointError naming the file, not a KeyError from torch."""
    from train.checkpoint import COMPLETE_FILE, _fsync_tree

    out = tmp_path / "copy"
    shutil.copytree(run_a[0], out)
    (out / "diffusion_pytorch_model.safetensors").unlink()
    step = out / "checkpoints/step-000004"
    (step / "optimizer.json").write_text(json.dumps({"state": {}, "param_groups": [{"params": [99]}]}))
    (step / COMPLETE_FILE).unlink()
    (step / COMPLETE_FILE).write_text(json.dumps({"files": _fsync_tree(step)}))
    with pytest.raises(CheckpointError, match=r"step-000004: optimizer.json/.safetensors does not restore \("):
        train(_run_a_cfg(tiny_model, fill_data, cache, out, resume="latest"))
