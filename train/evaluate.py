"""Validation loss: one deterministic number per evaluation, comparable across runs on one cache.

The training loss is drawn afresh every step (timesteps, noise, latent draw, caption), so its
curve is noisy and two runs' curves differ by their draws as much as by their adapters. Here
every one of those draws is fixed, so the number moves only when the adapter does:

- Samples: view 0 of every held-out image (`--validation-split`, `train.plan.held_out_images`:
  never trained on) or of every image of `--validation-cache` (another cache with this cache's
  identity). The first caption; never dropped.
- Timesteps: K quantiles of the training distribution, t_k = floor((1 - u_k^3) T) with
  u_k = (k + 0.5) / K (`quantile_timesteps`; K = 8 gives 999, 993, 969, 916, 822, 675, 463, 176 for
  T = 1000), every sample at every t_k.
- Latent draw: mean + std * eps, eps seeded by the sample key alone; noise seeded by (key, t_k)
  (`fixed_normal`: a CPU generator, so every device gets the same numbers). No seed of the run
  enters, so runs with other seeds, batch sizes, world sizes or settings evaluate the same inputs.
- Soft conditioning maps are binarised at the middle of the run's threshold range.

The loss is `train.step.Objective`'s, the very training objective, summed over the N x K
(sample, timestep) pairs and divided by N x K. Each sample is one forward pass of K copies (one
per timestep), so nothing depends on how samples are batched in training, and a bucketed cache
works as is (a pass has one shape). Ranks split the samples (by shard, so each rank reads only its
shards), fill their rows of an (N, K + 1) float64 table of losses and counts, and one all-reduce
sums it; every rank then adds the table up with `math.fsum` (exactly rounded, so in no particular
order). The result is bitwise the same for any world size.

The samples are read once, at the first evaluation, by the rank that evaluates them, and kept in
memory as their cache bytes (about a training sample's size each). Rendering and evaluation never
draw from a generator of the training run, so evaluating (or not) leaves training unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shards.manifest import Manifest, ShardRecord, identity_diff
from shards.reader import iter_shard_members
from shards.store import Store
from train.augment import prepare_cond, threshold_level
from train.plan import held_out_images, image_positions

logger = logging.getLogger(__name__)

DEFAULT_TIMESTEPS = 8
# The identity sections whose facts decide what a sample's numbers mean: a validation cache must
# agree with the training cache on every one (its dataset, shard size and so on may differ).
COMPARED_SECTIONS = ("latent", "text", "dtypes", "condition")


def quantile_timesteps(k: int, num_train_timesteps: int) -> torch.Tensor:
    """(k,) long: the quantiles (u = (i + 0.5) / k) of the training timestep distribution
    t = floor((1 - u^3) T) (`train.step.sample_timesteps`), largest first."""
    if k < 1:
        raise ValueError(f"need at least one timestep, got {k}")
    u = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    return ((1 - u**3) * num_train_timesteps).floor().long().clamp(0, num_train_timesteps - 1)


def _seed(*parts: str) -> int:
    digest = hashlib.blake2b("/".join(("validation-loss",) + parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are signed 64-bit


def fixed_normal(shape: Sequence[int], *parts: str) -> torch.Tensor:
    """Standard normal float32 of `shape` on the CPU, a pure function of `parts` (e.g. a sample key
    and a timestep): the same on every machine, process and run."""
    generator = torch.Generator().manual_seed(_seed(*parts))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


@dataclass
class EvalSample:
    """What the validation loss needs of one sample (CPU tensors, as stored)."""

    key: str
    latent_mean: torch.Tensor  # (C, h, w), scaled by the VAE factor
    latent_std: torch.Tensor | None
    prompt_embeds: torch.Tensor  # (77, D): the first caption
    pooled_prompt_embeds: torch.Tensor  # (P,)
    add_time_ids: torch.Tensor  # (6,) float32
    cond_u8: torch.Tensor  # (3, H, W) uint8


def fixed_inputs(sample: EvalSample, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (K, C, h, w), noise (K, C, h, w)) fp32 on the CPU for the K `timesteps`: the latent
    draw depends on the sample key only, the noise on (key, timestep)."""
    mean = sample.latent_mean.float()
    latents = mean
    if sample.latent_std is not None:
        latents = mean + sample.latent_std.float() * fixed_normal(mean.shape, sample.key, "latent")
    noise = torch.stack([fixed_normal(mean.shape, sample.key, "noise", str(int(t))) for t in timesteps])
    return latents.unsqueeze(0).expand(len(timesteps), *mean.shape).contiguous(), noise


@torch.no_grad()
def sample_losses(objective: Any, unet: torch.nn.Module, adapter: torch.nn.Module, sample: EvalSample,
                  timesteps: torch.Tensor, *, device: torch.device | str, weight_dtype: torch.dtype | None = None,
                  soft_level: int | None = None) -> torch.Tensor:
    """(K,) float64 on the CPU: the objective's loss of `sample` at each of `timesteps`, one forward
    pass of K copies. `soft_level`: the uint8 binarisation level of a soft-map cache, else None."""
    from train.step import Batch

    k = len(timesteps)
    latents, noise = fixed_inputs(sample, timesteps)
    cond_u8 = sample.cond_u8.unsqueeze(0).expand(k, *sample.cond_u8.shape).to(device)
    levels = None if soft_level is None else torch.full((k,), soft_level, dtype=torch.uint8, device=device)
    batch = Batch(
        latent_mean=latents.to(device), latent_std=None,
        prompt_embeds=sample.prompt_embeds.unsqueeze(0).expand(k, *sample.prompt_embeds.shape).to(device),
        pooled_prompt_embeds=sample.pooled_prompt_embeds.unsqueeze(0).expand(k, -1).to(device),
        add_time_ids=sample.add_time_ids.unsqueeze(0).expand(k, -1).to(device),
        cond=prepare_cond(cond_u8, levels), keys=[sample.key] * k,
    )
    losses = objective.loss_at(unet, adapter, batch, batch.latent_mean, noise.to(device), timesteps.to(device),
                               weight_dtype=weight_dtype)
    return losses.double().cpu()


def combine(table: torch.Tensor) -> tuple[float, list[float], int]:
    """(mean loss, mean per timestep, pairs counted) from the reduced (N, K + 1) table of losses and
    counts. Exactly rounded sums (`math.fsum`): the same bits whatever order rows were added in."""
    rows = table.tolist()
    losses = [r[:-1] for r in rows]
    counts = [r[-1] for r in rows]
    missing = [i for i, c in enumerate(counts) if c != 1]
    if missing:
        raise RuntimeError(f"internal: validation samples {missing[:8]} were evaluated {[counts[i] for i in missing[:8]]} "
                           "times instead of once")
    k = len(losses[0]) if losses else 0
    pairs = len(losses) * k
    total = math.fsum(v for row in losses for v in row) / pairs
    per_t = [math.fsum(row[j] for row in losses) / len(losses) for j in range(k)]
    return total, per_t, pairs


# --------------------------------------------------------------------------------------------
# Which samples


@dataclass(frozen=True)
class EvalSet:
    """The samples a validation loss evaluates: per shard, (record, ((position, key), ...)) in
    manifest order. `source` says where they come from; `manifest_id` is their cache's."""

    source: str  # "--validation-split 0.1 of the training cache" / "--validation-cache URL"
    manifest_id: str
    shards: tuple[tuple[ShardRecord, tuple[tuple[int, str], ...]], ...]

    @property
    def count(self) -> int:
        return sum(len(samples) for _, samples in self.shards)

    @property
    def keys(self) -> list[str]:
        return [key for _, samples in self.shards for _, key in samples]

    @property
    def set_id(self) -> str:
        """sha256 of the cache's manifest id and the keys: two runs' validation losses compare
        exactly when their set ids are equal."""
        digest = hashlib.sha256(self.manifest_id.encode())
        for key in self.keys:
            digest.update(b"\n" + key.encode())
        return digest.hexdigest()

    def describe(self) -> str:
        return f"{self.count} image(s) in {len(self.shards)} shard(s) ({self.source})"


def eval_set(records: Manifest | Sequence[ShardRecord], manifest_id: str, *, source: str,
             fraction: float | None = None) -> EvalSet:
    """View 0 of the images a `fraction` holds out (`train.plan.held_out_images`), or of every
    image when `fraction` is None (a validation cache)."""
    recs = sorted(records.shards if isinstance(records, Manifest) else records, key=lambda r: r.index)
    images = held_out_images(recs, fraction) if fraction is not None else None
    shards = []
    for rec in recs:
        samples = image_positions(rec, images)
        if samples:
            shards.append((rec, tuple(samples)))
    return EvalSet(source=source, manifest_id=manifest_id, shards=tuple(shards))


def identity_problems(train: Manifest, validation: Manifest, where: str) -> list[str]:
    """Why the validation cache `validation` cannot stand in for held-out samples of `train`:
    encoders (by fingerprint), latents, text widths, dtypes, condition or resolution differ."""
    a, b = train.identity, validation.identity
    problems = []
    if dict(a.encoder.fingerprints) != dict(b.encoder.fingerprints):
        names = sorted(n for n in set(a.encoder.fingerprints) | set(b.encoder.fingerprints)
                       if a.encoder.fingerprint(n) != b.encoder.fingerprint(n))
        problems.append(f"{where} was encoded by other encoders than the training cache ({', '.join(names)} "
                        "fingerprints differ)")
    for section in COMPARED_SECTIONS:
        for line in identity_diff(a.section(section) or {}, b.section(section) or {}):
            problems.append(f"{where}: {section}.{line} (training cache != validation cache)")
    if a.geometry.resolution != b.geometry.resolution:
        problems.append(f"{where}: resolution {b.geometry.resolution}, the training cache's is "
                        f"{a.geometry.resolution}")
    return problems


# --------------------------------------------------------------------------------------------
# The evaluation


@dataclass(frozen=True)
class EvalSpec:
    """How the validation loss is measured: K timesteps, and the fixed binarisation threshold of
    soft conditioning maps (None for a cache without them)."""

    timesteps: int = DEFAULT_TIMESTEPS
    soft_threshold: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.timesteps, int) or isinstance(self.timesteps, bool) or self.timesteps < 1:
            raise ValueError(f"validation loss timesteps must be an integer >= 1, got {self.timesteps!r}")


@dataclass(frozen=True)
class EvalResult:
    step: int
    loss: float
    per_timestep: dict[int, float]  # t -> mean loss at t (quantiles that floor to one t: their mean)
    images: int
    pairs: int
    weights: str  # "ema" or "raw"
    seconds: float
    timesteps: int = 0  # the quantile draws averaged (more than per_timestep's keys when some share a t)

    def record(self) -> dict:
        """The metrics.jsonl record (a record of its own: it has no "loss" key)."""
        return {"step": self.step, "validation_loss": self.loss,
                "validation_loss_by_timestep": {str(t): v for t, v in self.per_timestep.items()},
                "validation_images": self.images, "validation_weights": self.weights}

    def tracker_values(self) -> dict[str, float]:
        return {"validation_loss": self.loss, **{f"validation_loss/t{t:04d}": v for t, v in self.per_timestep.items()}}


class Evaluator:
    """Measures the validation loss of an adapter on `evalset` (read from `store`, every sample held
    to `manifest`). Built on every rank; `run` is collective."""

    def __init__(self, evalset: EvalSet, store: Store, manifest: Manifest, spec: EvalSpec):
        if evalset.count == 0:
            raise ValueError(f"no validation samples ({evalset.source})")
        self.evalset, self.store, self.manifest, self.spec = evalset, store, manifest, spec
        self.soft_level = None if spec.soft_threshold is None else threshold_level(spec.soft_threshold)
        self._mine: list[tuple[int, EvalSample]] | None = None
        self._world: tuple[int, int] | None = None

    def _load(self, rank: int, world: int) -> list[tuple[int, EvalSample]]:
        """(global index, sample) of this rank's samples: those of every world-th shard."""
        from train.data import decode_verified

        out, start = [], 0
        for j, (record, samples) in enumerate(self.evalset.shards):
            if j % world == rank:
                wanted = {pos: start + i for i, (pos, _) in enumerate(samples)}
                for pos, (key, members) in enumerate(iter_shard_members(self.store, record)):
                    if pos in wanted:
                        sample, cond = decode_verified(record.name, record.index, key, members, self.manifest)
                        out.append((wanted[pos], EvalSample(
                            key=key, latent_mean=sample.latent_mean, latent_std=sample.latent_std,
                            prompt_embeds=sample.prompt_embeds[0].clone(),
                            pooled_prompt_embeds=sample.pooled_prompt_embeds[0].clone(),
                            add_time_ids=torch.tensor(sample.meta.add_time_ids, dtype=torch.float32),
                            cond_u8=torch.from_numpy(np.array(cond)).permute(2, 0, 1).contiguous(),
                        )))
            start += len(samples)
        return out

    def local_table(self, *, rank: int, world: int, objective: Any, unet: torch.nn.Module, adapter: torch.nn.Module,
                    device: torch.device | str, weight_dtype: torch.dtype | None = None) -> torch.Tensor:
        """This rank's (N, K + 1) float64 table: the K losses and a count of 1 in the rows of its
        samples, zeros elsewhere (what the all-reduce sums). Reads its samples on first use."""
        if self._mine is None or self._world != (rank, world):
            self._mine, self._world = self._load(rank, world), (rank, world)
            logger.info("validation loss: %s; this process holds %d of them", self.evalset.describe(), len(self._mine))
        timesteps = quantile_timesteps(self.spec.timesteps, objective.num_train_timesteps)
        k = len(timesteps)
        table = torch.zeros((self.evalset.count, k + 1), dtype=torch.float64)
        for index, sample in self._mine:
            table[index, :k] = sample_losses(objective, unet, adapter, sample, timesteps, device=device,
                                             weight_dtype=weight_dtype, soft_level=self.soft_level)
            table[index, k] = 1.0
        return table

    def run(self, step: int, *, objective: Any, unet: torch.nn.Module, adapter: torch.nn.Module, accelerator: Any,
            weight_dtype: torch.dtype | None = None, weights: str = "raw") -> EvalResult:
        """The validation loss of `adapter` (collective: every rank calls it with the same weights)."""
        started = time.perf_counter()
        world = accelerator.num_processes
        table = self.local_table(rank=accelerator.process_index, world=world, objective=objective, unet=unet,
                                 adapter=adapter, device=accelerator.device, weight_dtype=weight_dtype)
        if world > 1:
            table = accelerator.reduce(table.to(accelerator.device), reduction="sum").cpu()
        loss, per_t, pairs = combine(table)
        timesteps = quantile_timesteps(self.spec.timesteps, objective.num_train_timesteps).tolist()
        at: dict[int, list[float]] = {}
        for t, value in zip(timesteps, per_t):  # many quantiles floor to 999 when K is large
            at.setdefault(t, []).append(value)
        return EvalResult(step=step, loss=loss, per_timestep={t: sum(v) / len(v) for t, v in at.items()},
                          images=self.evalset.count, pairs=pairs, weights=weights,
                          seconds=time.perf_counter() - started, timesteps=len(timesteps))


__all__ = ["DEFAULT_TIMESTEPS", "EvalResult", "EvalSample", "EvalSet", "EvalSpec", "Evaluator", "combine", "eval_set",
           "fixed_inputs", "fixed_normal", "identity_problems", "quantile_timesteps", "sample_losses"]
