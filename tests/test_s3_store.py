"""shards.s3 / shards.http / shards.localcache against a real S3 server (SeaweedFS, tests/s3server.py).

Store semantics on a bucket (round trip, listing, missing files), byte-identical caches and
identical batches from S3, https:// and local disk, atomic and conditional publishing (multipart
included, a writer SIGKILLed mid-upload, `shards gc`), each kind of damage and misconfiguration
as a clear error, and the --local-cache store (save while streaming, reuse, size bound, repair).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from ports import free_ports
from s3server import S3Server, bucket_fixtures
from streams import cache_loader, cache_stream

import train.step  # noqa: F401  (imported once here so forked loader workers inherit it)
from shards import schema
from shards.cli import cli as shards_cli
from shards.errors import (
    PublishConflictError,
    ReadOnlyStoreError,
    ShardError,
    StoreError,
)
from shards.http import HttpStore
from shards.localcache import CachingStore
from shards.manifest import Manifest, ManifestError
from shards.reader import iter_shard_members
from shards.remote import PROGRESS_BYTES, ResumableReader, RetryPolicy
from shards.s3 import S3Store, parse_s3_url
from shards.store import TEMP_PREFIX, LocalStore
from shards.stores import open_store
from shards.synthetic import write_synthetic_cache
from shards.units import parse_size

REPO = Path(__file__).resolve().parents[1]
BUCKET = "caches"
FAST = RetryPolicy(attempts=20, budget_s=20.0, backoff_s=0.05, max_backoff_s=0.5, connect_timeout_s=2.0,
                   read_timeout_s=5.0)


server, aws_env = bucket_fixtures(BUCKET)


@pytest.fixture(scope="module")
def caches(server, tmp_path_factory):
    """The same synthetic cache (4 shards, one with a skipped item) in a folder and in the bucket."""
    local = LocalStore(tmp_path_factory.mktemp("local") / "cache")
    write_synthetic_cache(local, shards=4, samples_per_shard=5, skip_every=7)
    remote = S3Store(f"s3://{BUCKET}/synthetic", policy=FAST)
    write_synthetic_cache(remote, shards=4, samples_per_shard=5, skip_every=7)
    return local, remote


def _batches(store, manifest, **kw) -> list[tuple[list[str], str]]:
    """(keys, sha256 over every tensor) per batch of one epoch, as train would get them."""
    args = dict(batch_size=3, seed=1, epoch=0, num_workers=0, shuffle_buffer=4)
    args.update(kw)
    out = []
    for batch in cache_stream(store, manifest, **args):
        h = hashlib.sha256()
        for t in (batch.latent_mean, batch.latent_std, batch.prompt_embeds, batch.pooled_prompt_embeds,
                  batch.add_time_ids, batch.cond):
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        out.append((list(batch.keys), h.hexdigest()))
    return out


def _cli(*args: str, env: dict[str, str] | None = None):
    """`python -m shards ARGS`, in-process (the real click command; a subprocess costs a torch import)."""
    result = CliRunner().invoke(shards_cli, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _upload_child(url: str, path: str) -> None:
    """A writer process to be killed: multipart upload of 30 MiB, each part slowed down (a
    botocore event hook, not a patch) so that the kill lands mid-upload."""
    store = S3Store(url, multipart_threshold=5 << 20, part_size=5 << 20, concurrency=1)
    store.client.meta.events.register("before-send.s3.UploadPart", lambda **kw: time.sleep(0.3))
    with open(path, "wb") as f:
        f.write(os.urandom(30 << 20))
    store.put_file("shards/shard-000007.tar", path)


# ----------------------------------------------------------------------------------------------
# URLs and settings (no server needed)


def test_urls_and_settings_are_validated_with_every_problem_listed(monkeypatch):
    assert parse_s3_url("s3://bkt/a/b/") == ("bkt", "a/b")
    assert parse_s3_url("s3://bkt") == ("bkt", "")
    with pytest.raises(ValueError, match="no bucket name"):
        parse_s3_url("s3:///x")
    with pytest.raises(ValueError, match=r"'\.\.' parts.*|query strings"):
        parse_s3_url("s3://bkt/a/../b?x=1")
    assert isinstance(open_store("s3://bkt/p"), S3Store)
    assert isinstance(open_store("https://example.com/c?token=secret"), HttpStore)
    assert open_store("https://example.com/c?token=secret").url == "https://example.com/c"  # no token in logs

    monkeypatch.setenv("SHARDS_RETRY_ATTEMPTS", "many")
    monkeypatch.setenv("SHARDS_READ_TIMEOUT", "soon")
    with pytest.raises(ValueError) as e:
        RetryPolicy.from_env()
    assert "SHARDS_RETRY_ATTEMPTS='many'" in str(e.value) and "SHARDS_READ_TIMEOUT='soon'" in str(e.value)
    with pytest.raises(ValueError) as e:
        RetryPolicy(attempts=-1, read_timeout_s=0, budget_s=-2)
    assert str(e.value).count("\n  - ") == 3 and "would hang" in str(e.value)
    monkeypatch.delenv("SHARDS_RETRY_ATTEMPTS")
    monkeypatch.delenv("SHARDS_READ_TIMEOUT")
    monkeypatch.setenv("SHARDS_S3_PART_SIZE", "5 parsecs")
    with pytest.raises(ValueError, match="SHARDS_S3_PART_SIZE"):
        S3Store("s3://bkt/p")
    assert parse_size("1.5GiB") == 3 << 29 and parse_size("200GB") == 200 * 10**9 and parse_size("4096") == 4096

    from train.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError) as e:
        TrainConfig(model=str(REPO), cache="s3://bkt/c", output_dir=str(REPO / "runs" / "x"),
                    local_cache_max="lots").validate(cuda_available=False)
    assert "--local-cache-max needs --local-cache" in str(e.value) and "'lots' is not a size" in str(e.value)


def _flaky_body(data: bytes, every: int, *, delay: float = 0.0, piece: int = 1 << 16):
    """A body class over `data` that breaks after `every` bytes per connection, giving at most
    `piece` bytes a read, each after `delay` seconds."""

    class Flaky:
        def __init__(self, offset):
            self.pos, self.left = offset, every

        def read(self, n):
            if self.left == 0:
                raise ConnectionResetError("reset by peer")
            time.sleep(delay)
            n = min(n, self.left, len(data) - self.pos, piece)
            self.left -= n
            self.pos += n
            return data[self.pos - n : self.pos]

        def close(self):
            pass

    return Flaky


def _classify(e):
    if not isinstance(e, (ConnectionError, TimeoutError)):
        raise e


def test_resumable_reader_resumes_at_the_offset_and_gives_up_in_time():
    """The mechanism alone: a body that breaks every 1.5 MiB is reopened at the byte reached, any
    number of times, since real progress (PROGRESS_BYTES) comes between the breaks."""
    every = PROGRESS_BYTES * 3 // 2
    data = os.urandom(8 * every)
    Flaky = _flaky_body(data, every)
    opens: list[int] = []

    def open_at(offset):
        opens.append(offset)
        return Flaky(offset)

    policy = RetryPolicy(attempts=3, budget_s=5, backoff_s=0.001, connect_timeout_s=1, read_timeout_s=1)
    r = ResumableReader(what="x", open_at=open_at, size=len(data), first_body=Flaky(0), policy=policy,
                        classify=_classify)
    got = b"".join(iter(lambda: r.read(77_777), b""))
    assert got == data and opens == list(range(every, len(data), every)) and r.reopens == 7

    def dead(offset):
        raise ConnectionRefusedError("refused")

    r = ResumableReader(what="s3://b/shards/x.tar", open_at=dead, size=len(data), first_body=Flaky(0),
                        policy=policy, classify=_classify)
    assert r.read(1000) == data[:1000]
    with pytest.raises(ShardError, match=rf"^s3://b/shards/x.tar: reading failed at byte {every} of {len(data)}: gave "
                                         "up after 4 attempts"):
        r.read(every)  # the first connection's bytes, then the object cannot be reopened


def test_a_server_that_cuts_every_response_short_or_trickles_is_an_error_not_a_hang():
    """Bytes arriving is not always progress: a server that cuts every response after 1000 bytes
    runs out of attempts, and one that sends 100 bytes a second (each read within the read
    timeout) is a stall once a read timeout's worth of reading brought less than min_rate."""
    data = os.urandom(200_000)
    policy = RetryPolicy(attempts=3, budget_s=30, backoff_s=0.001, connect_timeout_s=1, read_timeout_s=0.5,
                         min_rate=1000)
    Cut = _flaky_body(data, 1000)
    r = ResumableReader(what="s3://b/shards/cut.tar", open_at=Cut, size=len(data), first_body=Cut(0), policy=policy,
                        classify=_classify)
    with pytest.raises(ShardError, match=r"^s3://b/shards/cut.tar: reading failed at byte 4000 of 200000: gave up "
                                         r"after 4 attempts .*reset by peer"):
        r.read(len(data))

    Trickle = _flaky_body(data, len(data), delay=0.1, piece=10)  # 100 bytes a second
    r = ResumableReader(what="https://h/shards/slow.tar", open_at=Trickle, size=len(data), first_body=Trickle(0),
                        policy=policy, classify=_classify)
    with pytest.raises(ShardError, match=r"^https://h/shards/slow.tar: reading failed at byte \d+ of 200000: gave up "
                                         r"after 4 attempts .*the server sends too slowly \(\d+ bytes in 0\.\ds of "
                                         r"reading, under SHARDS_MIN_RATE 1000 bytes/s\)"):
        r.read(len(data))
    assert r.offset < 4 * 100  # four attempts, each ended after one read timeout (about 50 bytes)

    # A slow consumer is no slow server: pauses between reads are not counted.
    Fast = _flaky_body(data, len(data))
    r = ResumableReader(what="x", open_at=Fast, size=len(data), first_body=Fast(0), policy=policy,
                        classify=_classify)
    pieces = []
    for _ in range(4):
        pieces.append(r.read(100))
        time.sleep(0.3)  # 1.2 s in all between reads: over two read timeouts, at 333 bytes/s overall
    assert b"".join(pieces) + r.read() == data and r.reopens == 0

    # A blip, a long pause of the consumer (a checkpoint, validation), another blip: the pause
    # is no part of a failure streak; bytes and then quiet for worst_case_s forgive the first.
    strict = RetryPolicy(attempts=1, budget_s=0.2, backoff_s=0.001, connect_timeout_s=0.1, read_timeout_s=0.1,
                         min_rate=0)
    longer = os.urandom(300_000)
    Blips = _flaky_body(longer, 100_000)
    r = ResumableReader(what="x", open_at=Blips, size=len(longer), first_body=Blips(0), policy=strict,
                        classify=_classify)
    got = r.read(150_000)  # the first blip, at 100,000
    time.sleep(strict.worst_case_s() + 0.1)
    got += r.read()  # the second, at 200,000: one attempt allowed, and it is a new streak
    assert got == longer and r.reopens == 2


# ----------------------------------------------------------------------------------------------
# A cache on S3 is the cache on disk


def test_store_calls_on_a_bucket(server):
    store = S3Store(f"s3://{BUCKET}/calls/", policy=FAST)
    assert store.url == f"s3://{BUCKET}/calls"
    store.write_bytes("a/b.json", b"{}")
    store.write_bytes("a/b.json", b'{"x": 1}')  # write_bytes replaces
    store.write_bytes("c.bin", b"\x00" * 10)
    assert store.read_bytes("a/b.json") == b'{"x": 1}' and store.size("c.bin") == 10
    assert store.exists("a/b.json") and not store.exists("a/nope")
    assert store.list() == ["a/b.json", "c.bin"] and store.list("a") == ["a/b.json"]
    with pytest.raises(FileNotFoundError, match=f"s3://{BUCKET}/calls/a/nope does not exist"):
        store.read_bytes("a/nope")
    with pytest.raises(FileNotFoundError):
        store.size("a/nope")
    store.delete("a/b.json")
    store.delete("a/b.json")  # already gone: fine
    assert store.list() == ["c.bin"]
    with pytest.raises(ValueError, match="invalid cache path"):
        store.exists("../escape")


def test_cache_on_s3_and_https_reads_exactly_like_local(server, caches):
    local, remote = caches
    assert remote.list() == local.list()
    assert all(remote.read_bytes(rel) == local.read_bytes(rel) for rel in local.list())  # byte-identical
    manifest = Manifest.load(remote)
    want = _batches(local, Manifest.load(local))
    n = manifest.totals["samples"]
    assert _batches(remote, manifest) == want and len(want) == n // 3 and n == 18
    # Through DataLoader worker processes, forked after this process used its own S3 client.
    loader, _ = cache_loader(remote, manifest, batch_size=3, seed=1, epoch=0, num_workers=2, shuffle_buffer=4)
    local_loader, _ = cache_loader(local, manifest, batch_size=3, seed=1, epoch=0, num_workers=2, shuffle_buffer=4)
    assert [b.keys for b in loader] == [b.keys for b in local_loader]

    env = server.isolated_env()
    result = subprocess.run([sys.executable, "-m", "shards", "verify", remote.url], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)  # once as a user runs it
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: 4 shards, 18 samples")
    assert "samples    18" in _cli("stats", remote.url).stdout

    # The same bucket, anonymously over plain HTTP (SeaweedFS without an auth config is public).
    public = open_store(f"{server.endpoint}/{BUCKET}/synthetic")
    assert _batches(public, manifest) == want
    result = _cli("verify", public.url)
    assert result.exit_code == 0 and result.stdout.startswith("OK: 4 shards"), result.stderr
    with pytest.raises(ReadOnlyStoreError, match="read-only"):
        public.write_bytes("x", b"")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        public.read_bytes("nope.json")


def _cut(reader: ResumableReader) -> None:
    """Drop the reader's connection under it, as a network failure does.

    SHUT_RDWR, not SHUT_RD: Linux keeps accepting data on a socket shut for reading only, so a
    reader slower than the server (a loaded machine) could still receive every byte and the
    "cut" would be no cut at all (reopens == 0). After SHUT_RDWR the kernel answers the server's
    next data with a reset, so everything beyond what is already buffered (a few MB, against the
    ~23 MB still to come) is lost for certain and the reader must reopen at the byte it reached.
    """
    body = reader._body
    if hasattr(body, "_streaming"):  # shards.s3's body: botocore StreamingBody over a urllib3 response
        body._streaming._raw_stream._sock_shutdown(socket.SHUT_RDWR)
    else:  # shards.http's response
        body.conn.sock.shutdown(socket.SHUT_RDWR)


def test_a_cut_connection_resumes_at_the_byte_reached_and_a_replaced_object_is_refused(server):
    payload = os.urandom(24 << 20)  # more than loopback socket buffers hold: the cut loses data
    scratch = S3Store(f"s3://{BUCKET}/cut", policy=FAST)
    scratch.write_bytes("blob", payload)
    for store in (scratch, HttpStore(f"{server.endpoint}/{BUCKET}/cut", policy=FAST)):
        with store.open_read("blob") as f:
            head = f.read(1 << 20)
            _cut(f)
            rest = f.read()
        assert head + rest == payload and f.reopens == 1, type(store).__name__
        # Replaced between the cut and the reopen: the If-Match on the first ETag refuses to splice.
        with store.open_read("blob") as f:
            f.read(1 << 20)
            before = server.client().head_object(Bucket=BUCKET, Key="cut/blob")["ETag"]
            scratch.write_bytes("blob", payload[::-1])
            # The server's readers see the new version before the cut (a busy SeaweedFS may take a
            # moment), so the reopen below meets the replacement, not a lagging copy of the old.
            for _ in range(100):
                if server.client().head_object(Bucket=BUCKET, Key="cut/blob")["ETag"] != before:
                    break
                time.sleep(0.05)
            _cut(f)
            with pytest.raises(StoreError, match=r"/cut/blob: .*replaced while it was being read"):
                f.read()
        scratch.write_bytes("blob", payload)


# ----------------------------------------------------------------------------------------------
# Publishing: atomic, conditional, no leftovers


def test_multipart_publish_is_atomic_and_never_overwrites_other_content(server, tmp_path, caplog):
    store = S3Store(f"s3://{BUCKET}/publish", policy=FAST, multipart_threshold=5 << 20, part_size=5 << 20)
    big = tmp_path / "big"
    payload = os.urandom((11 << 20) + 123)  # 3 parts: 5 MiB, 5 MiB, the rest
    big.write_bytes(payload)
    store.put_file("shards/shard-000000.tar", big)
    assert not big.exists()  # put_file takes ownership
    head = server.client().head_object(Bucket=BUCKET, Key="publish/shards/shard-000000.tar")
    assert head["ETag"].endswith('-3"') and head["Metadata"]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert store.read_bytes("shards/shard-000000.tar") == payload

    # A resumed, reproducible writer publishing the same bytes again: a no-op success.
    big.write_bytes(payload)
    with caplog.at_level(logging.INFO, logger="shards.s3"):
        store.put_file("shards/shard-000000.tar", big)
    assert "already present with the same content" in caplog.text
    # Other bytes under a published name: refused, both sides named, the object untouched.
    for size in (100, 6 << 20):  # single PUT and multipart
        other = tmp_path / "other"
        other.write_bytes(os.urandom(size))
        with pytest.raises(PublishConflictError, match=r"already exists with other content .*Never run two precomputes") as e:
            store.put_file("shards/shard-000000.tar", other)
        assert isinstance(e.value, StoreError)  # the same error as a local cache's, and a StoreError
        assert store.read_bytes("shards/shard-000000.tar") == payload
    assert store.list_uploads() == []  # the refused multipart upload was aborted


def test_writer_killed_mid_upload_leaves_nothing_visible_and_gc_cleans_up(server, tmp_path, caplog):
    url = f"s3://{BUCKET}/killed-upload"
    s3 = server.client()
    key = "killed-upload/shards/shard-000007.tar"
    store = S3Store(url, policy=FAST, multipart_threshold=5 << 20, part_size=5 << 20)

    def kill_mid_upload(name: str) -> None:
        # Forked: the real S3Store code in a process of its own, without a fresh interpreter's imports.
        proc = multiprocessing.get_context("fork").Process(target=_upload_child, args=(url, str(tmp_path / name)))
        proc.start()
        deadline = time.monotonic() + 60
        while not s3.list_multipart_uploads(Bucket=BUCKET, Prefix=key).get("Uploads"):
            assert proc.is_alive() and time.monotonic() < deadline, "the child never started its upload"
            time.sleep(0.02)
        time.sleep(0.4)  # a part or two in
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
        assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="killed-upload/shards/")  # nothing visible
        assert [k for k, _ in store.list_uploads()] == [key]  # invisible, but stored (and billed)

    store.write_bytes("identity.json", b"{}")  # a cache's first file (gc refuses a prefix without one)
    kill_mid_upload("first")
    result = _cli("gc", url, "--dry-run")
    assert result.exit_code == 0 and "would remove unfinished upload: shards/shard-000007.tar" in result.stdout
    assert len(store.list_uploads()) == 1
    # The killed writer's staged copy too, in this cache's subfolder of the --tmp-dir it was given.
    staged = store.staging_dir(tmp_dir=tmp_path) / f"{TEMP_PREFIX}shard-000007.tar.4242.abcd"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"half a shard")
    result = _cli("gc", url, "--tmp-dir", str(tmp_path))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "removed unfinished upload: shards/shard-000007.tar",
        f"removed staged temp file: {staged}",
        f"gc {url}: removed 1 unfinished upload(s), 1 staged temp file(s)",
    ]
    assert store.list_uploads() == [] and not staged.exists()

    # A re-run's writer aborts what a killed run left under its own shard's name, then publishes.
    kill_mid_upload("second")
    data = os.urandom(6 << 20)
    (tmp_path / "ok").write_bytes(data)
    with caplog.at_level(logging.INFO, logger="shards.s3"):
        store.put_file("shards/shard-000007.tar", tmp_path / "ok")
    assert "aborted 1 unfinished upload(s) left by an earlier run" in caplog.text
    assert store.list_uploads() == [] and store.read_bytes("shards/shard-000007.tar") == data


def test_gc_orphans_deletes_only_shards_without_a_valid_record(server, caches):
    _, remote = caches
    store = S3Store(f"s3://{BUCKET}/orphans", policy=FAST)
    write_synthetic_cache(store, shards=2, samples_per_shard=2)
    # A writer killed between publishing shard 2 and writing its record leaves this:
    store.write_bytes(schema.shard_name(2), remote.read_bytes(schema.shard_name(2)))
    result = _cli("gc", store.url, "--orphans")
    assert result.exit_code == 0, result.stderr
    assert "removed orphan shard: shards/shard-000002.tar" in result.stdout
    assert store.list(schema.SHARD_DIR) == [schema.shard_name(0), schema.shard_name(1)]


# ----------------------------------------------------------------------------------------------
# Everything that goes wrong is a clear error


def _copy_cache(src, dst_url: str) -> S3Store:
    dst = S3Store(dst_url, policy=FAST)
    for rel in src.list():
        dst.write_bytes(rel, src.read_bytes(rel))
    return dst


def test_damaged_or_missing_shards_are_errors_naming_the_shard(server, caches):
    _, remote = caches
    store = _copy_cache(remote, f"s3://{BUCKET}/damaged")
    manifest = Manifest.load(store)
    rec = manifest.shards[1]
    good = remote.read_bytes(rec.name)

    store.write_bytes(rec.name, good[: len(good) // 2])
    with pytest.raises(ShardError, match=rf"^{rec.name}: truncated"):
        _batches(store, manifest)

    flipped = bytearray(good)
    flipped[2000] ^= 0x01  # inside the first sample's safetensors data: only the sha256 can tell
    store.write_bytes(rec.name, bytes(flipped))
    with pytest.raises(ShardError, match=rf"^{rec.name}: sha256 mismatch"):
        for _ in iter_shard_members(store, rec):
            pass

    store.delete(rec.name)
    with pytest.raises(ShardError, match=rf"^{rec.name}: missing from s3://{BUCKET}/damaged"):
        _batches(store, manifest)
    result = _cli("verify", store.url)
    assert result.exit_code == 1
    assert f"error: verify failed: {rec.name}: missing" in result.stderr


def test_wrong_endpoint_is_a_clear_error_within_the_budget(server, caches, tmp_path):
    (closed,) = free_ports(1)
    policy = RetryPolicy(attempts=100, budget_s=1.5, backoff_s=0.1, connect_timeout_s=1, read_timeout_s=1)
    store = S3Store(caches[1].url, policy=policy, endpoint_url=f"http://127.0.0.1:{closed}")
    t0 = time.monotonic()
    with pytest.raises(StoreError) as e:
        Manifest.load(store)
    elapsed = time.monotonic() - t0
    msg = str(e.value)
    m = re.match(rf"^{re.escape(caches[1].url)}/manifest.json: gave up after (\d+) attempts? over ([\d.]+)s", msg)
    assert m and f"127.0.0.1:{closed}" in msg, msg
    # Gave up on the time budget (the code's own measure), not on the attempt count; the wall clock
    # only guards against a hang, with a wide margin for a busy machine.
    assert int(m.group(1)) < policy.attempts and float(m.group(2)) >= policy.budget_s, msg
    assert elapsed < policy.worst_case_s() + 60, elapsed
    assert "Could not connect to the endpoint URL" in msg

    result = _cli("verify", caches[1].url, env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}", "SHARDS_RETRY_SECONDS": "1"})
    assert result.exit_code == 1  # a message, no traceback (_cli re-raises anything but SystemExit)
    assert result.stderr.startswith(f"error: {caches[1].url}/manifest.json: gave up") and "Could not connect" in result.stderr


def test_wrong_credentials_are_refused_at_once(tmp_path_factory, caches, caplog):
    with S3Server(tmp_path_factory.mktemp("seaweedfs-auth"), access_key="owner", secret_key="owner-secret") as auth:
        client = auth.client()
        client.create_bucket(Bucket=BUCKET)
        good = S3Store(f"s3://{BUCKET}/c", policy=FAST, endpoint_url=auth.endpoint)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ACCESS_KEY_ID", "owner")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "owner-secret")
            good.write_bytes("identity.json", b"{}")
            assert good.read_bytes("identity.json") == b"{}"
        for key, secret, code in (("owner", "not-the-secret", "SignatureDoesNotMatch"), ("stranger", "x", "InvalidAccessKeyId")):
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("AWS_ACCESS_KEY_ID", key)
                mp.setenv("AWS_SECRET_ACCESS_KEY", secret)
                store = S3Store(f"s3://{BUCKET}/c", policy=FAST, endpoint_url=auth.endpoint)
                with caplog.at_level(logging.WARNING, logger="shards"), pytest.raises(StoreError) as e:
                    store.read_bytes("identity.json")
                # Not retried (credentials do not fix themselves): counted, not timed.
                assert not [r for r in caplog.records if "retry" in r.getMessage()], caplog.text
                msg = str(e.value)
                assert msg.startswith(f"s3://{BUCKET}/c/identity.json: access denied ({code}")
                assert "AWS_ACCESS_KEY_ID" in msg and auth.endpoint in msg
                # gc too: a wrong key is no missing permission to list uploads, and no clean report.
                with pytest.raises(StoreError, match=rf"listing unfinished uploads: access denied \({code}"):
                    store.cleanup_incomplete()
        # Anonymous https:// reads of a private bucket: refused, with the way out.
        with pytest.raises(StoreError, match="HTTP 403.*use s3:// with credentials"):
            open_store(f"{auth.endpoint}/{BUCKET}/c").read_bytes("identity.json")


# ----------------------------------------------------------------------------------------------
# --local-cache


def test_local_cache_saves_while_streaming_reuses_bounds_and_repairs(server, caches, tmp_path):
    local, remote = caches
    manifest = Manifest.load(remote)
    want = _batches(local, manifest)
    shards = [r for r in manifest.shards if r.samples]
    sizes = {r.name: r.bytes for r in shards}

    # Run 1: every shard streams from the bucket and is saved on the way.
    cached = CachingStore(remote, tmp_path / "lc", records=manifest.shards)
    assert _batches(cached, manifest) == want
    assert sorted(e for _, e in cached.events) == ["fetched"] * len(shards)
    for r in shards:
        assert hashlib.sha256(cached.path_for(r.sha256).read_bytes()).hexdigest() == r.sha256
    assert not list((tmp_path / "lc").rglob(".tmp-*"))

    # Run 2: served locally. The remote now points at a closed port, so any remote read would fail.
    (closed,) = free_ports(1)
    dead = S3Store(remote.url, policy=RetryPolicy(attempts=0, connect_timeout_s=1, read_timeout_s=1),
                   endpoint_url=f"http://127.0.0.1:{closed}")
    again = CachingStore(dead, tmp_path / "lc", records=manifest.shards)
    assert _batches(again, manifest) == want
    assert sorted(e for _, e in again.events) == ["hit"] * len(shards)

    # A damaged local copy is detected before use, deleted, and fetched again.
    victim = cached.path_for(shards[2].sha256)
    data = bytearray(victim.read_bytes())
    data[1500] ^= 0xFF
    victim.write_bytes(bytes(data))
    repaired = CachingStore(remote, tmp_path / "lc", records=manifest.shards)
    assert _batches(repaired, manifest) == want
    assert (shards[2].name, "corrupt") in repaired.events and (shards[2].name, "fetched") in repaired.events
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == shards[2].sha256

    # Bounded: room for two shards keeps the two most recently used; a shard too big is not kept.
    limit = sum(sorted(sizes.values())[-2:])
    small = CachingStore(remote, tmp_path / "lc-small", max_bytes=limit, records=manifest.shards)
    _batches(small, manifest)
    assert small.total_bytes() <= limit and len(small.entries()) == 2
    used_last = [n for n, e in small.events if e == "fetched"][-2:]
    assert sorted(p.name for _, _, p in small.entries()) == sorted(
        f"{r.sha256}.tar" for r in shards if r.name in used_last)
    tiny = CachingStore(remote, tmp_path / "lc-tiny", max_bytes=min(sizes.values()) - 1, records=manifest.shards)
    assert _batches(tiny, manifest) == want
    assert {e for _, e in tiny.events} == {"too_big"} and tiny.entries() == []

    # A stream abandoned half way keeps nothing (no copy, no temp file).
    half = CachingStore(remote, tmp_path / "lc-half", records=manifest.shards)
    with half.open_read(shards[0].name) as f:
        f.read(1000)
    assert half.entries() == [] and not list((tmp_path / "lc-half").rglob(".tmp-*"))


def test_the_same_bucket_on_two_servers_stages_in_two_folders(tmp_path):
    """A bucket name is only unique on its server: staging (and its writer lock) is per server."""
    a = S3Store("s3://bkt/c", endpoint_url="http://127.0.0.1:9001")
    b = S3Store("s3://bkt/c", endpoint_url="http://127.0.0.1:9002")
    assert a.staging_dir(tmp_dir=tmp_path) != b.staging_dir(tmp_dir=tmp_path)
    assert a.staging_dir(tmp_dir=tmp_path) == S3Store("s3://bkt/c", endpoint_url="http://127.0.0.1:9001").staging_dir(
        tmp_dir=tmp_path)
    assert a.staging_dir(tmp_dir=tmp_path).parent == tmp_path / "shards-staging"


def test_a_bucket_that_does_not_exist_is_named_as_such_not_as_a_missing_manifest(server):
    with pytest.raises(ManifestError, match=r"the bucket does not exist \(check the URL and AWS_ENDPOINT_URL\)"):
        Manifest.load(S3Store("s3://no-such-bucket-here/c"))
    result = _cli("ls", "s3://no-such-bucket-here/c")
    assert result.exit_code == 1 and "the bucket does not exist" in result.stderr
    # An existing bucket without a cache at the prefix keeps the usual message.
    with pytest.raises(ManifestError, match=rf"no manifest.json in s3://{BUCKET}/nothing-here: run precompute first"):
        Manifest.load(S3Store(f"s3://{BUCKET}/nothing-here"))
