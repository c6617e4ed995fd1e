"""The errors train raises for a user to act on; `python -m train` prints them without a traceback.

One hierarchy, rooted at `TrainError` (the run cannot start or continue; the message says why
and what to do):

- `train.config.ConfigError`: settings (every problem at once);
- `train.checks.StartupError` and its `CacheMismatchError`: the run cannot start;
- `train.checkpoint.CheckpointError`: a checkpoint that cannot be used;
- `NonFiniteError`: a loss or gradient went NaN/inf, named with the step and the batch's keys;
- `train.validation.ConditionImageError`: a validation conditioning image that cannot be used.

A cache that is missing or damaged raises `shards.errors.ShardError` (the shards room's root).
Every CLI maps these to one message and exit status 1 (`shards.runtime.run_command`).
"""

from __future__ import annotations


class TrainError(RuntimeError):
    """A run that cannot continue; the message says why and what to do."""


class NonFiniteError(TrainError):
    """A non-finite loss or gradient norm: training stops before anything non-finite is saved."""


__all__ = ["NonFiniteError", "TrainError"]
