"""The encoders: pixels -> VAE posterior moments, captions -> SDXL prompt embeddings.

Owns the math precompute must reproduce exactly (docs/background.md section 1), plus loading the three
modules and fingerprinting their weights for the cache identity.

- `LatentEncoder`: `vae.encode(x).latent_dist` -> (mean, std), mapped into the UNet's latent
  space as the pipelines do: `(z - shift_factor) * scaling_factor` (SDXL has no shift, SD3-style
  VAEs do). Storing both moments lets training draw `mean + std * eps` every step, exactly the
  reference's `latent_dist.sample()`.
- `PromptEncoder`: exactly `StableDiffusionXLPipeline.encode_prompt` for a positive prompt with
  `clip_skip=None`: both tokenizers padded/truncated to 77, `hidden_states[-2]` of each text
  encoder concatenated on the last dim, the pooled embedding from `text_encoder_2`.
- `load_encoders`: VAE (or a `--vae` override), tokenizers and text encoders from a hub id or a
  local diffusers folder, with an identity dict: `module_fingerprint` of each module and
  `tokenizer_fingerprint` of each tokenizer (vocabulary, merges, special tokens, length: another
  pad token changes every prompt embedding as surely as other weights do). Both are defined in
  `shards.fingerprint`, so that train checks the very same thing.

The encoder classes are compute only: tensors or strings in, fp32 tensors out; no files.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from precompute.buckets import vae_scale_factor
from precompute.errors import EncoderError, ModelLoadError, NonFiniteLatentError
from shards import schema

# One definition of each fingerprint, shared with train (which checks what precompute wrote).
from shards.fingerprint import module_fingerprint, tokenizer_fingerprint
from shards.hub import locate, vae_location

__all__ = [
    "EncoderError", "LatentEncoder", "LatentInfo", "ModelLoadError", "PromptEncoder", "TextInfo",
    "NonFiniteLatentError", "check_model_sources", "compute_dtype", "load_encoders", "module_fingerprint",
    "tokenizer_fingerprint",
    "vae_latent_info",
]

logger = logging.getLogger(__name__)

FP16_VAE_HINT = (
    "encode with --vae-dtype fp32 or bf16 (the default on CUDA), or use a VAE that is fixed for fp16 "
    "(e.g. --vae madebyollin/sdxl-vae-fp16-fix)"
)

# Compute dtypes by name: tf32 is fp32 weights with TensorFloat-32 math (Ampere+ GPUs), fp32 is
# strict IEEE fp32 (cuDNN's convolutions default to TF32 in PyTorch: turned off for fp32 here).
_COMPUTE = {"fp32": (torch.float32, False), "tf32": (torch.float32, True), "bf16": (torch.bfloat16, False),
            "fp16": (torch.float16, False)}


def compute_dtype(name: str | torch.dtype) -> tuple[torch.dtype, bool]:
    """(torch dtype, whether TF32 math is on) for an encode dtype name or a torch dtype."""
    if isinstance(name, str) and name in _COMPUTE:
        return _COMPUTE[name]
    return schema.dtype_of(name), False


@contextlib.contextmanager
def _fp32_math(device: torch.device, tf32: bool):
    """TF32 on or off for CUDA matmuls and cuDNN convolutions while encoding, restored after
    (they are process-wide switches; the decode threads never touch CUDA)."""
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


# --------------------------------------------------------------------------------------------
# Latents


@dataclass(frozen=True)
class LatentInfo:
    channels: int
    scaling_factor: float
    shift_factor: float | None
    vae_scale_factor: int  # pixels per latent cell


def vae_latent_info(vae) -> LatentInfo:
    cfg = vae.config
    shift = getattr(cfg, "shift_factor", None)
    return LatentInfo(
        channels=int(cfg.latent_channels),
        scaling_factor=float(cfg.scaling_factor),
        shift_factor=None if shift is None else float(shift),
        vae_scale_factor=vae_scale_factor(cfg.block_out_channels),
    )


class LatentEncoder:
    """(B, 3, H, W) pixels in [-1, 1] -> (mean, std) of the scaled VAE posterior, each (B, C, h, w) fp32.

    The encoder runs in `dtype` ("fp32", "tf32", "bf16", "fp16" or a torch dtype); inputs are
    moved to the VAE's device and cast. SDXL's VAE overflows in fp16 (bf16 keeps fp32's range).
    With `compile`, the VAE's encoder module is compiled in place (torch.compile; the first batch
    of each shape compiles). Calling the encoder raises `NonFiniteLatentError` (naming the batch
    indices) rather than returning inf/NaN; `encode` returns the moments plus a per-image
    finiteness mask, for callers that skip the bad images and keep the rest of the batch.
    """

    def __init__(self, vae, *, dtype: torch.dtype | str = torch.float32, compile: bool = False):
        self.dtype, self.tf32 = compute_dtype(dtype)
        self.dtype_name = dtype if isinstance(dtype, str) else schema.dtype_name(self.dtype)
        if _module_dtype(vae) != self.dtype:
            # torch's own cast: diffusers' ModelMixin.to() warns about fp32-pinned modules even
            # when the VAE declares none (AutoencoderKL has none).
            torch.nn.Module.to(vae, dtype=self.dtype)
        self.vae = vae.eval().requires_grad_(False)
        self.info = vae_latent_info(vae)
        if compile:
            from shards.runtime import raise_recompile_limit

            # Batch sizes vary (a shard's last batch) and buckets bring several pixel shapes.
            raise_recompile_limit(64)
            self.vae.encoder.compile()

    @property
    def device(self) -> torch.device:
        return _module_device(self.vae)

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std, finite = self.encode(pixels)
        if not bool(finite.all()):
            bad = [int(i) for i in torch.nonzero(~finite).flatten()]
            raise NonFiniteLatentError(
                f"the VAE produced non-finite latents (inf/NaN) for image(s) {bad} of a batch of {len(finite)} "
                f"encoding in {self.dtype_name}; {FP16_VAE_HINT}", bad,
            )
        return mean, std

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std, finite): the moments as `__call__` returns them, and a (B,) bool mask on
        the CPU that is False for each image whose mean or std holds an inf or NaN."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels (B, 3, H, W), got {tuple(pixels.shape)}")
        f = self.info.vae_scale_factor
        if pixels.shape[2] % f or pixels.shape[3] % f:
            raise ValueError(f"image size {tuple(pixels.shape[2:])} is not a multiple of the VAE factor {f}")
        x = pixels.to(self.device, self.dtype)
        with _fp32_math(x.device, self.tf32):
            dist = self.vae.encode(x).latent_dist
            mean, std = dist.mean, dist.std
        # The affine map z -> (z - shift) * scale sends N(mean, std^2) to N((mean - shift) * scale,
        # (std * scale)^2); computed in fp32 so storage rounding is the only rounding after the VAE.
        mean = mean.float()
        std = std.float()
        if self.info.shift_factor is not None:
            mean = mean - self.info.shift_factor
        mean = mean * self.info.scaling_factor
        std = std * self.info.scaling_factor
        finite = torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1)
        return mean, std, finite.cpu()


# --------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class TextInfo:
    max_length: int
    prompt_dim: int  # text_encoder hidden + text_encoder_2 hidden (SDXL: 768 + 1280)
    pooled_dim: int  # text_encoder_2 projection (SDXL: 1280)


def _hidden_and_pooled(out: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """(hidden_states, pooled) of a CLIP text model's output (called with return_dict=True).

    `CLIPTextModelWithProjection` returns `CLIPTextModelOutput(text_embeds, last_hidden_state,
    hidden_states, ...)` (transformers 4.x and 5.x alike); `CLIPTextModel` returns
    `BaseModelOutputWithPooling` whose [0] is 3-D. diffusers takes the pooled embedding as
    output[0] when it is 2-D; reading `text_embeds` by name is the same tensor without relying on
    field order.
    """
    hidden = out.hidden_states
    if hidden is None:
        raise TypeError("text encoder returned no hidden_states; it must be called with output_hidden_states=True")
    pooled = getattr(out, "text_embeds", None)
    if pooled is None and out[0].ndim == 2:
        pooled = out[0]
    return hidden, pooled


def text_stack_problems(tokenizers, text_encoders) -> list[str]:
    """Why these tokenizers cannot feed these text encoders (SDXL pads both prompts to one length,
    the tokenizers' model_max_length, which each encoder's position table must hold)."""
    problems = []
    lengths = []
    for name, tok, te in zip(("tokenizer", "tokenizer_2"), tokenizers, text_encoders):
        length = getattr(tok, "model_max_length", None)
        positions = getattr(te.config, "max_position_embeddings", None)
        if not isinstance(length, int) or length < 2 or length > 1_000_000:
            unset = isinstance(length, int) and length > 1_000_000  # transformers' placeholder for "not set"
            shown = "not set in its tokenizer_config.json" if unset else repr(length)
            problems.append(f"{name}: model_max_length is {shown}; set it to "
                            f"{positions if isinstance(positions, int) else 77} (its text encoder's "
                            "max_position_embeddings; SDXL's is 77)")
            continue
        lengths.append(length)
        if isinstance(positions, int) and length > positions:
            problems.append(f"{name}: model_max_length {length} is more than the {positions} positions its text "
                            f"encoder has (max_position_embeddings)")
    if len(set(lengths)) > 1:
        problems.append(f"tokenizer and tokenizer_2 disagree on model_max_length ({lengths[0]} and {lengths[1]}): "
                        "SDXL pads both prompts to one length")
    return problems


class PromptEncoder:
    """Captions -> (prompt_embeds (N, 77, D), pooled_prompt_embeds (N, P)), fp32.

    Identical to `StableDiffusionXLPipeline.encode_prompt(prompt, do_classifier_free_guidance=False)`
    with prompt_2 = prompt and clip_skip=None. Captions over 77 tokens are truncated as SDXL
    does (`token_counts()` says which).
    """

    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2, *, dtype: torch.dtype | str = torch.float32):
        self.dtype, self.tf32 = compute_dtype(dtype)
        self.tokenizers = (tokenizer, tokenizer_2)
        self.text_encoders = tuple(
            te.to(dtype=self.dtype).eval().requires_grad_(False) for te in (text_encoder, text_encoder_2)
        )
        problems = text_stack_problems(self.tokenizers, self.text_encoders)
        if problems:
            raise ModelLoadError("its tokenizers do not fit its text encoders:\n  - " + "\n  - ".join(problems))
        lengths = {int(t.model_max_length) for t in self.tokenizers}
        self.info = TextInfo(
            max_length=lengths.pop(),
            prompt_dim=int(text_encoder.config.hidden_size + text_encoder_2.config.hidden_size),
            pooled_dim=int(text_encoder_2.config.projection_dim),
        )

    @property
    def device(self) -> torch.device:
        return _module_device(self.text_encoders[0])

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Token count of each prompt without truncation (BOS and EOS included), max over both tokenizers."""
        counts = [0] * len(prompts)
        for tok in self.tokenizers:
            for i, ids in enumerate(tok(list(prompts), truncation=False, verbose=False)["input_ids"]):
                counts[i] = max(counts[i], len(ids))
        return counts

    @torch.inference_mode()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("expected a non-empty list of prompts")
        embeds = []
        pooled = None
        for tok, te in zip(self.tokenizers, self.text_encoders):
            ids = tok(
                list(prompts),
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            device = _module_device(te)
            with _fp32_math(device, self.tf32):
                out = te(ids.to(device), output_hidden_states=True, return_dict=True)
            hidden, this_pooled = _hidden_and_pooled(out)
            # As diffusers: the pooled embedding is the first 2-D output[0] seen, which for SDXL
            # (CLIPTextModel then CLIPTextModelWithProjection) is text_encoder_2's text_embeds.
            if pooled is None and this_pooled is not None:
                pooled = this_pooled
            embeds.append(hidden[-2])
        if pooled is None:
            raise TypeError("text_encoder_2 returned no pooled embedding (text_embeds); is it a CLIPTextModelWithProjection?")
        prompt_embeds = torch.cat(embeds, dim=-1).float()
        return prompt_embeds, pooled.float()


# --------------------------------------------------------------------------------------------
# Loading

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def _check_component(folder: Path, label: str, kind: str, variant: str | None) -> list[str]:
    if not folder.is_dir():
        return [f"{label}: folder missing"]
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if kind == "tokenizer":
        if "tokenizer.json" in files or {"vocab.json", "merges.txt"} <= set(files):
            return []
        return [f"{label}: no tokenizer files (need vocab.json + merges.txt, or tokenizer.json)"]
    problems = []
    if "config.json" not in files:
        problems.append(f"{label}: no config.json")
    weights = [f for f in files if f.endswith(_WEIGHT_SUFFIXES)]
    if not weights:
        problems.append(f"{label}: no weights (*.safetensors or *.bin)")
    elif variant and not any(f".{variant}." in w for w in weights):
        problems.append(f"{label}: no weights for variant {variant!r} (files: {', '.join(sorted(weights))})")
    return problems


def check_model_sources(model: str | None, vae: str | None = None, variant: str | None = None) -> list[str]:
    """Every problem with a local model folder (and --vae folder) found without loading anything.

    Hub ids cannot be checked offline; they pass here and fail, if they must, at load time.
    """
    problems: list[str] = []
    if model:
        loc = locate(model)
        if loc.kind == "folder":
            for comp in _COMPONENTS:
                if comp == "vae" and vae:
                    continue
                kind = "tokenizer" if comp.startswith("tokenizer") else "module"
                problems += _check_component(loc.path / comp, f"{model}/{comp}", kind, variant)
        elif loc.problem("--model"):
            problems.append(loc.problem("--model"))
    if vae:
        loc = locate(vae)
        if loc.kind == "folder":
            repo, sub = vae_location(vae)
            p = Path(repo)
            problems += _check_component(p / sub if sub else p, f"{vae}/{sub}" if sub else vae, "module", None)
        elif loc.problem("--vae"):
            problems.append(loc.problem("--vae"))
    return problems


@dataclass(frozen=True)
class ModelLayout:
    """What the model's configs say about image sizes, read before any weight loads."""

    vae_scale_factor: int  # pixels per latent cell (8 for SDXL)
    unet_down_blocks: int | None  # None: the model folder has no UNet config (SDXL's 3 is assumed)
    problems: tuple[str, ...] = ()  # why the VAE's latents cannot serve this model (or this project)


def model_layout(model: str, vae: str | None = None, *, revision: str | None = None,
                 cache_dir: str | None = None) -> ModelLayout:
    """The VAE's scale factor (of --vae when given) and the UNet's down-block count, from their
    config.json alone: a local folder, or a hub id through the libraries (the hub cache when
    offline). ModelLoadError, naming the file and the likely cause, when a config cannot be read."""
    import json

    from diffusers import ConfigMixin

    from precompute.buckets import vae_scale_factor

    class _AnyConfig(ConfigMixin):  # load_config only reads JSON; any ConfigMixin will do
        config_name = "config.json"

    def read(repo: str, subfolder: str | None, rev: str | None, what: str, optional: bool = False) -> dict | None:
        local = Path(repo).expanduser()
        if local.is_dir():
            path = local / subfolder / "config.json" if subfolder else local / "config.json"
            if optional and not path.is_file():
                return None
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"cannot read {path}: {e}") from None
        try:
            return dict(_AnyConfig.load_config(repo, subfolder=subfolder, revision=rev, cache_dir=cache_dir))
        except (OSError, ValueError) as e:
            if optional:
                return None
            raise ModelLoadError(
                f"cannot read {what}'s config.json: {type(e).__name__}: {e}\n  {repo!r} is not a local folder, so it "
                "was looked up as a hub id: check the id, the network and HF_TOKEN, or download it once and pass "
                "the folder") from None

    if vae:
        vae_repo, vae_sub = vae_location(vae)
        vae_config = read(vae_repo, vae_sub, None, f"--vae {vae}")
    else:
        vae_config = read(locate(model).ref, "vae", revision, f"{model}/vae")
    unet_config = read(locate(model).ref, "unet", revision, f"{model}/unet", optional=True)
    try:
        factor = vae_scale_factor(vae_config["block_out_channels"])
        blocks = None if unet_config is None else len(unet_config["down_block_types"])
    except (KeyError, TypeError) as e:
        raise ModelLoadError(f"{vae or model}: a VAE or UNet config.json lacks {e} (not a diffusers SDXL "
                             "model?)") from None
    return ModelLayout(vae_scale_factor=factor, unet_down_blocks=blocks,
                       problems=tuple(_latent_problems(vae or f"{model}/vae", vae_config, f"{model}/unet", unet_config)))


def _latent_problems(vae_name: str, vae_config: dict, unet_name: str, unet_config: dict | None) -> list[str]:
    """Why latents of this VAE cannot train an adapter for this UNet, from their configs: found
    before anything is encoded, not when train refuses the finished cache."""
    problems = []
    if vae_config.get("latents_mean") is not None or vae_config.get("latents_std") is not None:
        problems.append(f"{vae_name}: its config sets latents_mean/latents_std (per-channel latent normalisation, as "
                        "Playground v2.5 does); the cache stores latents as (z - shift_factor) * scaling_factor, "
                        "which is not what such a model's UNet was trained on: not supported")
    channels = vae_config.get("latent_channels", 4)
    if unet_config is not None and unet_config.get("in_channels", 4) != channels:
        problems.append(f"{unet_name} takes {unet_config.get('in_channels', 4)} input channels but the VAE makes "
                        f"{channels}-channel latents (an inpainting UNet takes 9: a T2I-Adapter trains on a "
                        "text-to-image UNet)")
    return problems


def load_encoders(
    model: str,
    *,
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    device: str | torch.device = "cpu",
    vae_dtype: torch.dtype | str = torch.float32,
    text_dtype: torch.dtype | str = torch.float32,
    compile_vae: bool = False,
) -> tuple[LatentEncoder, PromptEncoder, dict]:
    """Load VAE (or the `vae` override), both tokenizers and both text encoders.

    Returns the two encoders on `device` and the encoder part of the cache identity. Modules are
    loaded in fp32 and fingerprinted before they are cast, so a fingerprint names the weights
    (the compute dtypes are recorded separately in the identity).
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    problems = check_model_sources(model, vae, variant)
    if problems:
        raise ModelLoadError("cannot load the model:\n  - " + "\n  - ".join(problems))
    for value in (vae_dtype, text_dtype):
        compute_dtype(value)  # an unknown name fails before anything loads
    root = locate(model).ref

    def load(what: str, fn, repo: str, *args, **kwargs):
        try:
            return fn(repo, *args, **kwargs)
        except Exception as e:  # from_pretrained raises OSError, ValueError, EnvironmentError...
            # Not a local folder: the libraries looked it up on the hub, and their message
            # ("does not appear to have a file named ...") hides that the hub may be unreachable.
            hint = "" if Path(repo).exists() else (
                f"\n  {repo!r} is not a local folder, so it was looked up as a hub id: check the id, the network "
                "and HF_TOKEN, or download it once and pass the folder (HF_HUB_OFFLINE=1 uses the local hub "
                "cache without retrying the network)"
            )
            raise ModelLoadError(f"cannot load {what}: {type(e).__name__}: {e}{hint}") from e

    if vae:
        vae_repo, vae_sub = vae_location(vae)
        vae_module = load(f"--vae {vae}", AutoencoderKL.from_pretrained, vae_repo, subfolder=vae_sub, torch_dtype=torch.float32)
    else:
        vae_module = load(
            f"{model}/vae", AutoencoderKL.from_pretrained, root, subfolder="vae", revision=revision, variant=variant,
            torch_dtype=torch.float32,
        )
    tokenizer = load(f"{model}/tokenizer", CLIPTokenizer.from_pretrained, root, subfolder="tokenizer", revision=revision)
    tokenizer_2 = load(f"{model}/tokenizer_2", CLIPTokenizer.from_pretrained, root, subfolder="tokenizer_2", revision=revision)
    text_encoder = load(
        f"{model}/text_encoder", CLIPTextModel.from_pretrained, root, subfolder="text_encoder", revision=revision,
        variant=variant, dtype=torch.float32,
    )
    text_encoder_2 = load(
        f"{model}/text_encoder_2", CLIPTextModelWithProjection.from_pretrained, root, subfolder="text_encoder_2",
        revision=revision, variant=variant, dtype=torch.float32,
    )
    identity = {
        "model": model,
        "revision": revision,
        "variant": variant,
        "vae": vae,
        "vae_fingerprint": module_fingerprint(vae_module),
        "text_encoder_fingerprint": module_fingerprint(text_encoder),
        "text_encoder_2_fingerprint": module_fingerprint(text_encoder_2),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "tokenizer_2_fingerprint": tokenizer_fingerprint(tokenizer_2),
    }
    if compute_dtype(vae_dtype)[0] == torch.float16 and getattr(vae_module.config, "force_upcast", False):
        logger.warning(
            "this VAE's config sets force_upcast (it is known to overflow in fp16) but --vae-dtype is fp16; "
            "if encoding fails with non-finite latents, %s", FP16_VAE_HINT,
        )
    try:  # PromptEncoder checks that the tokenizers fit the text encoders; the message names the model
        prompt = PromptEncoder(tokenizer, tokenizer_2, text_encoder.to(device), text_encoder_2.to(device),
                               dtype=text_dtype)
    except ModelLoadError as e:
        raise ModelLoadError(f"{model}: {e}") from None
    latent = LatentEncoder(vae_module.to(device), dtype=vae_dtype, compile=compile_vae)
    return latent, prompt, identity
