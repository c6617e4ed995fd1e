"""Read-only caches over plain HTTP(S): `https://host/path/to/cache` (or http:// on a trusted network).

For a public bucket or a static web server in front of a cache. Object URLs are the prefix plus
the cache-relative path; a query string on the prefix (a container-level access token, such as an
Azure SAS or a CDN token) is appended to every object URL. S3 presigned URLs are signed per
object, so a presigned *prefix* cannot work: use `s3://` with credentials for private buckets.

Built on `http.client` so that the connect and read timeouts are exactly the policy's (urllib has
one timeout for both): a stalled server raises a timeout instead of hanging, and a dropped
transfer resumes with a Range request pinned by If-Match to the ETag (or If-Unmodified-Since to
the Last-Modified time) of the first response, through `shards.remote.ResumableReader`. Redirects
are followed (up to 5). Proxies from the environment are not used. Every write raises
ReadOnlyStoreError: precompute needs a local folder or s3://.
"""

from __future__ import annotations

import http.client
import ssl
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urljoin, urlparse, urlunparse

from .errors import ReadOnlyStoreError, StoreError
from .remote import (
    Permanent,
    ResumableReader,
    RetryPolicy,
    is_network_error,
    retry_call,
)
from .secrets import redact
from .store import Store, check_rel

MAX_REDIRECTS = 5


class HTTPStatusError(Exception):
    def __init__(self, status: int, reason: str, url: str):
        super().__init__(f"HTTP {status} {reason}")
        self.status, self.reason, self.url = status, reason, url


def classify(e: BaseException) -> None:
    if isinstance(e, StoreError):
        raise e
    if isinstance(e, HTTPStatusError):
        s = e.status
        if s == 404 or s == 410:
            raise FileNotFoundError(str(e))
        if s in (401, 403):
            raise Permanent(f"{e}: access denied (a private object, or an expired token in the URL; for a private "
                            "bucket use s3:// with credentials)")
        if s == 412:
            raise Permanent(f"{e}: the object was replaced while it was being read")
        if s in (408, 425, 429) or s >= 500:
            return
        raise Permanent(str(e))
    if isinstance(e, ssl.SSLCertVerificationError):
        raise Permanent(f"TLS certificate verification failed ({e})")
    if is_network_error(e):
        return
    raise e


class _Response:
    """A response whose connection is closed with it."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse):
        self.conn, self.resp = conn, resp
        self.status = resp.status
        self.headers = resp.headers

    def read(self, n: int = -1) -> bytes:
        # read1: what one network read brings (at most n bytes), so that each call returns within
        # a read timeout and the reader can tell a trickling server from a slow consumer.
        return self.resp.read1(n) if n is not None and n >= 0 else self.resp.read()

    def close(self) -> None:
        try:
            self.resp.close()
        finally:
            self.conn.close()


class HttpStore(Store):
    """A read-only cache behind an HTTP(S) URL prefix (see the module docstring)."""

    def __init__(self, url: str, *, policy: RetryPolicy | None = None):
        parsed = urlparse(url)
        if parsed.scheme.lower() not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"cache location {redact(url)!r}: expected http(s)://host/path")
        if parsed.fragment:
            raise ValueError(f"cache location {redact(url)!r}: URL fragments are not allowed")
        self._base = parsed._replace(path=parsed.path.rstrip("/"), query="", fragment="")
        self._query = parsed.query
        # What messages, logs and every file written name: without the query and with any
        # user:password redacted (shards.secrets), so tokens never end up in logs or outputs.
        self.url = redact(urlunparse(self._base))
        self.policy = policy or RetryPolicy.from_env()

    def object_url(self, rel: str) -> str:
        path = f"{self._base.path}/{quote(check_rel(rel))}"
        return urlunparse(self._base._replace(path=path, query=self._query))

    # -- one request -----------------------------------------------------------------------------
    def _open(self, method: str, url: str, headers: dict[str, str]) -> _Response:
        for _ in range(MAX_REDIRECTS + 1):
            u = urlparse(url)
            cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
            conn = cls(u.hostname, u.port, timeout=self.policy.connect_timeout_s)
            try:
                conn.connect()
                conn.sock.settimeout(self.policy.read_timeout_s)
                target = u.path or "/"
                if u.query:
                    target += "?" + u.query
                conn.request(method, target, headers={"User-Agent": "sdxl-adapter-cache", **headers})
                resp = conn.getresponse()
            except BaseException:
                conn.close()
                raise
            if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                url = urljoin(url, resp.headers["Location"])
                resp.close()
                conn.close()
                continue
            if resp.status >= 400:
                reason = resp.reason
                resp.close()
                conn.close()
                raise HTTPStatusError(resp.status, reason, url)
            return _Response(conn, resp)
        raise Permanent(f"more than {MAX_REDIRECTS} redirects")

    def _call(self, rel: str, method: str, headers: dict[str, str] | None = None) -> _Response:
        url = self.object_url(rel)
        try:
            return retry_call(lambda: self._open(method, url, headers or {}), what=self.display(rel),
                              policy=self.policy, classify=classify)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.display(rel)} does not exist") from None

    # -- Store -----------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        try:
            self._call(rel, "HEAD").close()
        except FileNotFoundError:
            return False
        return True

    def size(self, rel: str) -> int:
        r = self._call(rel, "HEAD")
        r.close()
        length = r.headers.get("Content-Length")
        if length is None:
            raise StoreError(f"{self.display(rel)}: the server sent no Content-Length")
        return int(length)

    def open_read(self, rel: str) -> BinaryIO:
        first = self._call(rel, "GET")
        length = first.headers.get("Content-Length")
        if length is None:
            first.close()
            raise StoreError(f"{self.display(rel)}: the server sent no Content-Length, so a cut-off transfer "
                             "could not be told from the end of the object")
        size = int(length)
        pin = {}
        if first.headers.get("ETag"):
            pin["If-Match"] = first.headers["ETag"]
        elif first.headers.get("Last-Modified"):
            pin["If-Unmodified-Since"] = first.headers["Last-Modified"]
        url = self.object_url(rel)

        def open_at(offset: int) -> BinaryIO:
            r = self._open("GET", url, {"Range": f"bytes={offset}-", **pin})
            if r.status != 206 or not (r.headers.get("Content-Range") or "").startswith(f"bytes {offset}-"):
                r.close()
                raise Permanent(f"the server ignored the Range request for bytes {offset}- (HTTP {r.status})")
            return r

        return ResumableReader(what=self.display(rel), open_at=open_at, size=size, first_body=first,
                               policy=self.policy, classify=classify)

    def read_bytes(self, rel: str) -> bytes:
        with self.open_read(rel) as f:
            return f.read()

    def _read_only(self, rel: str, op: str):
        raise ReadOnlyStoreError(
            f"{self.display(rel)}: cannot {op}: {self.url} is a read-only http(s) cache; precompute and gc need a "
            "local folder or an s3:// URL"
        )

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._read_only(rel, "write")

    def put_file(self, rel, local_path) -> None:
        self._read_only(rel, "upload")

    def delete(self, rel: str) -> None:
        self._read_only(rel, "delete")

    def list(self, prefix: str = "") -> list[str]:
        raise ReadOnlyStoreError(f"{self.url}: an http(s) cache cannot be listed (nothing but gc needs to)")

    def cleanup_incomplete(self, *, tmp_dir: str | Path | None = None, dry_run: bool = False) -> list[str]:
        raise ReadOnlyStoreError(f"{self.url}: an http(s) cache is read-only and has no leftovers of writers to "
                                 "remove; gc works on the local folder or s3:// URL the cache was written to")
