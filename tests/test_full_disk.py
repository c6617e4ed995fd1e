"""A full disk (or a file-size limit, or a read-only folder) is one message naming what could not
be written and what to do; nothing partial is published, nothing already complete is lost.

The disk "fills" through RLIMIT_FSIZE in the command's process (a fork of the test's, the limit set
before the command starts): every write past the limit fails with EFBIG (Python ignores SIGXFSZ),
exactly where a full disk's ENOSPC would.
"""

from __future__ import annotations

import os
import resource

from clirun import run_cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def _limited(max_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def test_a_checkpoint_that_cannot_be_written_is_a_message_and_leaves_nothing(tiny_model, fill_cache, tmp_path):
    out = tmp_path / "out"
    # The adapter's weights are ~2 MB, its AdamW state ~4 MB: the first checkpoint cannot be saved.
    proc = run_cli("train", ["--model", tiny_model, "--cache", fill_cache, "--output-dir", out, "--max-steps", "4",
                             "--batch-size", "2", "--num-workers", "0", "--checkpointing-steps", "2"], env=ENV,
                   timeout=300, preexec=_limited(3 << 20))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"cannot save checkpoint {out / 'checkpoints' / 'step-000002'}: File too large" in errors[0]
    assert "Nothing of it was published and no earlier checkpoint exists" in errors[0]
    assert "--resume latest" in errors[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == []  # no half checkpoint, no temp folder
    assert not (out / "diffusion_pytorch_model.safetensors").exists()


def test_a_shard_that_cannot_be_written_is_a_message_and_leaves_nothing(tiny_model, fill_data, tmp_path):
    cache = tmp_path / "cache"
    # Shards of 4 tiny samples are ~55 KB; everything else precompute writes is smaller than 20 KB.
    proc = run_cli("precompute", ["--model", tiny_model, "--data", fill_data, "--cache", cache, "--resolution", "64",
                                  "--samples-per-shard", "4", "--num-workers", "0", "--device", "cpu"], env=ENV,
                   timeout=300, preexec=_limited(20 << 10))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: shards/shard-000000.tar: cannot be written (File too large")
    assert "Nothing of it was published" in errors[0] and "re-run the same command" in errors[0]
    assert "Free space (or fix the permissions), then re-run" in errors[0]
    assert not (cache / "shards").exists() or list((cache / "shards").iterdir()) == []
    assert [p.name for p in (cache / ".staging").iterdir()] == [".lock"]  # its temp file is gone
    assert not (cache / "manifest.json").exists()


def test_a_read_only_cache_folder_is_refused_before_any_model_loads(tiny_model, fill_data):
    """As root, permission bits do not stop a write; a read-only filesystem does (/sys here)."""
    proc = run_cli("precompute", ["--model", tiny_model, "--data", fill_data, "--cache", "/sys/kernel/t2i-cache",
                                  "--resolution", "64"], env=ENV, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--cache /sys/kernel/t2i-cache: /sys/kernel: cannot write there" in proc.stderr
    assert "loading encoders" not in proc.stderr


def test_what_to_do_about_a_failed_write_follows_its_cause():
    import errno

    from precompute.runner import _io_fix

    assert _io_fix(IsADirectoryError(errno.EISDIR, "Is a directory")) == (
        "Something else stands where the file goes: move it out of the way")
    assert _io_fix(PermissionError(errno.EACCES, "Permission denied")) == "Fix the permissions (or write elsewhere)"
    assert _io_fix(OSError(errno.EROFS, "Read-only file system")) == "Fix the permissions (or write elsewhere)"
    assert _io_fix(OSError(errno.ENOSPC, "No space left on device")) == "Free space (or fix the permissions)"
