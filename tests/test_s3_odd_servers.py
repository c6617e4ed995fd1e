"""S3-compatible servers that answer differently from AWS, and a bucket shared with others.

The real server (SeaweedFS) behind `faultproxy.FaultProxy`, which answers some requests as other
servers do: no ListMultipartUploads, no `x-amz-meta-*` on HEAD, a GET sent chunked without
Content-Length, a listing that pages without continuation tokens, a HEAD that misses an object
just written. Each is written to and read from as on AWS, or is one clear error; none is a
traceback, and nothing of anyone else's in the bucket is touched.
"""

from __future__ import annotations

import hashlib
import logging
import os

import pytest
from click.testing import CliRunner
from faultproxy import FaultProxy
from s3server import bucket_fixtures

from shards import schema
from shards.cli import cli
from shards.errors import PublishConflictError, StoreError
from shards.remote import RetryPolicy
from shards.s3 import S3Store

BUCKET = "odd"
FAST = RetryPolicy(attempts=5, budget_s=10.0, backoff_s=0.05, max_backoff_s=0.2, connect_timeout_s=2.0,
                   read_timeout_s=5.0)

server, aws_env = bucket_fixtures(BUCKET)


@pytest.fixture
def proxy(server):
    with FaultProxy(server.endpoint) as p:
        yield p


def _store(url: str, endpoint: str | None = None) -> S3Store:
    return S3Store(url, policy=FAST, endpoint_url=endpoint, multipart_threshold=5 << 20, part_size=5 << 20)


def _uploads(server, bucket: str) -> list[str]:
    return sorted(u["Key"] for u in server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def test_a_cache_at_a_bucket_root_aborts_only_its_own_unfinished_uploads(server):
    """gc and precompute's clean-up abort the uploads of the cache's shards, never another
    tool's, nor those of a cache further down the same bucket."""
    client = server.client()
    client.create_bucket(Bucket="shared-root")
    others = ["backups/db.dump", "caches/other/shards/shard-000000.tar", "shards/notes.txt"]
    for key in [*others, "shards/shard-000003.tar"]:
        client.create_multipart_upload(Bucket="shared-root", Key=key)
    client.put_object(Bucket="shared-root", Key="identity.json", Body=b"{}")  # the cache's first file
    result = CliRunner().invoke(cli, ["gc", "s3://shared-root"])
    assert result.exit_code == 0, result.output
    assert "removed unfinished upload: shards/shard-000003.tar" in result.output
    assert "1 unfinished upload(s)" in result.output
    assert _uploads(server, "shared-root") == sorted(others)
    # A cache under a prefix: the same, below it.
    client.create_multipart_upload(Bucket="shared-root", Key="caches/other/shards/shard-000001.tar")
    assert [k for k, _ in _store("s3://shared-root/caches/other").list_uploads()] == [
        "caches/other/shards/shard-000000.tar", "caches/other/shards/shard-000001.tar"]


def test_a_server_that_cannot_list_uploads_is_written_to_with_one_warning(proxy, tmp_path, caplog):
    proxy.rule("GET", "?uploads", ("status", 501, "NotImplemented"))
    store = _store(f"s3://{BUCKET}/no-upload-listing", proxy.endpoint)
    caplog.set_level(logging.WARNING, logger="shards.s3")
    for i in range(2):
        src = tmp_path / f"s{i}.tar"
        src.write_bytes(os.urandom(1000 + i))
        data = src.read_bytes()
        store.put_file(schema.shard_name(i), src)
        assert store.read_bytes(schema.shard_name(i)) == data
    warnings = [r.getMessage() for r in caplog.records if "does not list unfinished multipart uploads" in r.getMessage()]
    assert len(warnings) == 1 and "s3:ListBucketMultipartUploads" in warnings[0]
    assert store.cleanup_incomplete() == []


def test_an_object_without_our_metadata_is_judged_by_its_bytes(server, tmp_path):
    """A server that keeps no x-amz-meta-* (or a PUT whose answer was lost): the conditional
    create is refused, and the bytes, hashed, decide whether it is ours."""
    client = server.client()
    store = _store(f"s3://{BUCKET}/no-meta")
    data = os.urandom(4000)
    client.put_object(Bucket=BUCKET, Key="no-meta/" + schema.shard_name(0), Body=data)  # no metadata
    src = tmp_path / "same.tar"
    src.write_bytes(data)
    store.put_file(schema.shard_name(0), src)  # the same bytes: a success that changes nothing
    assert not src.exists() and store.read_bytes(schema.shard_name(0)) == data
    other = tmp_path / "other.tar"
    other.write_bytes(os.urandom(4000))
    theirs = hashlib.sha256(data).hexdigest()
    with pytest.raises(PublishConflictError, match=rf"already exists with other content \(4000 bytes, sha256 {theirs}"):
        store.put_file(schema.shard_name(0), other)
    assert store.read_bytes(schema.shard_name(0)) == data


def test_a_get_without_content_length_reads_the_length_from_head(proxy):
    store = _store(f"s3://{BUCKET}/chunked", proxy.endpoint)
    payload = os.urandom(300_000)
    store.write_bytes("blob", payload)
    proxy.rule("GET", "/chunked/blob", "chunked")
    with store.open_read("blob") as f:
        assert f.size == len(payload) and f.read() == payload
    assert ("HEAD", f"/{BUCKET}/chunked/blob") in proxy.seen


def test_a_listing_that_pages_without_tokens_goes_on_after_the_last_key(proxy):
    store = _store(f"s3://{BUCKET}/paged", proxy.endpoint)
    names = [f"shards/shard-{i:06d}.tar" for i in range(7)]
    for name in names:
        store.write_bytes(name, b"x")
    proxy.rule("GET", "list-type=2", ("query", "max-keys=2"))  # pages of two keys, as given below
    assert store.list("shards") == names
    pages = [p for m, p in proxy.seen if "list-type=2" in p]
    assert len(pages) == 4 and all("continuation-token" in p for p in pages[1:])
    # The same pages without tokens (a server of the ListObjects v1 kind): StartAfter the last key.
    proxy.rules.clear()
    proxy.seen.clear()
    proxy.rule("GET", "list-type=2", ("query", "max-keys=2"), "strip_token")
    assert store.list("shards") == names
    pages = [p for m, p in proxy.seen if "list-type=2" in p]
    assert len(pages) == 4 and all("start-after=" in p and "continuation-token" not in p for p in pages[1:])
    # ...and one that ignores StartAfter too would give the first page forever: an error instead.
    proxy.rules.clear()
    proxy.rule("GET", "list-type=2", ("query", "max-keys=2"), "strip_token", ("unquery", "start-after"))
    with pytest.raises(StoreError, match=rf"s3://{BUCKET}/paged: listing paged/shards/: the server says the listing "
                                         "goes on but sends no later key"):
        store.list("shards")


def test_a_head_that_misses_a_just_written_object_is_asked_again(proxy, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("shards.s3._READ_AFTER_WRITE_PAUSE", 0.01)  # the schedule's shape, not its 8 s
    store = _store(f"s3://{BUCKET}/lag", proxy.endpoint)
    proxy.rule("HEAD", f"/lag/{schema.shard_name(0)}", ("status", 404, "NoSuchKey"), times=2)
    src = tmp_path / "s.tar"
    src.write_bytes(os.urandom(2000))
    caplog.set_level(logging.WARNING, logger="shards.s3")
    store.put_file(schema.shard_name(0), src)
    assert sum("does not show it yet" in r.getMessage() for r in caplog.records) == 2
    proxy.rule("HEAD", f"/lag/{schema.shard_name(1)}", ("status", 404, "NoSuchKey"))  # always
    src.write_bytes(os.urandom(2000))
    with pytest.raises(StoreError, match=r"shard-000001.tar: the upload succeeded but the server still answers 404 for "
                                         r"it after 6 tries over 0.3s"):
        store.put_file(schema.shard_name(1), src)
    assert src.exists()  # still the caller's, for the re-run


def test_a_part_size_s3_refuses_is_refused_at_start(monkeypatch):
    monkeypatch.setenv("SHARDS_S3_PART_SIZE", "40KiB")
    with pytest.raises(ValueError, match=r"SHARDS_S3_PART_SIZE must be between 5MiB and 5GiB \(S3's limits on a part\), "
                                         r"got 40960 bytes"):
        S3Store(f"s3://{BUCKET}/x")


def test_verify_on_a_store_that_keeps_failing_says_it_could_not_finish_not_that_the_cache_is_damaged(
        proxy, monkeypatch):
    from shards.synthetic import write_synthetic_cache

    write_synthetic_cache(_store(f"s3://{BUCKET}/busy"), shards=2, samples_per_shard=2)
    proxy.rule("GET", f"/busy/{schema.shard_name(1)}", ("status", 503, "SlowDown"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("SHARDS_RETRY_ATTEMPTS", "2")
    monkeypatch.setenv("SHARDS_RETRY_SECONDS", "5")
    result = CliRunner().invoke(cli, ["verify", f"s3://{BUCKET}/busy"])
    assert result.exit_code == 1
    assert f"error: verify could not finish: s3://{BUCKET}/busy/{schema.shard_name(1)}: gave up after 3 attempts" \
        in result.output, result.output
    assert "SlowDown" in result.output and "rebuild" not in result.output


def test_a_host_name_that_does_not_exist_is_said_at_once_not_retried(monkeypatch):
    """A typo in a URL or an endpoint: the resolver's "no such name" (EAI_NONAME) ends the call at
    its first try, through each client's wrapping (http.client; botocore -> urllib3), where a
    retry budget would spend a minute on it. A resolver that is down (EAI_AGAIN) is retried."""
    import socket

    from shards import remote
    from shards.http import HttpStore
    from shards.remote import retry_call, unresolvable_host

    monkeypatch.setattr(remote, "_REACHED", False)  # this process's first contact with any store
    lookups = []

    def no_such_host(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    for store in (HttpStore("https://cache.example.org/c", policy=FAST),
                  _store("s3://bucket/c", endpoint="http://minio.example.org:9000")):
        lookups.clear()
        with pytest.raises(StoreError) as err:
            store.read_bytes("manifest.json")
        assert "no host of that name (check the URL or the endpoint)" in str(err.value), err.value
        assert "manifest.json" in str(err.value) and "gave up" not in str(err.value)
        assert len(set(lookups)) == 1 and len(lookups) <= 2, lookups  # one try (a client may look up twice)
    calls = []

    def resolver_down():
        calls.append(1)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    with pytest.raises(StoreError, match="gave up after 3 attempts"):
        retry_call(resolver_down, what="x", classify=lambda e: None,
                   policy=RetryPolicy(attempts=2, budget_s=5, backoff_s=0.01, max_backoff_s=0.01))
    assert len(calls) == 3
    assert not unresolvable_host(OSError("x")) and not unresolvable_host(ConnectionRefusedError())
    # Once a call has succeeded (hours into a run), "no such name" may be a resolver's passing
    # hiccup: retried like any network failure.
    assert retry_call(lambda: "ok", what="x", classify=lambda e: None, policy=FAST) == "ok"
    answers = iter([socket.gaierror(socket.EAI_NONAME, "Name or service not known"), None])

    def hiccup():
        error = next(answers)
        if error:
            raise error
        return "read"

    assert retry_call(hiccup, what="x", classify=lambda e: None, policy=FAST) == "read"
