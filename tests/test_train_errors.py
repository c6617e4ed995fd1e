"""User-facing start-up and CLI messages: what they say, and that no traceback leaks through."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data._utils.worker import ExceptionWrapper

from shards.errors import ShardError
from shards.fingerprint import module_fingerprint, tokenizer_fingerprint
from train.__main__ import user_message
from shards.identity import Encoder
from train.checks import compare_fingerprints


def _raised_in_a_worker(error: Exception) -> Exception:
    """The exception as the training process receives it from a DataLoader worker."""
    try:
        raise error
    except Exception:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(type(error)) as caught:
        wrapped.reraise()
    return caught.value


def test_a_worker_error_is_reduced_to_its_own_message():
    message = "shard-000003.tar: sha256 abc... != recorded def...: the shard changed after precompute"
    received = _raised_in_a_worker(ShardError(message))
    assert "Traceback" in str(received) and str(received).startswith("Caught ShardError")
    assert user_message(received) == message


def test_a_multi_line_worker_error_keeps_every_line():
    message = "shard-000001.tar: sample 0001-0002 lacks members:\n  - latent_std.safetensors"
    assert user_message(_raised_in_a_worker(ShardError(message))) == message


def test_other_errors_are_printed_as_they_are():
    assert user_message(ShardError("Caught my eye: nothing wrapped here")) == "Caught my eye: nothing wrapped here"


def test_fingerprint_mismatch_names_a_variant_difference_as_the_likely_cause():
    torch.manual_seed(0)
    ours = torch.nn.Linear(2, 2)
    identity = {"encoder": {"model": "m", "variant": "fp16", "vae_fingerprint": "f" * 64,
                            "text_encoder_fingerprint": module_fingerprint(ours), "text_encoder_2_fingerprint": None}}
    report = compare_fingerprints(Encoder.from_dict(identity["encoder"]), {"vae": ours, "text_encoder": ours, "text_encoder_2": None}, variant=None)
    assert report.differences[0].startswith("vae fingerprint: cache ffffffffffffffff... (encoded with 'm') != this")
    assert report.differences[1] == ("likely cause: the cache was encoded from weight variant 'fp16' and this run "
                                     "loads --variant None; pass --variant fp16 to load the same weight files")
    assert len(report.differences) == 2
    same_variant = compare_fingerprints(Encoder.from_dict(identity["encoder"]), {"vae": ours}, variant="fp16")
    assert len(same_variant.differences) == 1  # the variants agree: no hint


class _Tokenizer:
    """The attributes tokenizer_fingerprint reads, as a slow CLIPTokenizer has them."""

    def __init__(self, pad: str):
        self.vocab = {"!": 0, "a": 1, "b": 2, "ab": 3, "<|startoftext|>": 4, "<|endoftext|>": 5}
        self.special_tokens_map = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad}
        self.bos_token_id, self.eos_token_id, self.unk_token_id = 4, 5, 5
        self.pad_token_id = self.vocab[pad]
        self.model_max_length, self.padding_side = 77, "right"
        self.bpe_ranks = {("a", "b"): 0}

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def test_tokenizer_fingerprints_are_compared_when_the_cache_recorded_them():
    ours = torch.nn.Linear(2, 2)
    modules = {"vae": ours, "text_encoder": ours, "text_encoder_2": ours}
    tokenizers = {"tokenizer": _Tokenizer("<|endoftext|>"), "tokenizer_2": _Tokenizer("<|endoftext|>")}
    encoder = {"model": "m", "variant": "fp16", **{f"{n}_fingerprint": module_fingerprint(ours) for n in modules},
               "tokenizer_fingerprint": tokenizer_fingerprint(_Tokenizer("<|endoftext|>")),
               "tokenizer_2_fingerprint": tokenizer_fingerprint(_Tokenizer("!"))}

    report = compare_fingerprints(Encoder.from_dict(encoder), modules, tokenizers=tokenizers, variant=None)
    assert len(report.differences) == 1  # no weight-variant hint: the weights are the cache's
    assert report.differences[0].startswith("tokenizer_2 fingerprint: cache ")
    assert report.differences[0].endswith(f"model's {tokenizer_fingerprint(tokenizers['tokenizer_2'])[:16]}...")

    older = {k: v for k, v in encoder.items() if not k.startswith("tokenizer")}
    report = compare_fingerprints(Encoder.from_dict(older), modules, tokenizers=tokenizers, variant=None)
    assert report.differences == []  # a cache from before tokenizer fingerprints is not refused for it
    assert report.notes == [f"{n}: the cache recorded no fingerprint; cannot check it" for n in tokenizers]

    no_tokenizers = compare_fingerprints(Encoder.from_dict(encoder), modules, tokenizers={"tokenizer": None}, variant=None)
    assert no_tokenizers.differences == []
    assert no_tokenizers.notes == [f"{n}: MODEL has none; cannot check it against the cache" for n in tokenizers]
