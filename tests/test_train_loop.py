"""train.loop end to end on the tiny SDXL and a real cache made by `python -m precompute`.

Exact resume (0 and 2 loader workers, gradient accumulation, an epoch boundary, validation on one
side only), two processes with accelerate launch (gloo on the CPU), every refusal before weights,
and what OUT holds: an adapter that StableDiffusionXLAdapterPipeline loads and renders with, the
validation grids, the model card, the loss curve.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.checkpoint import CheckpointError
from train.checks import CacheMismatchError
from train.config import TrainConfig
from train.loop import train

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ("red circle with blue background", "green circle with yellow background")


@pytest.fixture(scope="module")
def cache(tiny_model, fill_data, tmp_path_factory) -> Path:
    """16 samples at 64 px in 4 shards of 4, encoded by the real precompute CLI."""
    out = tmp_path_factory.mktemp("train-cache") / "cache"
    subprocess.run(
        [sys.executable, "-m", "precompute", "--model", str(tiny_model), "--data", str(fill_data), "--cache", str(out),
         "--resolution", "64", "--samples-per-shard", "4", "--num-workers", "0", "--device", "cpu"],
        cwd=REPO, check=True, capture_output=True,
    )
    return out


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


# ---------------------------------------------------------------------------------------------
# One reference run, shared: accumulation 3 over 8 batches per epoch gives optimizer steps of
# 3, 3, 2 batches, so 4 steps cross into epoch 1. It also renders validation images.


@pytest.fixture(scope="module")
def run_a(tiny_model, fill_data, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run-a") / "out"
    result = train(_cfg(tiny_model, cache, out, max_steps=4, gradient_accumulation_steps=3, checkpointing_steps=1,
                        checkpoints_total_limit=2, validation_image=(str(fill_data / "source/0.png"),),
                        validation_prompt=PROMPTS, num_validation_images=2, validation_steps=2,
                        validation_inference_steps=2))
    return out, result


def test_resume_is_bitwise_identical(tiny_model, cache, run_a, tmp_path):
    """4 steps straight vs 2 steps, stop, resume to 4: same weights, samples, losses. Run A also
    rendered validation images (which must not touch the training random stream); B does not."""
    a, result = run_a
    assert result.global_step == 4 and result.samples_seen == (3 + 3 + 2 + 3) * 2
    kw = dict(gradient_accumulation_steps=3, checkpointing_steps=1, checkpoints_total_limit=2)
    b = tmp_path / "b"
    train(_cfg(tiny_model, cache, b, max_steps=2, **kw))
    train(_cfg(tiny_model, cache, b, max_steps=4, resume="latest", **kw))
    _assert_same_run(a, b, steps=4)
    samples = _jsonl(a / "logs/samples-rank00000.jsonl")
    assert [s["epoch"] for s in samples] == [0] * 8 + [1] * 3  # micro-batches: the epoch boundary was crossed
    epoch0 = [k for s in samples[:8] for k in s["keys"]]
    assert len(set(epoch0)) == 16  # every sample once per epoch
    lrs = [m["lr"] for m in _jsonl(a / "logs/metrics.jsonl")]
    assert lrs == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3])  # warm-up continued across the resume


def test_resume_is_bitwise_identical_with_two_loader_workers(tiny_model, cache, tmp_path):
    """Resuming at an odd batch with 2 workers: the worker rotation must give the same order."""
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
    assert f'"manifest_id": "{manifest_id}"' in card  # the resolved config is in the card
    with Image.open(out / "loss_curve.png") as curve:
        assert curve.format == "PNG" and curve.size[0] >= 400
    metrics = _jsonl(out / "logs/metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) and m["loss"] > 0 and m["samples_per_s"] > 0 for m in metrics)
    adapter_cfg = json.loads((out / "config.json").read_text())
    assert adapter_cfg["_class_name"] == "T2IAdapter" and adapter_cfg["adapter_type"] == "full_adapter_xl"


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


def test_cli_bf16_with_gradient_checkpointing_and_validation(tiny_model, fill_data, cache, tmp_path):
    """The CLI end to end in mixed precision (bf16 autocast on the CPU): UNet weights in bf16,
    adapter kept in fp32, validation rendered under autocast."""
    out = tmp_path / "bf16"
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--model", str(tiny_model), "--cache", str(cache), "--output-dir", str(out),
         "--max-steps", "2", "--batch-size", "2", "--num-workers", "0", "--mixed-precision", "bf16",
         "--gradient-checkpointing", "--lr-scheduler", "cosine", "--lr-warmup-steps", "1",
         "--validation-image", str(fill_data / "source/1.png"), "--validation-prompt", PROMPTS[0],
         "--num-validation-images", "1", "--validation-inference-steps", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "frozen (UNet, bfloat16)" in proc.stderr and "trainable (adapter, fp32)" in proc.stderr
    from safetensors.torch import load_file

    weights = load_file(out / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    metrics = _jsonl(out / "logs/metrics.jsonl")
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
    with Image.open(out / "validation/step-000002-0.png") as grid:
        assert grid.size == (128, 64)


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


def test_refuses_more_loader_streams_than_shards(tiny_model, cache, tmp_path):
    with pytest.raises(CacheMismatchError, match=r"4 non-empty shard\(s\).*5 streams"):
        train(_cfg(tiny_model, cache, tmp_path / "out", max_steps=1, num_workers=5))


def test_refuses_to_overwrite_a_run_without_resume(tiny_model, cache, run_a):
    out, _ = run_a
    with pytest.raises(CacheMismatchError, match="already holds checkpoints"):
        train(_cfg(tiny_model, cache, out, max_steps=8))


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tiny_model, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(_free_port()),
         "-m", "train", "--model", str(tiny_model), "--cache", str(cache), "--output-dir", str(out),
         # 14 samples: shards of 4, 4, 4 and 2, so the ranks hold 8 and 6 samples (uneven)
         "--max-samples", "14", "--max-steps", "4", "--batch-size", "2", "--num-workers", "1",
         "--checkpointing-steps", "2",
         "--log-samples", "--log-every", "1", "--learning-rate", "1e-3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


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
    assert all(int(k.split("-")[0]) * 4 + int(k.split("-")[1]) < 14 for k in used)  # --max-samples held
    resolved = json.loads((out / "train_config.json").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["batches_per_epoch_per_rank"] == [3, 3]
    digests = resolved["adapter_fingerprint_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # identical adapters on both ranks
    ckpt = out / "checkpoints/step-000004"
    assert (ckpt / "rng-rank00000.json").is_file() and (ckpt / "rng-rank00001.json").is_file()


def test_resume_with_another_world_size_or_worker_count_is_refused(tiny_model, cache, ddp_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(ddp_run, out)
    with pytest.raises(CheckpointError) as err:
        train(_cfg(tiny_model, cache, out, max_steps=8, num_workers=0, resume="latest"))
    message = str(err.value)
    assert "number of processes: checkpoint 2, now 1" in message
    assert "--num-workers: checkpoint 1, now 0" in message
    assert "--lr-scheduler: checkpoint 'constant', now 'constant_with_warmup'" in message


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing on a frozen UNet


def test_gradient_checkpointing_gives_the_same_adapter_gradients(tiny_model):
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    from train.step import Batch, Objective, build_adapter, freeze_unet

    unet = freeze_unet(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet"), torch.float32)
    config = unet.config
    adapter = build_adapter(config, 8)
    objective = Objective(EulerDiscreteScheduler.load_config(tiny_model, subfolder="scheduler"), "cpu")
    g = torch.Generator().manual_seed(0)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    batch = Batch(latent_mean=torch.randn(2, 4, 8, 8, generator=g), latent_std=None,
                  prompt_embeds=torch.randn(2, 77, config.cross_attention_dim, generator=g),
                  pooled_prompt_embeds=torch.randn(2, pooled, generator=g),
                  add_time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2), cond=torch.rand(2, 3, 64, 64, generator=g),
                  keys=["a", "b"])

    def grads():
        adapter.zero_grad(set_to_none=True)
        objective.loss(unet, adapter, batch, torch.Generator().manual_seed(1)).backward()
        return [p.grad.clone() for p in adapter.parameters()]

    plain = grads()
    unet.enable_gradient_checkpointing()
    unet.train()  # checkpointing is active in train mode too; the UNet's weights stay frozen
    checkpointed = grads()
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(plain, checkpointed))
    assert sum(float(g.abs().sum()) for g in checkpointed) > 0
    assert all(p.grad is None for p in unet.parameters())
