"""What the tool writes follows the user's umask, like any file a program creates: the tiny model
and fill data, the cache (shards, records, manifest) and a run's outputs and checkpoints."""

from __future__ import annotations

import os
import stat

from clirun import run_cli


def _umask(mask: int):
    return lambda: os.umask(mask)


def test_everything_written_follows_the_umask(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = [
        ["precompute.tiny", str(tmp_path / "tiny")],
        ["precompute.fill", str(tmp_path / "fill"), "--n", "8", "--resolution", "64"],
        ["precompute", "--model", str(tmp_path / "tiny"), "--data", str(tmp_path / "fill"), "--cache",
         str(tmp_path / "cache"), "--resolution", "64", "--samples-per-shard", "4", "--num-workers", "0"],
        ["train", "--model", str(tmp_path / "tiny"), "--cache", str(tmp_path / "cache"), "--output-dir",
         str(tmp_path / "out"), "--max-steps", "2", "--batch-size", "2", "--num-workers", "0",
         "--checkpointing-steps", "1"],
    ]
    for module, *args in steps:  # each command in a process of its own, started with the umask
        proc = run_cli(module, args, env=env, timeout=300, preexec=_umask(0o027))
        assert proc.returncode == 0, proc.stderr[-3000:]
    checked = 0
    for root in ("tiny", "fill", "cache", "out"):
        for path in (tmp_path / root).rglob("*"):
            mode = stat.S_IMODE(path.lstat().st_mode)
            if path.is_dir():
                assert mode & 0o027 == 0, (path, oct(mode))
            else:
                assert mode == 0o640, (path, oct(mode))  # 0o666 & ~0o027
                checked += 1
    assert checked > 30
