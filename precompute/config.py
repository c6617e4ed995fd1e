"""The precompute configuration: every setting of one run, typed, frozen, with its own checks.

`PrecomputeConfig` is what the CLI builds (its options are generated from these fields). It holds
values and checks values and places (`problems`: ranges, choices, the dataset path, the cache's
writability, the device); it calls no component. `precompute.settings.resolve(cfg)` turns it, once,
into the run's `Settings` (buckets, views, condition, device, encoder dtypes, with every
component's own checks) and the identity. `resolved()` is the config recorded in the manifest.
Spellings with one meaning ("--max-aspect 0", "--buckets none") are normalised when the config is
built, so the identity and the manifest never depend on how a setting was written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from precompute.conditions import METHODS
from precompute.preprocess import (
    CROP_MODES,
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_CAPTION_CHARS,
)
from precompute.source_base import DEFAULT_MAX_FILE_BYTES, MAX_JSON_BYTES, MAX_JSON_DEPTH
from precompute.sources import DEFAULT_SAMPLES_PER_SHARD
from precompute.sources import KINDS as DATA_KINDS
from shards import schema
from shards.options import SIZE, setting
from shards.secrets import redact
from shards.store import nearest_existing, writable_problem

DEVICES = ("auto", "cpu", "cuda")
# tf32: fp32 weights, TensorFloat-32 matmuls and convolutions on Ampere+ GPUs (fp32: strict IEEE).
ENCODE_DTYPES = ("fp32", "tf32", "bf16", "fp16")
# What an unset --vae-dtype / --text-dtype means, by device kind (precompute.settings.resolve). On a
# GPU, bf16 keeps fp32's range (SDXL's VAE overflows in fp16, not in bf16) at a fraction of the
# time; the text encoders run in fp16 as SDXL's pipelines run them. A CPU gains little from half
# precision, so it stays exact there.
DEFAULT_ENCODE_DTYPES = {"cuda": {"vae": "bf16", "text": "fp16"}, "cpu": {"vae": "fp32", "text": "fp32"}}
# Settings left out of the manifest's config (see `resolved`): where the cache and its temp files
# live and how one run went. `device` is not byte-neutral, but its spelling is ("auto" and "cpu"
# can mean the same device): the identity records the resolved kind instead.
# `cache_dir` (the datasets download cache) is where inputs are kept, not what they are.
RUN_ONLY = ("cache", "tmp_dir", "device", "num_workers", "strict", "cache_dir", "rebuild_stale",
            "verify_existing")
# Cache URL schemes precompute can write to (http(s):// caches are read-only).
WRITABLE_SCHEMES = ("", "file", "s3")
MISSING_MODEL_HINT = (
    "--model is required: a hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0) or a local "
    "diffusers SDXL folder; `make precompute` with no MODEL builds and uses the tiny offline model"
)


def _is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def _foreign_cache_folder_problems(shown: str, path: Path, data: str | None) -> list[str]:
    """A local --cache folder that holds files of something else (a dataset given as the cache
    by mistake), or that is the dataset or holds it: a cache's files would be written among
    them, and `shards gc --orphans` could take input tars named like shards for its own."""
    from shards.store import LOCAL_STAGING, STAGING_FOLDER, TEMP_PREFIX

    if data and not _is_url(data):
        source = Path(data.split("{", 1)[0]).expanduser().absolute()  # a brace pattern: its folder part
        if source == path or path in source.parents:
            return [f"--cache {shown}: the dataset ({data}) is in that folder: a cache is a folder of its own"]
    try:
        names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    except OSError:
        return []  # writable_problem speaks of access
    # STAGING_FOLDER: what a --tmp-dir pointed at the cache folder itself leaves there.
    ours = {schema.MANIFEST_FILE, schema.IDENTITY_FILE, schema.EMPTY_PROMPT_FILE, schema.SHARD_DIR, schema.RECORD_DIR,
            LOCAL_STAGING, STAGING_FOLDER}
    foreign = [n for n in names if n not in ours and not n.startswith(TEMP_PREFIX)]
    if not foreign:
        return []
    shown_names = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
    if schema.IDENTITY_FILE in names:  # a cache, with something else put in it since
        return [f"--cache {shown}: the cache folder also holds files that are no cache's ({shown_names}); precompute "
                "would write among them: move them out of it (a cache is a folder of its own)"]
    return [f"--cache {shown}: the folder holds files that are no cache's ({shown_names}); precompute would write "
            "among them: choose a new or empty folder"]


_s = setting  # a field with its option's help text, --help group, choices and aliases (shards.options)


@dataclass(frozen=True)
class PrecomputeConfig:
    """Every setting of one precompute run. Defaults match the reference training script. The
    command line is generated from these fields (`shards.options`): each one's help is its --help."""

    # -- what to encode with ------------------------------------------------------------------
    model: str | None = _s(None, "SDXL base model: a hub id or a local diffusers folder (vae, text_encoder(_2), "
                                 "tokenizer(_2)). `make precompute` without MODEL builds and uses a tiny offline "
                                 "model.", "model", aliases=["--pretrained-model-name-or-path"], metavar="ID|DIR")
    vae: str | None = _s(None, "Use this VAE instead of MODEL/vae, e.g. madebyollin/sdxl-vae-fp16-fix (needed for "
                               "--vae-dtype fp16).", "model", aliases=["--pretrained-vae-model-name-or-path"],
                         metavar="ID|DIR")
    revision: str | None = _s(None, "Hub revision (branch, tag or commit) of --model.", "model")
    variant: str | None = _s(None, "Weight file variant of --model, e.g. fp16 (model.fp16.safetensors).", "model")
    # -- what to encode -------------------------------------------------------------------------
    data: str | None = _s(None, "Dataset: a folder with metadata.jsonl/.json/.csv, fill50k's prompt.json or "
                                "train.jsonl, a metadata file, a .tar, a folder of .tar shards, a brace pattern like "
                                "'data/{00000..00009}.tar' (also s3:// and https://), or a Hugging Face dataset: a "
                                "save_to_disk folder, a .parquet / .arrow file, or the folder holding them (in the "
                                "hub's layout, data/train-*.parquet, the split picks the files; no glob patterns).",
                          "data", aliases=["--train-data-dir"], metavar="PATH|URL")
    data_kind: str = _s("auto", "Dataset format; auto decides from what --data holds.", "data", choices=DATA_KINDS)
    dataset_name: str | None = _s(None, "A Hugging Face dataset instead of --data: a hub id (e.g. fusing/fill50k) or a "
                                        "local dataset folder, loaded with datasets.load_dataset. Columns default to "
                                        "image, conditioning_image, text.", "data", metavar="ID|DIR")
    dataset_config_name: str | None = _s(None, "The dataset's configuration (subset).", "data")
    dataset_revision: str | None = _s(None, "Hub revision (branch, tag or commit) of --dataset-name.", "data")
    dataset_split: str = _s("train", "Split of --dataset-name, of a DatasetDict save_to_disk folder or of a "
                                     "hub-layout folder in --data (refused for a dataset without splits).", "data")
    cache_dir: str | None = _s(None, "The datasets / hub download cache for --dataset-name and --model (and parquet "
                                     "conversion) [default: the Hugging Face cache, ~/.cache/huggingface].", "data",
                               metavar="DIR")
    image_column: str | None = _s(None, "Folder: metadata column with the image path [default: image, else "
                                        "file_name; fill50k: target]. WebDataset: image member suffixes, "
                                        "comma-separated [default: jpg,jpeg,png,webp]. Hugging Face dataset: an "
                                        "Image, binary or path column [default: image].", "data", metavar="NAME")
    conditioning_image_column: str | None = _s(
        None, "Folder: column with the conditioning image path [default: conditioning_image; fill50k: source]. "
              "WebDataset: conditioning member suffixes [default: cond.png, conditioning.png, source.png, control.png "
              "and their .jpg]. Hugging Face dataset: as --image-column [default: conditioning_image].", "data",
        metavar="NAME")
    caption_column: str | None = _s(None, "Folder: caption column, a string or a list of strings [default: text; "
                                          "fill50k: prompt]. WebDataset: caption member suffix or .json key [default: "
                                          "txt,caption,text]. Hugging Face dataset: a string or list-of-strings "
                                          "column [default: text].", "data", metavar="NAME")
    max_samples: int | None = _s(None, "Use only the first N source items.", "data", aliases=["--max-train-samples"])
    allow_empty_captions: bool = _s(False, "Keep items without a caption (captioned \"\") instead of skipping them.",
                                    "data")
    # -- what may be read (bounds on untrusted inputs; they decide which items are skipped) -----
    max_input_bytes: int = _s(DEFAULT_MAX_FILE_BYTES, "Largest input file or tar member read (e.g. 256MiB, 1GB); "
                                                      "bigger ones are skipped as image_too_large / cond_too_large "
                                                      "without being read whole.", "limits", click_type=SIZE)
    max_image_pixels: int = _s(DEFAULT_MAX_IMAGE_PIXELS, "Largest image (width x height), checked from the file "
                                                         "header before decoding; bigger ones are skipped as "
                                                         "image_too_large / cond_too_large.", "limits")
    follow_symlinks: bool = _s(False, "Read files whose real path is outside the dataset folder (symlinks pointing "
                                      "out, ../ paths, absolute paths elsewhere); without it they are skipped as "
                                      "image_outside_root / cond_outside_root, and a folder of tars or a Hugging "
                                      "Face dataset folder with a link pointing out is refused.", "limits")
    max_caption_chars: int = _s(MAX_CAPTION_CHARS, "Characters kept of each caption; longer ones are cut (the item is "
                                                   "kept, counted as the caption_truncated note). The text encoders "
                                                   "see 77 tokens, a few hundred characters.", "limits")
    max_json_bytes: int = _s(MAX_JSON_BYTES, "Largest metadata row (a JSON line; one over it is read in chunks, never "
                                             "whole), tar .json member or caption member (e.g. 1MiB); bigger ones "
                                             "make the item metadata_invalid / caption_invalid.", "limits",
                             click_type=SIZE)
    max_json_depth: int = _s(MAX_JSON_DEPTH, "Deepest nesting of a metadata row, tar .json member or metadata.json "
                                             "list, checked before parsing (CPython's parser fails near 1000).",
                             "limits")
    # -- noticing edited and repeated inputs ----------------------------------------------------------
    source_fingerprint: str = _s("content", "How each item's inputs are fingerprinted in its shard record, so a re-run "
                                            "notices edited inputs: content (sha256 of image, conditioning image and "
                                            "captions; a re-run re-reads every input of complete shards) or stat "
                                            "(file size and mtime, no reads: much faster on big folders; Hugging "
                                            "Face datasets and remote tars always use content).", "inputs",
                                 choices=("content", "stat"))
    rebuild_stale: bool = _s(False, "Rebuild the shards whose inputs changed since they were made (without it a "
                                    "re-run over edited inputs lists them and refuses to call the cache complete).",
                             "inputs")
    verify_existing: bool = _s(False, "Re-read every shard already complete and check it against its record's "
                                      "sha256; rebuild the ones that differ (a shard damaged in place at its "
                                      "recorded size). One that has the wrong size is always rebuilt.", "inputs")
    dedupe: bool = _s(False, "Drop every item that repeats an earlier one (the same image, conditioning image and "
                             "captions, or the same file / tar key again), instead of only counting them. Reads every "
                             "input once more before encoding.", "inputs")
    # -- where ------------------------------------------------------------------------------------
    cache: str | None = _s(None, "Where the cache is written: a local folder (created if needed), file://, or "
                                 "s3://bucket/prefix (endpoint and credentials from the standard AWS variables or "
                                 "profile). https:// caches are read-only: write to S3 and serve that.", "output",
                           metavar="DIR|s3://BUCKET/PREFIX")
    tmp_dir: str | None = _s(None, "Local folder in which shards are staged before they are published, in a "
                                   "per-cache subfolder (shards-staging/<hash of the cache URL, with the endpoint for "
                                   "s3://>) that each run empties at start [default: a hidden .staging folder of a "
                                   "local cache; the system temp folder for s3://].", "output", metavar="DIR")
    # -- geometry ---------------------------------------------------------------------------------
    resolution: int = _s(1024, "Shortest side is resized to this, then a square crop of this size; a multiple of "
                               "the model's granularity (VAE factor x 2^(UNet down blocks - 1): 32 for SDXL), so "
                               "adapter features meet the UNet's. With --buckets: the side of the square bucket, "
                               "others keep about its area.", "geometry")
    crop: str = _s("center", "Crop position; random is seeded per item by --seed (same crops on any number of "
                             "processes).", "geometry", choices=CROP_MODES)
    seed: int = _s(0, "Seed of random crops (--crop random, --crops).", "geometry")
    min_size: int | None = _s(None, "Skip images whose shortest side is below this many pixels [default: "
                                    "resolution/4; 0 keeps all].", "geometry")
    max_aspect: float | None = _s(DEFAULT_MAX_ASPECT, "Skip images more elongated than their crop target by more "
                                                      "than this factor (square crops: the long/short side ratio; "
                                                      "with --buckets: relative to the nearest bucket). 0: no limit.",
                                  "geometry")
    buckets: str | None = _s(None, "Aspect-ratio buckets instead of square crops: each image goes to the bucket "
                                   "nearest its aspect ratio, is resized to cover it and cropped to it. sdxl: "
                                   "1024x1024, 1152x896, 1216x832, 1344x768, 1536x640 and transposes; sdxl-full: the "
                                   "SDXL paper's 41 sizes (to 4:1); both scaled to --resolution. Or explicit "
                                   "HEIGHTxWIDTH sizes. [default: none]", "geometry",
                             metavar="none|sdxl|sdxl-full|HxW,...")
    bucket_step: int | None = _s(None, "Side granularity of scaled bucket presets, a multiple of the model's (VAE "
                                       "factor x 2^(UNet down blocks - 1): 32 for SDXL) [default: 64 x "
                                       "resolution/1024, rounded up to that].", "geometry")
    # -- views: extra stored versions of each image ------------------------------------------------
    crops: int = _s(1, "Views per image: the planned crop plus CROPS-1 other seeded random crops of the same "
                       "target (positions already stored are not repeated). Each view is a full sample; train uses "
                       "one view per image per epoch.", "views")
    flip: bool = _s(False, "Also store every crop mirrored left-right as another view (crop_top_left follows the "
                           "flip). Not for conditions with a left/right meaning (e.g. colour-coded poses).", "views")
    # -- conditioning images computed from the image (precompute.conditions) ----------------------
    condition: str | None = _s(None, "Compute the conditioning image from each view's pixels instead of reading the "
                                     "dataset's: canny (OpenCV), gray, or sketch (a soft edge map).", "condition",
                               choices=METHODS)
    canny_low: int | None = _s(None, "Canny's lower hysteresis threshold [default: 100].", "condition")
    canny_high: int | None = _s(None, "Canny's upper hysteresis threshold [default: 200].", "condition")
    condition_soft: bool = _s(False, "The stored conditioning images are soft maps (e.g. --condition sketch): train "
                                     "binarises each with a random threshold every time it is drawn (train's "
                                     "--soft-threshold-range).", "condition")
    # -- what is stored ---------------------------------------------------------------------------
    samples_per_shard: int = _s(DEFAULT_SAMPLES_PER_SHARD, "Source items per output shard (folder and Hugging Face "
                                                           "datasets; a WebDataset input tar is one shard).", "storage")
    latent_store: str = _s("mean_std", "mean_std keeps the VAE posterior (train samples it each step, as the "
                                       "reference); mean halves latent bytes.", "storage", choices=schema.LATENT_STORES)
    storage_dtype: str = _s("bf16", "dtype of the tensors stored in the cache.", "storage", choices=tuple(schema.DTYPES))
    vae_dtype: str | None = _s(None, "dtype the VAE encodes in: fp32 (strict), tf32 (fp32 weights, TensorFloat-32 "
                                     "math on Ampere+ GPUs), bf16, or fp16 (SDXL's own VAE overflows in fp16: use it "
                                     "with an fp16-fixed --vae). Default: bf16 on CUDA, fp32 on CPU; the choice is "
                                     "recorded in the cache identity (bench/RESULTS.md has the latent error of each "
                                     "against fp32).", "storage", choices=ENCODE_DTYPES)
    text_dtype: str | None = _s(None, "dtype the text encoders run in. Default: fp16 on CUDA, fp32 on CPU; recorded in "
                                      "the cache identity.", "storage", choices=ENCODE_DTYPES)
    compile_vae: bool = _s(False, "torch.compile the VAE encoder (the first batch of each shape compiles; worth it for "
                                  "large caches on a GPU). Compiled kernels round differently, so it is part of the "
                                  "cache identity, and a resumed cache is not promised to be byte-identical to an "
                                  "uninterrupted one.", "storage")
    # -- how it runs ------------------------------------------------------------------------------
    # device (its kind: cpu or cuda) and batch_size change the bytes (kernels and batching round
    # differently) and are part of the identity; the rest never change what is written.
    device: str = _s("auto", "Where to encode: auto = the process's GPU if there is one, else cpu.", "run",
                     metavar="|".join(DEVICES))
    batch_size: int = _s(8, "Images per VAE call. Batching changes the rounding of the stored latents, so a resumed "
                            "cache must keep its batch size (and its device kind, cpu or cuda).", "run")
    num_workers: int = _s(4, "Threads decoding and preprocessing images ahead of the encoders (0: inline).", "run")
    strict: bool = _s(False, "Fail on the first item that would be skipped (bad image, missing caption...), naming "
                             "it.", "run")

    def __post_init__(self) -> None:
        # One spelling per meaning, so the identity and the manifest do not depend on the spelling.
        if self.max_aspect is not None and not isinstance(self.max_aspect, bool) and self.max_aspect == 0:
            object.__setattr__(self, "max_aspect", None)
        if isinstance(self.buckets, str) and self.buckets.strip().lower() == "none":
            object.__setattr__(self, "buckets", None)

    # ------------------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every problem with these values and places (empty when there is none). What needs the
        model or a component (sizes against the model's granularity, buckets, views, the
        condition, the model folder's layout) is checked by `precompute.settings.resolve`, which
        lists these too."""
        p: list[str] = []
        if not self.model:
            p.append(MISSING_MODEL_HINT)
        p += self.source_problems()
        p += self._cache_problems()
        if self.tmp_dir is not None:
            t = Path(self.tmp_dir).expanduser()
            if not t.is_dir():
                p.append(f"--tmp-dir {self.tmp_dir}: " + ("is a file, not a folder" if t.exists() else "no such folder"))
            elif problem := writable_problem(t):
                p.append(f"--tmp-dir {self.tmp_dir}: {problem}")
        if not isinstance(self.seed, int) or self.seed < 0:
            p.append(f"--seed must be an integer >= 0, got {self.seed!r}")
        for name, value, low in (
            ("batch_size", self.batch_size, 1),
            ("num_workers", self.num_workers, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                p.append(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.latent_store not in schema.LATENT_STORES:
            p.append(f"--latent-store must be one of {list(schema.LATENT_STORES)}, got {self.latent_store!r}")
        if self.storage_dtype not in schema.DTYPES:
            p.append(f"--storage-dtype must be one of {list(schema.DTYPES)}, got {self.storage_dtype!r}")
        for flag, value in (("--vae-dtype", self.vae_dtype), ("--text-dtype", self.text_dtype)):
            if value is not None and value not in ENCODE_DTYPES:
                p.append(f"{flag} must be one of {list(ENCODE_DTYPES)}, got {value!r}")
        p += self._device_problems()
        return p

    def source_problems(self) -> list[str]:
        """Problems with the settings that `sources.open_source` needs (checked before opening it)."""
        p: list[str] = []
        if self.data and self.dataset_name:
            p.append(f"--data {redact(self.data)} and --dataset-name {self.dataset_name} are mutually exclusive: pass one "
                     "(--data for files on this machine, --dataset-name for a hub id or a dataset folder by name)")
        elif not self.data and not self.dataset_name:
            p.append("--data or --dataset-name is required: a dataset folder (metadata file + images), WebDataset tar "
                     "shards, a Hugging Face dataset (save_to_disk folder, parquet / arrow files), or a hub id")
        elif self.data and not _is_url(self.data) and "{" not in self.data and not Path(self.data).expanduser().exists():
            glob = any(c in self.data for c in "*?[")
            p.append(f"--data {self.data}: no such file or folder" + (
                " (glob patterns are not expanded: give the folder that holds the files, or a brace pattern such as "
                "'data/{00000..00009}.tar')" if glob else ""))
        if not self.dataset_name:
            for flag, value in (("--dataset-config-name", self.dataset_config_name),
                                ("--dataset-revision", self.dataset_revision)):
                if value is not None:
                    p.append(f"{flag} only applies to --dataset-name")
        if not isinstance(self.dataset_split, str) or not self.dataset_split:
            p.append(f"--dataset-split must be a split name such as 'train', got {self.dataset_split!r}")
        if self.data_kind not in DATA_KINDS:
            p.append(f"--data-kind must be one of {list(DATA_KINDS)}, got {self.data_kind!r}")
        columns = {
            "--image-column": self.image_column,
            "--conditioning-image-column": self.conditioning_image_column,
            "--caption-column": self.caption_column,
        }
        named = [(flag, c) for flag, c in columns.items() if c is not None]
        for i, (flag, c) in enumerate(named):
            if not c:
                p.append(f"{flag} must not be empty")
            for other, d in named[i + 1 :]:
                if c and c == d:
                    p.append(f"{flag} and {other} are both {c!r}; each column must be different")
        if not isinstance(self.samples_per_shard, int) or isinstance(self.samples_per_shard, bool) or self.samples_per_shard < 1:
            p.append(f"--samples-per-shard must be an integer >= 1, got {self.samples_per_shard!r}")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            p.append(f"--max-samples must be an integer >= 1, got {self.max_samples!r}")
        for flag, value in (("--max-input-bytes", self.max_input_bytes), ("--max-image-pixels", self.max_image_pixels),
                            ("--max-caption-chars", self.max_caption_chars), ("--max-json-bytes", self.max_json_bytes),
                            ("--max-json-depth", self.max_json_depth)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                p.append(f"{flag} must be an integer >= 1, got {value!r}")
        if self.condition is not None and self.conditioning_image_column is not None:
            p.append(f"--conditioning-image-column has no effect with --condition {self.condition}: the "
                     "conditioning image is computed from the image; drop one of them")
        return p

    def _cache_problems(self) -> list[str]:
        """Problems with --cache, found without any I/O to a remote store (opening one does none)."""
        from urllib.parse import urlparse

        from shards.store import LocalStore
        from shards.stores import open_store

        if not self.cache:
            return ["--cache is required: the output folder of the cache (e.g. cache/mine) or s3://bucket/prefix"]
        shown = redact(self.cache)  # a signed URL's token stays out of messages
        scheme = urlparse(self.cache).scheme.lower() if "://" in self.cache else ""
        if scheme not in WRITABLE_SCHEMES:
            if scheme in ("http", "https"):
                return [f"--cache {shown}: {scheme}:// caches are read-only; write to a local folder or "
                        "s3://bucket/prefix (and serve that over https:// for reading)"]
            return [f"--cache {shown}: unknown URL scheme {scheme!r} (use a local folder, file:// or s3://)"]
        try:
            store = open_store(self.cache)
        except (ValueError, ImportError) as e:  # a malformed URL; boto3 missing for s3://
            message = str(e).replace(self.cache, shown)
            return [f"--cache {shown}: {message.removeprefix(f'cache location {shown!r}: ')}"]
        if not isinstance(store, LocalStore):
            return []  # credentials and permissions surface at the first request, as a StoreError
        path = store.root
        if path.exists() and not path.is_dir():
            return [f"--cache {self.cache}: exists and is not a folder"]
        base = nearest_existing(path)
        if not base.is_dir():
            return [f"--cache {self.cache}: {base} is not a folder"]
        problem = writable_problem(base)
        if problem:
            return [f"--cache {self.cache}: {base}: {problem}"]
        return _foreign_cache_folder_problems(self.cache, path, self.data)

    def _device_problems(self) -> list[str]:
        kind = self.device.split(":", 1)[0]
        if kind not in DEVICES or (":" in self.device and kind != "cuda"):
            return [f"--device must be one of {list(DEVICES)} (or cuda:N), got {self.device!r}"]
        if kind == "cuda":
            import torch

            if not torch.cuda.is_available():
                return ["--device cuda: no CUDA GPU is visible to torch (use --device cpu or auto)"]
        return []

    # ------------------------------------------------------------------------------------------
    def resolved(self) -> dict:
        """The config as recorded in the manifest: every setting that decides what the cache
        holds. Where it lives and how this particular run went (workers, strictness, temp folder,
        the device's spelling: its kind is in the identity) are left out, so the manifest
        describes the cache, not the last command that touched it, and is byte-identical however
        the cache was produced (resumed or not, on any number of processes)."""
        d = asdict(self)
        for key in RUN_ONLY:
            d.pop(key)
        for key in ("data", "dataset_name", "model", "vae"):  # a signed URL's token stays out of the manifest
            d[key] = redact(d[key])
        return d
