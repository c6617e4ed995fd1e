"""`python -m precompute`: encode a dataset into a cache of WebDataset shards.

One flag per `PrecomputeConfig` field; the CLI only parses, builds the config and calls
`runner.run`. Run it under `accelerate launch` (or torchrun) for several processes; each takes a
disjoint set of output shards. User errors (bad settings, unreadable inputs, a cache written with
other settings, --strict skips) print one message and exit with status 2; no traceback.
"""

from __future__ import annotations

import logging
import sys

import click

from precompute.config import DATA_KINDS, DEVICES, ENCODE_DTYPES, PrecomputeConfig, PrecomputeError
from precompute.encoders import EncoderError, ModelLoadError
from precompute.conditions import METHODS
from precompute.preprocess import CROP_MODES
from precompute.sources import SourceError
from shards import schema
from shards.units import human_bytes, parse_size
from shards.manifest import ManifestError
from shards.reader import ShardError
from shards.store import PublishConflictError

# Errors that mean "the input, the settings or the storage is wrong", not "the code is": one
# message, no traceback. ShardError covers StoreError (a remote store failing past its retries,
# wrong credentials, a read-only store) and ManifestError is a ValueError listing differences.
# PublishConflictError: another writer published other bytes under a shard's name.
USER_ERRORS = (PrecomputeError, ModelLoadError, EncoderError, SourceError, ManifestError, ShardError,
               PublishConflictError)

class _Size(click.ParamType):
    """A byte count: 268435456, 256MiB, 1GB."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value, f"--{param.name.replace('_', '-')}" if param else None)
        except ValueError as e:
            self.fail(str(e), param, ctx)


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
D = PrecomputeConfig()  # the defaults, shown in --help


@click.command(context_settings=CONTEXT, epilog="""
\b
Examples:
  python -m precompute --model stabilityai/stable-diffusion-xl-base-1.0 --data data/fill50k \\
      --cache cache/fill50k --vae madebyollin/sdxl-vae-fp16-fix --vae-dtype fp16
  accelerate launch --multi_gpu --num_processes 8 -m precompute --model ... --data ... --cache ...

Re-running the same command resumes: complete shards are kept, the rest are (re)built. A cache
written with another model or other byte-changing settings is refused.
""")
@click.option("--model", default=D.model, metavar="ID|DIR",
              help="SDXL base model: a hub id or a local diffusers folder (vae, text_encoder(_2), tokenizer(_2)). "
                   "`make precompute` without MODEL builds and uses a tiny offline model.")
@click.option("--vae", default=D.vae, metavar="ID|DIR",
              help="Use this VAE instead of MODEL/vae, e.g. madebyollin/sdxl-vae-fp16-fix (needed for --vae-dtype fp16).")
@click.option("--revision", default=D.revision, help="Hub revision (branch, tag or commit) of --model.")
@click.option("--variant", default=D.variant, help="Weight file variant of --model, e.g. fp16 (model.fp16.safetensors).")
@click.option("--data", default=D.data, metavar="PATH",
              help="Dataset: a folder with metadata.jsonl/.json/.csv, fill50k's prompt.json or train.jsonl, a metadata "
                   "file, a .tar, a folder of .tar shards, a brace pattern like 'data/{00000..00009}.tar', or a Hugging "
                   "Face dataset: a save_to_disk folder, .parquet / .arrow files or a folder of them (data/train-*.parquet).")
@click.option("--dataset-name", default=D.dataset_name, metavar="ID|DIR",
              help="A Hugging Face dataset instead of --data: a hub id (e.g. fusing/fill50k) or a local dataset "
                   "folder, loaded with datasets.load_dataset. Columns default to image, conditioning_image, text.")
@click.option("--dataset-config-name", default=D.dataset_config_name, help="The dataset's configuration (subset).")
@click.option("--dataset-revision", default=D.dataset_revision, help="Hub revision (branch, tag or commit) of --dataset-name.")
@click.option("--dataset-split", default=D.dataset_split, show_default=True,
              help="Split of --dataset-name, of a DatasetDict save_to_disk folder or of a hub-layout folder in --data.")
@click.option("--cache-dir", default=D.cache_dir, metavar="DIR",
              help="The datasets / hub download cache for --dataset-name (and parquet conversion) [default: datasets' "
                   "own, ~/.cache/huggingface].")
@click.option("--cache", default=D.cache, metavar="DIR|s3://BUCKET/PREFIX",
              help="Where the cache is written: a local folder (created if needed), file://, or s3://bucket/prefix "
                   "(endpoint and credentials from the standard AWS variables or profile). https:// caches are "
                   "read-only: write to S3 and serve that.")
@click.option("--data-kind", type=click.Choice(DATA_KINDS), default=D.data_kind, show_default=True,
              help="Dataset format; auto decides from what --data holds.")
@click.option("--image-column", default=D.image_column, metavar="NAME",
              help="Folder: metadata column with the image path [default: image, else file_name; fill50k: target]. "
                   "WebDataset: image member suffixes, comma-separated [default: jpg,jpeg,png,webp]. Hugging Face "
                   "dataset: an Image, binary or path column [default: image].")
@click.option("--conditioning-image-column", default=D.conditioning_image_column, metavar="NAME",
              help="Folder: column with the conditioning image path [default: conditioning_image; fill50k: source]. "
                   "WebDataset: conditioning member suffixes [default: cond.png, conditioning.png, source.png, "
                   "control.png and their .jpg]. Hugging Face dataset: as --image-column [default: conditioning_image].")
@click.option("--caption-column", default=D.caption_column, metavar="NAME",
              help="Folder: caption column, a string or a list of strings [default: text; fill50k: prompt]. "
                   "WebDataset: caption member suffix or .json key [default: txt,caption,text]. Hugging Face dataset: "
                   "a string or list-of-strings column [default: text].")
@click.option("--max-samples", type=int, default=D.max_samples, help="Use only the first N source items.")
@click.option("--allow-empty-captions", is_flag=True, default=D.allow_empty_captions,
              help="Keep items without a caption (captioned \"\") instead of skipping them.")
@click.option("--max-input-bytes", type=_Size(), default=D.max_input_bytes,
              help=f"Largest input file or tar member read (e.g. 256MiB, 1GB); bigger ones are skipped as "
                   f"image_too_large / cond_too_large without being read whole [default: {human_bytes(D.max_input_bytes)}].")
@click.option("--max-image-pixels", type=int, default=D.max_image_pixels, show_default=True,
              help="Largest image (width x height), checked from the file header before decoding; bigger ones are "
                   "skipped as image_too_large / cond_too_large.")
@click.option("--follow-symlinks", is_flag=True, default=D.follow_symlinks,
              help="Read files whose real path is outside the dataset folder (symlinks pointing out, ../ paths, "
                   "absolute paths elsewhere); without it they are skipped as image_outside_root / cond_outside_root.")
@click.option("--resolution", type=int, default=D.resolution, show_default=True,
              help="Shortest side is resized to this, then a square crop of this size; a multiple of the model's "
                   "granularity (VAE factor x 2^(UNet down blocks - 1): 32 for SDXL), so adapter features meet the "
                   "UNet's. With --buckets: the side of the square bucket, others keep about its area.")
@click.option("--crop", type=click.Choice(CROP_MODES), default=D.crop, show_default=True,
              help="Crop position; random is seeded per item by --seed (same crops on any number of processes).")
@click.option("--seed", type=int, default=D.seed, show_default=True, help="Seed of random crops (--crop random, --crops).")
@click.option("--min-size", type=int, default=D.min_size,
              help="Skip images whose shortest side is below this many pixels [default: resolution/4; 0 keeps all].")
@click.option("--max-aspect", type=float, default=D.max_aspect, show_default=True,
              help="Skip images more elongated than their crop target by more than this factor (square crops: "
                   "the long/short side ratio; with --buckets: relative to the nearest bucket). 0: no limit.")
@click.option("--buckets", default=D.buckets, metavar="none|sdxl|sdxl-full|HxW,...",
              help="Aspect-ratio buckets instead of square crops: each image goes to the bucket nearest its aspect "
                   "ratio, is resized to cover it and cropped to it. sdxl: 1024x1024, 1152x896, 1216x832, 1344x768, "
                   "1536x640 and transposes; sdxl-full: the SDXL paper's 41 sizes (to 4:1); both scaled to "
                   "--resolution. Or explicit HEIGHTxWIDTH sizes. [default: none]")
@click.option("--bucket-step", type=int, default=D.bucket_step,
              help="Side granularity of scaled bucket presets, a multiple of the model's (VAE factor x 2^(UNet "
                   "down blocks - 1): 32 for SDXL) [default: 64 x resolution/1024, rounded up to that].")
@click.option("--crops", type=int, default=D.crops, show_default=True,
              help="Views per image: the planned crop plus CROPS-1 other seeded random crops of the same target "
                   "(positions already stored are not repeated). Each view is a full sample; train uses one "
                   "view per image per epoch.")
@click.option("--flip", is_flag=True, default=D.flip,
              help="Also store every crop mirrored left-right as another view (crop_top_left follows the flip). "
                   "Not for conditions with a left/right meaning (e.g. colour-coded poses).")
@click.option("--condition", type=click.Choice(METHODS), default=D.condition,
              help="Compute the conditioning image from each view's pixels instead of reading the dataset's: "
                   "canny (OpenCV), gray, or sketch (a soft edge map). Needs opencv-python-headless for canny "
                   "and sketch.")
@click.option("--canny-low", type=int, default=D.canny_low, help="Canny's lower hysteresis threshold [default: 100].")
@click.option("--canny-high", type=int, default=D.canny_high,
              help="Canny's upper hysteresis threshold [default: 200].")
@click.option("--condition-soft", is_flag=True, default=D.condition_soft,
              help="The stored conditioning images are soft maps (e.g. --condition sketch): train binarises each "
                   "with a random threshold every time it is drawn (train's --soft-threshold-range).")
@click.option("--samples-per-shard", type=int, default=D.samples_per_shard, show_default=True,
              help="Source items per output shard (folder datasets; a WebDataset input tar is one shard).")
@click.option("--latent-store", type=click.Choice(schema.LATENT_STORES), default=D.latent_store, show_default=True,
              help="mean_std keeps the VAE posterior (train samples it each step, as the reference); mean halves "
                   "latent bytes.")
@click.option("--storage-dtype", type=click.Choice(list(schema.DTYPES)), default=D.storage_dtype, show_default=True,
              help="dtype of the tensors stored in the cache.")
@click.option("--vae-dtype", type=click.Choice(ENCODE_DTYPES), default=D.vae_dtype, show_default=True,
              help="dtype the VAE encodes in. SDXL's own VAE overflows in fp16: use fp32, or fp16 with an fp16-fixed "
                   "--vae.")
@click.option("--text-dtype", type=click.Choice(ENCODE_DTYPES), default=D.text_dtype, show_default=True,
              help="dtype the text encoders run in.")
@click.option("--device", default=D.device, show_default=True, metavar="|".join(DEVICES),
              help="Where to encode: auto = the process's GPU if there is one, else cpu.")
@click.option("--batch-size", type=int, default=D.batch_size, show_default=True,
              help="Images per VAE call. Batching changes the rounding of the stored latents, so a resumed cache "
                   "must keep its batch size (and its device kind, cpu or cuda).")
@click.option("--num-workers", type=int, default=D.num_workers, show_default=True,
              help="Threads decoding and preprocessing images ahead of the encoders (0: inline).")
@click.option("--tmp-dir", default=D.tmp_dir, metavar="DIR",
              help="Local folder in which shards are staged before they are published, in a per-cache subfolder "
                   "(shards-staging/<hash of --cache>) that each run empties at start [default: a hidden .staging "
                   "folder of a local cache; the system temp folder for s3://].")
@click.option("--strict", is_flag=True, default=D.strict,
              help="Fail on the first item that would be skipped (bad image, missing caption...), naming it.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool, **options) -> None:
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
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
            from diffusers.utils import logging as df_logging

            df_logging.disable_progress_bar()
            df_logging.set_verbosity_error()
            import datasets

            datasets.disable_progress_bars()
        except Exception:  # pragma: no cover - optional niceties
            pass

    from precompute.runner import run

    try:
        run(cfg)
    except USER_ERRORS as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
