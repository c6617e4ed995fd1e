"""Checkpoints: atomic save, exact resume, keep-last-K; never unpickled.

Layout of `OUT/checkpoints/step-000500/`:

    adapter/                      T2IAdapter.save_pretrained (config.json + safetensors): usable
                                  as an adapter on its own
    ema/                          with --ema-decay: the EMA of the adapter's weights, the same kind
                                  of folder (train.ema)
    optimizer.json/.safetensors   optimizer state: JSON structure, tensors in safetensors
    lr_scheduler.json             LR schedule position
    grad_scaler.json              fp16 loss-scale state (only with fp16)
    rng-rank00000.json/.safetensors   every RNG of that rank (torch, cuda, numpy, python, noise)
    state.json                    data position (epoch, batches done), step, world size, workers,
                                  batch size, cache manifest id, resolved config
    COMPLETE                      written last: names every file with its size and sha256

A checkpoint is built in `.tmp-step-000500/` (every rank writes its own RNG file into it), each
file fsynced, `COMPLETE` written last, then the folder is renamed into place. Only then are old
checkpoints beyond the newest K deleted, so a crash at any moment leaves at least one complete
checkpoint. A folder without a valid `COMPLETE` (or with a missing or resized file) is ignored.
A checkpoint is proven before it is resumed: every file's sha256 against `COMPLETE`. `--resume
latest` takes the newest checkpoint that proves good, warning about each newer one that does
not and why; when step folders exist and none proves good, it refuses (`--resume none` starts
over knowingly) rather than silently starting from step 0.

Nothing here uses pickle: tensors go through safetensors and everything else through JSON, via a
small tagged encoding that round-trips dicts with int keys, tuples and numpy arrays exactly.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from shards import limits
from shards.runtime import io_reason, is_io_failure
from shards.store import apply_umask, file_sha256, fsync_dir, fsync_file
from train.errors import TrainError
from train.optim import keep_implementation

CHECKPOINT_DIR = "checkpoints"
COMPLETE_FILE = "COMPLETE"
STATE_FILE = "state.json"
ADAPTER_DIR = "adapter"
EMA_DIR = "ema"
FORMAT_VERSION = 2  # 2: COMPLETE records each file's sha256
_NAME = re.compile(r"^step-(\d{6,})$")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"

# Settings besides the data stream that decide how the run continues: how the restored optimizer
# and schedule behave, the noise. A resume with any of them changed would silently not continue
# the same run. What decides the samples (batch size, workers, world size, shuffle buffer, max
# samples, caption dropout, soft threshold, the shards) is the data stream's identity,
# `train.data.stream_identity`, saved as meta["stream"] and compared as a whole.
RESUME_MUST_MATCH = (
    "gradient_accumulation_steps",
    "seed",  # also the noise stream and the adapter's init, not only the data order
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_num_cycles",
    "lr_power",
    "lr_step_rules",
    "use_8bit_adam",
    "adam_beta1",  # optimizer.load_state_dict restores the saved param groups: a changed value
    "adam_beta2",  # would be silently replaced by the checkpoint's
    "adam_epsilon",
    "adam_weight_decay",
    "mixed_precision",
    "ema_decay",  # the EMA continues only with the same average (absent from older checkpoints:
    "ema_warmup_steps",  # compared with the setting's default, no EMA)
)


# What the validation loss measures, besides the held-out images (--validation-split, in the
# stream identity) and the soft threshold (likewise): with validation on before and after a
# resume, a change would continue one curve, and its "best", with numbers of another measure.
VALIDATION_MEASURE = ("validation_cache", "validation_loss_timesteps")


# Schedules whose multiplier at step s depends on the run's total step count: resuming them with a
# different total (another --max-steps or --num-epochs) would continue another schedule than the
# one the checkpoint followed. The constant schedules (with or without warm-up) and
# piecewise_constant depend on the step alone, so those runs may be extended.
SCHEDULES_USING_TOTAL_STEPS = frozenset({"linear", "cosine", "cosine_with_restarts", "polynomial"})


class CheckpointError(TrainError):
    """A checkpoint that cannot be used; the message names it and says why."""


@dataclass
class TrainState:
    """Where training stands: enough to continue with the very next sample."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batches_done: int = 0  # micro-batches of `epoch` this rank has consumed (same on every rank)
    samples_seen: int = 0  # over all ranks, for logs and the model card


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


# ---------------------------------------------------------------------------------------------
# Pickle-free tree encoding


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        # clone: safetensors refuses tensors sharing storage (views of one buffer)
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"$tensor": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64 if obj.dtype.kind in "iub"
                                                                          else np.float64))
        return {"$ndarray": path, "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"$items": [[_encode(k, tensors, f"{path}.k{i}"), _encode(v, tensors, f"{path}.{i}")]
                           for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path!r}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "$tensor" in obj:
            return tensors[obj["$tensor"]]
        if "$ndarray" in obj:
            return tensors[obj["$ndarray"]].numpy().astype(np.dtype(obj["dtype"]))
        if "$items" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["$items"]}
        if "$tuple" in obj:
            return tuple(_decode(v, tensors) for v in obj["$tuple"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save_tree(folder: Path, name: str, obj: Any) -> list[Path]:
    """Write `obj` as name.json (+ name.safetensors when it holds tensors); return the files."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj, tensors, name)
    files = [folder / f"{name}.json"]
    files[0].write_text(json.dumps(structure, sort_keys=True))
    if tensors:
        files.append(folder / f"{name}.safetensors")
        save_file(tensors, str(files[1]))
    return files


def read_json(path: Path) -> Any:
    """A checkpoint's JSON file, parsed within the caps every reader keeps (size, nesting: a
    rewritten file cannot cost unbounded memory or a RecursionError). ValueError/OSError."""
    with open(path, "rb") as f:
        data = f.read(limits.cap("SHARDS_MAX_RECORD_BYTES") + 1)
    return limits.loads(data, str(path), "SHARDS_MAX_RECORD_BYTES")


def load_tree(folder: Path, name: str) -> Any:
    structure = read_json(folder / f"{name}.json")
    tensor_file = folder / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    return _decode(structure, tensors)


# ---------------------------------------------------------------------------------------------
# RNG state


def rng_state(noise_generator: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "noise": noise_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], noise_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    noise_generator.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def _listing(folder: Path) -> dict[str, dict]:
    """COMPLETE's {relative path: {"bytes", "sha256"}}; ValueError/OSError when unusable."""
    data = read_json(folder / COMPLETE_FILE)
    files = data["files"]
    if not isinstance(files, dict) or not all(isinstance(v, dict) and {"bytes", "sha256"} <= set(v)
                                              for v in files.values()):
        raise ValueError("COMPLETE does not list files with bytes and sha256 (written by an older version?)")
    for rel, f in files.items():
        parts = rel.split("/")
        if rel.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"COMPLETE lists {rel!r}, which is not a path inside the checkpoint")
        if type(f["bytes"]) is not int or f["bytes"] < 0 or not _SHA256.fullmatch(str(f["sha256"])):
            raise ValueError(f"COMPLETE lists {rel!r} without a byte count and a sha256")
    return files


def _regular_size(path: Path) -> int:
    """The size of `path`, a regular file reached without following a final symbolic link
    (a listed FIFO or device would block or never end when hashed). OSError otherwise."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path.name} is not a regular file")
    return st.st_size


def is_complete(folder: Path) -> bool:
    """COMPLETE present, parseable, and every file it names present with its recorded size (cheap:
    no hashing; `proof_problems` proves a checkpoint before it is resumed)."""
    try:
        return all(_regular_size(folder / rel) == f["bytes"] for rel, f in _listing(folder).items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def proof_problems(folder: Path) -> list[str]:
    """Why `folder` is not a checkpoint to resume from (empty when every file it lists is there
    with its size and sha256, and nothing is missing)."""
    try:
        files = _listing(folder)
    except FileNotFoundError:
        if not (folder / STATE_FILE).exists() and not (folder / ADAPTER_DIR).exists():
            return [f"not a checkpoint folder (no {COMPLETE_FILE}, {STATE_FILE} or {ADAPTER_DIR}/; checkpoints are "
                    "OUT/checkpoints/step-NNNNNN)"]
        return [f"no {COMPLETE_FILE} (its save was interrupted)"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{COMPLETE_FILE} is unreadable: {e}"]
    problems = []
    for rel, f in sorted(files.items()):
        path = folder / rel
        try:
            size = _regular_size(path)
        except FileNotFoundError:
            problems.append(f"{rel} is missing")
            continue
        except OSError:
            problems.append(f"{rel} is not a regular file")
            continue
        if size != f["bytes"]:
            problems.append(f"{rel} has {size} bytes, {COMPLETE_FILE} says {f['bytes']}")
        elif file_sha256(path) != f["sha256"]:
            problems.append(f"{rel} does not match its sha256 (damaged or changed after it was saved)")
    for required in (STATE_FILE, "optimizer.json", "lr_scheduler.json"):
        if required not in files:
            problems.append(f"{required} is not listed")
    return problems


def named_checkpoint(output_dir: str | Path, name: str) -> Path | None:
    """The folder of OUT/checkpoints that `name` means: `step-000200` as it is listed, or the
    reference script's name for the same step, `checkpoint-200`; None when `name` is neither."""
    m = re.fullmatch(r"(?:step|checkpoint)-(\d+)", name.strip().rstrip("/"))
    return checkpoints_dir(output_dir) / checkpoint_name(int(m.group(1))) if m else None


def step_folders(output_dir: str | Path) -> list[Path]:
    """Every step-NNNNNN folder, complete or not, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary, trashed and incomplete folders are ignored."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | None, output_dir: str | Path, warn: Any = None) -> Path | None:
    """--resume value -> a proven checkpoint folder (None: start fresh). `warn(message)` hears
    about each damaged checkpoint `latest` passes over. Raises CheckpointError if unusable."""
    if resume is None or resume == "none":
        return None
    if resume == "latest":
        skipped = []
        for folder in reversed(step_folders(output_dir)):
            problems = proof_problems(folder)
            if not problems:
                for message in skipped:
                    if warn is not None:
                        warn(f"{message}; resuming from {folder.name} instead")
                return folder
            skipped.append(f"checkpoint {folder} is incomplete or damaged: " + "; ".join(problems))
        if skipped:
            raise CheckpointError(
                f"--resume latest: no checkpoint in {checkpoints_dir(output_dir)} proves good, so the run cannot "
                "continue where it stopped:\n" + "\n".join(f"  - {m}" for m in reversed(skipped)) +
                "\nStart over knowingly with --resume none (the damaged folders are kept for you to look at), or "
                "pass a checkpoint folder you trust")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    problems = proof_problems(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} is incomplete or damaged: " + "; ".join(problems) + "; use another one or "
                              "--resume latest")
    return path


# ---------------------------------------------------------------------------------------------
# Save


def _fsync_tree(folder: Path) -> dict[str, dict]:
    """fsync every file and folder; {relative path: {"bytes", "sha256"}} for COMPLETE."""
    sizes = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fsync_file(p)
            sizes[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    for d in sorted({p.parent for p in folder.rglob("*")} | {folder}):
        fsync_dir(d)
    return sizes


def save_checkpoint(
    accelerator: Any,
    output_dir: str | Path,
    *,
    state: TrainState,
    adapter: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    noise_generator: torch.Generator,
    meta: dict[str, Any],
    keep: int | None,
    ema: Any = None,
) -> Path:
    """Save on every rank (collective: each rank writes its RNG state). Returns the final folder.

    `adapter` is the unwrapped model; `meta` holds what resume compares (world_size, config,
    manifest_id, ...). Old checkpoints beyond the newest `keep` are deleted after the new one is
    complete.
    """
    root = checkpoints_dir(output_dir)
    name = checkpoint_name(state.global_step)
    tmp = root / f"{_TMP_PREFIX}{name}"
    final = root / name
    try:
        return _save(accelerator, output_dir, root, tmp, final, state=state, adapter=adapter, optimizer=optimizer,
                     lr_scheduler=lr_scheduler, noise_generator=noise_generator, meta=meta, keep=keep, ema=ema)
    except Exception as e:
        # safetensors reports I/O failures as SafetensorError("...IoError(Os { code: 28 ...")
        if not is_io_failure(e):
            raise
        _remove(tmp, missing_ok=True)
        newest = latest_checkpoint(output_dir)
        kept = f"{newest.name}, the newest complete checkpoint, is intact" if newest else "no earlier checkpoint exists"
        reason = io_reason(e)
        raise CheckpointError(
            f"cannot save checkpoint {final}: {reason}" + (f" ({e.filename})" if getattr(e, "filename", None) else "")
            + f". Nothing of it was published and {kept}; free space (or fix the folder's permissions), then "
            "continue with --resume latest") from None


def _save(accelerator: Any, output_dir: str | Path, root: Path, tmp: Path, final: Path, *, state: TrainState,
          adapter: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
          noise_generator: torch.Generator, meta: dict[str, Any], keep: int | None, ema: Any = None) -> Path:
    name = final.name
    if accelerator.is_main_process:
        if tmp.exists() or tmp.is_symlink():  # left by a run that died while saving this very step
            _remove(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    save_tree(tmp, f"rng-rank{accelerator.process_index:05d}", rng_state(noise_generator))

    if accelerator.is_main_process:
        adapter.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)
        if ema is not None:  # train.ema.EMA: its module is an adapter of its own
            ema.module.save_pretrained(tmp / EMA_DIR, safe_serialization=True)
        save_tree(tmp, "optimizer", optimizer.state_dict())
        save_tree(tmp, "lr_scheduler", lr_scheduler.state_dict())
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:
            save_tree(tmp, "grad_scaler", scaler.state_dict())
        (tmp / STATE_FILE).write_text(json.dumps({
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "state": asdict(state),
            **meta,
        }, indent=1, sort_keys=True))
    accelerator.wait_for_everyone()  # every rank's RNG file is on disk

    if accelerator.is_main_process:
        apply_umask(tmp)  # save_pretrained's temp files are private (0600)
        sizes = _fsync_tree(tmp)
        ranks = [f"rng-rank{r:05d}.json" for r in range(accelerator.num_processes)]
        missing = [r for r in ranks if r not in sizes]
        if missing:
            raise CheckpointError(f"{tmp}: RNG state of some ranks missing ({missing}); is {root} on a "
                                  "filesystem every process shares?")
        (tmp / COMPLETE_FILE).write_text(json.dumps({"files": sizes}, indent=1, sort_keys=True))
        fsync_file(tmp / COMPLETE_FILE)
        fsync_dir(tmp)
        trash = None
        if final.exists() or final.is_symlink():  # an abandoned timeline (resumed from an older checkpoint)
            trash = root / f"{_TRASH_PREFIX}{name}"  # reached this step
            if trash.exists() or trash.is_symlink():
                _remove(trash)
            final.rename(trash)
        tmp.rename(final)
        fsync_dir(root)
        # Published: what follows is tidying, and a failure there must not fail the save.
        if trash is not None:
            _tidy(trash)
        prune_checkpoints(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep`, and leftovers of interrupted saves."""
    root = checkpoints_dir(output_dir)
    removed = []
    complete = list_checkpoints(output_dir)
    if keep is not None:
        for p in complete[: max(0, len(complete) - keep)]:
            if _tidy(p):
                removed.append(p)
    for p in root.iterdir() if root.is_dir() else []:
        # Leftovers of saves that died. (A step-* folder that is not complete was damaged after
        # the fact; it is ignored by resume but left for a human to look at.)
        if p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)) and (p.is_dir() or p.is_symlink()):
            if _tidy(p):
                removed.append(p)
    return removed


def _remove(path: Path, *, missing_ok: bool = False) -> None:
    """Delete a checkpoint folder; a symbolic link in its place is unlinked, never followed."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=missing_ok)
    elif path.exists() or not missing_ok:
        shutil.rmtree(path, ignore_errors=missing_ok)


def _tidy(path: Path) -> bool:
    """`_remove` for clean-up after a save: a failure is a warning (the save stands); True when gone."""
    try:
        _remove(path)
        return True
    except OSError as e:
        logging.getLogger("train").warning("could not remove %s (%s); remove it by hand", path, e.strerror or e)
        return False


# ---------------------------------------------------------------------------------------------
# Load


@dataclass
class Checkpoint:
    path: Path
    state: TrainState
    meta: dict[str, Any]  # state.json minus the position


def read_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete or damaged (no valid {COMPLETE_FILE})")
    try:
        meta = read_json(path / STATE_FILE)
        state = TrainState(**meta.pop("state"))
        bad = [k for k, v in asdict(state).items() if type(v) is not int or v < 0]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be whole numbers >= 0")
        for key in ("config", "stream"):
            if not isinstance(meta.get(key, {}), dict):
                raise ValueError(f"{key} is not an object")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_FILE}: {e}") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format_version {meta.get('format_version')!r} is not "
                              f"{FORMAT_VERSION}")
    return Checkpoint(path=path, state=state, meta=meta)


def resume_problems(ckpt: Checkpoint, now: dict[str, Any]) -> list[str]:
    """Why continuing `ckpt` with the current settings would not continue the same run.

    `now` has the keys of the saved meta: world_size, manifest_id, learning_rate (effective),
    total_steps (optimizer steps of the whole run), `stream` (train.data.stream_identity) and
    `config` (TrainConfig.to_dict()). One line per difference, each once.
    """
    problems = []
    labels = {"world_size": "number of processes", "manifest_id": "cache manifest id (a different cache)",
              "learning_rate": "effective learning rate"}
    for key, label in labels.items():
        if ckpt.meta.get(key) != now.get(key):
            problems.append(f"{label}: checkpoint {ckpt.meta.get(key)!r}, now {now.get(key)!r}")
    saved_cfg, cfg = ckpt.meta.get("config", {}), now.get("config", {})
    schedule = cfg.get("lr_scheduler")
    if schedule in SCHEDULES_USING_TOTAL_STEPS and ckpt.meta.get("total_steps") != now.get("total_steps"):
        problems.append(
            f"total optimizer steps (--max-steps / --num-epochs), which shape the {schedule} learning-rate schedule: "
            f"checkpoint {ckpt.meta.get('total_steps')!r}, now {now.get('total_steps')!r} (only constant and "
            "piecewise_constant schedules can be extended on resume)")
    if "stream" in now:
        from train.data import stream_resume_problems

        problems += stream_resume_problems(ckpt.meta.get("stream"), now["stream"])
    for key in RESUME_MUST_MATCH:
        # A setting added since the checkpoint was saved counts as its default there.
        saved, current = saved_cfg.get(key, _setting_default(key)), cfg.get(key, _setting_default(key))
        if saved != current:
            from train.data import shown

            problems.append(f"--{key.replace('_', '-')}: checkpoint {shown(saved)}, now {shown(current)}")
    measured = [bool(c.get("validation_split") or c.get("validation_cache")) for c in (saved_cfg, cfg)]
    if all(measured):
        from train.data import shown

        for key in VALIDATION_MEASURE:
            saved, current = saved_cfg.get(key, _setting_default(key)), cfg.get(key, _setting_default(key))
            if saved != current:
                problems.append(f"--{key.replace('_', '-')}: checkpoint {shown(saved)}, now {shown(current)} (the "
                                "validation loss curve would go on in another measure; measure differently in a "
                                "new run)")
    return list(dict.fromkeys(problems))  # e.g. the seed and the world size are in the stream too


def _setting_default(key: str) -> Any:
    from train.config import TrainConfig

    return TrainConfig.__dataclass_fields__[key].default


def load_checkpoint(
    ckpt: Checkpoint,
    accelerator: Any,
    *,
    adapter: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    noise_generator: torch.Generator,
    ema: Any = None,
) -> TrainState:
    """Restore every piece of state in place (adapter = the unwrapped model, `ema` a train.ema.EMA
    when the run keeps one); return the position.
    A file that parses but does not fit (its files were rewritten together with COMPLETE) is a
    CheckpointError naming the file, never a raw KeyError from deep inside torch."""
    path = ckpt.path
    part = f"{ADAPTER_DIR}/"
    try:
        try:
            weights = load_file(str(next((path / ADAPTER_DIR).glob("*.safetensors"))))
        except StopIteration:
            raise CheckpointError(f"checkpoint {path}: no adapter weights in {ADAPTER_DIR}/") from None
        adapter.load_state_dict(weights, strict=True)
        if ema is not None:
            part = f"{EMA_DIR}/"
            try:
                ema.load_state_dict(load_file(str(next((path / EMA_DIR).glob("*.safetensors")))))
            except StopIteration:
                raise CheckpointError(f"checkpoint {path}: no EMA weights in {EMA_DIR}/ although the run keeps an "
                                      "EMA (--ema-decay)") from None
        part = "optimizer.json/.safetensors"
        # The moments and step counts come back; fused or not stays this run's choice.
        optimizer.load_state_dict(keep_implementation(load_tree(path, "optimizer"), optimizer))
        part = "lr_scheduler.json"
        lr_scheduler.load_state_dict(load_tree(path, "lr_scheduler"))
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None and (path / "grad_scaler.json").exists():
            part = "grad_scaler.json"
            scaler.load_state_dict(load_tree(path, "grad_scaler"))
        rank_file = f"rng-rank{accelerator.process_index:05d}"
        if not (path / f"{rank_file}.json").exists():
            raise CheckpointError(f"checkpoint {path}: no RNG state for rank {accelerator.process_index}")
        part = f"{rank_file}.json"
        set_rng_state(load_tree(path, rank_file), noise_generator)
    except CheckpointError:
        raise
    except Exception as e:  # torch, safetensors and json raise many types for a tampered file
        raise CheckpointError(f"checkpoint {path}: {part} does not restore ({type(e).__name__}: {str(e)[:300]}); it "
                              "was changed after it was saved. Resume from another checkpoint, or start over with "
                              "--resume none") from None
    return ckpt.state
