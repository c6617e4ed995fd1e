"""An exponential moving average (EMA) of the adapter's weights.

After optimizer step n (n = 1, 2, ...) every EMA weight moves toward the trained one:

    ema = d_n * ema + (1 - d_n) * weight,   d_n = decay * min(1, n / warmup_steps)

(`d_n = decay` without warm-up). The warm-up lets the average follow the fast early changes of a
new adapter instead of remembering its random start for ~1 / (1 - decay) steps. The EMA starts as
a copy of the initial adapter. Every rank holds the same EMA: it updates from the same weights (DDP
keeps the replicas equal) with the same arithmetic, in fp32 on the training device.

The EMA is a `T2IAdapter` of its own (same config), so validation renders and evaluates it like the
trained adapter, checkpoints save it as a loadable `ema/` adapter folder (`train.checkpoint`), and
`--save-ema` writes it as the run's output. Its step count is the run's optimizer step, which the
checkpoint holds already: resume restores it bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EMASpec:
    decay: float
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.decay, (int, float)) or isinstance(self.decay, bool) or not 0.0 < self.decay < 1.0:
            problems.append(f"EMA decay must be in (0, 1), got {self.decay!r}")
        w = self.warmup_steps
        if not isinstance(w, int) or isinstance(w, bool) or w < 0:
            problems.append(f"EMA warm-up steps must be an integer >= 0, got {w!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def decay_at(self, step: int) -> float:
        """d_n of the update after optimizer step `step` (>= 1)."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.decay * step / self.warmup_steps
        return self.decay


class EMA:
    """The EMA of `adapter`'s weights: `module` is a separate adapter holding them."""

    def __init__(self, adapter: torch.nn.Module, spec: EMASpec):
        self.spec = spec
        # A fresh module from the config (not a deepcopy: accelerate may have wrapped the trained
        # adapter's forward). Its random init is overwritten at once; drawn from a forked RNG so
        # that having an EMA leaves the run's random stream untouched.
        with torch.random.fork_rng(devices=[]):
            module = type(adapter).from_config(adapter.config)
        module.load_state_dict(adapter.state_dict())
        first = next(adapter.parameters())
        # nn.Module.to: ModelMixin.to warns on every dtype cast
        self.module = torch.nn.Module.to(module, device=first.device, dtype=torch.float32).requires_grad_(False).eval()
        self._pairs = self._match(adapter)

    def _match(self, adapter: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        mine = dict(self.module.named_parameters())
        theirs = dict(adapter.named_parameters())
        if mine.keys() != theirs.keys():
            raise ValueError("the EMA adapter and the trained adapter have different parameters")
        names = sorted(mine)
        return [mine[n] for n in names], [theirs[n] for n in names]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based): move every EMA weight toward the trained one."""
        d = self.spec.decay_at(step)
        ema, weights = self._pairs
        torch._foreach_lerp_(ema, [w.detach().to(torch.float32) for w in weights], 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(weights, strict=True)


__all__ = ["EMA", "EMASpec"]
