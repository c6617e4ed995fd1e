"""`python -m shards ls|stats|verify`: right numbers, and errors name the first bad shard (gc: test_shards_writer, test_s3_store)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
from click.testing import CliRunner

from shards import schema
from shards.cli import cli, safetensors_layout
from shards.reader import load_empty_prompt, write_empty_prompt
from shards.stores import open_store
from shards.synthetic import write_synthetic_cache
from clirun import run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    manifest = write_synthetic_cache(open_store(root), shards=3, samples_per_shard=4, skip_every=5)
    return root, manifest


@pytest.fixture
def cache(built, tmp_path):
    """A private copy of the built cache that a test may damage."""
    root, manifest = built
    dst = tmp_path / "cache"
    shutil.copytree(root, dst)
    return dst, manifest


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def edit_manifest(root: Path, fn) -> None:
    d = json.loads((root / "manifest.json").read_text())
    fn(d)
    (root / "manifest.json").write_text(json.dumps(d))


def tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


def test_ls(built):
    root, manifest = built
    res = run("ls", root)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert len(lines) == 1 + 3 + 1
    for line, r in zip(lines[1:4], manifest.shards):
        on_disk = (root / r.name).read_bytes()
        assert line.split() == [
            r.name,
            str(r.samples),
            str(len(on_disk)),
            str(sum(r.skipped.values())),
            hashlib.sha256(on_disk).hexdigest()[:12],
        ]
    # 12 planned items, every 5th skipped -> 10 samples in shards of 4, 3, 3
    assert [r.samples for r in manifest.shards] == [4, 3, 3]
    total_bytes = sum((root / r.name).stat().st_size for r in manifest.shards)
    assert lines[-1].startswith(f"total: 3 shards, 10 samples, {total_bytes} bytes (")
    assert lines[-1].endswith(", 2 skipped")


def test_ls_and_stats_start_without_torch(built):
    """Reading a manifest and the shards' headers needs no tensor library: `shards ls` (which
    `make train` runs to look at its cache) and `shards stats` start in a fraction of a second."""
    import subprocess
    import sys

    root, _ = built
    probe = ("import runpy, sys\n"
             "sys.argv = ['shards', sys.argv[1], sys.argv[2]]\n"
             "try:\n    runpy.run_module('shards', run_name='__main__')\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "print('torch imported' if 'torch' in sys.modules else 'no torch')\n")
    for command in ("ls", "stats"):
        proc = subprocess.run([sys.executable, "-c", probe, command, str(root)], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == "no torch", proc.stdout


def test_stats_numbers_match_the_tars(built):
    root, manifest = built
    res = run("stats", root)
    assert res.exit_code == 0, res.output
    out = res.output
    member_totals: dict[str, int] = defaultdict(int)
    tensor_totals: dict[str, int] = defaultdict(int)
    shard_bytes = 0
    for r in manifest.shards:
        path = root / r.name
        shard_bytes += path.stat().st_size
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                suffix = m.name.split(".", 1)[1]
                member_totals[suffix] += m.size
                if suffix == schema.TENSOR_MEMBER:
                    from safetensors import (
                        safe_open,  # tensor sizes via the library, not our parser
                    )

                    tmp = root.parent / "one.safetensors"
                    tmp.write_bytes(tf.extractfile(m).read())
                    with safe_open(str(tmp), "pt") as f:
                        for name in f.keys():
                            t = f.get_tensor(name)
                            tensor_totals[name] += t.numel() * t.element_size()
    n = 10
    assert f"samples    {n}\n" in out
    assert f"bytes      {shard_bytes} (" in out and f"{shard_bytes / n:.1f} per sample" in out

    def row(label):
        line = next(l for l in out.splitlines() if l.strip().startswith(label))
        return line.split()

    for suffix in schema.MEMBERS:
        fields = row("." + suffix)
        assert fields[-1] == str(member_totals[suffix]) and fields[1] == f"{member_totals[suffix] / n:.1f}"
    for name, total in tensor_totals.items():
        assert row(name + " [")[-1] == str(total)
    assert "latent_mean [BF16 4x8x8]" in out
    framing = shard_bytes - sum(member_totals.values())
    assert row("(tar headers + padding)")[-1] == str(framing)
    assert row("synthetic_skip") == ["synthetic_skip", "2"]
    assert "per sample by member: 10 samples read" in out

    limited = run("stats", root, "--max-shards", 1)
    assert limited.exit_code == 0 and "(first 1 of 3 shards): 4 samples read" in limited.output


def test_safetensors_layout_parses_the_header_only():
    import torch
    from safetensors.torch import save

    blob = save({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.zeros(5)})
    header, layout = safetensors_layout(blob)
    assert layout == {"a": {"dtype": "BF16", "shape": [2, 3], "nbytes": 12}, "b": {"dtype": "F32", "shape": [5], "nbytes": 20}}
    assert header + 12 + 20 == len(blob)


def test_stats_names_the_shard_and_sample_of_an_unparsable_header(cache):
    root, m = cache
    rec = m.shards[1]
    key = rec.keys[1]
    path = root / rec.name
    with tarfile.open(path) as tf:
        info = tf.getmember(f"{key}.{schema.TENSOR_MEMBER}")
    data = bytearray(path.read_bytes())
    start = info.offset_data + 8  # the JSON header after its 8-byte length; same size, so only sha256 differs
    (n,) = struct.unpack("<Q", data[info.offset_data : start])
    data[start : start + n] = b"\xff" * n
    path.write_bytes(bytes(data))
    res = run("stats", root)
    assert res.exit_code == 1
    assert res.stderr.startswith(
        f"error: {root}/{rec.name}: sample {key}: cannot parse the safetensors header of {key}.safetensors "
        "(UnicodeDecodeError: "), res.stderr
    assert f"run `python -m shards verify {root}`" in res.stderr


def test_verify_ok(built):
    root, _ = built
    res = run("verify", root)
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1].startswith("OK: 3 shards, 10 samples, ")


def expect_failure(root, *patterns):
    res = run("verify", root)
    assert res.exit_code == 1, res.output
    assert "error: verify failed: " in res.output
    for p in patterns:
        assert p in res.output, res.output
    return res.output


def test_verify_truncated_shard(cache):
    root, m = cache
    path = root / m.shards[1].name
    path.write_bytes(path.read_bytes()[: tar_members(path)[6].offset])
    expect_failure(root, "shards/shard-000001.tar: truncated")


def test_verify_flipped_data_byte(cache):
    root, m = cache
    path = root / m.shards[2].name
    data = bytearray(path.read_bytes())
    first = tar_members(path)[0]
    data[first.offset_data + first.size - 1] ^= 0x01
    path.write_bytes(bytes(data))
    expect_failure(root, "shards/shard-000002.tar: sha256 mismatch")


def test_verify_flipped_header_byte(cache):
    root, m = cache
    path = root / m.shards[0].name
    data = bytearray(path.read_bytes())
    data[tar_members(path)[4].offset + 10] ^= 0x04
    path.write_bytes(bytes(data))
    expect_failure(root, "shards/shard-000000.tar: corrupt tar header")


def test_verify_missing_shard(cache):
    root, m = cache
    (root / m.shards[1].name).unlink()
    expect_failure(root, "shards/shard-000001.tar: missing from")


def test_verify_manifest_sha_disagrees(cache):
    root, m = cache
    edit_manifest(root, lambda d: d["shards"][2].update(sha256="f" * 64))
    (root / schema.record_name(2)).unlink()  # the record would disagree first otherwise
    expect_failure(root, "shards/shard-000002.tar: sha256 mismatch", "record says ffff")


def test_verify_record_file_disagrees_with_manifest(cache):
    root, m = cache
    rec = json.loads((root / schema.record_name(1)).read_text())
    rec["sha256"] = "e" * 64
    (root / schema.record_name(1)).write_text(json.dumps(rec))
    expect_failure(root, "shards/shard-000001.tar: its record records/shard-000001.json disagrees", "['sha256']")


def test_verify_unknown_member_with_consistent_manifest(cache):
    """A payload injected into a shared bucket by someone who also fixed up the manifest."""
    root, m = cache
    path = root / m.shards[1].name
    with tarfile.open(path) as tf:
        entries = [(x.name, tf.extractfile(x).read()) for x in tf.getmembers()]
    entries.insert(3, (f"{m.shards[1].keys[1]}.pyd", b"\x80\x04K\x01."))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    sha, size = hashlib.sha256(buf.getvalue()).hexdigest(), len(buf.getvalue())

    def fix(d):
        d["shards"][1].update(sha256=sha, bytes=size)
        d["totals"]["bytes"] = sum(s["bytes"] for s in d["shards"])

    edit_manifest(root, fix)
    (root / schema.record_name(1)).unlink()
    expect_failure(root, f"shards/shard-000001.tar: unknown member '{m.shards[1].keys[1]}.pyd'")


def test_verify_dtype_and_shape_mismatches(cache):
    root, m = cache
    (root / "identity.json").unlink()  # checked separately; here the manifest alone is edited
    edit_manifest(root, lambda d: d["identity"]["latent"].update(channels=16))
    expect_failure(root, "shards/shard-000000.tar: sample #0 (000000-000000): latent_mean has 4 channels, the manifest says 16")
    edit_manifest(root, lambda d: d["identity"]["latent"].update(channels=4, store="mean"))
    expect_failure(root, "shards/shard-000000.tar: sample #0", "latent_std present")
    edit_manifest(root, lambda d: (d["identity"]["latent"].update(store="mean_std"), d["identity"]["dtypes"].update(storage="fp16")))
    expect_failure(root, "empty_prompt.safetensors: dtype")
    pe, pooled = load_empty_prompt(open_store(root))
    write_empty_prompt(open_store(root), pe, pooled, "fp16")
    expect_failure(root, "shards/shard-000000.tar: sample #0 (000000-000000): latent_mean is bf16, the manifest says fp16")


def test_verify_empty_prompt_and_identity(cache):
    root, m = cache
    ident = json.loads((root / "identity.json").read_text())
    ident["seed"] = 99
    (root / "identity.json").write_text(json.dumps(ident))
    expect_failure(root, "identity.json: differs from the manifest's identity: seed: 99 != 0")
    (root / "identity.json").unlink()
    (root / schema.EMPTY_PROMPT_FILE).unlink()
    expect_failure(root, "empty_prompt.safetensors: missing from")


def test_verify_without_manifest(tmp_path):
    res = run("verify", tmp_path)
    assert res.exit_code == 1
    assert f"no manifest.json in {tmp_path}: run precompute first, or it did not finish" in res.output


def test_python_dash_m_entry_point(cache):
    root, m = cache
    (root / m.shards[0].name).unlink()
    bad = run_cli("shards", ["verify", root])
    assert bad.returncode == 1 and "shards/shard-000000.tar: missing" in bad.stderr


def test_ctrl_c_is_the_shared_interruption_message_not_clicks_abort(cache, monkeypatch):
    root, _ = cache

    def interrupted(store):
        raise KeyboardInterrupt

    # Inherited by run_cli's forked child: the command is interrupted while it reads the manifest.
    monkeypatch.setattr("shards.cli.Manifest.load", interrupted)
    res = run_cli("shards", ["verify", root])
    assert res.returncode == 130, res.stderr
    assert "interrupted. Nothing partial was published; re-run the command." in res.stderr
    assert "Aborted" not in res.stderr + res.stdout and "Traceback" not in res.stderr


def test_verify_says_what_a_path_that_is_no_cache_is(tmp_path):
    missing, a_file = tmp_path / "nowhere", tmp_path / "notes.txt"
    a_file.write_text("x")
    assert f"{missing}: no such folder" in run("verify", missing).output
    assert f"{a_file}: is a file, not a cache folder" in run("verify", a_file).output
    assert f"no manifest.json in {tmp_path}" in run("verify", tmp_path).output


def test_gc_touches_nothing_in_a_folder_that_is_no_cache(tmp_path):
    """A typo, a dataset of WebDataset tars named like shards, a training run: gc deletes by name,
    so it works only where precompute wrote its identity.json, and removes nothing elsewhere."""
    data = tmp_path / "my-tars"
    (data / schema.SHARD_DIR).mkdir(parents=True)
    mine = [data / schema.shard_name(0), data / schema.SHARD_DIR / ".tmp-notes.txt"]
    for path in mine:
        path.write_bytes(b"the user's own file")
    for args in (["gc", "--orphans", data], ["gc", data]):
        result = run(*args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert (f"{data}: not a cache (no identity.json, which precompute writes before anything else): gc removed "
                "nothing") in result.output
    assert all(path.read_bytes() == b"the user's own file" for path in mine)
    result = run("gc", tmp_path / "typo")
    assert result.exit_code == 1 and f"{tmp_path / 'typo'}: no such folder" in result.output
    assert "gc removed nothing" in result.output and not (tmp_path / "typo").exists()


def test_a_cache_folder_that_is_a_link_out_is_never_written_or_cleaned_through(cache, tmp_path):
    """shards/ planted as a link to someone else's folder: gc --orphans would delete their
    shard-named files there, and precompute overwrite them; both refuse, touching nothing."""
    from shards.store import LocalStore

    root, _ = cache
    elsewhere = tmp_path / "elsewhere"
    (root / schema.SHARD_DIR).rename(elsewhere)
    (root / schema.SHARD_DIR).symlink_to(elsewhere)
    (elsewhere / "shard-000077.tar").write_bytes(b"theirs")
    before = sorted(p.name for p in elsewhere.iterdir())
    result = run("gc", "--orphans", root)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"{root / schema.SHARD_DIR}: a symbolic link inside the cache, which is never followed" in result.output
    assert sorted(p.name for p in elsewhere.iterdir()) == before
    assert LocalStore(root).layout_problems((schema.SHARD_DIR, schema.RECORD_DIR), (schema.MANIFEST_FILE,)) == [
        f"{root / schema.SHARD_DIR}: a symbolic link inside the cache, which is never followed (writers would write, "
        "and gc delete, where it points): make it a real folder"]
    (root / schema.SHARD_DIR).unlink()
    (root / schema.SHARD_DIR).mkdir()
    (root / schema.MANIFEST_FILE).unlink()
    (root / schema.MANIFEST_FILE).mkdir()
    assert LocalStore(root).layout_problems((schema.SHARD_DIR,), (schema.MANIFEST_FILE,)) == [
        f"{root / schema.MANIFEST_FILE}: not a regular file, where the cache writes its manifest.json: move it away"]


def test_gc_of_an_http_cache_is_refused_not_reported_clean(built):
    from httpserver import serve

    root, _ = built
    with serve(root) as server:
        url = server.url("", query="sig=tok-5531")
        for args in (["gc", url], ["gc", "--dry-run", url]):
            res = run(*args)
            assert res.exit_code == 1, res.output
            assert "is read-only and has no leftovers of writers to remove; gc works on the local folder or s3:// " \
                   "URL the cache was written to" in res.output
            assert "tok-5531" not in res.output and "removed" not in res.output


def test_gc_orphans_fails_closed_on_an_unreadable_manifest_or_record(cache):
    """An orphan is a shard with no record, not in the manifest; what cannot be read is never
    taken for absent, so a damaged manifest or record (or a store answering garbage) costs no
    complete shard."""
    cache, _ = cache
    shards = sorted((cache / schema.SHARD_DIR).iterdir())
    extra = cache / schema.shard_name(len(shards))
    shutil.copyfile(shards[0], extra)  # published, then the writer was killed before its record
    leftover = cache / schema.SHARD_DIR / ".tmp-shard-000009.tar.x1"  # a killed writer's temp file
    leftover.write_bytes(b"partial")
    (cache / schema.MANIFEST_FILE).write_text("<html>503 Service Unavailable</html>")
    result = run("gc", "--orphans", str(cache))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "manifest.json is not valid JSON" in result.output
    assert "gc --orphans deleted nothing: which shards are orphans is judged against the manifest" in result.output
    assert sorted((cache / schema.SHARD_DIR).iterdir()) == sorted([*shards, extra, leftover])  # nothing at all

    # No manifest yet (an unfinished cache): a shard whose record is damaged is kept, the one
    # with no record goes.
    (cache / schema.MANIFEST_FILE).unlink()
    (cache / schema.record_name(0)).write_text("<html>garbage</html>")
    result = run("gc", "--orphans", str(cache))
    assert result.exit_code == 0, result.output
    assert f"removed orphan shard: {schema.shard_name(len(shards))}" in result.output
    assert "removed temp file: shards/.tmp-shard-000009.tar.x1" in result.output
    assert "1 orphan shard(s)" in result.output
    assert sorted((cache / schema.SHARD_DIR).iterdir()) == shards
