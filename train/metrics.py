"""Per-step training metrics: kept on the device, fetched in windows, written and sent once.

Every optimizer step records loss, gradient norm, learning rate, samples/s and the time the loop
waited for data (`data_wait_s`); on a GPU also `peak_memory_gib`, the peak allocated memory of the
window since the previous flush (the peak is reset after every flush and after validation, so a
value is never the validation pipeline's, nor a maximum over the whole run). The values go to
`OUT/logs/metrics.jsonl` (one JSON object per step, read back for the loss curve and the card), to
the tracker (`accelerator.log`, when --report-to is set) and to the progress bar, on the main
process. Losses are averaged over processes with one all-reduce per window: the only host sync.

Evaluations write records of their own into the same file, after the step records they follow
(`Metrics.record`): the validation loss (`{"step", "validation_loss", ...}`, `train.evaluate`) and
the condition adherence of the validation images (`{"step", "adherence", ...}`). Only per-step
records have a "loss"; `step_records` / `records_with` pick one kind when reading it back.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import time
from pathlib import Path
from typing import Any

import torch

from train.errors import NonFiniteError, TrainError

LOGS_DIR = "logs"  # OUT/logs: metrics.jsonl and the per-rank sample logs
METRICS_FILE = "metrics.jsonl"


def reset_peak_memory() -> None:
    """Start a new peak-memory window (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


class Metrics:
    """Per-step values kept on the device and flushed every `every` steps with one host sync."""

    def __init__(self, accelerator: Any, path: Path, progress: Any, every: int):
        self.accelerator, self.path, self.progress, self.every = accelerator, path, progress, every
        self.pending: list[tuple] = []  # (step, loss, grad_norm, lr, data_wait, samples, keys, skipped)
        self.window_start = time.perf_counter()
        reset_peak_memory()

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, data_wait: float,
            samples: int, keys: list[str] | None = None, scaler_skipped: bool = False) -> None:
        """One optimizer step. `scaler_skipped`: fp16's loss scaler found inf gradients and skipped
        the step (normal while it finds its scale): an inf gradient norm is then not an error."""
        self.pending.append((step, loss.detach().float(), grad_norm.detach().float(), lr, data_wait, samples,
                             list(keys or []), scaler_skipped))
        if len(self.pending) >= self.every:
            self.flush()

    def _stop_if_not_finite(self, values: list[list[float]]) -> None:
        """A NaN/inf loss or gradient norm (mean over ranks, so every rank sees it) stops the run
        here, before the checkpoint or output this flush precedes: nothing non-finite is saved."""
        for (step, _, _, _, _, _, keys, skipped), (loss, grad_norm) in zip(self.pending, values):
            if math.isfinite(loss) and (math.isfinite(grad_norm) or skipped):
                continue
            shown = ", ".join(keys[:16]) + (f" and {len(keys) - 16} more" if len(keys) > 16 else "")
            raise NonFiniteError(
                f"step {step}: the loss is {loss} and the gradient norm {grad_norm}; nothing of this step or later "
                f"was saved. Batch keys on this rank: {shown or '(not recorded)'}. A cache with non-finite or "
                "out-of-range values is the usual cause: `python -m shards verify CACHE`; else lower "
                "--learning-rate or use --mixed-precision bf16 instead of fp16. Continue from the last good "
                "checkpoint with --resume latest."
            )

    def restart_window(self) -> None:
        """After a pause (checkpoint, validation): samples/s and peak memory measure training only."""
        self.window_start = time.perf_counter()
        reset_peak_memory()

    def record(self, record: dict, tracker_values: dict[str, float] | None = None) -> None:
        """Append an evaluation's record (it has a "step") after every pending step record, and
        send `tracker_values` to the tracker at that step. Main process only writes."""
        self.flush()
        acc = self.accelerator
        if acc.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if tracker_values:
                acc.log(tracker_values, step=record["step"])

    def flush(self) -> None:
        if not self.pending:
            return
        acc = self.accelerator
        values = torch.stack([torch.stack([p[1], p[2]]) for p in self.pending])  # (n, 2)
        values = acc.reduce(values, reduction="mean").cpu().tolist()  # the one sync per window
        self._stop_if_not_finite(values)
        now = time.perf_counter()
        rate = sum(p[5] for p in self.pending) / max(now - self.window_start, 1e-9)
        self.window_start = now
        peak = None
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        records = []
        for (step, _, _, lr, wait, _, _, _), (loss, grad_norm) in zip(self.pending, values):
            record = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "samples_per_s": rate,
                      "data_wait_s": wait}
            if peak is not None:
                record["peak_memory_gib"] = peak
            records.append(record)
        self.pending = []
        if acc.is_main_process:
            with self.path.open("a") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            for r in records:
                acc.log({k: v for k, v in r.items() if k != "step"}, step=r["step"])
            last = records[-1]
            self.progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                      samples_s=f"{rate:.1f}", refresh=False)


def read_jsonl(path: str | Path) -> tuple[list[tuple[str, dict]], list[int]]:
    """((line, record) of every readable record, numbers of the unreadable lines) of a run's
    JSON-lines log; ([], []) when there is none. A record is a JSON object with an integer
    "step". A crash, a power loss or a full disk can leave a torn last line (or a run of NUL
    bytes): such lines are reported, never fatal, and the records around them are kept."""
    try:
        text = _read_log(Path(path)).decode("utf-8", "replace")
    except FileNotFoundError:
        return [], []
    good, bad = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool):
            good.append((line, record))
        else:
            bad.append(number)
    return good, bad


MAX_LOG_BYTES = 1 << 30  # a run's log: about 5M step records, far beyond any run


def _read_log(path: Path) -> bytes:
    """A log's bytes: a regular file reached without following a final symbolic link, of at most
    MAX_LOG_BYTES (a planted link to /dev/zero, a FIFO or a folder is a TrainError naming it,
    never a read without end). FileNotFoundError when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise TrainError(f"{path}: cannot read this run log ({_why(e)}): remove it, or move the run folder "
                         "aside") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TrainError(f"{path}: not a regular file, so not a run log: remove it")
        data = f.read(MAX_LOG_BYTES + 1)
    if len(data) > MAX_LOG_BYTES:
        raise TrainError(f"{path}: over {MAX_LOG_BYTES >> 20} MiB, more than any run writes: damaged or not a run "
                         "log")
    return data


def _why(e: OSError) -> str:
    return "a symbolic link" if e.errno == errno.ELOOP else (e.strerror or str(e))


def unreadable_note(path: str | Path, bad: list[int]) -> str:
    shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return (f"{path}: left out {len(bad)} unreadable line(s) (line {shown}), what a crash or a full disk "
            "leaves; the other records are kept")


def _readable(path: str | Path, log: Any) -> list[tuple[str, dict]]:
    good, bad = read_jsonl(path)
    if bad and log is not None:
        log.warning("%s", unreadable_note(path, bad))
    return good


def read_records(path: str | Path, log: Any = None) -> list[dict]:
    """The readable records of a run's log (see `read_jsonl`); unreadable lines are said on `log`."""
    return [record for _, record in _readable(path, log)]


def truncate_jsonl(path: Path, after_step: int | None, log: Any = None) -> None:
    """Drop records of steps > after_step (a resumed run rewrites them), and unreadable lines
    (said on `log`); None: start empty. Rewritten whole, then renamed over the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():  # never written through: the run's own log takes its place
        path.unlink()
    if path.exists() and not path.is_file():
        raise TrainError(f"{path}: not a regular file (a folder, FIFO or device), so not a run log: remove it")
    kept = "" if after_step is None or not path.exists() else "".join(
        line + "\n" for line, record in _readable(path, log) if record["step"] <= after_step)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(kept)
    os.replace(tmp, path)


def step_records(records: list[dict]) -> list[dict]:
    """The per-optimizer-step records (those with a finite-or-not "loss")."""
    return [r for r in records if "loss" in r]


def records_with(records: list[dict], key: str) -> list[dict]:
    """The evaluation records holding `key` (e.g. "validation_loss", "adherence"), in step order."""
    return [r for r in records if isinstance(r.get(key), (int, float))]


__all__ = ["METRICS_FILE", "Metrics", "read_jsonl", "read_records", "records_with", "reset_peak_memory",
           "step_records", "truncate_jsonl", "unreadable_note"]
