"""Many runs, one cache: `python -m train compare RUN...` and `python -m train summary RUN`.

A finished run folder holds `train_config.json` (every setting, and under `resolved` what start-up
decided and what the run measured: `resolved.results`) and `logs/metrics.jsonl` (the per-step loss
and the evaluations). `Run.load` reads one, with a message naming what is missing when the folder
is not a finished run.

- `compare` prints one table row per run: steps, samples, the validation loss (best, with its step,
  and last), the condition adherence (best and last), the median training throughput (samples/s),
  and every setting that differs between the runs; and writes one PNG with each run's loss
  (moving average, solid) and validation loss (dashed, markers) overlaid. Runs of different caches
  (manifest ids) are refused unless --allow-different-caches: their numbers measure different
  data. Validation losses are comparable only on the same validation set (the same cache, the same
  --validation-split or --validation-cache); a note says so when the sets differ.
- `summary` prints a run's last validation loss and adherence in two lines (the `make demo`
  summary uses it).

`python -m train compare ...` reaches this module through `train/__main__.py`, which hands it
the arguments when the first one is `compare` or `summary`; `python -m train.compare ...` is the
same command.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from train.errors import TrainError

COMPARE_PNG = "compare.png"
# Settings that say where a run went or how it was logged, not how it trained.
NOT_COMPARED = frozenset({
    "output_dir", "resume", "logging_dir", "report_to", "tracker_project_name", "log_every", "log_samples",
    "push_to_hub", "hub_model_id", "hub_token", "hub_public", "local_cache", "local_cache_max", "cache_dir",
    "ddp_timeout_minutes", "checkpointing_steps", "checkpoints_total_limit", "cache",
})


class RunError(TrainError):
    """A folder that is not a finished run (the message says what is missing)."""


@dataclass
class Run:
    path: Path
    settings: dict[str, Any]  # train_config.json without "resolved"
    resolved: dict[str, Any]
    metrics: list[dict]
    label: str = ""  # set by `compare` when runs share a folder name

    @property
    def name(self) -> str:
        return self.label or self.path.name or str(self.path)

    @property
    def manifest_id(self) -> str:
        return str(self.resolved.get("manifest_id"))

    @classmethod
    def load(cls, path: str | Path) -> "Run":
        from train.checkpoint import step_folders
        from train.metrics import LOGS_DIR, METRICS_FILE, read_jsonl, unreadable_note
        from train.outputs import TRAIN_CONFIG_FILE

        path = Path(path)
        if not path.exists():
            raise RunError(f"{path}: no such folder")
        if not path.is_dir():
            raise RunError(f"{path} is not a folder (give a training run's --output-dir)")
        config_file = path / TRAIN_CONFIG_FILE
        if not config_file.is_file():
            if step_folders(path):
                raise RunError(f"{path} is a run that has not finished: it has checkpoints but no {TRAIN_CONFIG_FILE} "
                               "(written at the end); finish it with the same command and --resume latest")
            raise RunError(f"{path} is not a training run (no {TRAIN_CONFIG_FILE}; `python -m train` writes it "
                           "at the end of a run)")
        try:
            data = json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise RunError(f"{config_file} is unreadable ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("resolved"), dict) \
                or not data["resolved"].get("manifest_id"):
            raise RunError(f"{config_file} has no resolved.manifest_id: not written by `python -m train` at the end of "
                           "a run")
        try:
            good, bad = read_jsonl(path / LOGS_DIR / METRICS_FILE)
        except OSError as e:
            raise RunError(f"{path / LOGS_DIR / METRICS_FILE} is unreadable ({e})") from None
        if bad:
            click.echo(f"note: {unreadable_note(path / LOGS_DIR / METRICS_FILE, bad)}", err=True)
        metrics = [record for _, record in good]
        resolved = data.pop("resolved")
        return cls(path=path, settings=data, resolved=resolved, metrics=metrics)

    def stale_note(self) -> str | None:
        """A line when the run's log goes past what train_config.json records: a resume of the
        run is going on, or stopped before it finished, and the saved figures are older."""
        recorded = self.results().get("global_step")
        logged = max((m["step"] for m in self.metrics if isinstance(m.get("step"), int)), default=None)
        if not isinstance(recorded, int) or logged is None or logged <= recorded:
            return None
        return (f"note: {self.name}: its log goes on to step {logged}, past the {recorded} steps its train_config.json "
                "records (a resume is running, or stopped before it finished): the figures are those of step "
                f"{recorded}")

    def results(self) -> dict[str, Any]:
        """What the run measured: `resolved.results`, or (for runs written before it existed) the
        same figures from metrics.jsonl."""
        from train.metrics import step_records
        from train.outputs import results

        saved = self.resolved.get("results")
        if isinstance(saved, dict):
            return saved
        steps = step_records(self.metrics)
        return {"global_step": steps[-1]["step"] if steps else 0, "samples_seen": None, **results(self.metrics)}


# ---------------------------------------------------------------------------------------------
# Formatting


def _number(value: Any, digits: int = 4) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"


def _best_last(found: dict | None, digits: int) -> tuple[str, str]:
    if not found:
        return "-", "-"
    return (f"{_number(found['best'], digits)} @{found['best_step']}", f"{_number(found['last'], digits)} "
            f"@{found['last_step']}")


def _value(value: Any) -> str:
    if value is None:
        return "-"  # unset, as the other empty cells
    if isinstance(value, list):
        return ",".join(_value(v) for v in value) or "()"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def differing_settings(runs: list[Run]) -> list[str]:
    """Names of the settings (and resolved facts: processes, effective learning rate) whose values
    differ between the runs, in config order."""
    names: list[str] = []
    for run in runs:
        names += [k for k in run.settings if k not in names]
    differ = [k for k in names if k not in NOT_COMPARED
              and len({json.dumps(r.settings.get(k), sort_keys=True) for r in runs}) > 1]
    for key in ("world_size", "effective_learning_rate"):
        if len({json.dumps(r.resolved.get(key)) for r in runs}) > 1:
            differ.append(f"resolved.{key}")
    return differ


def _setting(run: Run, name: str) -> Any:
    if name.startswith("resolved."):
        return run.resolved.get(name.split(".", 1)[1])
    return run.settings.get(name)


def table(runs: list[Run]) -> str:
    """The comparison as aligned text columns, one row per run."""
    differ = differing_settings(runs)
    header = ["run", "steps", "samples", "val loss best", "val loss last", "adherence best", "adherence last",
              "samples/s"] + [d.replace("resolved.", "") for d in differ]
    rows = [header]
    for run in runs:
        r = run.results()
        loss_best, loss_last = _best_last(r.get("validation_loss"), 6)
        adh_best, adh_last = _best_last(r.get("adherence"), 4)
        rows.append([run.name, str(r.get("global_step", "-")), str(r.get("samples_seen") or "-"), loss_best, loss_last,
                     adh_best, adh_last, _number(r.get("samples_per_s_median"), 1)]
                    + [_value(_setting(run, d)) for d in differ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def notes(runs: list[Run]) -> list[str]:
    """What the reader must know to read the table: validation sets or weights that differ."""
    out = []
    sets = {json.dumps((r.resolved.get("validation_set") or {}).get("set_id")) for r in runs
            if r.results().get("validation_loss")}
    if len(sets) > 1:
        out.append("note: the runs measured their validation loss on different validation sets (another "
                   "--validation-split or --validation-cache): those numbers do not compare")
    measures = {r.settings.get("validation_loss_timesteps") for r in runs if r.results().get("validation_loss")}
    if len(sets) == 1 and len(measures) > 1:
        out.append("note: the runs measured their validation loss at different numbers of timesteps "
                   "(--validation-loss-timesteps): those numbers do not compare")
    out += [n for n in (r.stale_note() for r in runs) if n]
    weights = {r.resolved.get("evaluated_weights") for r in runs if r.resolved.get("evaluated_weights")}
    if len(weights) > 1:
        out.append("note: some runs were evaluated with EMA weights and some with the trained weights (--ema-decay)")
    return out


def plot(runs: list[Run], out_png: str | Path) -> Path:
    """One PNG: every run's loss (moving average) and validation loss on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.card import curve_points, moving_average

    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        loss = curve_points(run.metrics, "loss")
        if loss:
            steps, values = zip(*loss)
            ax.plot(steps, moving_average(list(values)), color=colour, linewidth=1.5, label=f"{run.name}: loss")
        validation = curve_points(run.metrics, "validation_loss")
        if validation:
            ax.plot(*zip(*validation), color=colour, linestyle="--", marker="o", markersize=4, linewidth=1.5,
                    label=f"{run.name}: validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (sigma^-2 weighted, = epsilon MSE)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    out_png = output_path(out_png)
    try:
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png)
    except OSError as e:
        raise RunError(f"--output {out_png}: cannot write it ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return out_png


def output_path(output: str | Path) -> Path:
    """Where the curves go: `output`, with .png added when it has no extension (what matplotlib
    writes then); RunError for an image format matplotlib cannot write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(output).expanduser()
    if not out.suffix:
        return out.with_name(out.name + ".png")
    formats = FigureCanvasAgg.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:
        raise RunError(f"--output {output}: {out.suffix} is no image format this can write; use one of "
                       f"{', '.join('.' + f for f in sorted(formats))}")
    return out


def unique_labels(paths: list[Path]) -> list[str]:
    """A name per run: its folder's name, or as many of its last path parts as tell it apart
    from the others (x/run and y/run, not run twice)."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    labels = []
    for i, mine in enumerate(parts):
        others = [p for j, p in enumerate(parts) if j != i]
        n = 1
        while n < len(mine) and any(p[-n:] == mine[-n:] for p in others):
            n += 1
        labels.append(str(Path(*mine[-n:])))
    return labels


def compare(paths: list[str], *, output: str | Path = COMPARE_PNG, allow_different_caches: bool = False) -> str:
    """The text `compare` prints (and the PNG written to `output`); RunError for a folder that is
    not a finished run or for runs of different caches (unless allowed)."""
    output = output_path(output)  # a format it cannot write is said before any run is read
    runs = [Run.load(p) for p in paths]
    for run, label in zip(runs, unique_labels([r.path for r in runs])):
        run.label = label
    caches: dict[str, list[str]] = {}
    for run in runs:
        caches.setdefault(run.manifest_id, []).append(run.name)
    if len(caches) > 1 and not allow_different_caches:
        listing = "; ".join(f"{', '.join(names)}: cache manifest {mid[:16]}" for mid, names in caches.items())
        raise RunError(f"these runs trained on different caches ({listing}): their losses measure different data. "
                       "Pass --allow-different-caches to compare them anyway")
    lines = [table(runs), ""]
    if len(caches) > 1:
        lines.append("note: the runs trained on different caches (--allow-different-caches)")
    lines += notes(runs)
    lines.append(f"curves: {plot(runs, output)}")
    return "\n".join(lines)


def summary(path: str | Path) -> str:
    """Two lines about how good a run's adapter is: its last validation loss and adherence."""
    run = Run.load(path)
    r = run.results()
    weights = {"ema": "EMA weights", "raw": "trained weights"}
    loss = r.get("validation_loss")
    if loss:
        where = (run.resolved.get("validation_set") or {})
        loss_line = (f"{loss['last']:.6f} at step {loss['last_step']} (best {loss['best']:.6f} at step "
                     f"{loss['best_step']}; {where.get('images', '?')} image(s), {weights.get(loss['weights'])})")
    else:
        loss_line = "not measured (train with --validation-split or --validation-cache)"
    adherence = r.get("adherence")
    if adherence:
        adherence_line = (f"{adherence['last']:.4f} edge F1 at step {adherence['last_step']} (best "
                          f"{adherence['best']:.4f} at step {adherence['best_step']}; {weights.get(adherence['weights'])})")
    else:
        adherence_line = "not measured (needs validation images and a cache with --condition canny or sketch)"
    stale = run.stale_note()
    return f"  validation loss       {loss_line}\n  condition adherence   {adherence_line}" + (f"\n{stale}" if stale else "")


# ---------------------------------------------------------------------------------------------
# Command line


@click.group(name="python -m train", context_settings={"help_option_names": ["-h", "--help"],
                                                         "max_content_width": 110})
def tools() -> None:
    """Read finished training runs (`python -m train` itself trains)."""


@tools.command(name="compare")
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option("--output", "-o", default=COMPARE_PNG, show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the PNG with every run's loss and validation-loss curves.")
@click.option("--allow-different-caches", is_flag=True,
              help="Compare runs trained on different caches (refused by default: other data, other numbers).")
def compare_command(runs: tuple[str, ...], output: str, allow_different_caches: bool) -> None:
    """Compare finished runs on one cache: steps, samples, validation loss, condition adherence,
    throughput and the settings that differ; curves overlaid in one PNG."""
    _run(lambda: click.echo(compare(list(runs), output=output, allow_different_caches=allow_different_caches)))


@tools.command(name="summary")
@click.argument("run", metavar="RUN")
def summary_command(run: str) -> None:
    """Print a finished run's last validation loss and condition adherence."""
    _run(lambda: click.echo(summary(run)))


def _run(work) -> None:
    from shards.runtime import run_command

    run_command(work, user_errors=(TrainError,), continue_hint="run the same command again")


def main(args: list[str] | None = None) -> None:
    tools.main(args=sys.argv[1:] if args is None else args, prog_name="python -m train")


if __name__ == "__main__":
    main()


__all__ = ["Run", "RunError", "compare", "differing_settings", "main", "summary", "table", "tools"]
