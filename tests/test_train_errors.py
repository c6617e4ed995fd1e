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


def _snapshot(root) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes), links included as their target."""
    import os
    from pathlib import Path

    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            out[rel] = ("-> " + os.readlink(path)).encode() if path.is_symlink() else path.read_bytes()
    return out


def _read_only_command(folder, command: list[str]) -> list[str]:
    """`command` run with `folder` read-only, the way a user meets one. Root ignores permission
    bits, so as root the folder is bind-mounted read-only in a private user and mount namespace
    (`unshare`, nothing changes outside the child); anyone else gets a folder without write bits."""
    import os
    import shlex

    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return command
    f = shlex.quote(str(folder))
    script = f"mount --bind {f} {f} && mount -o remount,ro,bind {f} && exec {shlex.join(command)}"
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script]


def test_train_into_a_read_only_output_dir_is_one_line_and_writes_nothing(tiny_model, fill_cache, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file\n")
    before_out, before_cache = _snapshot(out), _snapshot(fill_cache)
    command = [sys.executable, "-m", "train", "--model", str(tiny_model), "--cache", str(fill_cache), "--output-dir",
               str(out), "--max-steps", "2", "--batch-size", "2", "--num-workers", "0"]
    proc = subprocess.run(_read_only_command(out, command), cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    os.chmod(out, 0o755)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"--output-dir {out}: cannot write there" in errors[0], errors
    assert "Read-only file system" in errors[0] or "Permission denied" in errors[0], errors
    assert _snapshot(out) == before_out and _snapshot(fill_cache) == before_cache


def test_a_folder_where_an_output_file_goes_is_said_at_start_not_after_training(tmp_path):
    from train.startup import output_obstacles

    out = tmp_path / "out"
    (out / "train_config.json").mkdir(parents=True)
    (out / "diffusion_pytorch_model.safetensors").mkdir()
    (out / "checkpoints").write_text("a file")
    elsewhere = tmp_path / "big-disk"
    elsewhere.mkdir()
    (out / "logs").symlink_to(elsewhere)  # a folder kept elsewhere on purpose: fine
    assert output_obstacles(out) == [
        f"{out}/train_config.json: not a file, where the run writes its train_config.json: move it away",
        f"{out}/diffusion_pytorch_model.safetensors: not a file, where the run writes its "
        "diffusion_pytorch_model.safetensors: move it away",
        f"{out}/checkpoints: not a folder, where the run keeps its checkpoints: move it away"]
    assert output_obstacles(tmp_path / "new") == []
