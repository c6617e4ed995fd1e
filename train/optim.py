"""The optimizer and the LR schedule of a run, each built from its own frozen spec.

AdamW (bitsandbytes' 8-bit AdamW with --use-8bit-adam) over the adapter's parameters, and one of
diffusers' LR schedules. `train.loop` makes the specs from the resolved config (`OptimizerSpec.of`,
`ScheduleSpec.of`), builds both, prepares the optimizer with accelerate and steps the scheduler
itself, once per optimizer step.
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

    @classmethod
    def of(cls, cfg: TrainConfig, learning_rate: float) -> "OptimizerSpec":
        return cls(learning_rate=learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                   weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, use_8bit=cfg.use_8bit_adam)


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
    """AdamW with the spec's hyper-parameters (bitsandbytes' 8-bit AdamW with `use_8bit`)."""
    if spec.use_8bit:
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(params, lr=spec.learning_rate, betas=spec.betas, weight_decay=spec.weight_decay,
                         eps=spec.eps)


def make_lr_scheduler(spec: ScheduleSpec, optimizer: torch.optim.Optimizer) -> Any:
    """diffusers' schedule `spec.name`, stepped once per optimizer step for `spec.total_steps`."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(spec.name, optimizer, step_rules=spec.step_rules, num_warmup_steps=spec.warmup_steps,
                         num_training_steps=spec.total_steps, num_cycles=spec.num_cycles, power=spec.power)


__all__ = ["OptimizerSpec", "ScheduleSpec", "make_lr_scheduler", "make_optimizer"]
