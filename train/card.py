"""What a finished run leaves for people: the model card (README.md) and the loss curve.

The card says what the adapter was trained from (base model, the cache's manifest id and
location), how (the resolved config), what came out (summary numbers: the validation loss and the
condition adherence, best and last, and which weights they measured; the last validation grids,
the loss curve with the validation loss on it) and how to use it with
`StableDiffusionXLAdapterPipeline`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

LOSS_CURVE_FILE = "loss_curve.png"
README_FILE = "README.md"


def curve_points(metrics: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of every record with a finite number under `key` ("loss", "validation_loss",
    "adherence")."""
    return [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]


def moving_average(values: list[float]) -> list[float]:
    """The exponential moving average the loss curve draws (span ~ a tenth of the points, 2..100)."""
    alpha = 2.0 / (min(100, max(2, len(values) // 10)) + 1)
    ema, smoothed = values[0], []
    for v in values:
        ema = alpha * v + (1 - alpha) * ema
        smoothed.append(ema)
    return smoothed


def plot_loss_curve(metrics: list[dict], out_png: str | Path) -> Path | None:
    """Per-step loss (faint) and its exponential moving average, log-scaled when it spans decades;
    the validation loss (markers) on the same axis, the condition adherence on a second one."""
    points = curve_points(metrics, "loss")
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display here; must be set before pyplot is imported
    import matplotlib.pyplot as plt

    steps, losses = zip(*points)
    smoothed = moving_average(list(losses))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    ax.plot(steps, smoothed, color="tab:blue", linewidth=1.8, label="moving average")
    validation = curve_points(metrics, "validation_loss")
    if validation:
        ax.plot(*zip(*validation), color="tab:orange", marker="o", markersize=4, linewidth=1.5,
                label="validation loss (fixed timesteps and noise)")
    positive = [v for v in list(losses) + [v for _, v in validation] if v > 0]
    if positive and max(positive) / min(positive) > 30:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (sigma^-2 weighted, = epsilon MSE)")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    adherence = curve_points(metrics, "adherence")
    if adherence:
        ax2 = ax.twinx()
        ax2.plot(*zip(*adherence), color="tab:green", marker="s", markersize=4, linewidth=1.2, linestyle="--",
                 label="condition adherence (edge F1)")
        ax2.set_ylabel("condition adherence (edge F1)")
        ax2.set_ylim(0, 1)
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def model_card(
    *,
    base_model: str,
    cache_url: str,
    manifest_id: str,
    config: dict[str, Any],
    summary: dict[str, Any],
    validation_grids: list[str],
    prompts: list[str],
    loss_curve: str | None,
    validation_sheet: str | None = None,
) -> str:
    """README.md text (YAML front matter + markdown). Paths are relative to the output folder."""
    front = [
        "---",
        f"base_model: {json.dumps(base_model)}",
        "library_name: diffusers",
        "tags:",
        "- stable-diffusion-xl",
        "- stable-diffusion-xl-diffusers",
        "- text-to-image",
        "- diffusers",
        "- t2i-adapter",
        "---",
        "",
    ]
    body = [
        "# T2I-Adapter for SDXL",
        "",
        f"A T2I-Adapter trained on top of `{base_model}` from a precomputed cache.",
        "",
        "## Training data",
        "",
        f"- cache: `{cache_url}`",
        f"- cache manifest id (sha256 of `manifest.json`): `{manifest_id}`",
        "",
        "## Summary",
        "",
    ]
    body += [f"- {k.replace('_', ' ')}: {v}" for k, v in summary.items()]
    body.append("")
    if validation_sheet:
        body += ["## Validation images", "", "The last validation, labelled: per prompt, the conditioning image, "
                 "then samples.", "", f"![validation images]({validation_sheet})", ""]
    if validation_grids:
        body += ["## Validation", "", "Each row: the conditioning image, then samples.", ""]
        for path, prompt in zip(validation_grids, prompts):
            body += [f"**{prompt}**", "", f"![{prompt}]({path})", ""]
    if loss_curve:
        body += ["## Loss", "", f"![loss curve]({loss_curve})", ""]
    body += [
        "## Use",
        "",
        "```python",
        "import torch",
        "from diffusers import StableDiffusionXLAdapterPipeline, T2IAdapter",
        "from diffusers.utils import load_image",
        "",
        'adapter = T2IAdapter.from_pretrained("path/to/this/folder", torch_dtype=torch.float16)',
        "pipe = StableDiffusionXLAdapterPipeline.from_pretrained(",
        f'    "{base_model}", adapter=adapter, torch_dtype=torch.float16',
        ').to("cuda")',
        'image = pipe("a prompt", image=load_image("condition.png")).images[0]',
        "```",
        "",
        "## Resolved training config",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    return "\n".join(front + body)


def quality_summary(measured: dict[str, Any], *, validation: dict | None, ema_decay: float | None, save_ema: bool,
                    adherence_method: str | None) -> dict[str, str]:
    """The card's summary lines about how good the adapter is: which weights the folder holds and
    the evaluations measured, the validation loss and the condition adherence (best and last)."""
    lines: dict[str, str] = {}
    if ema_decay is not None:
        lines["weights"] = (f"this folder's adapter is the EMA of the trained weights (decay {ema_decay:g})"
                            if save_ema else f"this folder's adapter is the trained weights; their EMA (decay "
                            f"{ema_decay:g}) is in ema/") + "; validation images and loss use the EMA weights"
    loss = measured.get("validation_loss")
    if loss:
        where = f"{validation['images']} image(s), {validation['source']}" if validation else "validation set"
        lines["validation_loss"] = (f"last {loss['last']:.6f} (step {loss['last_step']}), best {loss['best']:.6f} "
                                    f"(step {loss['best_step']}); {where}, {validation['timesteps'] if validation else '?'}"
                                    f" fixed timesteps, {loss['weights']} weights")
    elif validation is None:
        lines["validation_loss"] = "not measured (train with --validation-split or --validation-cache)"
    adherence = measured.get("adherence")
    if adherence:
        lines["condition_adherence"] = (f"last {adherence['last']:.4f} (step {adherence['last_step']}), best "
                                        f"{adherence['best']:.4f} (step {adherence['best_step']}); edge F1 of the "
                                        f"validation images, {adherence_method}, {adherence['weights']} weights")
    elif adherence_method is None:
        lines["condition_adherence"] = ("not measured: the cache's conditioning images are not computed edges "
                                        "(precompute --condition canny or sketch)")
    else:
        lines["condition_adherence"] = ("not measured: no validation images (--validation-image and "
                                        "--validation-prompt, or --validation-file)")
    return lines
