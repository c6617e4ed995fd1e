"""What a finished run leaves for people: the model card (README.md) and the loss curve.

The card says what the adapter was trained from (base model, the cache's manifest id and
location), how (the resolved config), what came out (summary numbers, the last validation grids,
the loss curve) and how to use it with `StableDiffusionXLAdapterPipeline`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

LOSS_CURVE_FILE = "loss_curve.png"
README_FILE = "README.md"


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics: list[dict], out_png: str | Path) -> Path | None:
    """Per-step loss (faint) and its exponential moving average, log-scaled when it spans decades."""
    points = [(m["step"], m["loss"]) for m in metrics if isinstance(m.get("loss"), (int, float))
              and math.isfinite(m["loss"])]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display here; must be set before pyplot is imported
    import matplotlib.pyplot as plt

    steps, losses = zip(*points)
    alpha = 2.0 / (min(100, max(2, len(losses) // 10)) + 1)
    ema, smoothed = losses[0], []
    for v in losses:
        ema = alpha * v + (1 - alpha) * ema
        smoothed.append(ema)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    ax.plot(steps, smoothed, color="tab:blue", linewidth=1.8, label="moving average")
    positive = [v for v in losses if v > 0]
    if positive and max(positive) / min(positive) > 30:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (sigma^-2 weighted, = epsilon MSE)")
    ax.grid(True, alpha=0.3)
    ax.legend()
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
