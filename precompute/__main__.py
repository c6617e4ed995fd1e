"""`python -m precompute`: encode a dataset into a cache of WebDataset shards.

One flag per `PrecomputeConfig` field, generated from it (`shards.options`); `--config FILE`
reads them from TOML/YAML/JSON (a cache's manifest.json is one: its `config` section). The
reference script's options work as it spells them (underscores, `--pretrained_model_name_or_path`,
`--train_data_dir`, `--dataset_name`, ...); its training options are refused naming train, the
few with no effect here accepted with a line saying why. The CLI only parses, builds the config
and calls `runner.run`. Run it under `accelerate launch` (or torchrun) for several processes; each
takes a disjoint set of output shards. User errors (bad settings, unreadable inputs, a cache
written with other settings, --strict skips) print one message and exit with status 1, without a
traceback (`shards.runtime`).
"""

from __future__ import annotations

import logging
import os

import click

from precompute.config import PrecomputeConfig
from precompute.errors import PrecomputeError
from shards.errors import ShardError
from shards.options import Foreign, config_command

# Errors that mean "the input, the settings or the storage is wrong", not "the code is": one
# message, no traceback. The two roots: precompute's own (settings, sources, models, encoders)
# and the cache's (a store failing past its retries, wrong credentials, a manifest or identity
# that differs, another writer's lock or bytes under a shard's name).
USER_ERRORS = (PrecomputeError, ShardError)

_TRAIN = ("belongs to train: precompute only encodes the dataset into the cache. Pass it to `python -m train` "
          "(changing it never re-encodes the cache)")
_TRAIN_FLAGS = ("gradient_checkpointing", "scale_lr", "use_8bit_adam", "allow_tf32", "push_to_hub", "hub_public",
                "log_samples", "accept_encoder_mismatch", "compile", "channels_last", "fused_adamw", "no_fused_adamw",
                "prefetch", "no_prefetch", "save_ema")
_TRAIN_VALUES = (
    "output_dir", "adapter", "adapter_model_name_or_path", "train_batch_size", "num_epochs", "num_train_epochs",
    "max_steps", "max_train_steps", "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps",
    "lr_num_cycles", "lr_power", "lr_step_rules", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
    "max_grad_norm", "mixed_precision", "checkpointing_steps", "checkpoints_total_limit", "resume",
    "resume_from_checkpoint", "validation_image", "validation_prompt", "num_validation_images", "validation_steps",
    "validation_inference_steps", "validation_guidance_scale", "validation_resolution", "report_to",
    "tracker_project_name", "logging_dir", "log_every", "ddp_timeout_minutes", "hub_model_id", "hub_token",
    "local_cache", "local_cache_max", "shuffle_buffer", "caption_dropout", "proportion_empty_prompts",
    "soft_threshold_range", "dataloader_num_workers", "attention", "ema_decay", "ema_warmup_steps", "validation_cache",
    "validation_file", "validation_loss_steps", "validation_loss_timesteps", "validation_split")

# Options of the reference script and of train that precompute does not take, with why.
FOREIGN = {
    **{name: Foreign(_TRAIN) for name in _TRAIN_VALUES},
    **{name: Foreign(_TRAIN, takes_value=False) for name in _TRAIN_FLAGS},
    "enable_xformers_memory_efficient_attention": Foreign(
        "it is a training option, and the encoders run PyTorch's scaled_dot_product_attention anyway",
        takes_value=False, accepted=True),
    "set_grads_to_none": Foreign("it is a training option (and train always sets gradients to None)",
                                 takes_value=False, accepted=True),
    "tokenizer_name": Foreign("precompute uses MODEL's own tokenizers and records their fingerprints in the cache, "
                              "which train checks", accepted=True),
    "crops_coords_top_left_h": Foreign("each sample records its own crop_top_left (SDXL's micro-conditioning) "
                                       "from the crop precompute made", accepted=True),
    "crops_coords_top_left_w": Foreign("each sample records its own crop_top_left (SDXL's micro-conditioning) "
                                       "from the crop precompute made", accepted=True),
    "detection_resolution": Foreign("conditioning images are taken (or computed, --condition) at the training "
                                    "geometry", accepted=True),
    "trust_remote_code": Foreign("datasets are read from their data files (parquet, arrow, images); no dataset "
                                 "script is ever run", takes_value=False, accepted=True),
}


@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@config_command(
    PrecomputeConfig, name="precompute", foreign=FOREIGN, sections={"config": "config"},
    epilog="""
\b
Examples:
  python -m precompute --model stabilityai/stable-diffusion-xl-base-1.0 --data data/fill50k \\
      --cache cache/fill50k --vae madebyollin/sdxl-vae-fp16-fix --vae-dtype fp16
  python -m precompute --model ... --dataset-name fusing/fill50k --cache cache/fill50k
  accelerate launch --multi_gpu --num_processes 8 -m precompute --model ... --data ... --cache ...

Re-running the same command resumes: complete shards are kept, the rest are (re)built. A cache
written with another model or other byte-changing settings is refused. --config CACHE/manifest.json
repeats the settings a cache was made with (give --cache and --data again).
""")
def main(config: tuple[str, ...] = (), verbose: bool = False, **options) -> None:
    """Encode images, conditioning images and captions with SDXL's VAE and text encoders into a cache
    of WebDataset shards (latent mean/std, prompt embeddings, conditioning PNG, micro-conditioning)
    that `python -m train` reads."""
    cfg = PrecomputeConfig(**options)  # normalises "--max-aspect 0" and "--buckets none"
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        # Library chatter (weight loading bars, processor notices) drowns our own log.
        for noisy in ("transformers", "diffusers", "accelerate", "urllib3", "filelock", "PIL", "datasets"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # datasets reads this when a Hugging Face source imports it (importing it here, for a
        # folder or tars, would cost half a second); a value the user set is kept.
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
            from diffusers.utils import logging as df_logging

            df_logging.disable_progress_bar()
            df_logging.set_verbosity_error()
        except Exception:  # pragma: no cover - optional niceties
            pass

    from precompute.runner import run
    from shards.runtime import run_command

    run_command(lambda: run(cfg), user_errors=USER_ERRORS,
                continue_hint="re-run the same command: complete shards are kept, the rest are rebuilt")


if __name__ == "__main__":
    main()
