"""train.metrics: one record per step, flushed in windows; peak memory per window, not per run."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

import train.metrics as metrics_module
from train.metrics import Metrics, truncate_jsonl


class _FakeCuda:
    """torch.cuda's peak-memory counters, as a GPU would keep them: peak since the last reset."""

    def __init__(self):
        self.current = 0
        self.peak = 0
        self.resets = 0

    def allocate(self, gib: float) -> None:
        self.current = int(gib * 2**30)
        self.peak = max(self.peak, self.current)

    def max_memory_allocated(self) -> int:
        return self.peak

    def reset_peak_memory_stats(self) -> None:
        self.peak = self.current
        self.resets += 1


@pytest.fixture
def cuda(monkeypatch) -> _FakeCuda:
    fake = _FakeCuda()
    monkeypatch.setattr(metrics_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(metrics_module.torch.cuda, "max_memory_allocated", fake.max_memory_allocated)
    monkeypatch.setattr(metrics_module.torch.cuda, "reset_peak_memory_stats", fake.reset_peak_memory_stats)
    return fake


def test_peak_memory_is_per_window_and_validation_is_not_counted(tmp_path, cuda):
    accelerator = Accelerator(cpu=True)
    path = tmp_path / "metrics.jsonl"
    with tqdm(disable=True) as progress:
        m = Metrics(accelerator, path, progress, every=2)
        one = torch.tensor(1.0)
        cuda.allocate(3.0)
        m.add(1, one, one, 1e-3, 0.01, 4)
        cuda.allocate(1.0)
        m.add(2, one, one, 1e-3, 0.02, 4)  # flush: the window's peak was 3 GiB
        cuda.allocate(20.0)  # validation renders with the VAE and the pipeline
        cuda.allocate(1.0)
        m.restart_window()
        cuda.allocate(2.0)
        m.add(3, one, one, 1e-3, 0.0, 4)
        m.add(4, one, one, 1e-3, 0.0, 4)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["peak_memory_gib"] for r in records] == [3.0, 3.0, 2.0, 2.0]
    assert [r["data_wait_s"] for r in records] == [0.01, 0.02, 0.0, 0.0]
    assert all(r["samples_per_s"] > 0 and r["loss"] == 1.0 for r in records)


def test_truncate_keeps_the_steps_a_checkpoint_covers(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    truncate_jsonl(path, None)
    assert path.read_text() == ""
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)))
    truncate_jsonl(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_a_torn_log_is_read_around_and_truncated_without_its_bad_lines(tmp_path, caplog):
    """What a crash, a power loss or a full disk leaves at the end of metrics.jsonl: read around
    (never a traceback), said once with the line numbers, and dropped when a resume rewrites it."""
    import logging

    from train.metrics import read_jsonl, truncate_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 1.0}\n[1, 2]\n{"step": "2"}\n{"step": 2, "loss": 0.5}\n\n'
                     b'{"step": 3, "loss": 0.2}\n\xff\xfe\n{"step": 4, "lo' + b"\0" * 64)
    good, bad = read_jsonl(path)
    assert [r["step"] for _, r in good] == [1, 2, 3] and bad == [2, 3, 7, 8]
    assert read_jsonl(tmp_path / "none.jsonl") == ([], [])
    log = logging.getLogger("test-torn")
    with caplog.at_level(logging.WARNING):
        truncate_jsonl(path, 2, log)
    assert f"{path}: left out 4 unreadable line(s) (line 2, 3, 7, 8)" in caplog.text
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left


def test_a_planted_log_is_refused_or_replaced_never_read_without_end(tmp_path):
    """OUT may be shared: a metrics.jsonl that is a link to /dev/zero, a FIFO or a folder must not
    exhaust memory, hang or crash a resumed run; a link to a file is replaced, its target untouched."""
    import os

    from train.errors import TrainError
    from train.metrics import read_records

    log = tmp_path / "metrics.jsonl"
    os.symlink("/dev/zero", log)
    with pytest.raises(TrainError, match="metrics.jsonl: cannot read this run log \\(a symbolic link\\)"):
        read_records(log)
    victim = tmp_path / "victim.txt"
    victim.write_text('{"step": 1, "loss": 1.0}\n')
    log.unlink()
    os.symlink(victim, log)
    truncate_jsonl(log, None)
    assert victim.read_text() == '{"step": 1, "loss": 1.0}\n' and not log.is_symlink() and log.read_text() == ""
    log.unlink()
    os.mkfifo(log)
    for call in (lambda: read_records(log), lambda: truncate_jsonl(log, 3)):
        with pytest.raises(TrainError, match="metrics.jsonl: not a regular file"):
            call()
    log.unlink()
    log.mkdir()
    with pytest.raises(TrainError, match="metrics.jsonl: not a regular file"):
        truncate_jsonl(log, None)
