"""The precompute configuration: one typed object, validated once, listing every problem.

`PrecomputeConfig` is what the CLI builds and `runner.run` consumes; `resolve()` decides, once and
first, what depends on the device (unset encoder dtypes: bf16 VAE and fp16 text encoders on CUDA,
fp32 on CPU), and everything after reads the resolved config. `validate()` checks the
settings and everything that can be checked before loading a model (dataset path, model folder
layout, cache writability, geometry, buckets against the model's granularity, views, condition
method) and raises one `ConfigError` listing every problem, so a user fixes them all in one go.
`identity()` says which settings change the bytes of the cache (and so must match when a run
resumes into an existing cache): the resolved bucket sizes, the views, the condition method with
its parameters, and also the VAE batch size and the kind of device (batched and single-image VAE
calls, and CPU and GPU kernels, round differently); `resolved()` is the config recorded in the
manifest. Spellings with one meaning ("--max-aspect 0", "--buckets none") are normalised when the
config is built, so the identity and the manifest never depend on how a setting was written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from precompute.conditions import METHODS
from precompute.errors import ConfigError, PrecomputeError  # noqa: F401  (raised by the config)
from precompute.preprocess import (
    CROP_MODES,
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_IMAGE_PIXELS,
)
from precompute.source_base import DEFAULT_MAX_FILE_BYTES
from precompute.sources import DEFAULT_SAMPLES_PER_SHARD
from precompute.sources import KINDS as DATA_KINDS
from shards import schema
from shards.options import SIZE, setting
from shards.secrets import redact
from shards.store import writable_problem

DEVICES = ("auto", "cpu", "cuda")
# tf32: fp32 weights, TensorFloat-32 matmuls and convolutions on Ampere+ GPUs (fp32: strict IEEE).
ENCODE_DTYPES = ("fp32", "tf32", "bf16", "fp16")
# What an unset --vae-dtype / --text-dtype means, by device kind (PrecomputeConfig.resolve). On a
# GPU, bf16 keeps fp32's range (SDXL's VAE overflows in fp16, not in bf16) at a fraction of the
# time; the text encoders run in fp16 as SDXL's pipelines run them. A CPU gains little from half
# precision, so it stays exact there.
DEFAULT_ENCODE_DTYPES = {"cuda": {"vae": "bf16", "text": "fp16"}, "cpu": {"vae": "fp32", "text": "fp32"}}
# Settings left out of the manifest's config (see `resolved`): where the cache and its temp files
# live and how one run went. `device` is not byte-neutral, but its spelling is ("auto" and "cpu"
# can mean the same device): the identity records the resolved kind instead.
# `cache_dir` (the datasets download cache) is where inputs are kept, not what they are.
RUN_ONLY = ("cache", "tmp_dir", "device", "num_workers", "strict", "cache_dir", "rebuild_stale")
# Cache URL schemes precompute can write to (http(s):// caches are read-only).
WRITABLE_SCHEMES = ("", "file", "s3")
MISSING_MODEL_HINT = (
    "--model is required: a hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0) or a local "
    "diffusers SDXL folder; `make precompute` with no MODEL builds and uses the tiny offline model"
)


def _is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


_s = setting  # a field with its option's help text, --help group, choices and aliases (shards.options)


@dataclass
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
                                "save_to_disk folder, .parquet / .arrow files or a folder of them "
                                "(data/train-*.parquet).", "data", aliases=["--train-data-dir"], metavar="PATH|URL")
    data_kind: str = _s("auto", "Dataset format; auto decides from what --data holds.", "data", choices=DATA_KINDS)
    dataset_name: str | None = _s(None, "A Hugging Face dataset instead of --data: a hub id (e.g. fusing/fill50k) or a "
                                        "local dataset folder, loaded with datasets.load_dataset. Columns default to "
                                        "image, conditioning_image, text.", "data", metavar="ID|DIR")
    dataset_config_name: str | None = _s(None, "The dataset's configuration (subset).", "data")
    dataset_revision: str | None = _s(None, "Hub revision (branch, tag or commit) of --dataset-name.", "data")
    dataset_split: str = _s("train", "Split of --dataset-name, of a DatasetDict save_to_disk folder or of a "
                                     "hub-layout folder in --data.", "data")
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
                                      "image_outside_root / cond_outside_root.", "limits")
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
    dedupe: bool = _s(False, "Drop every item that repeats an earlier one (the same image, conditioning image and "
                             "captions, or the same file / tar key again), instead of only counting them. Reads every "
                             "input once more before encoding.", "inputs")
    # -- where ------------------------------------------------------------------------------------
    cache: str | None = _s(None, "Where the cache is written: a local folder (created if needed), file://, or "
                                 "s3://bucket/prefix (endpoint and credentials from the standard AWS variables or "
                                 "profile). https:// caches are read-only: write to S3 and serve that.", "output",
                           metavar="DIR|s3://BUCKET/PREFIX")
    tmp_dir: str | None = _s(None, "Local folder in which shards are staged before they are published, in a "
                                   "per-cache subfolder (shards-staging/<hash of --cache>) that each run empties at "
                                   "start [default: a hidden .staging folder of a local cache; the system temp folder "
                                   "for s3://].", "output", metavar="DIR")
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
            self.max_aspect = None
        if isinstance(self.buckets, str) and self.buckets.strip().lower() == "none":
            self.buckets = None

    # ------------------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every problem with these settings (empty when they are valid)."""
        from precompute.encoders import check_model_sources
        from precompute.preprocess import geometry_problems

        p: list[str] = []
        if not self.model:
            p.append(MISSING_MODEL_HINT)
        else:
            p += check_model_sources(self.model, self.vae, self.variant)
        p += self.source_problems()
        p += self._cache_problems()
        if self.tmp_dir is not None:
            t = Path(self.tmp_dir).expanduser()
            if not t.is_dir():
                p.append(f"--tmp-dir {self.tmp_dir}: no such folder")
            elif writable_problem(t):
                p.append(f"--tmp-dir {self.tmp_dir}: {writable_problem(t)}")
        granularity = self.resolution_problems()
        geometry = geometry_problems(
            resolution=self.resolution,
            crop=self.crop,
            vae_scale_factor=self.vae_scale_factor_hint(),
            min_size=self.min_size,
            max_aspect=self.max_aspect,
        )
        # The granularity check is the stricter one, and its suggestion passes both: say only it.
        p += [q for q in geometry if not (granularity and q.startswith("resolution "))]
        p += granularity
        p += self._bucket_problems()
        p += self.view_spec().problems()
        p += self._condition_problems()
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
            p.append(f"--data {self.data} and --dataset-name {self.dataset_name} are mutually exclusive: pass one "
                     "(--data for files on this machine, --dataset-name for a hub id or a dataset folder by name)")
        elif not self.data and not self.dataset_name:
            p.append("--data or --dataset-name is required: a dataset folder (metadata file + images), WebDataset tar "
                     "shards, a Hugging Face dataset (save_to_disk folder, parquet / arrow files), or a hub id")
        elif self.data and not _is_url(self.data) and "{" not in self.data and not Path(self.data).expanduser().exists():
            p.append(f"--data {self.data}: no such file or folder")
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
        for flag, value in (("--max-input-bytes", self.max_input_bytes), ("--max-image-pixels", self.max_image_pixels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                p.append(f"{flag} must be an integer >= 1, got {value!r}")
        if self.condition is not None and self.conditioning_image_column is not None:
            p.append(f"--conditioning-image-column has no effect with --condition {self.condition}: the "
                     "conditioning image is computed from the image; drop one of them")
        return p

    # -- buckets, views, conditions -------------------------------------------------------------
    def resolution_problems(self, vae_scale_factor: int | None = None) -> list[str]:
        """Square crops: the side must be a multiple of the model's granularity (32 for SDXL), or
        the adapter's features would not meet the UNet's. Buckets are checked by bucket_problems."""
        f = self.vae_scale_factor_hint() if vae_scale_factor is None else vae_scale_factor
        if self.buckets is not None or not isinstance(self.resolution, int) or self.resolution < 1:
            return []  # buckets: checked per size; a non-positive one by geometry_problems
        g = self.granularity_hint(f)
        if self.resolution % g:
            return [f"--resolution {self.resolution} is not a multiple of {g} px, the model's granularity (VAE "
                    f"factor {f} x 2^(UNet down blocks - 1)): a T2I-Adapter's features would not meet the UNet's; "
                    f"try {max(1, round(self.resolution / g)) * g}"]
        return []

    def _bucket_problems(self) -> list[str]:
        from precompute.buckets import bucket_problems

        if not isinstance(self.resolution, int) or self.resolution < 1:
            return []  # reported by geometry_problems
        return bucket_problems(self.buckets, self.resolution, self.bucket_step, self.granularity_hint())

    def resolved_buckets(self, vae_scale_factor: int | None = None) -> list[tuple[int, int]] | None:
        """The bucket sizes (h, w) of this run, or None for square crops. `vae_scale_factor` is the
        loaded VAE's (the config hint otherwise)."""
        from precompute.buckets import resolve_buckets

        return resolve_buckets(self.buckets, self.resolution, step=self.bucket_step,
                               granularity=self.granularity_hint(vae_scale_factor))

    def view_spec(self):
        from precompute.preprocess import ViewSpec

        return ViewSpec(crops=self.crops, flip=self.flip)

    def condition_spec(self):
        """The ConditionSpec of --condition, or None when the dataset supplies conditioning images."""
        from precompute.conditions import (
            DEFAULT_CANNY_HIGH,
            DEFAULT_CANNY_LOW,
            ConditionSpec,
        )

        if self.condition is None:
            return None
        return ConditionSpec(
            method=self.condition,
            canny_low=DEFAULT_CANNY_LOW if self.canny_low is None else self.canny_low,
            canny_high=DEFAULT_CANNY_HIGH if self.canny_high is None else self.canny_high,
            soft=self.condition_soft,
        )

    def _condition_problems(self) -> list[str]:
        spec = self.condition_spec()
        p = spec.problems() if spec is not None else []
        if self.condition != "canny":
            for flag, value in (("--canny-low", self.canny_low), ("--canny-high", self.canny_high)):
                if value is not None:
                    p.append(f"{flag} only applies to --condition canny")
        return p

    def condition_identity(self) -> dict:
        from precompute.conditions import dataset_identity

        spec = self.condition_spec()
        return dataset_identity(self.condition_soft) if spec is None else spec.identity()

    def granularity_hint(self, vae_scale_factor: int | None = None) -> int:
        """Pixels every bucket side must be a multiple of: vae_scale_factor * 2^(UNet down blocks
        - 1), from the model's local UNet config (SDXL's 3 down blocks when there is none)."""
        import json

        from precompute.buckets import model_granularity

        blocks = None
        if self.model:
            try:
                unet = json.loads((Path(self.model).expanduser() / "unet" / "config.json").read_text())
                blocks = len(unet["down_block_types"])
            except (OSError, ValueError, KeyError, TypeError):
                blocks = None
        factor = self.vae_scale_factor_hint() if vae_scale_factor is None else vae_scale_factor
        return model_granularity(factor, blocks)

    def validate(self) -> "PrecomputeConfig":
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    def _cache_problems(self) -> list[str]:
        """Problems with --cache, found without any I/O to a remote store (opening one does none)."""
        from urllib.parse import urlparse

        from shards.store import LocalStore
        from shards.stores import open_store

        if not self.cache:
            return ["--cache is required: the output folder of the cache (e.g. cache/mine) or s3://bucket/prefix"]
        scheme = urlparse(self.cache).scheme.lower() if "://" in self.cache else ""
        if scheme not in WRITABLE_SCHEMES:
            if scheme in ("http", "https"):
                return [f"--cache {self.cache}: {scheme}:// caches are read-only; write to a local folder or "
                        "s3://bucket/prefix (and serve that over https:// for reading)"]
            return [f"--cache {self.cache}: unknown URL scheme {scheme!r} (use a local folder, file:// or s3://)"]
        try:
            store = open_store(self.cache)
        except (ValueError, ImportError) as e:  # a malformed URL; boto3 missing for s3://
            return [f"--cache {self.cache}: {str(e).removeprefix(f'cache location {self.cache!r}: ')}"]
        if not isinstance(store, LocalStore):
            return []  # credentials and permissions surface at the first request, as a StoreError
        path = store.root
        if path.exists() and not path.is_dir():
            return [f"--cache {self.cache}: exists and is not a folder"]
        base = _nearest_existing(path)
        if not base.is_dir():
            return [f"--cache {self.cache}: {base} is not a folder"]
        problem = writable_problem(base)
        if problem:
            return [f"--cache {self.cache}: {base}: {problem}"]
        return []

    def _device_problems(self) -> list[str]:
        kind = self.device.split(":", 1)[0]
        if kind not in DEVICES or (":" in self.device and kind != "cuda"):
            return [f"--device must be one of {list(DEVICES)} (or cuda:N), got {self.device!r}"]
        if kind == "cuda":
            import torch

            if not torch.cuda.is_available():
                return ["--device cuda: no CUDA GPU is visible to torch (use --device cpu or auto)"]
        return []

    def vae_scale_factor_hint(self) -> int:
        """The VAE's pixels per latent cell, read from a local VAE config when there is one
        (8 otherwise; the runner re-checks against the loaded VAE)."""
        import json

        from precompute.buckets import vae_scale_factor

        candidates = []
        if self.vae:
            candidates += [Path(self.vae) / "config.json", Path(self.vae) / "vae" / "config.json"]
        elif self.model:
            candidates.append(Path(self.model) / "vae" / "config.json")
        for c in candidates:
            try:
                return vae_scale_factor(json.loads(c.expanduser().read_text())["block_out_channels"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return 8

    # ------------------------------------------------------------------------------------------
    def resolved_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def device_kind(self) -> str:
        """cpu or cuda: what the identity records (the GPU index changes nothing)."""
        return self.resolved_device().split(":", 1)[0]

    def resolve(self, device_kind: str | None = None) -> "PrecomputeConfig":
        """This config with every device-dependent default decided: an unset --vae-dtype or
        --text-dtype becomes the device kind's default (`DEFAULT_ENCODE_DTYPES`: bf16 / fp16 on
        CUDA, fp32 on CPU). `runner.run` calls it once, first; the identity and the manifest
        record the result, so a cache says how it was encoded and `--config manifest.json`
        repeats it exactly. `device_kind` (cpu | cuda) defaults to this config's device."""
        from dataclasses import replace

        defaults = DEFAULT_ENCODE_DTYPES.get(device_kind or self.device_kind())
        if defaults is None:
            return self  # an unknown device: validate() names it
        return replace(self, vae_dtype=self.vae_dtype or defaults["vae"],
                       text_dtype=self.text_dtype or defaults["text"])

    def identity(self, *, encoder: dict, latent: dict, text: dict, source: dict,
                 buckets: list[tuple[int, int]] | None = None) -> dict:
        """The identity's JSON object (`shards.identity.CacheIdentity.from_dict` types and checks
        it): what makes a cache built with these settings this cache: everything that changes the
        bytes of a shard (the VAE batch size and the device kind among them), and nothing that
        does not (strictness, workers, which GPU index, where the cache or its temp files live).

        `encoder` comes from `encoders.load_encoders`, `latent` and `text` from the loaded
        encoders (dims and factors), `source` from `Source.describe()`, `buckets` from
        `resolved_buckets` with the loaded VAE's factor. The config must be resolved (`resolve`).
        """
        if self.vae_dtype is None or self.text_dtype is None:
            raise ValueError("PrecomputeConfig.identity() needs a resolved config: call resolve() first")
        compute = {"batch_size": self.batch_size, "device": self.device_kind()}
        if self.compile_vae:  # only when on: caches made before the option keep their identity
            compute["compile_vae"] = True
        return {
            "format_version": schema.FORMAT_VERSION,
            "encoder": dict(encoder),
            "latent": {**latent, "store": self.latent_store},
            "text": dict(text),
            "geometry": {
                "resolution": self.resolution,
                "crop": self.crop,
                "buckets": [list(b) for b in buckets] if buckets else None,
                "min_size": self.min_size,
                "max_aspect": self.max_aspect,
            },
            "views": {"crops": self.crops, "flip": self.flip},
            "condition": self.condition_identity(),
            "dtypes": {"storage": self.storage_dtype, "vae": self.vae_dtype, "text": self.text_dtype},
            # Batched VAE calls round differently from single ones (bf16 storage keeps the
            # difference), and so do CPU and GPU kernels: a resume must not mix them in one cache.
            "compute": compute,
            "source": dict(source),
            "captions": {"allow_empty": self.allow_empty_captions},
            # Which inputs are read at all (and so which items are skipped).
            "input_limits": {"max_input_bytes": self.max_input_bytes, "max_image_pixels": self.max_image_pixels,
                             "follow_symlinks": self.follow_symlinks},
            "max_samples": self.max_samples,
            "samples_per_shard": self.samples_per_shard,
            # How records fingerprint the inputs (records are compared across runs) and whether
            # repeated items are dropped (which items a shard holds).
            "inputs": {"fingerprint": self.source_fingerprint, "dedupe": self.dedupe},
            # The seed only draws random crops: with centre crops (and one crop per image) it
            # changes nothing, and a resume with another --seed must not be refused for it.
            "seed": self.seed if self.crop == "random" or self.crops > 1 else None,
        }

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
