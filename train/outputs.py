"""What a finished run leaves in OUT: the adapter, the resolved config, loss curve, model card, hub.

Written by the main process once training is over: the adapter in diffusers format
(`config.json` + `diffusion_pytorch_model.safetensors`, so `T2IAdapter.from_pretrained(OUT)`
works), `train_config.json` (every setting plus what start-up resolved, and under
`resolved.results` what the run measured: steps, samples, throughput, validation loss and condition
adherence, best and last), `loss_curve.png` and `README.md` (train.card), then the optional hub
upload (`train.hub`). With an EMA (--ema-decay) the adapter is the EMA when --save-ema, else the
trained weights with the EMA beside them in `OUT/ema/` (a loadable adapter folder).
`replica_digests` checks beforehand that every process ends with the same adapter.
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
from train.metrics import LOGS_DIR, METRICS_FILE, read_records
from train.hub import push_to_hub
from train.plan import data_summary

if TYPE_CHECKING:
    from train.startup import Plan

TRAIN_CONFIG_FILE = "train_config.json"
EMA_OUTPUT_DIR = "ema"

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


def results(metrics: list[dict]) -> dict[str, Any]:
    """What the run measured, from its metrics.jsonl records: the last and best (lowest loss,
    highest adherence) of each evaluation, with their steps, and the median throughput."""
    from train.metrics import records_with, step_records

    steps = step_records(metrics)
    out: dict[str, Any] = {}
    rates = sorted(m["samples_per_s"] for m in steps if isinstance(m.get("samples_per_s"), (int, float)))
    out["samples_per_s_median"] = rates[len(rates) // 2] if rates else None
    out["final_loss"] = steps[-1]["loss"] if steps else None
    for key, best in (("validation_loss", min), ("adherence", max)):
        found = records_with(metrics, key)
        if found:
            top = best(found, key=lambda r: r[key])
            out[key] = {"last": found[-1][key], "last_step": found[-1]["step"], "best": top[key],
                        "best_step": top["step"], "evaluations": len(found),
                        "weights": found[-1].get("validation_weights", "raw")}
        else:
            out[key] = None
    return out


def _publish(stage: Path, out: Path) -> None:
    """Move every file and folder of `stage` into `out`: files by atomic rename; a folder replaces
    the previous one (moved aside first, deleted after)."""
    for path in sorted(stage.iterdir()):
        target = out / path.name
        if path.is_dir() and target.is_dir():
            old = out / f".tmp-old-{path.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(path, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(path, target)


def write_outputs(cfg: TrainConfig, plan: Plan, state: TrainState, adapter: torch.nn.Module, *, world: int,
                  seconds: float, rate: float, validation_images: list[Path], replica_digests: list[str],
                  parameters: dict[str, int], hub_repo: str | None = None, ema: torch.nn.Module | None = None,
                  validation_sheet: Path | None = None) -> None:
    """OUT's deliverables: the adapter (diffusers format), resolved config, loss curve, model card.

    Built in OUT/.tmp-outputs and moved into OUT file by file (each an atomic rename) once all
    are written, so a full disk leaves the previous outputs (or none), never a truncated adapter.
    """
    out = Path(cfg.output_dir)
    stage = out / ".tmp-outputs"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        _write(cfg, plan, state, adapter, stage, out, world=world, seconds=seconds, rate=rate,
               validation_images=validation_images, replica_digests=replica_digests, parameters=parameters,
               ema=ema, validation_sheet=validation_sheet)
        apply_umask(stage)  # save_pretrained's temp files are private (0600)
        staged_ema = (stage / EMA_OUTPUT_DIR).is_dir()
        _publish(stage, out)
        if not staged_ema and (out / EMA_OUTPUT_DIR).is_dir():
            # An EMA an earlier session of this OUT wrote (this one keeps none beside the adapter):
            # left there, it would pass for this run's, and go to the hub with it.
            shutil.rmtree(out / EMA_OUTPUT_DIR)
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
           parameters: dict[str, int], ema: torch.nn.Module | None = None,
           validation_sheet: Path | None = None) -> None:
    if ema is not None and cfg.save_ema:
        ema.save_pretrained(stage, safe_serialization=True)
    else:
        adapter.save_pretrained(stage, safe_serialization=True)
        if ema is not None:
            ema.save_pretrained(stage / EMA_OUTPUT_DIR, safe_serialization=True)
    data = data_summary(plan.epoch_stats)  # what the epoch plans used and dropped (never silently)
    metrics = read_records(out / LOGS_DIR / METRICS_FILE)  # a resume has said which lines it left out
    measured = results(metrics)
    validation = None
    if plan.validation is not None:
        validation = {"source": plan.validation.source, "images": plan.validation.count,
                      "set_id": plan.validation.set_id, "manifest_id": plan.validation.manifest_id,
                      "timesteps": cfg.validation_loss_timesteps}
    weights = "ema" if ema is not None else "raw"
    resolved = {
        **cfg.to_dict(),
        "resolved": {
            "world_size": world, "effective_learning_rate": plan.learning_rate, "total_steps": plan.total_steps,
            "batches_per_epoch_per_rank": plan.batches_per_epoch, "weight_dtype": cfg.mixed_precision,
            "manifest_id": plan.manifest_id, "cache_samples": plan.manifest.num_samples,
            "adapter_config": {k: v for k, v in adapter.config.items() if not k.startswith("_")},
            "adapter_fingerprint_per_rank": replica_digests, "data": data, **parameters,
            "validation_set": validation,
            "output_weights": "ema" if (ema is not None and cfg.save_ema) else "raw",
            "evaluated_weights": weights,
            "results": {"global_step": state.global_step, "samples_seen": state.samples_seen,
                        "samples_per_s_this_session": rate, **measured},
        },
    }
    (stage / TRAIN_CONFIG_FILE).write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str) + "\n")
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
        "final_loss": round(measured["final_loss"], 5) if measured["final_loss"] is not None else None,
        "time_this_session_s": round(seconds, 1),
        "samples_per_s_this_session": round(rate, 2),
    }
    summary.update(card.quality_summary(measured, validation=validation, ema_decay=cfg.ema_decay if ema is not None
                                        else None, save_ema=cfg.save_ema, adherence_method=_adherence_method(plan)))
    (stage / card.README_FILE).write_text(card.model_card(
        base_model=cfg.model, cache_url=redact(cfg.cache), manifest_id=plan.manifest_id, config=resolved, summary=summary,
        validation_grids=[p.relative_to(out).as_posix() for p in validation_images],
        prompts=[prompt for _, prompt in plan.validation_pairs],
        loss_curve=card.LOSS_CURVE_FILE if curve else None,
        validation_sheet=validation_sheet.relative_to(out).as_posix() if validation_sheet else None,
    ))


def _adherence_method(plan: Plan) -> str | None:
    from train.adherence import EdgeDetector

    detector = EdgeDetector.for_condition(plan.manifest.identity.condition)
    return None if detector is None else detector.describe()


__all__ = ["EMA_OUTPUT_DIR", "TRAIN_CONFIG_FILE", "epochs_done", "replica_digests", "results", "write_outputs"]
