"""The errors precompute raises for a user to act on; `python -m precompute` prints them without a
traceback and exits 1 (`shards.runtime.run_command`).

One hierarchy, rooted at `PrecomputeError`:

- `ConfigError`: settings; `problems` lists every one at once.
- `SourceError`: the dataset cannot be read at all (missing, unrecognised, wrong columns).
- `ModelLoadError`: the model (or --vae) cannot be found or loaded.
- `EncoderError` and its `NonFiniteLatentError`: an encoder produced unusable output.
- `StrictSkipError`: --strict, and an item had to be skipped.

A cache or store that fails raises `shards.errors.ShardError` (the shards room's root).
"""

from __future__ import annotations


class PrecomputeError(RuntimeError):
    """An error the user can act on; the CLI prints its message without a traceback."""


class ConfigError(PrecomputeError):
    """Invalid settings. `problems` holds every problem found; the message lists them all."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid precompute settings:\n  - " + "\n  - ".join(self.problems))


class SourceError(PrecomputeError, ValueError):
    """The dataset cannot be read at all (missing, unrecognised, wrong columns). Lists every problem."""


class ModelLoadError(PrecomputeError):
    """The model (or --vae) cannot be found or loaded. The message says what is missing."""


class EncoderError(PrecomputeError):
    """An encoder produced unusable output (e.g. fp16 overflow to inf/NaN)."""


class NonFiniteLatentError(EncoderError):
    """Some images of a batch encoded to inf/NaN. `bad` holds their indices in the batch."""

    def __init__(self, message: str, bad: list[int]):
        super().__init__(message)
        self.bad = list(bad)


class StrictSkipError(PrecomputeError):
    """--strict and an item had to be skipped. The message names the file and the reason."""


__all__ = ["ConfigError", "EncoderError", "ModelLoadError", "NonFiniteLatentError", "PrecomputeError", "SourceError",
           "StrictSkipError"]
