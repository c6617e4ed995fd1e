"""`python -m train`: the command line over TrainConfig.

Every option is generated from a TrainConfig field (its name, type, default, choices and help), so
`--help` documents every knob and cannot drift from the config. The reference script's option
names (diffusers' train_t2i_adapter_sdxl.py) are accepted as aliases where ours differ. Launch
several processes with `accelerate launch` or `torchrun`; the options are the same.

User errors (bad settings, a cache that does not fit the model, an unusable checkpoint, a damaged
shard) print one message and exit with status 1, without a traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import click

from train.config import ConfigError, TrainConfig

# Where our name differs from the reference script's, its name works too.
REFERENCE_ALIASES = {
    "model": ["--pretrained-model-name-or-path"],
    "vae": ["--pretrained-vae-model-name-or-path"],
    "adapter": ["--adapter-model-name-or-path"],
    "batch_size": ["--train-batch-size"],
    "num_epochs": ["--num-train-epochs"],
    "max_steps": ["--max-train-steps"],
    "max_samples": ["--max-train-samples"],
    "caption_dropout": ["--proportion-empty-prompts"],
    "num_workers": ["--dataloader-num-workers"],
    "resume": ["--resume-from-checkpoint"],
}

_TYPES = {"int": int, "float": float, "str": str}


def user_message(error: BaseException) -> str:
    """The message to print for a user-facing error, without any traceback.

    An error raised in a DataLoader worker reaches the training process re-raised by torch with
    its type kept and its message replaced by "Caught ShardError in DataLoader worker process 0.
    Original Traceback (most recent call last): ... shards.reader.ShardError: <message>": the
    original message is what follows the traceback's last "ShardError: " line.
    """
    text = str(error)
    if not text.startswith("Caught ") or "Traceback (most recent call last)" not in text:
        return text
    name = re.escape(type(error).__name__)
    found = list(re.finditer(rf"^(?:[\w.]+\.)?{name}: ", text, flags=re.MULTILINE))
    return text[found[-1].end():].strip() if found else text


def _option(f: dataclasses.Field) -> Any:
    meta = f.metadata
    names = [f"--{f.name.replace('_', '-')}", *REFERENCE_ALIASES.get(f.name, [])]
    kwargs: dict[str, Any] = {"help": meta["help"], "show_default": True}
    type_name = str(f.type).split("|")[0].strip()
    if type_name == "bool":
        kwargs.update(is_flag=True, default=f.default)
    elif meta.get("multiple"):
        kwargs.update(multiple=True, type=str, default=())
        kwargs["show_default"] = False
    else:
        kwargs["type"] = click.Choice(meta["choices"]) if "choices" in meta else _TYPES[type_name]
        if meta.get("required"):
            kwargs["required"] = True
            kwargs["show_default"] = False
        else:
            kwargs["default"] = f.default
    return click.option(*names, f.name, **kwargs)


def _with_config_options(fn):
    for f in reversed(dataclasses.fields(TrainConfig)):
        fn = _option(f)(fn)
    return fn


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog="Example: python -m train --model stabilityai/stable-diffusion-xl-base-1.0 --cache cache/mine "
           "--output-dir runs/canny-1 --max-steps 20000 --batch-size 16 --learning-rate 1e-5 "
           "--mixed-precision bf16 --validation-image a.png --validation-prompt 'a house'. "
           "Continue a run: the same command with --resume latest.",
)
@_with_config_options
def main(**options: Any) -> None:
    """Train a T2I-Adapter for SDXL from a precomputed cache (see `python -m precompute`).

    Loads only the frozen UNet and the adapter; the cache supplies latents and prompt
    embeddings. Writes a diffusers adapter folder (T2IAdapter.from_pretrained(OUTPUT_DIR)).
    """
    from shards.manifest import ManifestError
    from shards.reader import ShardError
    from train.checkpoint import CheckpointError
    from train.checks import StartupError
    from train.loop import TrainError, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # Our own progress bar is the one to watch; the libraries' per-file loading bars are noise.
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    from shards.runtime import run_command

    cfg = TrainConfig(**options)
    run_command(lambda: train(cfg), user_errors=(ConfigError, StartupError, CheckpointError, TrainError,
                                                 ManifestError, ShardError),
                message=user_message, continue_hint="continue with --resume latest (the newest complete checkpoint)")


if __name__ == "__main__":
    main()
