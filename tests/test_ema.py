"""train.ema on a small real T2IAdapter: the update rule, the warm-up, and that keeping an EMA
draws nothing from the run's random stream."""

from __future__ import annotations

import pytest
import torch
from diffusers import T2IAdapter

from train.ema import EMA, EMASpec


def _adapter() -> T2IAdapter:
    return T2IAdapter(in_channels=3, channels=[8, 16, 16], num_res_blocks=1, downscale_factor=8,
                      adapter_type="full_adapter")


def test_the_decay_ramps_up_over_the_warm_up():
    spec = EMASpec(0.9, warmup_steps=4)
    assert [spec.decay_at(n) for n in (1, 2, 3, 4, 10)] == pytest.approx([0.225, 0.45, 0.675, 0.9, 0.9])
    assert EMASpec(0.99).decay_at(1) == 0.99
    with pytest.raises(ValueError, match=r"EMA decay must be in \(0, 1\), got 1.0"):
        EMASpec(1.0)
    with pytest.raises(ValueError, match="warm-up steps must be an integer >= 0"):
        EMASpec(0.9, warmup_steps=-1)


def test_each_update_moves_every_weight_toward_the_trained_one():
    torch.manual_seed(0)
    adapter = _adapter()
    start = {k: v.clone() for k, v in adapter.state_dict().items()}
    ema = EMA(adapter, EMASpec(0.75, warmup_steps=2))
    assert all(torch.equal(ema.state_dict()[k], start[k]) for k in start)  # starts as the adapter
    expected = {k: v.clone() for k, v in start.items()}
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(torch.randn_like(p))  # an "optimizer step"
        ema.update(step)
        d = 0.75 * min(1.0, step / 2)
        for name, w in adapter.named_parameters():
            expected[name] = d * expected[name] + (1 - d) * w.detach()
    for name, _ in adapter.named_parameters():
        assert torch.allclose(ema.state_dict()[name], expected[name], atol=1e-6, rtol=0), name
        assert not torch.equal(ema.state_dict()[name], adapter.state_dict()[name])
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_keeping_an_ema_draws_nothing_from_the_global_generator():
    torch.manual_seed(0)
    adapter = _adapter()
    before = torch.get_rng_state()
    ema = EMA(adapter, EMASpec(0.9))  # builds a module of its own (its init draws from a fork)
    ema.update(1)
    assert torch.equal(torch.get_rng_state(), before)
