"""The training step's fast paths: attention kernels, memory format and torch.compile.

`prepare(cfg, unet, adapter, shapes=..., log=...)` applies a resolved config's choices to the
loaded frozen UNet and the prepared adapter and returns a `FastStep`, whose `unet` and `adapter`
are what the training step calls:

- Attention (`--attention`): every attention layer of the UNet gets one processor class,
  diffusers' `AttnProcessor2_0` (PyTorch's `scaled_dot_product_attention`, which picks flash or
  memory-efficient kernels on a GPU) or `AttnProcessor` (explicit matmul and softmax). The class
  in use is checked over every layer and logged, with the SDPA backends torch has enabled.
- `--channels-last`: the frozen UNet's weights in NHWC. Only the UNet: it is ~95% of the step's
  FLOPs (docs/background.md section 2), and the adapter, whose weights are saved, keeps the
  layout safetensors writes as it is.
- `--compile`: `torch.compile(..., dynamic=False)` wrappers of the UNet and of the (prepared,
  possibly DDP-wrapped) adapter. Static shapes give one graph per batch shape (aspect buckets:
  one per bucket), so dynamo's recompile limit is raised to the number of shapes. The wrappers
  share the modules' parameters; validation, checkpoints and the saved adapter use the modules
  themselves, eagerly, so rendering at other sizes never compiles anything. `CompileWatch` counts
  the graphs dynamo made (`torch._dynamo.utils.counters`): the first batch of each shape is that
  shape's warm-up (logged); a new graph for a shape already seen is a recompile (a warning; run
  with TORCH_LOGS=recompiles to see which guard failed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from shards.runtime import raise_recompile_limit

ATTENTION_CLASSES = {"sdpa": "AttnProcessor2_0", "eager": "AttnProcessor"}


def set_attention(unet: torch.nn.Module, kind: str) -> str:
    """Give every attention layer of `unet` the processor of `kind` ("sdpa" | "eager"), check that
    each one has it, and return a line for the log. Raises RuntimeError when a layer does not."""
    from diffusers.models import attention_processor

    name = ATTENTION_CLASSES[kind]
    unet.set_attn_processor(getattr(attention_processor, name)())
    used: dict[str, int] = {}
    for processor in unet.attn_processors.values():
        used[type(processor).__name__] = used.get(type(processor).__name__, 0) + 1
    if set(used) != {name}:
        raise RuntimeError(f"--attention {kind}: expected {name} in every attention layer of the UNet, found {used}")
    line = f"{name} in all {used[name]} attention layers"
    if kind == "sdpa" and torch.cuda.is_available():
        backends = [b for b, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                    ("memory-efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                    ("cudnn", torch.backends.cuda.cudnn_sdp_enabled()),
                                    ("math", torch.backends.cuda.math_sdp_enabled())) if on]
        line += f" (SDPA backends enabled: {', '.join(backends)}; torch picks per call)"
    return line


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


@dataclass
class CompileWatch:
    """Counts torch.compile's graphs and tells warm-up (a new batch shape) from recompiles."""

    log: Any
    seen: set = field(default_factory=set)
    graphs: int = field(default_factory=lambda: _graphs_compiled())
    recompiles: int = 0  # graphs made for a shape that had been compiled before

    def observe(self, step: int, shape: tuple) -> int:
        """After a micro-batch of `shape` at optimizer step `step`: the new graphs it cost."""
        now = _graphs_compiled()
        new, self.graphs = max(0, now - self.graphs), now  # (torch._dynamo.reset() clears the counters)
        first = shape not in self.seen
        self.seen.add(shape)
        if new and first:
            self.log.info("torch.compile: %d graph(s) for batch shape %s at step %d (this shape's warm-up; %d graph(s) "
                          "so far, %d graph break(s))", new, shape, step, now, _graph_breaks())
        elif new:
            self.recompiles += new
            self.log.warning("torch.compile recompiled %d graph(s) at step %d for batch shape %s, which was compiled "
                             "before (%d recompile(s) after warm-up, %d graph(s) in all): a guard failed; run with "
                             "TORCH_LOGS=recompiles to see which", new, step, shape, self.recompiles, now)
        return new


@dataclass
class FastStep:
    """What the training step calls: the UNet and adapter, or their compiled wrappers."""

    unet: Callable
    adapter: Callable
    watch: CompileWatch | None = None

    def observe(self, step: int, batch: Any) -> None:
        """Call after each micro-batch's backward: counts what torch.compile made for it."""
        if self.watch is not None:
            self.watch.observe(step, tuple(batch.latent_mean.shape) + tuple(batch.cond.shape[-2:]))


def prepare(cfg: Any, unet: torch.nn.Module, adapter: torch.nn.Module, *, shapes: int, log: Any) -> FastStep:
    """Apply the resolved config's attention, channels_last and compile choices. `unet` is the
    frozen UNet on its device, `adapter` the prepared one, `shapes` the number of batch shapes the
    cache has (its buckets, or 1)."""
    log.info("attention: %s", set_attention(unet, cfg.attention))
    if cfg.channels_last:
        torch.nn.Module.to(unet, memory_format=torch.channels_last)
        log.info("channels_last: the UNet's weights are NHWC")
    if not cfg.compile:
        return FastStep(unet=unet, adapter=adapter)
    limit = raise_recompile_limit(shapes + 2)
    log.info("torch.compile: UNet and adapter, static shapes (%d batch shape(s) in the cache, recompile limit %d); "
             "each shape compiles on its first batch", shapes, limit)
    return FastStep(unet=torch.compile(unet, dynamic=False), adapter=torch.compile(adapter, dynamic=False),
                    watch=CompileWatch(log))


__all__ = ["ATTENTION_CLASSES", "CompileWatch", "FastStep", "prepare", "set_attention"]
