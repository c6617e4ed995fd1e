"""train.step: the frozen UNet, the adapter's shape, and the reference objective.

The UNets here are built from small configs with SDXL's block structure (DownBlock2D, then two
CrossAttnDownBlock2D, a cross-attention mid block, text_time micro-conditioning), random weights.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler, T2IAdapter, UNet2DConditionModel
from torch.overrides import TorchFunctionMode

from train.step import (
    Batch,
    Objective,
    adapter_kwargs_for,
    build_adapter,
    check_adapter_fits,
    count_parameters,
    freeze_unet,
    sample_timesteps,
)

# SDXL base 1.0's real component configs, kept beside the tests.
SDXL = Path(__file__).resolve().parent / "assets" / "sdxl-base-1.0"
VAE_FACTOR = 8
LATENT = 8  # latent side; images are LATENT * VAE_FACTOR = 64 px
TEXT_DIM, POOLED_DIM, TIME_DIM = 64, 32, 8


def sdxl_like_config(**overrides) -> dict:
    cfg = dict(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        transformer_layers_per_block=1,
        attention_head_dim=(2, 4, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        cross_attention_dim=TEXT_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=TIME_DIM * 6 + POOLED_DIM,
    )
    cfg.update(overrides)
    return cfg


def sd15_like_config() -> dict:
    """SD 1.x's layout (three cross-attention down blocks, then a plain one), no text_time."""
    return dict(
        sample_size=LATENT,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        attention_head_dim=4,
        norm_num_groups=8,
        cross_attention_dim=TEXT_DIM,
    )


@pytest.fixture(scope="module")
def scheduler_config() -> dict:
    return json.loads((SDXL / "scheduler" / "scheduler_config.json").read_text())


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return freeze_unet(UNet2DConditionModel(**sdxl_like_config()), torch.float32)


def make_adapter(unet_config, seed: int = 1) -> T2IAdapter:
    torch.manual_seed(seed)
    return build_adapter(unet_config, VAE_FACTOR)


def random_batch(n: int, seed: int, *, with_std: bool = True) -> Batch:
    g = torch.Generator().manual_seed(seed)
    side = LATENT * VAE_FACTOR
    mean = torch.randn(n, 4, LATENT, LATENT, generator=g)
    return Batch(
        latent_mean=mean,
        latent_std=torch.rand(n, 4, LATENT, LATENT, generator=g) * 0.1 if with_std else None,
        prompt_embeds=torch.randn(n, 77, TEXT_DIM, generator=g),
        pooled_prompt_embeds=torch.randn(n, POOLED_DIM, generator=g),
        add_time_ids=torch.tensor([[side, side, 0, 0, side, side]] * n, dtype=torch.float32),
        cond=torch.rand(n, 3, side, side, generator=g),
        keys=[f"{seed:06d}-{i:06d}" for i in range(n)],
    )


def unet_call(unet, batch, sample, timesteps, **residuals):
    return unet(
        sample,
        timesteps,
        encoder_hidden_states=batch.prompt_embeds,
        added_cond_kwargs={"text_embeds": batch.pooled_prompt_embeds, "time_ids": batch.add_time_ids},
        return_dict=False,
        **residuals,
    )[0]


# --------------------------------------------------------------------------------------------
# frozen UNet, gradients, one optimizer step


def test_frozen_unet_passes_gradients_to_the_adapter_and_allocates_none(unet, scheduler_config):
    adapter = make_adapter(unet.config)
    assert count_parameters(unet) == (0, sum(p.numel() for p in unet.parameters()))
    assert count_parameters(adapter) == (sum(p.numel() for p in adapter.parameters()), 0)

    loss = Objective(scheduler_config, "cpu").loss(unet, adapter, random_batch(4, 0), torch.Generator().manual_seed(0))
    loss.backward()

    assert all(p.grad is None for p in unet.parameters())
    for name, p in adapter.named_parameters():
        assert p.grad is not None and p.grad.norm() > 0, f"adapter parameter {name} got no gradient"


def test_one_optimizer_step_changes_only_adapter_parameters(unet, scheduler_config):
    adapter = make_adapter(unet.config)
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in adapter.state_dict().items()}
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3)

    loss = Objective(scheduler_config, "cpu").loss(unet, adapter, random_batch(4, 1), torch.Generator().manual_seed(1))
    loss.backward()
    optimizer.step()

    for k, v in unet.state_dict().items():
        assert torch.equal(v, unet_before[k]), f"frozen UNet tensor {k} changed"
    changed = [k for k, v in adapter.state_dict().items() if not torch.equal(v, adapter_before[k])]
    assert sorted(changed) == sorted(adapter_before), "every adapter tensor should move in one AdamW step"


def test_gradient_checkpointing_gives_the_adapter_the_same_gradients(unet, scheduler_config):
    """The trainer's --gradient-checkpointing on a frozen UNet: same loss and adapter gradients."""
    objective = Objective(scheduler_config, "cpu")
    batch = random_batch(2, 8)

    def grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        adapter = make_adapter(unet.config)
        loss = objective.loss(unet, adapter, batch, torch.Generator().manual_seed(2))
        loss.backward()
        return loss.detach(), [p.grad for p in adapter.parameters()]

    plain_loss, plain = grads()
    unet.enable_gradient_checkpointing()
    try:
        ckpt_loss, ckpt = grads()
    finally:
        unet.disable_gradient_checkpointing()
    assert all(p.grad is None for p in unet.parameters())
    assert torch.allclose(plain_loss, ckpt_loss, rtol=1e-6)
    for a, b in zip(plain, ckpt):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_freeze_unet_casts_and_counts():
    torch.manual_seed(0)
    model = UNet2DConditionModel(**sdxl_like_config())
    total = sum(p.numel() for p in model.parameters())
    frozen = freeze_unet(model, torch.bfloat16)
    assert frozen is model and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert count_parameters(model) == (0, total)


# --------------------------------------------------------------------------------------------
# the objective equals the reference


def test_sigma_table_equals_add_noise_at_every_timestep(scheduler_config):
    """noisy = latents + noise * sigma[t] is EulerDiscreteScheduler.add_noise, bitwise, for all t."""
    objective = Objective(scheduler_config, "cpu")
    scheduler = EulerDiscreteScheduler.from_config(scheduler_config)
    T = scheduler.config.num_train_timesteps
    t = torch.arange(T)
    latents = torch.randn(T, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(T, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    expected = scheduler.add_noise(latents, noise, t)
    ours = latents + noise * objective.sigmas[t].view(-1, 1, 1, 1)
    assert torch.equal(ours, expected)
    # Sanity on the schedule itself: sigma grows with t, SDXL's range.
    assert torch.all(objective.sigmas[1:] > objective.sigmas[:-1])
    assert objective.sigmas[0] == pytest.approx(0.0292, abs=1e-4)
    assert objective.sigmas[-1] == pytest.approx(14.6146, abs=1e-4)


def reference_loss(unet, adapter, scheduler, batch, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """train_t2i_adapter_sdxl.py's step, written out the straightforward way (per-sample sigma
    lookup with .nonzero().item(), add_noise, the deprecated residual argument), with the latent,
    noise and timestep draws taken in train.step's documented order."""
    latents = batch.latent_mean + batch.latent_std * torch.randn(batch.latent_mean.shape, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    T = scheduler.config.num_train_timesteps
    timesteps = torch.rand((latents.shape[0],), generator=generator)
    timesteps = (1 - timesteps**3) * T
    timesteps = timesteps.long().to(scheduler.timesteps.dtype)
    timesteps = timesteps.clamp(0, T - 1)

    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    sigmas = scheduler.sigmas.to(dtype=noisy_latents.dtype)
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigma = sigmas[step_indices].flatten()
    while len(sigma.shape) < len(noisy_latents.shape):
        sigma = sigma.unsqueeze(-1)
    inp_noisy_latents = noisy_latents / ((sigma**2 + 1) ** 0.5)

    down_block_additional_residuals = adapter(batch.cond)
    with pytest.warns(FutureWarning, match="down_intrablock_additional_residuals"):  # the reference's argument
        model_pred = unet_call(
            unet, batch, inp_noisy_latents, timesteps,
            down_block_additional_residuals=list(down_block_additional_residuals),
        )  # fmt: skip
    denoised_latents = model_pred * (-sigma) + noisy_latents
    weighing = sigma**-2.0
    loss = torch.mean(
        (weighing.float() * (denoised_latents.float() - latents.float()) ** 2).reshape(latents.shape[0], -1), 1
    )
    return loss.mean(), timesteps


def test_loss_equals_the_reference_formula(unet, scheduler_config):
    adapter = make_adapter(unet.config)
    batch = random_batch(6, 2)
    objective = Objective(scheduler_config, "cpu")
    scheduler = EulerDiscreteScheduler.from_config(scheduler_config)

    generator = torch.Generator().manual_seed(7)
    state = generator.get_state()
    ours, timesteps = objective.per_sample_loss(unet, adapter, batch, generator)
    ref, ref_timesteps = reference_loss(unet, adapter, scheduler, batch, torch.Generator().set_state(state))

    assert torch.equal(timesteps.float(), ref_timesteps)
    assert len(set(timesteps.tolist())) > 1  # a real mix of noise levels, not one t
    assert ours.dtype == torch.float32
    assert ours.mean().item() == pytest.approx(ref.item(), rel=1e-6)
    again = objective.loss(unet, adapter, batch, torch.Generator().set_state(state))
    assert again.item() == pytest.approx(ref.item(), rel=1e-6)


def test_mean_only_cache_uses_the_mean_and_draws_no_posterior_noise(unet, scheduler_config):
    objective = Objective(scheduler_config, "cpu")
    batch = random_batch(3, 3, with_std=False)
    latents, noise, t = objective.draw(batch, torch.Generator().manual_seed(5))
    assert torch.equal(latents, batch.latent_mean)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(noise, torch.randn(noise.shape, generator=g))  # noise is the first draw


def test_loss_is_deterministic_given_the_generator(unet, scheduler_config):
    adapter = make_adapter(unet.config)
    objective = Objective(scheduler_config, "cpu")
    batch = random_batch(2, 4)
    a = objective.loss(unet, adapter, batch, torch.Generator().manual_seed(3))
    b = objective.loss(unet, adapter, batch, torch.Generator().manual_seed(3))
    c = objective.loss(unet, adapter, batch, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------------------------
# timesteps


def test_cubic_timesteps_distribution():
    T, n = 1000, 200_000
    t = sample_timesteps(n, T, torch.Generator().manual_seed(0), "cpu")
    assert t.dtype == torch.long and t.shape == (n,)
    assert int(t.min()) >= 0 and int(t.max()) <= T - 1
    # E[1 - u^3] = 3/4; flooring to an integer step lowers the mean by ~0.5/T.
    assert (t.float() / T).mean().item() == pytest.approx(0.75 - 0.5 / T, abs=3e-3)
    # P(t/T > 1/2) = P(u^3 < 1/2) = 2^(-1/3): three quarters of the steps are the noisy half.
    assert (t >= T // 2).float().mean().item() == pytest.approx(2 ** (-1 / 3), abs=5e-3)
    # Not uniform: the top decile holds P(u^3 < 0.1) = 0.464 of the mass.
    assert (t >= 900).float().mean().item() == pytest.approx(0.1 ** (1 / 3), abs=5e-3)
    again = sample_timesteps(n, T, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(t, again)


# --------------------------------------------------------------------------------------------
# the loss falls when only the adapter learns


def informative_samples(n: int, seed: int) -> Batch:
    """8 conditioning images (coloured squares) whose latents are a fixed function of them."""
    g = torch.Generator().manual_seed(seed)
    side = LATENT * VAE_FACTOR
    cond = torch.zeros(n, 3, side, side)
    for i in range(n):
        y, x = torch.randint(0, side - 24, (2,), generator=g).tolist()
        size = int(torch.randint(12, 24, (1,), generator=g))
        cond[i, :, y : y + size, x : x + size] = torch.rand(3, 1, 1, generator=g)
    mix = torch.randn(4, 3, generator=g)
    latents = 2 * torch.einsum("oc,bchw->bohw", mix, F.avg_pool2d(cond, VAE_FACTOR))
    batch = random_batch(n, seed)
    batch.latent_mean, batch.latent_std, batch.cond = latents, torch.full_like(latents, 0.05), cond
    return batch


def test_loss_falls_when_only_the_adapter_trains(scheduler_config):
    """The adapter alone lowers the loss through a frozen UNet.

    The loss is epsilon-MSE; a random frozen UNet cannot predict the noise, so its floor is ~1, and
    diffusers' default init already outputs so little that the loss starts at ~1.07: no room to
    see learning. Scaling the UNet's output conv x4 puts the start at ~2.4; the adapter must learn
    features that steer the frozen UNet back towards the floor (it reaches ~1.1). The run is also
    compared step by step with the same run without updates (same generator: same timesteps and
    noise), which removes the step-to-step noise from the comparison."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(**sdxl_like_config())
    with torch.no_grad():
        model.conv_out.weight.mul_(4)
        model.conv_out.bias.mul_(4)
    model = freeze_unet(model, torch.float32)
    objective = Objective(scheduler_config, "cpu")
    batch = informative_samples(8, seed=3)
    adapter = make_adapter(model.config, seed=2)
    untrained = copy.deepcopy(adapter)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=2e-3, weight_decay=0.0)

    steps = 25
    generator = torch.Generator().manual_seed(1234)
    trained_losses = []
    for _ in range(steps):
        loss = objective.loss(model, adapter, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        trained_losses.append(loss.item())

    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        baseline = [objective.loss(model, untrained, batch, generator).item() for _ in range(steps)]

    assert all(math.isfinite(x) for x in trained_losses)
    first, last = sum(trained_losses[:5]) / 5, sum(trained_losses[-5:]) / 5
    assert trained_losses[0] == pytest.approx(baseline[0], rel=1e-6)  # same draws, same weights at step 0
    assert last < 0.8 * first, trained_losses
    assert last < 0.75 * sum(baseline[-5:]) / 5, (trained_losses, baseline)


# --------------------------------------------------------------------------------------------
# no host sync in the step

# Tensor ops that make the host wait for the device (or read device memory from the host).
SYNCING = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
    torch.Tensor.nonzero, torch.nonzero, torch.argwhere, torch.Tensor.argwhere,
    torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
    torch.masked_select, torch.Tensor.masked_select, torch.unique, torch.Tensor.unique,
}  # fmt: skip


class SyncRecorder(TorchFunctionMode):
    """Records every syncing tensor op (and boolean-mask indexing) run while active."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self.ops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func in SYNCING:
            self.calls.append(func.__name__)
        elif func is torch.Tensor.__getitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self.calls.append("bool-mask __getitem__")
        return func(*args, **(kwargs or {}))


def test_step_has_no_host_sync(unet, scheduler_config):
    adapter = make_adapter(unet.config)
    objective = Objective(scheduler_config, "cpu")
    batch = random_batch(3, 5)

    with SyncRecorder() as recorder:
        objective.loss(unet, adapter, batch, torch.Generator().manual_seed(0)).backward()
    assert recorder.ops > 100  # it really watched the forward (UNet included)
    assert recorder.calls == []

    # The recorder does see the reference's lookup, so the empty list above means something.
    scheduler = objective.scheduler
    with SyncRecorder() as recorder:
        scheduler.add_noise(batch.latent_mean, batch.latent_mean, torch.tensor([3, 500, 999]))
    assert recorder.calls.count("nonzero") == 3 and recorder.calls.count("item") == 3


# --------------------------------------------------------------------------------------------
# adapter shape


def test_sdxl_gets_the_published_sdxl_adapter_and_the_unet_consumes_every_feature():
    unet_config = json.loads((SDXL / "unet" / "config.json").read_text())
    published = json.loads((SDXL / "adapter" / "config.json").read_text())
    published.pop("_class_name")
    assert adapter_kwargs_for(unet_config, 8) == published

    # Full size on the meta device: shapes only, nothing allocated.
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        adapter = build_adapter(unet.config, 8)
        assert sum(p.numel() for p in adapter.parameters()) == pytest.approx(79.0e6, abs=0.05e6)
        assert sum(p.numel() for p in unet.parameters()) == pytest.approx(2.567e9, abs=0.001e9)
        features = list(adapter(torch.empty(1, 3, 1024, 1024)))
        assert [tuple(f.shape[1:]) for f in features] == [(320, 64, 64), (640, 64, 64), (1280, 32, 32), (1280, 32, 32)]
        out = unet(
            torch.empty(1, 4, 128, 128),
            torch.zeros(1, dtype=torch.long),
            encoder_hidden_states=torch.empty(1, 77, 2048),
            added_cond_kwargs={"text_embeds": torch.empty(1, 1280), "time_ids": torch.empty(1, 6)},
            down_intrablock_additional_residuals=features,
            return_dict=False,
        )[0]
    assert out.shape == (1, 4, 128, 128)
    assert features == []  # the UNet popped all four, the mid block's included


def consumed_all(unet, adapter, *, sdxl: bool) -> bool:
    n = 2
    side = LATENT * VAE_FACTOR
    features = list(adapter(torch.rand(n, 3, side, side)))
    kwargs = {}
    if sdxl:
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(n, POOLED_DIM), "time_ids": torch.zeros(n, 6)}
    with torch.no_grad():
        unet(
            torch.randn(n, 4, LATENT, LATENT),
            torch.tensor([10, 900]),
            encoder_hidden_states=torch.randn(n, 77, TEXT_DIM),
            down_intrablock_additional_residuals=features,
            **kwargs,
        )
    return features == []


def test_derivation_follows_the_unet_not_sdxl_widths(unet):
    kwargs = adapter_kwargs_for(unet.config, VAE_FACTOR)
    assert kwargs == {
        "in_channels": 3,
        "channels": [32, 64, 64, 64],
        "num_res_blocks": 2,
        "downscale_factor": 16,
        "adapter_type": "full_adapter_xl",
    }
    assert consumed_all(unet, make_adapter(unet.config), sdxl=True)

    # SD 1.x's layout: a plain full_adapter at the VAE factor, or light_adapter when asked.
    torch.manual_seed(0)
    sd15 = UNet2DConditionModel(**sd15_like_config()).eval()
    kwargs = adapter_kwargs_for(sd15.config, VAE_FACTOR)
    assert kwargs["adapter_type"] == "full_adapter"
    assert (kwargs["channels"], kwargs["downscale_factor"]) == ([16, 32, 64, 64], 8)
    assert consumed_all(sd15, T2IAdapter(**kwargs), sdxl=False)
    light = adapter_kwargs_for(sd15.config, VAE_FACTOR, adapter_type="light_adapter")
    assert (light["channels"], light["downscale_factor"], light["num_res_blocks"]) == ([16, 32, 64], 8, 4)
    assert consumed_all(sd15, T2IAdapter(**light), sdxl=False)

    # Another VAE factor moves the unshuffle factor with it.
    assert adapter_kwargs_for(unet.config, 16)["downscale_factor"] == 32


def test_unets_no_adapter_can_serve_are_refused_clearly():
    with pytest.raises(ValueError) as e:
        adapter_kwargs_for(
            sdxl_like_config(down_block_types=("DownBlock2D", "SimpleCrossAttnDownBlock2D", "AttnDownBlock2D")), 8
        )
    assert "'SimpleCrossAttnDownBlock2D'" in str(e.value) and "'AttnDownBlock2D'" in str(e.value)
    # Two blocks: features at (32, 1/16), (64, 1/16) [+ mid (64, 1/16)] fit no diffusers adapter.
    two_blocks = sdxl_like_config(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), block_out_channels=(32, 64))
    with pytest.raises(ValueError, match=r"no full_adapter_xl / full_adapter T2I-Adapter fits .*\(32 ch, 1/16\)"):
        adapter_kwargs_for(two_blocks, 8)
    with pytest.raises(ValueError, match="full_adapter_xl"):
        adapter_kwargs_for(sd15_like_config(), 8, adapter_type="full_adapter_xl")
    with pytest.raises(ValueError, match="vae_scale_factor"):
        adapter_kwargs_for(sdxl_like_config(), 0)


def test_build_adapter_loads_a_saved_adapter_only_if_it_fits(unet, tmp_path):
    saved = make_adapter(unet.config, seed=5)
    saved.save_pretrained(tmp_path / "good")
    loaded = build_adapter(unet.config, VAE_FACTOR, path=tmp_path / "good")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for (k, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k

    sd15_shaped = T2IAdapter(channels=[32, 64, 64, 64], downscale_factor=8, adapter_type="full_adapter")
    sd15_shaped.save_pretrained(tmp_path / "sd15")
    with pytest.raises(ValueError, match=r"adapter .*sd15 does not fit the UNet:\n  - it emits \[\(32 ch, 1/8\)"):
        build_adapter(unet.config, VAE_FACTOR, path=tmp_path / "sd15")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_adapter(unet.config, VAE_FACTOR, path=tmp_path / "missing")


def test_objective_refuses_features_the_unet_would_silently_drop(unet, scheduler_config):
    # A fifth feature map: the UNet has nowhere to add it and would ignore it without a word.
    torch.manual_seed(0)
    adapter = T2IAdapter(channels=[32, 64, 64, 64, 64], downscale_factor=16, adapter_type="full_adapter_xl")
    with pytest.raises(ValueError, match=r"UNet ignored 1 adapter feature map"):
        Objective(scheduler_config, "cpu").loss(unet, adapter, random_batch(2, 6), torch.Generator().manual_seed(0))
    # ...and check_adapter_fits (what build_adapter(path=...) runs) refuses it before any weights.
    with pytest.raises(ValueError, match=r"emits \[.*\(64 ch, 1/32\), \(64 ch, 1/32\)\] but the UNet consumes"):
        check_adapter_fits(adapter.config, unet.config, VAE_FACTOR)
    check_adapter_fits(adapter_kwargs_for(unet.config, VAE_FACTOR), unet.config, VAE_FACTOR)


def test_objective_refuses_non_epsilon_schedulers(scheduler_config):
    with pytest.raises(ValueError, match="prediction_type is 'v_prediction'"):
        Objective({**scheduler_config, "prediction_type": "v_prediction"}, "cpu")


# --------------------------------------------------------------------------------------------
# Batch


def test_batch_to_casts_floating_tensors_only():
    batch = random_batch(2, 0)
    batch.keys = ["a", "b"]
    as_bf16 = batch.to("cpu", torch.bfloat16)
    assert as_bf16.latent_mean.dtype == torch.bfloat16 and as_bf16.cond.dtype == torch.bfloat16
    assert as_bf16.keys == ["a", "b"] and len(as_bf16) == 2
    assert batch.latent_mean.dtype == torch.float32  # a new Batch, the old one untouched
    no_std = Batch(**{**batch.__dict__, "latent_std": None}).to("cpu", torch.float16)
    assert no_std.latent_std is None and no_std.prompt_embeds.dtype == torch.float16
    ints = Batch(**{**batch.__dict__, "add_time_ids": torch.zeros(2, 6, dtype=torch.long)}).to("cpu", torch.float16)
    assert ints.add_time_ids.dtype == torch.long
