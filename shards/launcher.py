"""Who started this process, and which of its settings the user chose rather than the launcher.

`accelerate launch` hands its decisions to the processes it starts as environment variables
only, and it sets two of them whatever the user asked (accelerate 1.x: `commands/launch.py`
decides, `utils/launch.py` exports):

- OMP_NUM_THREADS, always: its `--num_cpu_threads_per_process`, else the OMP_NUM_THREADS it was
  started with, else 1; but with `--cpu` (or a config file's `use_cpu: true`) and no
  OMP_NUM_THREADS, the physical cores divided among the processes of the machine.
- ACCELERATE_MIXED_PRECISION, always: its `--mixed_precision`, else the `mixed_precision` of its
  config file (`--config_file FILE`, or `$HF_HOME/accelerate/default_config.yaml` when that file
  exists and `--cpu` is not given), else "no".

torchrun, too, sets OMP_NUM_THREADS=1 when it is unset and it starts several processes. So the
variables alone cannot say whether anyone chose one thread or a precision. The launcher can:
each of them starts the ranks as its own child processes (accelerate's multi-process launch runs
torch's elastic agent inside its own process), and on Linux `/proc/<parent>/cmdline` and
`/proc/<parent>/environ` give the launcher's command line and the environment it was *started*
with, which what it sets later for its children does not change. `parent_process()` reads them;
where they cannot be read it returns None, and callers say that they cannot tell.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ACCELERATE = "accelerate launch"
TORCHRUN = "torchrun"
# Variables only a launcher sets: this process was started by one (for wording when the launcher
# itself cannot be seen).
_LAUNCHED_BY = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND")


@dataclass(frozen=True)
class Parent:
    """This process's parent: its command line and the environment it was started with."""

    argv: tuple[str, ...]
    environ: Mapping[str, str]

    @property
    def launcher(self) -> str | None:
        """ACCELERATE, TORCHRUN, or None when the parent is not a launcher (a shell, make, pytest)."""
        return _classify(self.argv)[0]

    @property
    def launcher_args(self) -> tuple[str, ...]:
        """The launcher's own arguments (and the command it runs), after its name."""
        return _classify(self.argv)[1]

    def accelerate_options(self) -> argparse.Namespace | None:
        """accelerate launch's arguments as its own parser reads them (it takes `--a-b` for
        `--a_b`), or None when the parent is not accelerate launch or they do not parse."""
        if self.launcher != ACCELERATE:
            return None
        return _parse_accelerate(self.launcher_args)


def _classify(argv: tuple[str, ...]) -> tuple[str | None, tuple[str, ...]]:
    """(launcher, its arguments) from a command line: `accelerate launch ...`, `accelerate-launch
    ...`, `python -m accelerate.commands.launch ...` (or `-m shards.launch`, the Makefile's, which
    runs accelerate's launch in-process), `torchrun ...`, `python -m torch.distributed.run ...`
    (or `.launch`), with or without the interpreter in front."""
    for i, token in enumerate(argv[:4]):
        name = os.path.basename(token)
        prev = argv[i - 1] if i else ""
        if name == "accelerate" and i + 1 < len(argv) and argv[i + 1] == "launch":
            return ACCELERATE, argv[i + 2:]
        if name == "accelerate-launch" or (prev == "-m" and token in ("accelerate.commands.launch", "shards.launch")):
            return ACCELERATE, argv[i + 1:]
        if name == "torchrun" or (prev == "-m" and token in ("torch.distributed.run", "torch.distributed.launch")):
            return TORCHRUN, argv[i + 1:]
    return None, ()


@lru_cache(maxsize=64)
def _parse_accelerate(args: tuple[str, ...]) -> argparse.Namespace | None:
    try:
        from accelerate.commands.launch import launch_command_parser
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return launch_command_parser().parse_args(list(args))
    except (SystemExit, Exception):
        return None


def read_process(pid: int) -> Parent | None:
    """The command line and start-up environment of process `pid`, or None where /proc cannot
    tell (not Linux, the process is gone, or not ours)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    environ = {}
    for entry in env:
        name, eq, value = entry.partition(b"=")
        if eq:
            environ[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return Parent(argv=tuple(a.decode("utf-8", "replace") for a in argv if a), environ=environ)


@lru_cache(maxsize=1)
def parent_process() -> Parent | None:
    """This process's parent (see `read_process`); read once."""
    return read_process(os.getppid())


def launched(environ: Mapping[str, str]) -> bool:
    """Whether a launcher's variables are in `environ` (for wording only)."""
    return any(environ.get(name) for name in _LAUNCHED_BY)


# ---------------------------------------------------------------------------------------------
# OpenMP threads


def user_threads(environ: Mapping[str, str], parent: Parent | None) -> tuple[str | None, str]:
    """(the OMP_NUM_THREADS value the user chose, or None; a note for the log).

    Unset: (None, ""). Without a launcher it is the user's. Under one whose start-up environment
    had it, or accelerate launch given `--num_cpu_threads_per_process`, it is the user's too.
    Otherwise the launcher put it there on its own: (None, "<launcher> set OMP_NUM_THREADS=1 itself,
    not you"). `parent` None (unknown) under a launcher: taken as the user's, and the note says
    that this system cannot tell.
    """
    value = (environ.get("OMP_NUM_THREADS") or "").strip()
    if not value:
        return None, ""
    if parent is None:
        if launched(environ):
            return value, (f"OMP_NUM_THREADS={value}: yours or the launcher's default, which cannot be told apart "
                           "on this system")
        return value, f"OMP_NUM_THREADS={value}"
    if parent.launcher is None or (parent.environ.get("OMP_NUM_THREADS") or "").strip():
        return value, f"OMP_NUM_THREADS={value}"
    options = parent.accelerate_options()
    if options is not None and options.num_cpu_threads_per_process is not None:
        return value, f"accelerate launch --num_cpu_threads_per_process {options.num_cpu_threads_per_process}"
    return None, f"{parent.launcher} set OMP_NUM_THREADS={value} itself, not you"


# ---------------------------------------------------------------------------------------------
# Mixed precision


def accelerate_default_config(environ: Mapping[str, str]) -> Path:
    """The config file `accelerate config` writes and `accelerate launch` reads by default:
    $HF_HOME/accelerate/default_config.yaml, HF_HOME defaulting to $XDG_CACHE_HOME/huggingface
    (XDG_CACHE_HOME to ~/.cache). Whether or not it exists."""
    home = environ.get("HF_HOME") or os.path.join(environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "accelerate" / "default_config.yaml"


def config_file_precision(path: Path) -> str | None:
    """The mixed precision an accelerate config file sets ("no", "fp16", "bf16", ...; its legacy
    `fp16: true` as "fp16"), or None when it sets none. Raises OSError / ValueError when unreadable."""
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".json"):
        data = json.loads(text)  # JSONDecodeError is a ValueError
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"not valid YAML: {e}") from None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping, got {type(data).__name__}")
    value = data.get("mixed_precision") or ("fp16" if data.get("fp16") else None)
    return None if value is None else str(value).lower()


def accelerate_precision(parent: Parent) -> tuple[str, str] | None:
    """(precision, where it came from) as accelerate launch decided it from its arguments and
    config file (see the module docstring), or None when its arguments cannot be read."""
    options = parent.accelerate_options()
    if options is None:
        return None
    if options.mixed_precision:
        return str(options.mixed_precision).lower(), "accelerate launch --mixed_precision"
    if options.config_file is not None:
        path, how = Path(options.config_file).expanduser(), "accelerate launch --config_file"
    else:
        path, how = accelerate_default_config(parent.environ), "accelerate launch's default config file"
        if not path.is_file() or options.cpu:  # accelerate reads it only then
            return "no", "accelerate launch's default: no --mixed_precision and no accelerate config file"
    try:
        value = config_file_precision(path)
    except (OSError, ValueError):
        return None
    if value is None:
        return "no", f"accelerate launch's default: neither --mixed_precision nor its config file {path} sets one"
    return value, f"the accelerate config file {path} ({how})"


__all__ = ["ACCELERATE", "TORCHRUN", "Parent", "accelerate_default_config", "accelerate_precision",
           "config_file_precision", "launched", "parent_process", "read_process", "user_threads"]
