"""Encoder fingerprints: the one definition precompute records and train checks.

`module_fingerprint(module)` is sha256 over the module's architecture config (without bookkeeping
keys that change with the library version or load options) and every state_dict tensor in sorted
name order (name, dtype, shape, byte count, bytes). Precompute loads the VAE and text encoders in
fp32 and fingerprints them before casting; train loads them the same way to compare, so the
fingerprint names the weights, not the compute dtype.

`tokenizer_fingerprint(tokenizer)` is sha256 over what decides the ids a tokenizer produces
(vocabulary, merges or backend pipeline, special tokens and their ids, max length, padding side),
read from the tokenizer object's own attributes: another pad token changes every prompt embedding
as surely as other weights do.

Both live in `shards/` (torch only, no model imports: they work on the objects passed in)
because they are part of the cache contract: both stages must compute the very same hash.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

# Config keys that say which library version or runtime wrote a config, not what the module
# computes; left out so that re-saving or upgrading a library does not change a fingerprint.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "architectures", "return_dict",
                         "output_hidden_states", "output_attentions", "use_cache", "id2label", "label2id"}
_HASH_CHUNK = 64 << 20  # bytes copied to the CPU per step, so a GPU module never doubles its memory


def _config_dict(module: torch.nn.Module) -> dict:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return {}
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    if hasattr(cfg, "to_dict"):
        # transformers: keep the model's own architecture fields, drop the generic
        # PretrainedConfig bookkeeping (many of its fields come and go between versions).
        try:
            from transformers import PretrainedConfig

            generic = set(PretrainedConfig().to_dict()) - {"bos_token_id", "eos_token_id", "pad_token_id"}
        except ImportError:  # a diffusers-only install has no transformers configs to filter
            generic = set()
        d = {k: v for k, v in d.items() if k not in generic}
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 hex digest over `module`'s architecture config and weights (see the module docstring)."""
    h = hashlib.sha256()
    h.update(json.dumps(_config_dict(module), sort_keys=True, default=str).encode("utf-8"))
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"\n{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|{t.numel() * t.element_size()}\n".encode())
        flat = t.contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, flat.numel(), _HASH_CHUNK):
            h.update(flat[start : start + _HASH_CHUNK].cpu().numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything in a tokenizer that decides the ids it produces: the full vocabulary
    (added tokens included), the BPE merges in rank order (or a fast tokenizer's whole serialised
    pipeline), the special tokens with their ids (pad among them), `model_max_length` and the
    padding side. File names, paths and hub revisions play no part."""
    state: dict[str, Any] = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special_tokens": sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()),
        "special_ids": {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")},
        "model_max_length": int(tokenizer.model_max_length),
        "padding_side": tokenizer.padding_side,
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state["backend"] = json.loads(backend.to_str())
        # Call-time state: every call with padding= / truncation= rewrites these two.
        state["backend"].pop("truncation", None)
        state["backend"].pop("padding", None)
    else:
        ranks = getattr(tokenizer, "bpe_ranks", None)
        if ranks is None:
            raise TypeError(f"cannot fingerprint a {type(tokenizer).__name__}: it has neither BPE merges nor a backend")
        state["merges"] = [" ".join(pair) for pair, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    blob = json.dumps(state, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
