"""What a finished run leaves in OUT: the adapter, the resolved config, loss curve, model card, hub.

Written by the main process once training is over: the adapter in diffusers format
(`config.json` + `diffusion_pytorch_model.safetensors`, so `T2IAdapter.from_pretrained(OUT)`
works), `train_config.json` (every setting plus what start-up resolved), `loss_curve.png` and
`README.md` (train.card), then the optional hub upload (`train.hub`). `replica_digests` checks beforehand that
every process ends with the same adapter.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shards.fingerprint import module_fingerprint
from shards.runtime import io_reason, is_io_failure
from shards.secrets import redact
from shards.store import apply_umask
from train import card
from train.checkpoint import TrainState, checkpoint_name
from train.config import TrainConfig
from train.errors import TrainError
from train.metrics import METRICS_FILE
from train.hub import push_to_hub
from train.plan import data_summary

if TYPE_CHECKING:
    from train.startup import Plan

TRAIN_CONFIG_FILE = "train_config.json"

logger = logging.getLogger(__name__)


def replica_digests(accelerator: Any, adapter: torch.nn.Module) -> list[str]:
    """Every rank's adapter fingerprint (sha256 of config + weights), gathered as integer tensors."""
    digest = bytes.fromhex(module_fingerprint(adapter))
    local = torch.from_numpy(np.frombuffer(digest, dtype=np.int64).copy()).to(accelerator.device)
    gathered = accelerator.gather(local).cpu().numpy().reshape(accelerator.num_processes, -1)
    return [row.tobytes().hex() for row in gathered]


def epochs_done(state: TrainState, batches_per_epoch: list[int]) -> float:
    if state.epoch < len(batches_per_epoch) and batches_per_epoch[state.epoch]:
        return state.epoch + state.batches_done / batches_per_epoch[state.epoch]
    return float(state.epoch)


def write_outputs(cfg: TrainConfig, plan: Plan, state: TrainState, adapter: torch.nn.Module, *, world: int,
                  seconds: float, rate: float, validation_images: list[Path], replica_digests: list[str],
                  parameters: dict[str, int], hub_repo: str | None = None) -> None:
    """OUT's deliverables: the adapter (diffusers format), resolved config, loss curve, model card.

    Built in OUT/.tmp-outputs and moved into OUT file by file (each an atomic rename) once all
    are written, so a full disk leaves the previous outputs (or none), never a truncated adapter.
    """
    out = Path(cfg.output_dir)
    stage = out / ".tmp-outputs"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        _write(cfg, plan, state, adapter, stage, out, world=world, seconds=seconds, rate=rate,
               validation_images=validation_images, replica_digests=replica_digests, parameters=parameters)
        apply_umask(stage)  # save_pretrained's temp files are private (0600)
        for path in sorted(stage.iterdir()):
            os.replace(path, out / path.name)
    except Exception as e:
        if not is_io_failure(e):
            raise
        reason = io_reason(e)
        raise TrainError(f"cannot write the outputs in {out}: {reason}"
                         + (f" ({e.filename})" if getattr(e, "filename", None) else "")
                         + f". Training finished: the adapter of step {state.global_step} is in "
                         f"{out}/checkpoints/{checkpoint_name(state.global_step)}/adapter. Free space, then run the "
                         "same command with --resume latest to write the outputs") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    logger.info("done: %d steps, %d samples, %.1f s this session, %.2f samples/s. Adapter in %s", state.global_step,
                state.samples_seen, seconds, rate, out)
    if cfg.push_to_hub:
        push_to_hub(cfg, out, hub_repo)


def _write(cfg: TrainConfig, plan: Plan, state: TrainState, adapter: torch.nn.Module, stage: Path, out: Path, *,
           world: int, seconds: float, rate: float, validation_images: list[Path], replica_digests: list[str],
           parameters: dict[str, int]) -> None:
    adapter.save_pretrained(stage, safe_serialization=True)
    data = data_summary(plan.epoch_stats)  # what the epoch plans used and dropped (never silently)
    resolved = {
        **cfg.to_dict(),
        "resolved": {
            "world_size": world, "effective_learning_rate": plan.learning_rate, "total_steps": plan.total_steps,
            "batches_per_epoch_per_rank": plan.batches_per_epoch, "weight_dtype": cfg.mixed_precision,
            "manifest_id": plan.manifest_id, "cache_samples": plan.manifest.num_samples,
            "adapter_config": {k: v for k, v in adapter.config.items() if not k.startswith("_")},
            "adapter_fingerprint_per_rank": replica_digests, "data": data, **parameters,
        },
    }
    (stage / TRAIN_CONFIG_FILE).write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str) + "\n")
    metrics = card.read_metrics(out / "logs" / METRICS_FILE)
    curve = card.plot_loss_curve(metrics, stage / card.LOSS_CURVE_FILE)
    summary = {
        "optimizer_steps": state.global_step,
        "samples_seen": state.samples_seen,
        "epochs": round(epochs_done(state, plan.batches_per_epoch), 2),
        "global_batch": cfg.batch_size * cfg.gradient_accumulation_steps * world,
        "samples_dropped_by_the_epoch_plans": f"{data['samples_dropped']} over {data['epochs_planned']} planned "
                                              f"epoch(s) of {data['samples_per_epoch']} samples "
                                              f"({100 * data['samples_dropped_fraction']:.1f}%: "
                                              f"{data['samples_dropped_in_partial_batches']} in partial batches, "
                                              f"{data['samples_dropped_for_equal_steps']} for equal steps per rank)",
        "samples_repeated_by_the_epoch_plans": f"{data['samples_repeated']} (repeats completing the last batch of a "
                                               "latent shape; 0 for a one-shape cache)",
        "final_loss": round(metrics[-1]["loss"], 5) if metrics else None,
        "time_this_session_s": round(seconds, 1),
        "samples_per_s_this_session": round(rate, 2),
    }
    (stage / card.README_FILE).write_text(card.model_card(
        base_model=cfg.model, cache_url=redact(cfg.cache), manifest_id=plan.manifest_id, config=resolved, summary=summary,
        validation_grids=[p.relative_to(out).as_posix() for p in validation_images],
        prompts=[prompt for _, prompt in cfg.validation_pairs()],
        loss_curve=card.LOSS_CURVE_FILE if curve else None,
    ))


__all__ = ["TRAIN_CONFIG_FILE", "epochs_done", "replica_digests", "write_outputs"]
