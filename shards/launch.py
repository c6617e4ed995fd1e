"""`python -m shards.launch ARGS`: `accelerate launch ARGS`, ending a failed run with one line.

`make precompute` and `make train` start several processes (NPROC x NNODES > 1) through this.
It runs accelerate's own launch command in this process, so everything accelerate does is done
as `accelerate launch` does it (the same parser, environment, torch elastic agent; the ranks are
its children as they are accelerate's), with four differences. On a machine without CUDA the
ranks are gloo processes on the CPU (ACCELERATE_USE_CPU=true, which accelerate needs for
separate CPU processes), unless the environment sets ACCELERATE_USE_CPU itself; and in what
reaches the terminal:

- when a rank fails, each rank has already said why in its own words; accelerate would then
  print the agent's traceback and failure report (some 40 lines). Here: one line naming the
  rank that failed first and how it ended, and this process exits with that rank's status
  (128 + N for a rank killed by signal N, as a shell reports it);
- the agent's per-process log lines ("Sending process N closing signal SIGTERM", "failed
  (exitcode: 1)") are left out: that line says the same;
- accelerate's warning that some of its options took defaults is left out: the stages log the
  choices that matter (threads, precision and where each came from) themselves.

Anything else (a bad launch option, a rendezvous that times out) is accelerate's or torch's own
error, shown as one line too. A process that uses `accelerate launch` directly is not affected.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys

# Whose log lines about the ranks' processes the summary line replaces.
_AGENT_LOGGER = "torch.distributed.elastic.multiprocessing.api"
_DEFAULTS_WARNING = "The following values were not passed to `accelerate launch`"


class _DropDefaultsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_DEFAULTS_WARNING)


def how_it_ended(exitcode: int) -> tuple[str, int]:
    """(words, shell status) for a rank's exit code as torch elastic reports it: negative for a
    signal. SIGKILL is mostly the kernel's out-of-memory killer, and said so."""
    if exitcode >= 0:
        return f"exited with status {exitcode}", exitcode
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    hint = " (often the kernel's out-of-memory killer: see `dmesg`)" if -exitcode == signal.SIGKILL else ""
    return f"was killed by {name}{hint}", 128 - exitcode


def failure_line(error: BaseException) -> tuple[str, int]:
    """The one line (and exit status) for a launch that raised `error`."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if isinstance(error, ChildFailedError) and error.failures:
        rank, failure = error.get_first_failure()
        words, status = how_it_ended(failure.exitcode)
        said = "its message is above" if failure.exitcode >= 0 else "a process killed so leaves no message of its own"
        rest = "; the other ranks ended with it" if len(error.failures) > 1 else ""
        return f"error: the run stopped: rank {rank} {words}, the first to fail ({said}){rest}", status or 1
    text = " ".join(str(error).split()) or type(error).__name__
    return f"error: accelerate launch failed: {text}", 1


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser

    parser = launch_command_parser()
    parser.prog = "python -m shards.launch"
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if "ACCELERATE_USE_CPU" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"
    logging.getLogger("accelerate.commands.launch").addFilter(_DropDefaultsWarning())
    importlib.import_module(_AGENT_LOGGER)  # it sets its logger's level when imported: after that, ours
    logging.getLogger(_AGENT_LOGGER).setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except SystemExit as e:  # accelerate's own exits (130 on Ctrl-C, 128 + N on a signal)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the ranks' failure, or the launch's own (rendezvous, options)
        line, status = failure_line(e)
        print(line, file=sys.stderr, flush=True)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
