"""The training step's fast paths (train.fast, train.data.DeviceBatches, train.optim), on CPU.

What a CPU can prove: the compiled step computes the eager step's loss and adapter gradients (to
a stated tolerance: inductor fuses and reorders float ops); a compiled run resumes consistently;
prefetching batches changes no bit of a run; every optimizer choice builds and steps, a
checkpoint does not change whether this run's AdamW is fused; fp16's skipped steps are seen with
a fused AdamW too; the optimizer step does not wait for the device; the attention processor is
what the flag says. GPU speed is not measured here (bench/gpu.sh, bench/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import types
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from train.config import TrainConfig, resolve
from train.loop import train
from train.step import Batch, Objective, build_adapter, freeze_unet

# Compiled vs eager on the tiny model (measured: loss 1e-7 relative, gradients 3e-6 relative L2).
LOSS_RTOL = 1e-5
GRAD_REL_L2 = 1e-4


def _unet(tiny_model: Path) -> UNet2DConditionModel:
    return freeze_unet(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet"), torch.float32)


def _batch(unet: UNet2DConditionModel, n: int = 2, side: int = 64, seed: int = 0) -> Batch:
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    h = side // 8
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return Batch(latent_mean=torch.randn(n, 4, h, h, generator=g), latent_std=0.1 * torch.rand(n, 4, h, h, generator=g),
                 prompt_embeds=torch.randn(n, 77, cfg.cross_attention_dim, generator=g),
                 pooled_prompt_embeds=torch.randn(n, pooled, generator=g),
                 add_time_ids=torch.tensor([[side, side, 0, 0, side, side]] * n, dtype=torch.float32),
                 cond=torch.rand(n, 3, side, side, generator=g), keys=[str(i) for i in range(n)])


def _loss_and_grads(objective, unet, adapter, step_unet, step_adapter, batch):
    adapter.zero_grad(set_to_none=True)
    loss = objective.loss(step_unet, step_adapter, batch, torch.Generator().manual_seed(3))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in adapter.parameters()]


def _rel_l2(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(((x - y) ** 2).sum() for x, y in zip(a, b)).sqrt()
    return float(num / sum((x**2).sum() for x in a).sqrt())


def _fast_cfg(**kw) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{"attention": "sdpa", "channels_last": False, "compile": False, **kw})


def _setup(tiny_model: Path):
    from precompute.tiny import SDXL_SCHEDULER_CONFIG

    unet = _unet(tiny_model)
    torch.manual_seed(1)
    adapter = build_adapter(unet.config, 8)
    return unet, adapter, Objective(SDXL_SCHEDULER_CONFIG, "cpu"), _batch(unet)


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.slow
def test_compiled_step_equals_the_eager_step(tiny_model, caplog):
    """Loss and every adapter gradient of one step, through train.fast's compiled wrappers, against
    the same modules run eagerly. Inductor (gcc on CPU) compiles each wrapper once; a second batch
    of the same shape reuses the graphs (no recompile warning)."""
    from train import fast

    torch._dynamo.reset()  # graphs another test compiled for the same code and shapes would be reused
    unet, adapter, objective, batch = _setup(tiny_model)
    eager_loss, eager_grads = _loss_and_grads(objective, unet, adapter, unet, adapter, batch)
    log = logging.getLogger("test_fast")
    with caplog.at_level(logging.INFO, logger="test_fast"):
        step = fast.prepare(_fast_cfg(compile=True), unet, adapter, shapes=1, log=log)
        loss, grads = _loss_and_grads(objective, unet, adapter, step.unet, step.adapter, batch)
        step.observe(1, batch)
        assert step.watch.graphs >= 2  # the UNet's and the adapter's
        again, _ = _loss_and_grads(objective, unet, adapter, step.unet, step.adapter, _batch(unet, seed=1))
        assert step.watch.observe(2, tuple(batch.latent_mean.shape) + tuple(batch.cond.shape[-2:])) == 0
    assert torch.isclose(loss, eager_loss, rtol=LOSS_RTOL, atol=0), (loss, eager_loss)
    assert _rel_l2(eager_grads, grads) < GRAD_REL_L2
    assert step.watch.recompiles == 0 and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("this shape's warm-up" in r.getMessage() for r in caplog.records)
    # the wrappers share the modules' weights: the saved adapter is the trained one
    assert step.adapter._orig_mod is adapter and step.unet._orig_mod is unet


def test_compile_watch_tells_warm_up_from_recompiles(monkeypatch, caplog):
    from train import fast

    made = iter([0, 2, 2, 3, 5])  # unique graphs dynamo reports at each look
    monkeypatch.setattr(fast, "_graphs_compiled", lambda: next(made))
    watch = fast.CompileWatch(logging.getLogger("test_fast"))
    with caplog.at_level(logging.INFO, logger="test_fast"):
        assert watch.observe(1, (2, 4, 8, 8)) == 2  # first batch of this shape: warm-up
        assert watch.observe(2, (2, 4, 8, 8)) == 0
        assert watch.observe(3, (2, 4, 8, 8)) == 1  # same shape, a new graph: a recompile
        assert watch.observe(4, (2, 4, 8, 12)) == 2  # another bucket: its warm-up
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert watch.recompiles == 1 and len(warnings) == 1 and "at step 3" in warnings[0]


# ---------------------------------------------------------------------------------------------
# attention and memory format


def test_attention_processor_is_set_checked_and_logged(tiny_model):
    from train.fast import set_attention

    unet, adapter, objective, batch = _setup(tiny_model)
    assert set_attention(unet, "eager").startswith("AttnProcessor in all ")
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor"}
    eager, _ = _loss_and_grads(objective, unet, adapter, unet, adapter, batch)
    line = set_attention(unet, "sdpa")
    assert line.startswith("AttnProcessor2_0 in all ") and f"all {len(unet.attn_processors)} " in line
    sdpa, _ = _loss_and_grads(objective, unet, adapter, unet, adapter, batch)
    assert torch.isclose(sdpa, eager, rtol=1e-5)  # the same math through other kernels


def test_channels_last_unet_computes_the_same_loss(tiny_model):
    from train import fast

    unet, adapter, objective, batch = _setup(tiny_model)
    plain, plain_grads = _loss_and_grads(objective, unet, adapter, unet, adapter, batch)
    step = fast.prepare(_fast_cfg(channels_last=True), unet, adapter, shapes=1, log=logging.getLogger("test_fast"))
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    loss, grads = _loss_and_grads(objective, unet, adapter, step.unet, step.adapter, batch)
    assert torch.isclose(loss, plain, rtol=1e-5) and _rel_l2(plain_grads, grads) < 1e-4


# ---------------------------------------------------------------------------------------------
# prefetching


def test_device_batches_issue_the_next_copy_before_the_current_batch_is_used():
    from train.data import DeviceBatches, HostBatch

    taken: list[int] = []

    def host_batches():
        for i in range(3):
            taken.append(i)
            yield HostBatch(latent_mean=torch.full((1, 4, 2, 2), float(i)), latent_std=None,
                            prompt_embeds=torch.zeros(1, 77, 8), pooled_prompt_embeds=torch.zeros(1, 4),
                            add_time_ids=torch.zeros(1, 6), cond_u8=torch.full((1, 3, 16, 16), i, dtype=torch.uint8),
                            cond_levels=None, keys=[f"k{i}"])

    ahead = DeviceBatches(host_batches(), "cpu", prefetch=True)
    first = next(ahead)
    assert first.keys == ["k0"] and taken == [0, 1]  # batch 1 was read and copied before batch 0 is used
    assert [b.keys for b in ahead] == [["k1"], ["k2"]]
    taken.clear()
    plain = DeviceBatches(host_batches(), "cpu", prefetch=False)
    assert next(plain).keys == ["k0"] and taken == [0]
    assert float(first.cond.max()) == 0.0 and torch.equal(first.latent_mean, torch.zeros(1, 4, 2, 2))


def _run_cfg(model, cache, out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(model=str(model), cache=str(cache), output_dir=str(out), batch_size=2,
                                 num_workers=0, learning_rate=1e-3, log_every=2, checkpointing_steps=100,
                                 max_steps=4), **kw})


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "logs/metrics.jsonl").read_text().splitlines()]


def test_prefetching_changes_no_bit_of_a_cpu_run(tiny_model, fill_cache, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(_run_cfg(tiny_model, fill_cache, a, prefetch=False))
    train(_run_cfg(tiny_model, fill_cache, b, prefetch=True))
    assert _losses(a) == _losses(b) and len(_losses(a)) == 4
    assert _sha(a / "diffusion_pytorch_model.safetensors") == _sha(b / "diffusion_pytorch_model.safetensors")
    saved = json.loads((b / "train_config.json").read_text())
    assert saved["prefetch"] is True and saved["fused_adamw"] is False  # resolved, as run (CPU)


@pytest.mark.slow
def test_a_compiled_run_resumes_consistently_and_matches_eager(tiny_model, fill_cache, tmp_path, caplog):
    """Compiled: 4 steps straight vs 2 steps then a resume to 4 (constant schedule): the same
    losses to float tolerance, the same as an eager run's to the compile tolerance, and no
    recompile after the one shape's warm-up."""
    straight, split, eager = tmp_path / "straight", tmp_path / "split", tmp_path / "eager"
    with caplog.at_level(logging.INFO):
        train(_run_cfg(tiny_model, fill_cache, straight, compile=True))
        train(_run_cfg(tiny_model, fill_cache, split, compile=True, max_steps=2))
        train(_run_cfg(tiny_model, fill_cache, split, compile=True, resume="latest"))
    train(_run_cfg(tiny_model, fill_cache, eager))
    assert _losses(straight) == pytest.approx(_losses(split), rel=1e-5)
    assert _losses(straight) == pytest.approx(_losses(eager), rel=1e-4)
    messages = [r.getMessage() for r in caplog.records]
    assert any("torch.compile: UNet and adapter, static shapes" in m for m in messages)
    assert not any("torch.compile recompiled" in m for m in messages)


# ---------------------------------------------------------------------------------------------
# the optimizer


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_choices_build_and_step_alike(fused):
    from train.optim import OptimizerSpec, make_optimizer

    spec = OptimizerSpec(learning_rate=1e-2, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, fused=fused)
    results = []
    for implementation in (spec, dataclasses.replace(spec, fused=not fused)):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(5, 3))
        optimizer = make_optimizer(implementation, [param])
        assert bool(optimizer.param_groups[0]["fused"]) == implementation.fused
        for _ in range(3):
            (param**2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append(param.detach())
    torch.testing.assert_close(results[0], results[1])  # fused or not, the same AdamW
    with pytest.raises(ValueError, match="pick one"):
        make_optimizer(dataclasses.replace(spec, fused=True, use_8bit=True), [torch.nn.Parameter(torch.zeros(1))])


def test_resolve_turns_fused_adamw_and_prefetch_on_with_cuda_only(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "c").mkdir()
    cfg = TrainConfig(model=str(tmp_path / "m"), cache=str(tmp_path / "c"), output_dir=str(tmp_path / "o"))
    gpu = resolve(cfg, cuda_available=True, environ={}).config
    cpu = resolve(cfg, cuda_available=False, environ={}).config
    assert (gpu.fused_adamw, gpu.prefetch, cpu.fused_adamw, cpu.prefetch) == (True, True, False, False)
    assert (gpu.compile, gpu.channels_last, gpu.attention) == (False, False, "sdpa")  # unmeasured: off
    off = resolve(dataclasses.replace(cfg, fused_adamw=False, prefetch=False), cuda_available=True, environ={}).config
    assert (off.fused_adamw, off.prefetch) == (False, False)
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="--fused-adamw and --use-8bit-adam"):
        resolve(dataclasses.replace(cfg, fused_adamw=True, use_8bit_adam=True), cuda_available=True, environ={})


def test_speed_flags_parse_on_and_off():
    from train.__main__ import main

    base = ["--model", "m", "--cache", "c", "--output-dir", "o"]
    p = main.make_context("train", base).params
    assert (p["fused_adamw"], p["prefetch"], p["compile"], p["channels_last"], p["attention"]) == (
        None, None, False, False, "sdpa")
    p = main.make_context("train", base + ["--no-fused-adamw", "--prefetch", "--compile", "--channels_last",
                                           "--attention", "eager"]).params
    assert (p["fused_adamw"], p["prefetch"], p["compile"], p["channels_last"], p["attention"]) == (
        False, True, True, True, "eager")


def test_a_checkpoint_does_not_choose_whether_adamw_is_fused():
    """torch's load_state_dict copies every param-group entry from the saved state, `fused`
    included; keep_implementation keeps this run's choice and restores only the numbers."""
    from train.optim import OptimizerSpec, keep_implementation, make_optimizer

    spec = OptimizerSpec(learning_rate=1e-2, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    for saved_fused in (False, True):
        param = torch.nn.Parameter(torch.ones(3))
        saver = make_optimizer(dataclasses.replace(spec, fused=saved_fused), [param])
        param.sum().backward()
        saver.step()
        state = saver.state_dict()
        loader = make_optimizer(dataclasses.replace(spec, fused=not saved_fused), [torch.nn.Parameter(torch.ones(3))])
        loader.load_state_dict(keep_implementation(state, loader))
        assert bool(loader.param_groups[0]["fused"]) is (not saved_fused)
        moments = loader.state[loader.param_groups[0]["params"][0]]
        torch.testing.assert_close(moments["exp_avg"], state["state"][0]["exp_avg"])
        assert float(moments["step"]) == 1.0


@pytest.mark.parametrize("fused", [False, True])
def test_scale_watch_sees_fp16_skipped_steps_with_fused_adamw_too(fused):
    """A fused AdamW is always called by GradScaler.step (it skips inside its kernel), so
    accelerate's "was optimizer.step called" cannot see the skip; the scale's drop can."""
    from train.optim import OptimizerSpec, ScaleWatch, make_optimizer

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = make_optimizer(OptimizerSpec(learning_rate=0.1, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8,
                                             fused=fused), [param])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    watch = ScaleWatch(scaler)
    seen = []
    for overflow in (False, True, False, True):
        before = param.detach().clone()
        scaler.scale((param * (float("inf") if overflow else 1.0)).sum()).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        seen.append(watch())
        assert torch.equal(param.detach(), before) is overflow
    assert seen == [False, True, False, True]
    assert ScaleWatch(None)() is False


def test_the_optimizer_step_waits_for_no_device_value():
    """Clip, fused AdamW step and schedule (no loss scaler: bf16 or fp32) call nothing that
    reads a device value on the host; the gradient norm stays on the device."""
    from accelerate import Accelerator
    from test_step import SyncRecorder

    from train.loop import optimizer_step
    from train.optim import OptimizerSpec, ScaleWatch, ScheduleSpec, make_lr_scheduler, make_optimizer

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    optimizer = make_optimizer(OptimizerSpec(learning_rate=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                                             fused=True), model.parameters())
    scheduler = make_lr_scheduler(ScheduleSpec(name="cosine", total_steps=10, warmup_steps=2), optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    s = types.SimpleNamespace(accelerator=accelerator, adapter=model, optimizer=optimizer, lr_scheduler=scheduler,
                              cfg=types.SimpleNamespace(max_grad_norm=1.0), scale_watch=ScaleWatch(accelerator.scaler))
    for _ in range(2):
        model(torch.randn(2, 4)).pow(2).sum().backward()
        with SyncRecorder() as recorder:
            grad_norm, lr, skipped = optimizer_step(s)
        assert recorder.ops > 10 and recorder.calls == [], recorder.calls
        assert isinstance(grad_norm, torch.Tensor) and isinstance(lr, float) and skipped is False


def test_each_stage_names_the_other_stages_speed_flags():
    from click.testing import CliRunner

    from precompute.__main__ import main as precompute_main
    from train.__main__ import main as train_main

    result = CliRunner().invoke(precompute_main, ["--model", "m", "--cache", "c", "--compile", "--no-prefetch",
                                                  "--attention", "eager"])
    assert result.exit_code == 2
    for flag in ("--compile", "--no-prefetch", "--attention"):
        assert f"{flag} belongs to train" in result.output
    result = CliRunner().invoke(train_main, ["--model", "m", "--cache", "c", "--output-dir", "o", "--compile-vae"])
    assert result.exit_code == 2 and "--compile-vae is fixed at precompute" in result.output
