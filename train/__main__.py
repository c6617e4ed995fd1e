"""`python -m train`: the command line over TrainConfig.

Every option is generated from a TrainConfig field (`shards.options`), so `--help` documents every
knob and cannot drift from the config; `--config FILE` reads them from TOML/YAML/JSON. The
reference script's options (diffusers' train_t2i_adapter_sdxl.py) work as it spells them:
underscores, its names where ours differ, `--validation_image a.png b.png`. Its options that
belong to precompute are refused naming precompute; the few with no effect here are accepted with
a line saying why. Launch several processes with `accelerate launch` or `torchrun`; the options
are the same.

User errors (bad settings, a cache that does not fit the model, an unusable checkpoint, a damaged
shard) print one message and exit with status 1, without a traceback (`shards.runtime`).

Two commands read finished runs instead of training: `python -m train compare RUN...` and
`python -m train summary RUN` (`train.compare`). They are picked by the first argument, before the
training command parses anything, so training's own options and spellings are untouched (training
takes no positional argument).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import click

from shards.options import Foreign, config_command
from train.config import TrainConfig

_FIXED_AT_PRECOMPUTE = ("is fixed at precompute: the cache holds what precompute encoded (see `python -m shards "
                        "stats CACHE`); pass it to `python -m precompute`, and train reads the result from the "
                        "cache's manifest")
_DATASET = ("belongs to precompute, which reads the dataset once into the cache; train reads only the cache "
            "(--cache). Pass it to `python -m precompute`")

# Options of the reference script and of precompute that train does not take, with why.
FOREIGN = {
    "resolution": Foreign(_FIXED_AT_PRECOMPUTE),
    # Reference options that have no effect in either stage: accepted with one line, as precompute does.
    **{name: Foreign("each sample's crop_top_left (SDXL's micro-conditioning) comes from the crop precompute made, "
                     "recorded in the cache", accepted=True)
       for name in ("crops_coords_top_left_h", "crops_coords_top_left_w")},
    "detection_resolution": Foreign("the conditioning images are the cache's, taken (or computed, precompute's "
                                    "--condition) at the training geometry", accepted=True),
    **{name: Foreign(_DATASET) for name in (
        "dataset_name", "dataset_config_name", "dataset_revision", "dataset_split", "train_data_dir", "data",
        "data_kind", "image_column", "conditioning_image_column", "caption_column")},
    **{name: Foreign(_FIXED_AT_PRECOMPUTE) for name in (
        "buckets", "bucket_step", "crop", "crops", "min_size", "max_aspect", "condition", "canny_low", "canny_high",
        "samples_per_shard", "latent_store", "storage_dtype", "vae_dtype", "text_dtype", "tmp_dir", "device",
        "max_input_bytes", "max_image_pixels", "max_caption_chars", "max_json_bytes", "max_json_depth",
        "source_fingerprint")},
    **{name: Foreign(_FIXED_AT_PRECOMPUTE, takes_value=False) for name in (
        "flip", "condition_soft", "allow_empty_captions", "follow_symlinks", "strict", "rebuild_stale",
        "verify_existing", "dedupe", "compile_vae")},
    "trust_remote_code": Foreign("train reads only the cache; precompute reads datasets from their data files, and "
                                 "no dataset script is ever run", takes_value=False, accepted=True),
    "enable_xformers_memory_efficient_attention": Foreign(
        "attention runs through PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels), which "
        "is what xformers gave the reference", takes_value=False, accepted=True),
    "set_grads_to_none": Foreign("gradients are always set to None between steps (optimizer.zero_grad(set_to_none="
                                 "True))", takes_value=False, accepted=True),
    "tokenizer_name": Foreign("train uses MODEL's tokenizers (to embed the validation prompts) and checks them "
                              "against the ones the cache was encoded with", accepted=True),
}


def user_message(error: BaseException) -> str:
    """The message to print for a user-facing error, without any traceback.

    An error raised in a DataLoader worker reaches the training process re-raised by torch with
    its type kept and its message replaced by "Caught ShardError in DataLoader worker process 0.
    Original Traceback (most recent call last): ... shards.errors.ShardError: <message>": the
    original message is what follows the traceback's last "ShardError: " line.
    """
    text = str(error)
    if not text.startswith("Caught ") or "Traceback (most recent call last)" not in text:
        return text
    name = re.escape(type(error).__name__)
    found = list(re.finditer(rf"^(?:[\w.]+\.)?{name}: ", text, flags=re.MULTILINE))
    return text[found[-1].end():].strip() if found else text


@config_command(
    TrainConfig, name="train", foreign=FOREIGN, sections={"resolved": None},
    epilog="Example: python -m train --model stabilityai/stable-diffusion-xl-base-1.0 --cache cache/mine "
           "--output-dir runs/canny-1 --max-steps 20000 --batch-size 16 --learning-rate 1e-5 "
           "--mixed-precision bf16 --validation-image a.png --validation-prompt 'a house'. "
           "Continue a run: the same command with --resume latest. Repeat one: --config runs/canny-1/train_config.json.",
)
def main(config: tuple[str, ...] = (), **options: Any) -> None:
    """Train a T2I-Adapter for SDXL from a precomputed cache (see `python -m precompute`).

    Loads only the frozen UNet and the adapter; the cache supplies latents and prompt
    embeddings. Writes a diffusers adapter folder (T2IAdapter.from_pretrained(OUTPUT_DIR)).
    """
    from shards.errors import ShardError
    from shards.runtime import run_command
    from train.errors import TrainError
    from train.loop import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # Our own progress bar is the one to watch; the libraries' per-file loading bars are noise.
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    # transformers' notices (an image processor falling back to PIL without torchvision, loaded
    # only for validation) are not about this run; its errors still show.
    transformers.utils.logging.set_verbosity_error()
    _command_line_length_wins(options)
    cfg = TrainConfig(**options)
    run_command(lambda: train(cfg), user_errors=(TrainError, ShardError),
                message=user_message, continue_hint="continue with --resume latest (the newest complete checkpoint)")


def _command_line_length_wins(options: dict[str, Any]) -> None:
    """--num-epochs typed on the command line beats the --max-steps of a --config file (a preset
    sets max-steps; flags override the file, and max-steps would otherwise override the flag)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    if (ctx.get_parameter_source("num_epochs") == ParameterSource.COMMANDLINE
            and ctx.get_parameter_source("max_steps") == ParameterSource.DEFAULT_MAP
            and options.get("max_steps") is not None):
        from shards.options import _main_process

        if _main_process():  # said once, not by every rank
            logging.getLogger("train").info("--num-epochs %s from the command line: the config file's max-steps %s is "
                                            "not used", options["num_epochs"], options["max_steps"])
        options["max_steps"] = None


TOOLS = ("compare", "summary")  # `python -m train <tool> ...`: train.compare


def dispatch(argv: list[str]) -> None:
    """`python -m train`: a run-reading tool when the first argument names one, else training."""
    if argv and argv[0] in TOOLS:
        from train.compare import main as tools

        tools(argv)
    else:
        main(args=argv, prog_name="python -m train")


if __name__ == "__main__":
    import sys

    dispatch(sys.argv[1:])
