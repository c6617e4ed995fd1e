"""The optimizer and the LR schedule of a run, built from its TrainConfig.

AdamW (bitsandbytes' 8-bit AdamW with --use-8bit-adam) over the adapter's parameters, and one of
diffusers' LR schedules. `train.loop` builds both, prepares the optimizer with accelerate and
steps the scheduler itself, once per optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch

from train.config import TrainConfig


def make_optimizer(cfg: TrainConfig, params: Any, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW with the configured hyper-parameters (bitsandbytes' 8-bit AdamW with --use-8bit-adam)."""
    if cfg.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(params, lr=learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                         weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


def make_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """diffusers' schedule `cfg.lr_scheduler`, stepped once per optimizer step for `total_steps`."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, step_rules=cfg.lr_step_rules,
                         num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total_steps,
                         num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)


__all__ = ["make_lr_scheduler", "make_optimizer"]
