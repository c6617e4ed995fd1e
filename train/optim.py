"""The optimizer and the LR schedule of a run, each built from its own frozen spec.

AdamW (fused with --fused-adamw, the default on CUDA; bitsandbytes' 8-bit AdamW with
--use-8bit-adam) over the adapter's parameters, and one of diffusers' LR schedules. `train.loop`
makes the specs from the resolved config (`OptimizerSpec.of`, `ScheduleSpec.of`), builds both,
prepares the optimizer with accelerate and steps the scheduler itself, once per optimizer step.

Two things a checkpoint and fp16 need besides:

- `keep_implementation`: torch's `Optimizer.load_state_dict` takes every param-group entry from the
  saved state, `fused` and `foreach` included, so a checkpoint written by a CPU run (not fused)
  would silently turn a GPU run's fused AdamW back into the loop implementation, and the other way
  round. The implementation is this run's choice; the saved state only brings the numbers.
- `ScaleWatch`: whether fp16's loss scaler skipped the optimizer step. accelerate tells that by
  noticing that `optimizer.step` was not called, but a fused AdamW is always called (it skips an
  overflowed step inside its kernel), so accelerate would report no skip, the LR schedule would
  advance over skipped steps and the inf gradient norm would look like a diverged run. The scaler
  lowers its scale exactly when it found inf/NaN gradients (and only then), so a drop in
  `scaler.get_scale()` is the skip. That read is one host sync per optimizer step, under fp16
  only (without fused AdamW the scaler syncs there anyway); bf16 and fp32 have no scaler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from train.config import TrainConfig


@dataclass(frozen=True)
class OptimizerSpec:
    learning_rate: float  # effective (after --scale-lr)
    betas: tuple[float, float]
    weight_decay: float
    eps: float
    use_8bit: bool = False
    fused: bool = False  # torch's fused AdamW (CUDA; CPU kernels exist too)

    @classmethod
    def of(cls, cfg: TrainConfig, learning_rate: float) -> "OptimizerSpec":
        """From a resolved config (`fused_adamw` is decided by `train.config.resolve`)."""
        return cls(learning_rate=learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                   weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, use_8bit=cfg.use_8bit_adam,
                   fused=bool(cfg.fused_adamw))


def step_rules_problems(text: str) -> list[str]:
    """Problems with piecewise_constant's rules "m1:s1,m2:s2,...,m_last" (the learning rate times
    m1 until step s1, then m2 until s2, ..., then m_last); empty when they are well formed: every
    multiplier a finite number > 0, the steps whole numbers >= 1, increasing."""
    import math

    parts = [p.strip() for p in str(text).split(",")]
    problems, steps = [], []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        pieces = part.split(":")
        if len(pieces) != (1 if last else 2):
            problems.append(f"{part!r} should be {'the final MULTIPLIER' if last else 'MULTIPLIER:STEP'}")
            continue
        try:
            multiplier = float(pieces[0])
        except ValueError:
            problems.append(f"multiplier {pieces[0]!r} is not a number")
        else:
            if not (math.isfinite(multiplier) and multiplier > 0):
                problems.append(f"multiplier {pieces[0]!r} must be a finite number > 0")
        if not last:
            try:
                step = int(pieces[1])
            except ValueError:
                problems.append(f"step {pieces[1]!r} is not a whole number")
                continue
            if step < 1 or (steps and step <= steps[-1]):
                problems.append(f"step {step} must be >= 1 and after the step before it")
            steps.append(step)
    return problems


@dataclass(frozen=True)
class ScheduleSpec:
    name: str  # one of train.config.LR_SCHEDULERS
    total_steps: int  # optimizer steps of the whole run
    warmup_steps: int
    num_cycles: int = 1
    power: float = 1.0
    step_rules: str | None = None  # piecewise_constant's rules

    @classmethod
    def of(cls, cfg: TrainConfig, total_steps: int) -> "ScheduleSpec":
        return cls(name=cfg.lr_scheduler, total_steps=total_steps, warmup_steps=cfg.lr_warmup_steps,
                   num_cycles=cfg.lr_num_cycles, power=cfg.lr_power, step_rules=cfg.lr_step_rules)


def make_optimizer(spec: OptimizerSpec, params: Any) -> torch.optim.Optimizer:
    """AdamW with the spec's hyper-parameters: fused with `fused`, bitsandbytes' 8-bit AdamW with
    `use_8bit`, else torch's default (foreach) implementation."""
    kwargs = dict(lr=spec.learning_rate, betas=spec.betas, weight_decay=spec.weight_decay, eps=spec.eps)
    if spec.use_8bit:
        if spec.fused:
            raise ValueError("fused and 8-bit AdamW are different optimizers: pick one")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=True if spec.fused else None, **kwargs)


# Param-group entries that choose how the update is computed, not what it computes.
_IMPLEMENTATION_KEYS = ("fused", "foreach")


def keep_implementation(saved: dict, optimizer: Any) -> dict:
    """`saved` (an optimizer state dict about to be loaded into `optimizer`) with each param group's
    implementation entries replaced by `optimizer`'s own, so loading it restores the moments and
    step counts but not how the checkpoint's run computed them. torch then places the step
    counters where this implementation wants them (on the device for fused AdamW)."""
    groups = optimizer.param_groups
    if len(saved.get("param_groups", [])) != len(groups):
        return saved  # load_state_dict names the mismatch
    for i, (g, now) in enumerate(zip(saved["param_groups"], groups)):
        for k, value in now.items():
            # A hyperparameter of another type (a string learning rate) loads without complaint
            # and fails inside the first step: refused here, by name.
            if k != "params" and k not in _IMPLEMENTATION_KEYS and k in g and not _same_kind(g[k], value):
                raise ValueError(f"param group {i}: {k} is {g[k]!r}, not a {type(value).__name__} like this "
                                 f"optimizer's {value!r}")
    out = dict(saved)
    out["param_groups"] = [
        {**g, **{k: now[k] for k in _IMPLEMENTATION_KEYS if k in now}} for g, now in zip(saved["param_groups"], groups)
    ]
    return out


def _same_kind(saved: Any, now: Any) -> bool:
    """Whether a saved hyperparameter may stand where `now` does: numbers for numbers (an int
    betas entry is fine), equal-length sequences of them, booleans for booleans, None for None."""
    if isinstance(now, bool) or now is None:
        return type(saved) is type(now)
    if isinstance(now, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool)
    if isinstance(now, (tuple, list)):
        return isinstance(saved, (tuple, list)) and len(saved) == len(now) and all(map(_same_kind, saved, now))
    if isinstance(now, torch.Tensor):
        return isinstance(saved, torch.Tensor)
    return isinstance(saved, type(now))


class ScaleWatch:
    """Whether the last optimizer step was skipped by fp16's loss scaler (see the module docstring).

    Build it after the scaler's state is final (after a resume) and call it once after every
    `optimizer.step()`. Without a scaler it always answers False and never touches the device.
    """

    def __init__(self, scaler: Any):
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.scale = self.scaler.get_scale() if self.scaler is not None else None

    def __call__(self) -> bool:
        if self.scaler is None:
            return False
        scale = self.scaler.get_scale()  # the one host sync per step, fp16 only
        skipped = scale < self.scale  # GradScaler.update backs off exactly when it found inf/NaN
        self.scale = scale
        return skipped


def make_lr_scheduler(spec: ScheduleSpec, optimizer: torch.optim.Optimizer) -> Any:
    """diffusers' schedule `spec.name`, stepped once per optimizer step for `spec.total_steps`."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(spec.name, optimizer, step_rules=spec.step_rules, num_warmup_steps=spec.warmup_steps,
                         num_training_steps=spec.total_steps, num_cycles=spec.num_cycles, power=spec.power)


__all__ = ["OptimizerSpec", "ScaleWatch", "ScheduleSpec", "keep_implementation", "make_lr_scheduler",
           "make_optimizer"]
