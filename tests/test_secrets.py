"""Secrets in locations never reach what the tool writes or prints.

End to end, as a user runs it: precompute reads WebDataset tars over HTTP from a URL carrying a
password and a signed query string, into a local cache; that cache is then served over HTTP and a
short training (with a loader worker, a local shard cache, checkpoints and a tensorboard log)
reads it through a URL carrying another password and signature. Every byte of every file either
run wrote, and everything both printed, is searched for the secrets. The server's request log
shows the tokens were really sent, so the test is not passing for want of using them.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from clirun import run_cli
from httpserver import serve

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
SECRETS = ("pw-data-7781", "sig-data-5523", "pw-cache-9034", "sig-cache-1170")


def _tars(fill_data: Path, folder: Path) -> None:
    """fill_data's 16 items as two img2dataset-style tars of 8 (key.png, key.txt, key.cond.png)."""
    rows = [json.loads(line) for line in (fill_data / "prompt.json").read_text().splitlines()]
    folder.mkdir(parents=True)
    for t in range(2):
        with tarfile.open(folder / f"{t:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(t * 8, t * 8 + 8):
                r = rows[i]
                for suffix, data in (("png", (fill_data / r["target"]).read_bytes()), ("txt", r["prompt"].encode()),
                                     ("cond.png", (fill_data / r["source"]).read_bytes())):
                    info = tarfile.TarInfo(f"{i:04d}.{suffix}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


def _leaks(texts: dict[str, bytes]) -> list[str]:
    return [f"{name} holds {secret}" for name, data in texts.items() for secret in SECRETS if secret.encode() in data]


def _files(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_no_secret_of_a_data_or_cache_url_is_written_or_printed(tiny_model, fill_data, tmp_path):
    served = tmp_path / "served"
    _tars(fill_data, served / "tars")
    cache, out, local = served / "cache", tmp_path / "out", tmp_path / "local-cache"
    with serve(served) as server:
        data_url = server.url("tars/{00000..00001}.tar", userinfo="alice:pw-data-7781", query="sv=1&sig=sig-data-5523")
        pre = run_cli("precompute", ["--model", tiny_model, "--data", data_url, "--cache", cache, "--resolution", "64",
                                     "--samples-per-shard", "4", "--num-workers", "0", "--device", "cpu"], env=ENV)
        assert pre.returncode == 0, pre.stderr[-3000:]
        cache_url = server.url("cache", userinfo="bob:pw-cache-9034", query="sig=sig-cache-1170")
        train = run_cli("train", ["--model", tiny_model, "--cache", cache_url, "--output-dir", out, "--max-steps", "4",
                                  "--batch-size", "2", "--num-workers", "1", "--checkpointing-steps", "2",
                                  "--local-cache", local, "--report-to", "tensorboard", "--log-every", "1"], env=ENV)
        assert train.returncode == 0, train.stderr[-3000:]
        # A reader error names the location too: a cache that is not there.
        missing = run_cli("train", ["--model", tiny_model, "--cache",
                                    server.url("nowhere", userinfo="bob:pw-cache-9034", query="sig=sig-cache-1170"),
                                    "--output-dir", tmp_path / "out2", "--max-steps", "1"], env=ENV)
        verify = run_cli("shards", ["verify", cache_url], env=ENV)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr[-3000:]
    assert "http://bob:REDACTED@127.0.0.1" in missing.stderr and "nowhere" in missing.stderr
    assert verify.returncode == 0 and verify.stdout.startswith("OK: 2 shards, 16 samples"), verify.stderr  # a tar is one unit
    # The tokens were used: every request carried its signature.
    tar_requests = [r for r in server.requests if "/tars/" in r]
    cache_requests = [r for r in server.requests if "/cache/" in r]
    assert tar_requests and all("sig=sig-data-5523" in r for r in tar_requests)
    assert cache_requests and all("sig=sig-cache-1170" in r for r in cache_requests)
    # What was written names the locations, redacted.
    manifest = json.loads((cache / "manifest.json").read_bytes())
    assert manifest["identity"]["source"]["path"] == server.url("tars/{00000..00001}.tar", userinfo="alice:REDACTED")
    card = (out / "README.md").read_text()
    assert server.url("cache", userinfo="bob:REDACTED", query="sig=REDACTED") in card
    written = _files(cache, out, local, tmp_path / "out2")
    assert len(written) > 20 and any("checkpoints/step-" in name for name in written)
    assert any("events.out.tfevents" in name for name in written)
    printed = {f"{name} {stream}": getattr(proc, stream).encode() for name, proc in
               (("precompute", pre), ("train", train), ("failed train", missing), ("verify", verify))
               for stream in ("stdout", "stderr")}
    assert _leaks({**written, **printed}) == []


def test_a_store_names_itself_without_its_secrets():
    from shards.stores import open_store

    store = open_store("https://bob:hunter2@cdn.example/c/fill?sv=2024&sig=abc")
    assert store.url == "https://bob:REDACTED@cdn.example/c/fill"
    assert store.display("manifest.json") == "https://bob:REDACTED@cdn.example/c/fill/manifest.json"
    assert store.object_url("manifest.json") == "https://bob:hunter2@cdn.example/c/fill/manifest.json?sv=2024&sig=abc"
    assert "hunter2" not in repr(store)
    with pytest.raises(ValueError) as err:
        open_store("https://bob:hunter2@cdn.example/c#frag")
    assert "hunter2" not in str(err.value) and "bob:REDACTED" in str(err.value)


def test_remote_tar_errors_name_the_tars_without_their_secrets(tmp_path):
    from precompute.sources import SourceError, open_source

    with serve(tmp_path) as server:
        spec = server.url("tars/{00000..00001}.tar", userinfo="alice:pw-data-7781", query="sig=sig-data-5523")
        with pytest.raises(SourceError) as err:
            open_source(spec)
        listing = server.url("tars/", userinfo="alice:pw-data-7781", query="sig=sig-data-5523")
        with pytest.raises(SourceError) as no_listing:
            open_source(listing)
    message = str(err.value)
    assert "2 of 2 tars do not exist" in message and "alice:REDACTED@" in message
    assert "http has no listing" in str(no_listing.value) or "http(s) has no listing" in str(no_listing.value)
    assert _leaks({"missing tars": message.encode(), "no listing": str(no_listing.value).encode()}) == []


@pytest.mark.parametrize("url, problem", [
    ("s3://AKIAEXAMPLE:TopSecret42@bucket/c", "s3:// URLs take no user:password@ part"),
    ("s3://bucket:9000/c", "'bucket:9000' is not a valid bucket name (the endpoint and its port go in AWS_ENDPOINT_URL)"),
    ("s3://", "no bucket name (expected s3://bucket/prefix)"),
])
def test_a_malformed_s3_url_is_one_message_in_every_command_and_never_shows_a_secret(tiny_model, fill_data, tmp_path,
                                                                                   url, problem):
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    for module, args in (("train", ["--model", tiny_model, "--cache", url, "--output-dir", tmp_path / "out"]),
                         ("train", ["--model", tiny_model, "--cache", tmp_path, "--validation-cache", url,
                                    "--output-dir", tmp_path / "out"]),
                         ("precompute", ["--model", tiny_model, "--data", fill_data, "--cache", url]),
                         ("shards", ["ls", url])):
        result = run_cli(module, args, env=env, timeout=120)
        assert result.returncode == 1, (module, result.stderr[-2000:])
        assert problem in result.stderr and "Traceback" not in result.stderr, (module, result.stderr[-2000:])
        assert "TopSecret42" not in result.stderr + result.stdout
