"""Hostile caches: consistent lies. Each case rewrites samples *and* re-hashes their shard's record
and the manifest, so every count, byte size and sha256 matches: only the readers' content checks
can catch them. Each must be an error naming the shard, the sample's key and what is wrong, from
train's loader and from `shards verify`, and never cost more than the caps allow.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from streams import cache_stream

from shards import schema
from shards.errors import ShardError
from shards.manifest import Manifest, ManifestError, ShardRecord
from shards.reader import write_empty_prompt
from shards.stores import open_store
from shards.identity import CacheIdentity
from shards.synthetic import synthetic_identity, synthetic_sample
from shards.verify import VerifyError, verify_cache
from shards.writer import ShardWriter, _tarinfo
from clirun import run_cli

REPO = Path(__file__).resolve().parents[1]
IDENTITY = synthetic_identity(resolution=16, prompt_dim=8, pooled_dim=4)  # latents 4x2x2, 16 px conditions
IDENTITY["input_limits"] = {"max_input_bytes": 256 << 20, "max_image_pixels": 64_000_000, "follow_symlinks": False}


def _cache(root: Path, shards: int = 2, per_shard: int = 3) -> Manifest:
    store = open_store(root)
    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(shards):
        with ShardWriter(store, i) as w:
            for p in range(per_shard):
                w.write(synthetic_sample(schema.sample_key(i, p), IDENTITY, g))
            records.append(w.commit({}, []))
    write_empty_prompt(store, torch.zeros(1, 77, 8), torch.zeros(1, 4), "bf16")
    manifest = Manifest.build(CacheIdentity.from_dict(IDENTITY), records, {}, code_version="test", created="")
    manifest.save(store)
    return manifest


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def _rewrite(root: Path, edit, shards=(1,)) -> Manifest:
    """Apply edit(key, {suffix: bytes}) -> {suffix: bytes} to every sample of `shards`, then
    re-hash the records and the manifest so they agree with the new bytes."""
    store = open_store(root)
    manifest = Manifest.load(store)
    records = []
    for r in manifest.shards:
        if r.index not in shards:
            records.append(r)
            continue
        path = root / r.name
        grouped: dict[str, dict[str, bytes]] = {}
        for name, data in _members(path):
            key, suffix = schema.split_member_name(name)
            grouped.setdefault(key, {})[suffix] = data
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for key, members in grouped.items():
                members = edit(key, members)
                for suffix in schema.MEMBERS:
                    tf.addfile(_tarinfo(f"{key}.{suffix}", len(members[suffix])), io.BytesIO(members[suffix]))
        data = buf.getvalue()
        path.write_bytes(data)
        rec = ShardRecord(index=r.index, name=r.name, samples=r.samples, bytes=len(data),
                          sha256=hashlib.sha256(data).hexdigest(), keys=r.keys)
        store.write_bytes(schema.record_name(r.index), rec.to_json())
        records.append(rec)
    manifest = Manifest.build(CacheIdentity.from_dict(IDENTITY), records, {}, code_version="test", created="")
    manifest.save(store)
    return manifest


def _tensors(edit_tensors):
    def edit(key, members):
        tensors = dict(st_load(members[schema.TENSOR_MEMBER]))
        tensors = edit_tensors(key, tensors)
        return {**members, schema.TENSOR_MEMBER: st_save({k: v.contiguous() for k, v in tensors.items()})}
    return edit


def _only_first(change):
    return lambda key, t: change(t) if key.endswith("-000000") else t


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _meta(change):
    def edit(key, members):
        meta = json.loads(members[schema.META_MEMBER])
        return {**members, schema.META_MEMBER: change(meta)}
    return edit


def _set(t: dict, name: str, value: torch.Tensor) -> dict:
    return {**t, name: value}


CASES = {
    "nan-latent": (_tensors(_only_first(lambda t: _set(t, "latent_mean", t["latent_mean"].float().fill_(float("nan"))
                                                       .to(torch.bfloat16)))),
                   "latent_mean has non-finite values"),
    "inf-prompt": (_tensors(_only_first(lambda t: _set(t, "prompt_embeds", t["prompt_embeds"].float().fill_(float("inf"))
                                                       .to(torch.bfloat16)))),
                   "prompt_embeds has non-finite values"),
    "float64-everywhere": (_tensors(lambda k, t: {n: v.double() for n, v in t.items()}),
                           "latent_mean is torch.float64, the manifest says bf16"),
    "int64-latents": (_tensors(lambda k, t: _set(t, "latent_mean", t["latent_mean"].long())),
                      "latent_mean is torch.int64, the manifest says bf16"),
    "latent-of-another-size": (_tensors(lambda k, t: {**t, "latent_mean": torch.zeros(4, 3, 3, dtype=torch.bfloat16),
                                                      "latent_std": torch.zeros(4, 3, 3, dtype=torch.bfloat16)}),
                               "cond.png is 16x16, the latent needs 24x24"),
    "prompt-width": (_tensors(lambda k, t: _set(t, "prompt_embeds", torch.zeros(1, 77, 9, dtype=torch.bfloat16))),
                     "prompt_embeds (1, 77, 9), the manifest says (k, 77, 8)"),
    "condition-of-another-size": (lambda k, m: {**m, schema.COND_MEMBER: _png(np.zeros((24, 24, 3), np.uint8))},
                                  "cond.png is 24x24, the latent needs 16x16"),
    "huge-png-header": (lambda k, m: {**m, schema.COND_MEMBER: _huge_png()},
                        "cond.png is 13000x13000, the latent needs 16x16"),
    "deep-json": (lambda k, m: {**m, schema.META_MEMBER: b"[" * 200_000 + b"]" * 200_000},
                  "nests 200000 levels deep"),
    "big-json": (lambda k, m: {**m, schema.META_MEMBER: b'{"x": "' + b"a" * (2 << 20) + b'"}'},
                 "over the 1048576-byte limit (SHARDS_MAX_JSON_MEMBER_BYTES)"),
    "target-size-lie": (_meta(lambda m: json.dumps({**m, "target_size": [32, 32]}).encode()),
                        "target_size (32, 32) != latent size x 8 = (16, 16)"),
    "pooled-width": (_tensors(lambda k, t: _set(t, "pooled_prompt_embeds", torch.zeros(1, 5, dtype=torch.bfloat16))),
                     "pooled_prompt_embeds (1, 5), the manifest says (k, 4)"),
    # add_time_ids come from the json: json.dumps writes float("inf") as Infinity, which
    # json.loads reads back; int() of it was an uncaught OverflowError.
    "infinite-original-size": (_meta(lambda m: json.dumps({**m, "original_size": [float("inf"), 16]}).encode()),
                               "original_size must be two whole numbers [h, w], got [inf, 16]"),
    "nan-crop": (_meta(lambda m: json.dumps({**m, "crop_top_left": [float("nan"), 0]}).encode()),
                 "crop_top_left must be two whole numbers [h, w], got [nan, 0]"),
    "fractional-target-size": (_meta(lambda m: json.dumps({**m, "target_size": [16.5, 16]}).encode()),
                               "target_size must be two whole numbers [h, w], got [16.5, 16]"),
    "absurd-original-size": (_meta(lambda m: json.dumps({**m, "original_size": [10 ** 30, 16]}).encode()),
                             "original_size [1000000000000000000000000000000, 16] is outside [1, 16777216]"),
    "negative-crop": (_meta(lambda m: json.dumps({**m, "crop_top_left": [-8, 0]}).encode()),
                      "crop_top_left [-8, 0] is outside [0, 16777216]"),
    # Synthetic samples are 32x16 images resized to cover 16x16 (no resize: 32x16), cropped at
    # row 8; a crop at row 40 lies outside anything precompute could have cropped.
    "crop-outside-the-resize": (_meta(lambda m: json.dumps({**m, "crop_top_left": [40, 0]}).encode()),
                                "crop_top_left [40, 0] with target_size [16, 16] does not fit in original_size "
                                "[32, 16] resized to cover the target (32x16)"),
    # Precompute skips images over its pixel cap, which the identity records.
    "original-over-the-pixel-cap": (_meta(lambda m: json.dumps({**m, "original_size": [8000, 9000],
                                                                  "crop_top_left": [0, 0]}).encode()),
                                    "original_size [8000, 9000] is 72,000,000 pixels, over the 64,000,000 the cache "
                                    "was made with"),
    # A consistent lie about size: a latent, a PNG and a json that agree with each other on
    # 13000 x 13000 px. Only the manifest's geometry (16 px) can refuse it, and it must do so
    # before the PNG (~500 MB as RGB) is decoded.
    "consistent-huge-lie": (lambda k, m: _consistent_huge_lie(k, m),
                            "latent 1625x1625 covers 13000x13000 px (x8), not the manifest's resolution 16x16"),
}


def _consistent_huge_lie(key: str, members: dict) -> dict:
    if not key.endswith("-000000"):
        return members
    big = torch.zeros(4, 1625, 1625, dtype=torch.bfloat16)
    tensors = {**st_load(members[schema.TENSOR_MEMBER]), "latent_mean": big, "latent_std": big.clone()}
    meta = json.loads(members[schema.META_MEMBER])
    meta.update(original_size=[13000, 13000], crop_top_left=[0, 0], target_size=[13000, 13000])
    return {schema.TENSOR_MEMBER: st_save(tensors), schema.META_MEMBER: json.dumps(meta).encode(),
            schema.COND_MEMBER: _huge_png()}


_HUGE: list[bytes] = []


def _huge_png() -> bytes:
    """A 13000 x 13000 PNG (1-bit, so it is small on disk; decoded to RGB it would be ~500 MB)."""
    if not _HUGE:
        buf = io.BytesIO()
        Image.new("1", (13000, 13000)).save(buf, format="PNG")
        _HUGE.append(buf.getvalue())
    return _HUGE[0]


def _cond_png_as(mode: str) -> bytes:
    """A 16 x 16 conditioning PNG in another layout than the 8-bit RGB precompute writes."""
    image = (Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)) if mode == "I;16"
             else Image.new("RGB", (16, 16), (10, 200, 30)).convert(mode))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


CASES.update({
    "negative-std": (_tensors(_only_first(lambda t: _set(t, "latent_std", -t["latent_std"].float().abs()
                                                         .add(0.5).to(torch.bfloat16)))),
                     "latent_std has negative values"),
    "caption-not-a-string": (_meta(lambda m: json.dumps({**m, "captions": [5]}).encode()),
                             "captions must be a list of strings, got [5]"),
    "flip-not-a-boolean": (_meta(lambda m: json.dumps({**m, "flip": "yes"}).encode()),
                           "flip must be true or false, got 'yes'"),
})
# Converted silently, a 16-bit PNG would be clipped and a palette one read as its colours.
CASES.update({
    f"cond-png-{mode.replace(';', '')}": (
        lambda key, m, mode=mode: {**m, schema.COND_MEMBER: _cond_png_as(mode)} if key.endswith("-000000") else m,
        "cond.png is not an 8-bit RGB PNG")
    for mode in ("I;16", "P", "RGBA", "L")
})


@pytest.fixture
def decoded_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The (w, h) of every image PIL decodes while the test runs (headers alone are not decoded)."""
    from PIL import ImageFile

    seen: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def spy(im):
        seen.append(im.size)
        return load(im)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return seen


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_loader_and_verify_name_the_shard_the_key_and_the_lie(tmp_path, case, decoded_sizes):
    edit, expected = CASES[case]
    _cache(tmp_path)
    manifest = _rewrite(tmp_path, edit)
    store = open_store(tmp_path)
    decoded_sizes.clear()
    with pytest.raises(ShardError) as err:  # the hashes hold: the content checks must catch it
        list(cache_stream(store, manifest, batch_size=2, seed=0, epoch=0, shuffle_buffer=0))
    message = str(err.value)
    assert message.startswith("shards/shard-000001.tar: "), message
    assert expected in message and "000001-00000" in message
    # A content check points at the whole-cache check; a member refused by its tar header names it.
    assert "shards verify" in message or "member '000001-000000" in message
    with pytest.raises(VerifyError) as err:
        verify_cache(store)
    assert "shards/shard-000001.tar" in str(err.value) and expected in str(err.value)
    # Whatever the lie, nothing larger than the manifest's 16 x 16 px was ever decoded.
    assert decoded_sizes and set(decoded_sizes) == {(16, 16)}, decoded_sizes


def test_shards_verify_reports_a_non_finite_size_in_one_line(tmp_path):
    """The CLI as a user runs it: an Infinity in original_size was an OverflowError traceback."""
    _cache(tmp_path)
    _rewrite(tmp_path, CASES["infinite-original-size"][0])
    proc = subprocess.run([sys.executable, "-m", "shards", "verify", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: verify failed: shards/shard-000001.tar: sample 000001-000000: bad json member: "
                               "original_size must be two whole numbers [h, w], got [inf, 16]"), lines[0]


def test_an_oversized_manifest_is_refused_before_it_is_read(tmp_path, monkeypatch):
    _cache(tmp_path)
    monkeypatch.setenv("SHARDS_MAX_MANIFEST_BYTES", "1KiB")
    with pytest.raises(ManifestError, match=r"manifest.json is \d+ bytes, over the 1024-byte limit "
                                            r"\(SHARDS_MAX_MANIFEST_BYTES\)"):
        Manifest.load(open_store(tmp_path))
    monkeypatch.delenv("SHARDS_MAX_MANIFEST_BYTES")
    (tmp_path / "manifest.json").write_bytes(b'{"format": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(ManifestError, match="nests 100001 levels deep, over the limit of 64"):
        Manifest.load(open_store(tmp_path))


class _Endless(io.RawIOBase):
    """A body that never ends (a hostile server's, or a file that keeps growing); counts what it gives."""

    def __init__(self, size: int | None = None):
        self.given, self.size = 0, size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        b[:] = b"{" * len(b)
        self.given += len(b)
        return len(b)


def test_capped_files_are_refused_as_they_are_read_never_read_whole(tmp_path, monkeypatch):
    """Records, identity, empty prompt and manifest are read with their cap: a file's or a
    response's declared length over it is refused before a byte is read; a body longer than it
    declared (or declaring nothing) stops being read one byte past the cap."""
    from shards.limits import LimitError
    from shards.manifest import read_identity, read_record
    from shards.reader import load_empty_prompt
    from shards.store import LocalStore

    manifest = _cache(tmp_path)
    record = tmp_path / schema.record_name(0)
    with record.open("r+b") as f:
        f.truncate(2 << 30)  # 2 GiB, sparse: costs no disk
    with pytest.raises(VerifyError, match=rf"records/shard-000000.json is {2 << 30} bytes, over the 67108864-byte "
                                          r"limit \(SHARDS_MAX_RECORD_BYTES\)"):
        verify_cache(open_store(tmp_path), manifest)
    with pytest.raises(ManifestError, match=r"over the 67108864-byte limit"):
        read_record(open_store(tmp_path), 0)

    bodies: list[_Endless] = []

    class Hostile(LocalStore):  # every file a body without end; `declared` its claimed length
        declared: int | None = None

        def open_read(self, rel):
            bodies.append(_Endless(self.declared))
            return bodies[-1]

    store = Hostile(tmp_path)
    monkeypatch.setenv("SHARDS_MAX_RECORD_BYTES", "3MiB")
    with pytest.raises(ManifestError, match=r"identity.json is over the 3145728-byte limit"):
        read_identity(store)
    assert bodies[-1].given <= (3 << 20) + (1 << 20)  # the cap and at most one chunk more
    with pytest.raises(LimitError, match=r"empty_prompt.safetensors is over the 268435456-byte limit "
                                         r"\(SHARDS_MAX_TENSOR_MEMBER_BYTES\)"):
        load_empty_prompt(store)
    assert bodies[-1].given <= (257 << 20)
    store.declared = 1 << 40  # a terabyte, says the response: refused before its body is read
    with pytest.raises(ManifestError, match=rf"manifest.json is {1 << 40} bytes, over the"):
        Manifest.load(store)
    assert bodies[-1].given == 0


def test_a_fifo_planted_in_a_cache_is_refused_not_waited_on(tmp_path):
    _cache(tmp_path)
    record = tmp_path / schema.record_name(1)
    record.unlink()
    os.mkfifo(record)
    result = run_cli("shards", ["verify", str(tmp_path)], timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"{record}: not a regular file (a cache holds only files)" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_on_a_cache_with_a_nan_sample_stops_with_a_message_and_saves_nothing(tiny_model, fill_cache, tmp_path):
    """The whole CLI: before, this trained 'successfully' into an all-NaN adapter."""
    import shutil

    cache = Path(shutil.copytree(fill_cache, tmp_path / "cache"))
    global IDENTITY
    real = Manifest.load(open_store(cache))
    saved, IDENTITY = IDENTITY, real.identity.to_dict()
    try:
        _rewrite(cache, _tensors(_only_first(lambda t: _set(t, "latent_mean", torch.full_like(
            t["latent_mean"], float("nan"))))), shards=(2,))
    finally:
        IDENTITY = saved
    out = tmp_path / "out"
    proc = run_cli("train", ["--model", tiny_model, "--cache", cache, "--output-dir", out, "--max-steps", "8",
                             "--batch-size", "2", "--num-workers", "0", "--checkpointing-steps", "2"], timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: shards/shard-000002.tar: sample 000002-000000: latent_mean has non-finite values" in proc.stderr
    assert not (out / "diffusion_pytorch_model.safetensors").exists()
    for ckpt in (out / "checkpoints").glob("step-*"):  # whatever was saved is finite
        from safetensors.torch import load_file

        weights = load_file(ckpt / "adapter" / "diffusion_pytorch_model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_non_finite_loss_stops_training_naming_the_step_and_keys(tiny_model, fill_cache, tmp_path):
    """Finite inputs, an absurd learning rate: the weights blow up, the loss goes NaN; the run
    stops at the next metrics flush, which precedes every checkpoint, so none holds NaN."""
    from train.config import TrainConfig
    from train.errors import NonFiniteError
    from train.loop import train

    out = tmp_path / "out"
    cfg = TrainConfig(model=str(tiny_model), cache=str(fill_cache), output_dir=str(out), batch_size=2, num_workers=0,
                      learning_rate=1e30, max_steps=8, checkpointing_steps=2, log_every=1, max_grad_norm=1e30,
                      adam_epsilon=1e-30)
    with pytest.raises(NonFiniteError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith("step ") and "Batch keys on this rank: 0000" in message
    assert "shards verify" in message and "--resume latest" in message
    step = int(message.split()[1].rstrip(":"))
    from safetensors.torch import load_file

    for ckpt in (out / "checkpoints").glob("step-*"):
        assert int(ckpt.name.split("-")[1]) < step
        weights = load_file(ckpt / "adapter" / "diffusion_pytorch_model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "diffusion_pytorch_model.safetensors").exists()


def test_a_manifest_declaring_a_giant_geometry_is_refused_before_any_image_is_read(tmp_path, monkeypatch):
    """Every conditioning image is held to the cache's geometry before it decodes; a hostile
    manifest could declare the geometry itself huge. It is capped (SHARDS_MAX_IMAGE_PIXELS)."""
    _cache(tmp_path)
    d = json.loads((tmp_path / "manifest.json").read_text())
    d["identity"]["geometry"]["resolution"] = 100_000  # 10 gigapixels per conditioning image
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=r"image sizes \[\(100000, 100000\)\] .* SHARDS_MAX_IMAGE_PIXELS"):
        Manifest.load(open_store(tmp_path))
    monkeypatch.setenv("SHARDS_MAX_IMAGE_PIXELS", str(100_000 ** 2))  # genuine after all: the user says so
    assert Manifest.load(open_store(tmp_path)).geometry.resolution == 100_000


def test_a_cap_set_to_nonsense_is_a_message_naming_the_variable(tmp_path):
    _cache(tmp_path)
    for variable, value, says in (("SHARDS_MAX_IMAGE_PIXELS", "64MP", "is not a whole number"),
                                  ("SHARDS_MAX_MANIFEST_BYTES", "lots", "SHARDS_MAX_MANIFEST_BYTES")):
        result = run_cli("shards", ["verify", tmp_path], env={**os.environ, variable: value})
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: ") and variable in result.stderr and says in result.stderr


@pytest.mark.slow
def test_a_shard_failing_in_a_loader_worker_ends_with_the_message_alone(tiny_model, fill_cache, tmp_path):
    """The error comes from a DataLoader worker process. The workers are shut down before the
    process exits; left to the interpreter's exit, torch reported each as 'killed by signal'
    with a traceback after the message (in about half the runs). A real interpreter each time:
    the exit is what is tested."""
    import shutil

    cache = Path(shutil.copytree(fill_cache, tmp_path / "cache"))
    shard = cache / "shards/shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        proc = subprocess.run([sys.executable, "-m", "train", "--model", str(tiny_model), "--cache", str(cache),
                               "--output-dir", str(out), "--max-steps", "8", "--batch-size", "4", "--num-workers", "2"],
                              cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "error: shards/shard-000001.tar: sha256 mismatch" in proc.stderr
        assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_number_too_long_to_read_is_a_message_naming_the_file(tmp_path):
    """Python refuses to convert an integer of over 4300 digits (a ValueError, not a JSON error):
    in the manifest, a record or identity.json it is the file's message, never a traceback."""
    from shards.manifest import read_identity, read_record

    _cache(tmp_path)
    (tmp_path / schema.IDENTITY_FILE).write_text(json.dumps(IDENTITY))
    huge = "9" * 5000
    manifest, record, identity = (tmp_path / "manifest.json", tmp_path / schema.record_name(0),
                                  tmp_path / schema.IDENTITY_FILE)
    for path, read in ((manifest, lambda s: Manifest.load(s)), (record, lambda s: read_record(s, 0)),
                       (identity, read_identity)):
        original = path.read_bytes()
        path.write_bytes(original.replace(b"{", b'{"x": ' + huge.encode() + b", ", 1))
        with pytest.raises(ManifestError, match=rf"{path.name}.* not valid JSON \(a number of over 4300 digits"):
            read(open_store(tmp_path))
        path.write_bytes(original)
    manifest.write_bytes(manifest.read_bytes().replace(b"{", b'{"x": ' + huge.encode() + b", ", 1))
    result = run_cli("shards", ["ls", str(tmp_path)], timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{manifest} is not valid JSON (a number of over 4300 digits" in result.stderr


def test_manifest_sections_and_totals_that_lie_are_refused_or_recomputed(tmp_path):
    """The totals are sums of the records, so a manifest's totals must add up; a section of the
    identity of the wrong type is a ManifestError, not an AttributeError in a reader."""
    _cache(tmp_path)
    path = tmp_path / "manifest.json"
    good = path.read_text()
    assert not (tmp_path / schema.IDENTITY_FILE).exists()  # optional: the manifest's identity is the one read
    cases = {
        "input_limits": (lambda d: d["identity"].__setitem__("input_limits", "x"), "input_limits must be an object"),
        "skipped": (lambda d: d["totals"].__setitem__("skipped", []), "totals.skipped is [] but the shards add up to {}"),
        "samples": (lambda d: d["totals"].__setitem__("samples", 7), "totals.samples is 7 but the shards add up to 6"),
        "repeated": (lambda d: d["totals"].__setitem__("repeated_items", "2"), "totals.repeated_items must be an "
                                                                                "integer >= 0, got '2'"),
    }
    for name, (change, message) in cases.items():
        path.write_text(good)
        _edit_json(path, change)
        with pytest.raises(ManifestError, match=re.escape(message)):
            Manifest.load(open_store(tmp_path))
    path.write_text(good)
    _edit_json(path, lambda d: (d["totals"].pop("skipped"), d["totals"].pop("notes")))  # an older writer's
    totals = Manifest.load(open_store(tmp_path)).totals
    assert totals["skipped"] == {} and totals["notes"] == {} and totals["samples"] == 6
    result = run_cli("shards", ["stats", str(tmp_path)], timeout=120)
    assert result.returncode == 0 and "samples    6" in result.stdout, result.stderr


@pytest.mark.parametrize("header, problem", [
    (b"[]", "the header is not an object of tensor entries"),
    (b"[" * 100_000 + b"]" * 100_000, "nests 100000 levels deep"),
])
def test_shards_stats_names_a_safetensors_header_it_cannot_parse(tmp_path, header, problem):
    _cache(tmp_path)
    _rewrite(tmp_path, lambda key, m: {**m, schema.TENSOR_MEMBER: len(header).to_bytes(8, "little") + header})
    result = run_cli("shards", ["stats", str(tmp_path)], timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "shards/shard-000001.tar: sample 000001-000000: cannot parse the safetensors header" in result.stderr
    assert problem in result.stderr


def test_a_non_finite_empty_prompt_is_named_by_the_loader_and_verify(tmp_path):
    """Caption dropout puts the empty prompt into batches: a NaN in it would be blamed on them."""
    from shards.reader import load_empty_prompt

    manifest = _cache(tmp_path)
    pe = torch.zeros(1, 77, 8)
    pe[0, 0, 0] = float("nan")
    write_empty_prompt(open_store(tmp_path), pe, torch.zeros(1, 4), "bf16")
    message = rf"{tmp_path}/empty_prompt.safetensors: prompt_embeds is not all finite floating point values"
    with pytest.raises(ShardError, match=message):
        load_empty_prompt(open_store(tmp_path))
    with pytest.raises(ShardError, match=message):
        verify_cache(open_store(tmp_path), manifest)


def test_a_shard_grown_past_its_record_is_not_read_to_its_end(tmp_path):
    """A shard replaced by a huge file (here 64 GiB, sparse) whose head is the real shard: the reader
    stops one chunk past the recorded size, instead of hashing every byte."""
    import time

    from shards.reader import iter_shard

    manifest = _cache(tmp_path)
    with (tmp_path / manifest.shards[1].name).open("r+b") as f:
        f.truncate(64 << 30)
    started = time.monotonic()
    with pytest.raises(ShardError, match=rf"shards/shard-000001.tar: longer than the {manifest.shards[1].bytes} bytes "
                                         r"its record lists \(replaced or appended to\?\)"):
        list(iter_shard(open_store(tmp_path), manifest.shards[1]))
    assert time.monotonic() - started < 60  # reading it all would take minutes at any disk speed


def test_error_messages_show_control_characters_instead_of_obeying_them(capsys):
    from shards.runtime import fail

    with pytest.raises(SystemExit) as e:
        fail("sample 000000-\x1b[2J\x1b[31mOK: bad\nsecond line")
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: sample 000000-\\x1b[2J\\x1b[31mOK: bad\nsecond line\n"

