"""The S3 backend: `s3://bucket/prefix` caches on AWS S3 or any S3-compatible store (R2, MinIO, SeaweedFS...).

Configuration is boto3's own, nothing hard-coded: credentials, region and endpoint come from the
standard variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE,
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3) and ~/.aws/config profiles. Our own
knobs, all optional: the `SHARDS_*` retry and timeout variables (`shards.remote.RetryPolicy`),
SHARDS_S3_MULTIPART_THRESHOLD and SHARDS_S3_PART_SIZE (sizes such as 64MiB, read by
`shards.units.parse_size`; a part is 5MiB to 5GiB), SHARDS_S3_CONDITIONAL_WRITES=0 for servers
that reject If-None-Match.

How each Store promise is kept on S3:

- Reads stream through `shards.remote.ResumableReader`: explicit connect/read timeouts, and on a
  dropped connection a ranged GET at the consumed offset pinned with If-Match to the object's
  ETag, so a shard replaced mid-read is an error instead of a spliced stream. botocore's own
  retries are off: every call goes through one bounded, backed-off loop, so the time to an error
  is bounded by the policy (`RetryPolicy.worst_case_s`).
- `put_file` publishes atomically: a single PUT for small files, else a multipart upload, which
  S3 makes visible only when it completes. Nothing ever appears under a shard's name half
  written. Before uploading, unfinished multipart uploads of the same key (left by a killed
  writer) are aborted; `python -m shards gc URL` aborts all of the cache's own (its shards':
  other keys under the prefix, or anywhere in the bucket of a cache at its root, are others').
  A server that cannot list them (no ListMultipartUploads, or no permission for it) is warned
  about once and written to all the same.
- Two writers never overwrite each other's shard: `put_file` is a conditional create
  (If-None-Match: *). If the object exists with the same sha256 (stored as object metadata), the
  publish is a no-op success, which is what a resumed, byte-reproducible precompute needs; with
  other content it fails naming both sides. Servers that do not understand the header may
  silently overwrite; the reader's sha256 check against the record still catches a mismatch.
- `write_bytes` is one PUT (atomic on S3) and may replace: records, identity and manifest are
  rewritten legitimately.
- The boto3 client is created lazily per process (DataLoader workers fork; a client's pooled
  connections must never be shared across processes) and is not pickled.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from . import schema
from .errors import PublishConflictError, StoreError
from .remote import (
    Permanent,
    ResumableReader,
    RetryPolicy,
    describe,
    is_network_error,
    retry_call,
)
from .store import Store, check_rel, conflict_message, file_sha256, stream_sha256
from .secrets import redact
from .units import parse_size

log = logging.getLogger(__name__)

MiB = 1 << 20
MIN_PART_SIZE = 5 * MiB  # S3's smallest part but the last (EntityTooSmall below it)
MAX_PART_SIZE = 5 * 1024 * MiB
# How often a HEAD right after a successful upload may miss the new object (a server whose reads
# lag its writes) before that is an error.
_READ_AFTER_WRITE_TRIES = 6
_READ_AFTER_WRITE_PAUSE = 0.25  # seconds before the second try; doubled each time (about 8 s in all)
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB  # single PUT up to this size (S3 allows 5 GiB)
DEFAULT_PART_SIZE = 32 * MiB  # S3: >= 5 MiB except the last part, <= 10000 parts
DEFAULT_CONCURRENCY = 4  # parts in flight per upload

_TRANSIENT_CODES = {
    "SlowDown", "RequestTimeout", "RequestTimeoutException", "Throttling", "ThrottlingException",
    "RequestLimitExceeded", "InternalError", "ServiceUnavailable", "OperationAborted",
    "ConditionalRequestConflict", "TooManyRequests", "BandwidthLimitExceeded",
}
_AUTH_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "AuthorizationHeaderMalformed", "InvalidSecurity", "AllAccessDisabled",
}
_AUTH_HINT = (
    "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE), "
    "the endpoint (AWS_ENDPOINT_URL) and the bucket's permissions"
)


class S3PublishConflictError(StoreError, PublishConflictError):
    """put_file found another object, with other content, under the shard's name."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b/' -> ('bucket', 'a/b')."""
    parsed = urlparse(url)
    if parsed.scheme.lower() != "s3":
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket = parsed.netloc
    problems = []
    if "@" in bucket:  # never echoed: what comes before the @ is usually a key and a secret
        problems.append("s3:// URLs take no user:password@ part (credentials come from AWS_ACCESS_KEY_ID / "
                        "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role)")
    elif not bucket:
        problems.append("no bucket name (expected s3://bucket/prefix)")
    elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.\-_]{1,254}", bucket):
        problems.append(f"{bucket!r} is not a valid bucket name" + (
            " (the endpoint and its port go in AWS_ENDPOINT_URL)" if ":" in bucket else ""))
    if parsed.query or parsed.fragment or parsed.params:
        problems.append("query strings and fragments are not allowed")
    prefix = parsed.path.strip("/")
    if prefix and any(p in ("", ".", "..") for p in prefix.split("/")):
        problems.append(f"prefix {prefix!r} has empty, '.' or '..' parts")
    if problems:
        raise ValueError(f"cache location {redact(url)!r}: " + "; ".join(problems))
    return bucket, prefix


def _status(e: Exception) -> tuple[str, int]:
    resp = getattr(e, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def classify(e: BaseException) -> None:
    """Retry transient S3/network failures; Permanent for the rest; FileNotFoundError for 404."""
    from botocore import exceptions as bx

    if isinstance(e, StoreError):  # already the final word of an inner retry loop
        raise e
    if isinstance(e, bx.ClientError):
        code, status = _status(e)
        message = e.response.get("Error", {}).get("Message", "") if hasattr(e, "response") else ""
        if code == "NoSuchBucket":
            raise Permanent("the bucket does not exist (check the URL and AWS_ENDPOINT_URL)")
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            raise FileNotFoundError(code or "404 Not Found")
        if code in _AUTH_CODES or status in (401, 403):
            raise Permanent(f"access denied ({code or status}: {message or 'forbidden'}); {_AUTH_HINT}")
        if code == "PreconditionFailed" or status == 412:
            raise Permanent(
                "the object was replaced while it was being read (its ETag changed); nothing may rewrite "
                "a cache while it is read"
            )
        if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
            if status == 501:
                raise Permanent(f"the server does not implement this request ({code}: {message}); if it rejects "
                                "conditional uploads (If-None-Match), set SHARDS_S3_CONDITIONAL_WRITES=0")
            return
        if code in ("NotImplemented", "InvalidArgument") and "match" in message.lower():
            message += "; if the server rejects conditional uploads, set SHARDS_S3_CONDITIONAL_WRITES=0"
        raise Permanent(f"{code or status}: {message}")
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        raise Permanent(f"no usable AWS credentials ({e}); {_AUTH_HINT}")
    if isinstance(e, (bx.ProfileNotFound, bx.NoRegionError, bx.ParamValidationError, bx.InvalidEndpointConfigurationError)):
        raise Permanent(str(e))
    if isinstance(e, getattr(bx, "SSLError", ())) and "CERTIFICATE_VERIFY_FAILED" in str(e):
        raise Permanent(f"TLS certificate verification failed ({e}); check AWS_CA_BUNDLE")
    if isinstance(e, (bx.HTTPClientError, bx.ConnectionError, bx.IncompleteReadError, bx.ResponseStreamingError)):
        return
    if is_network_error(e):
        return
    try:
        from urllib3 import exceptions as ux
    except ImportError:  # pragma: no cover - urllib3 ships with botocore
        ux = None
    if ux is not None and isinstance(e, ux.HTTPError):
        return
    raise e


class _CannotListUploads(Exception):
    """The server refuses to list multipart uploads (not implemented, or not permitted)."""


class _Body:
    """A GET body read a piece at a time: each read returns what one network read brings (at most
    n bytes), within a read timeout, so the reader can tell a trickling server from a slow
    consumer (botocore's own read(n) waits for all n bytes). The length is checked by the reader."""

    def __init__(self, streaming: Any):
        self._streaming = streaming
        raw = getattr(streaming, "_raw_stream", None)
        self._read = raw.read1 if callable(getattr(raw, "read1", None)) else streaming.read

    def read(self, n: int = -1) -> bytes:
        return self._read(n)

    def close(self) -> None:
        self._streaming.close()


class S3Store(Store):
    """An `s3://bucket/prefix` cache (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        policy: RetryPolicy | None = None,
        endpoint_url: str | None = None,
        multipart_threshold: int | None = None,
        part_size: int | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        conditional_writes: bool | None = None,
    ):
        if importlib.util.find_spec("boto3") is None:
            raise ImportError(f"cache location {url!r}: s3:// caches need boto3: pip install 'sdxl-adapter-cache[s3]'")
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        env = os.environ
        self.policy = policy or RetryPolicy.from_env()
        self.endpoint_url = endpoint_url  # None: boto3 resolves it (AWS_ENDPOINT_URL, profile, AWS)
        problems = []
        try:
            self.multipart_threshold = multipart_threshold if multipart_threshold is not None else parse_size(
                env.get("SHARDS_S3_MULTIPART_THRESHOLD", str(DEFAULT_MULTIPART_THRESHOLD)), "SHARDS_S3_MULTIPART_THRESHOLD")
        except ValueError as e:
            problems.append(str(e))
        try:
            self.part_size = part_size if part_size is not None else parse_size(
                env.get("SHARDS_S3_PART_SIZE", str(DEFAULT_PART_SIZE)), "SHARDS_S3_PART_SIZE")
            if not MIN_PART_SIZE <= self.part_size <= MAX_PART_SIZE:
                problems.append(f"SHARDS_S3_PART_SIZE must be between 5MiB and 5GiB (S3's limits on a part), got "
                                f"{self.part_size} bytes")
        except ValueError as e:
            problems.append(str(e))
        if not isinstance(concurrency, int) or concurrency < 1:
            problems.append(f"concurrency must be an integer >= 1, got {concurrency!r}")
        if conditional_writes is None:
            flag = env.get("SHARDS_S3_CONDITIONAL_WRITES", "1").strip().lower()
            if flag not in ("0", "1", "true", "false", "yes", "no"):
                problems.append(f"SHARDS_S3_CONDITIONAL_WRITES={flag!r}: expected 1 or 0")
            conditional_writes = flag in ("1", "true", "yes")
        if problems:
            raise ValueError(f"S3 settings for {url}:\n  - " + "\n  - ".join(problems))
        self.concurrency = concurrency
        self.conditional_writes = conditional_writes
        self._client_obj: Any = None
        self._client_pid: int | None = None
        self._warned_uploads = False

    # -- plumbing ----------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client_obj"] = None  # rebuilt in the process that uses it
        state["_client_pid"] = None
        return state

    @property
    def client(self) -> Any:
        pid = os.getpid()
        if self._client_obj is None or self._client_pid != pid:
            import boto3
            from botocore.config import Config

            p = self.policy
            config = Config(
                connect_timeout=p.connect_timeout_s,
                read_timeout=p.read_timeout_s,
                retries={"total_max_attempts": 1},  # one retry loop, ours: bounded and logged
                max_pool_connections=max(10, 2 * self.concurrency),
                user_agent_extra="sdxl-adapter-cache",
            )
            session = boto3.session.Session()
            self._client_obj = session.client("s3", endpoint_url=self.endpoint_url, config=config)
            self._client_pid = pid
        return self._client_obj

    @property
    def endpoint(self) -> str:
        try:
            return self.client.meta.endpoint_url
        except Exception:  # no region or a broken profile: the call itself will say so
            return self.endpoint_url or "(boto3 default)"

    def why_missing(self) -> str | None:
        # A HEAD of a key in a missing bucket answers a bare 404; a listing names the bucket.
        try:
            self._call(f"{self.url}: listing", self.client.list_objects_v2, Bucket=self.bucket, Prefix=self.prefix,
                       MaxKeys=1)
        except StoreError as e:
            return str(e)
        except FileNotFoundError:
            return None
        return None

    def staging_key(self) -> str:
        # s3://bucket/prefix names an object on one server: two S3-compatible servers (a staging
        # one beside production, two test servers) may both have it, and must not share a
        # staging folder (nor its writer lock).
        return f"{self.url} at {self.endpoint}"

    def _key(self, rel: str) -> str:
        check_rel(rel)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def _hint(self) -> str:
        return f" [S3 endpoint {self.endpoint}]"

    def _call(self, what: str, fn, *args, **kwargs):
        return retry_call(lambda: fn(*args, **kwargs), what=what, policy=self.policy, classify=classify, hint=self._hint())

    def _not_found(self, rel: str) -> FileNotFoundError:
        return FileNotFoundError(f"{self.display(rel)} does not exist")

    # -- reads -------------------------------------------------------------------------------
    def _head(self, rel: str) -> dict:
        try:
            return self._call(f"{self.display(rel)}", self.client.head_object, Bucket=self.bucket, Key=self._key(rel))
        except FileNotFoundError:
            raise self._not_found(rel) from None

    def exists(self, rel: str) -> bool:
        try:
            self._head(rel)
        except FileNotFoundError:
            return False
        return True

    def size(self, rel: str) -> int:
        return int(self._head(rel)["ContentLength"])

    def open_read(self, rel: str) -> BinaryIO:
        key = self._key(rel)
        what = self.display(rel)
        try:
            first = self._call(what, self.client.get_object, Bucket=self.bucket, Key=key)
        except FileNotFoundError:
            raise self._not_found(rel) from None
        etag, body = first.get("ETag"), _Body(first["Body"])
        if first.get("ContentLength") is not None:
            size = int(first["ContentLength"])
        else:
            # Sent chunked, without a length: the end of a cut transfer could not be told from the
            # end of the object. The object's HEAD gives the length, of the same version (ETag);
            # the reader then opens it afresh.
            body.close()
            body, head = None, self._head(rel)
            if head.get("ContentLength") is None or (etag and head.get("ETag") and head["ETag"] != etag):
                raise StoreError(f"{what}: the server sent no Content-Length, and its HEAD "
                                 f"{'none either' if head.get('ContentLength') is None else 'is of another version'}"
                                 f"; a cut-off transfer could not be told from the end of the object{self._hint()}")
            size = int(head["ContentLength"])

        def open_at(offset: int) -> BinaryIO:
            kwargs = {"IfMatch": etag} if etag else {}
            r = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={offset}-", **kwargs)
            got = r.get("ContentRange", "")
            # At byte 0 the whole object (a 200 without Content-Range) is what was asked for.
            if not got.startswith(f"bytes {offset}-") and not (offset == 0 and not got):
                r["Body"].close()
                raise Permanent(f"asked for bytes {offset}- and got {got or 'the whole object'}")
            return _Body(r["Body"])

        return ResumableReader(what=what, open_at=open_at, size=size, first_body=body, policy=self.policy,
                               classify=classify, hint=self._hint())

    def read_bytes(self, rel: str) -> bytes:
        with self.open_read(rel) as f:
            return f.read()

    def list(self, prefix: str = "") -> list[str]:
        base = (self._key(prefix) + "/") if prefix else (f"{self.prefix}/" if self.prefix else "")
        out: list[str] = []
        kwargs: dict = {"Bucket": self.bucket, "Prefix": base}
        last: str | None = None
        while True:
            page = self._call(f"{self.url}: listing {base or '/'}", self.client.list_objects_v2, **kwargs)
            keys = [o["Key"] for o in page.get("Contents", [])]
            out.extend(self._rel(k) for k in keys)
            if not page.get("IsTruncated"):
                return sorted(out)
            # Keys come in order: each page must end later than the one before, whatever the
            # server does with the way on (a repeated page would otherwise be listed forever).
            token = page.get("NextContinuationToken")
            repeated = bool(keys) and last is not None and keys[-1] <= last
            empty_without_way_on = not keys and (not token or token == kwargs.get("ContinuationToken"))
            if repeated or empty_without_way_on:
                raise StoreError(f"{self.url}: listing {base or '/'}: the server says the listing goes on but "
                                 f"sends no later key{self._hint()}")
            last = keys[-1] if keys else last
            kwargs.pop("ContinuationToken", None)
            kwargs.pop("StartAfter", None)
            if token:
                kwargs["ContinuationToken"] = token
            else:  # a server that pages without tokens (ListObjects v1 style): go on after the last key
                kwargs["StartAfter"] = last

    # -- writes ------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        data = bytes(data)
        self._call(f"{self.display(rel)}: upload", self.client.put_object, Bucket=self.bucket, Key=self._key(rel),
                   Body=data, ContentLength=len(data))

    def delete(self, rel: str) -> None:
        self._call(f"{self.display(rel)}: delete", self.client.delete_object, Bucket=self.bucket, Key=self._key(rel))

    def put_file(self, rel: str, local_path: str | Path) -> None:
        path = Path(local_path)
        size = path.stat().st_size
        sha = file_sha256(path)
        key = self._key(rel)
        aborted = self._abort_uploads(key, exact=True)
        if aborted:
            log.info("%s: aborted %d unfinished upload(s) left by an earlier run", self.display(rel), len(aborted))
        if size <= self.multipart_threshold:
            created = self._put_single(rel, key, path, size, sha)
        else:
            created = self._put_multipart(rel, key, path, size, sha)
        if created:
            got = self._size_after_upload(rel)
            if got != size:
                raise StoreError(f"{self.display(rel)}: uploaded {size} bytes but the server holds {got}{self._hint()}")
        else:
            self._check_same(rel, size, sha)
        path.unlink()

    def _size_after_upload(self, rel: str) -> int:
        """The size of the object just uploaded. A server whose reads lag its writes may answer
        404 for a moment: asked again a few times, then a StoreError that says so (never a
        FileNotFoundError, which would read as a local file gone missing)."""
        pause = _READ_AFTER_WRITE_PAUSE
        for attempt in range(_READ_AFTER_WRITE_TRIES):
            try:
                return self.size(rel)
            except FileNotFoundError:
                if attempt + 1 == _READ_AFTER_WRITE_TRIES:
                    break
                log.warning("%s: uploaded, but the server does not show it yet; asking again in %.2fs",
                            self.display(rel), pause)
                time.sleep(pause)
                pause *= 2
        waited = _READ_AFTER_WRITE_PAUSE * (2 ** (_READ_AFTER_WRITE_TRIES - 1) - 1)
        raise StoreError(f"{self.display(rel)}: the upload succeeded but the server still answers 404 for it after "
                         f"{_READ_AFTER_WRITE_TRIES} tries over {waited:.1f}s (its reads lag its writes); re-run, and "
                         f"the shard is checked again{self._hint()}")

    def _put_single(self, rel: str, key: str, path: Path, size: int, sha: str) -> bool:
        """True if created, False if the object already existed (conditional create refused)."""
        cond = {"IfNoneMatch": "*"} if self.conditional_writes else {}

        def put() -> bool:
            with open(path, "rb") as f:
                try:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=f, ContentLength=size,
                                           Metadata={"sha256": sha}, **cond)
                except Exception as e:
                    if _status(e)[1] == 412 or _status(e)[0] == "PreconditionFailed":
                        return False
                    raise
            return True

        return retry_call(put, what=f"{self.display(rel)}: upload", policy=self.policy, classify=classify,
                          hint=self._hint())

    def _put_multipart(self, rel: str, key: str, path: Path, size: int, sha: str) -> bool:
        what = f"{self.display(rel)}: multipart upload"
        upload = self._call(what, self.client.create_multipart_upload, Bucket=self.bucket, Key=key,
                            Metadata={"sha256": sha})
        upload_id = upload["UploadId"]
        try:
            n_parts = max(1, -(-size // self.part_size))
            if n_parts > 10000:
                raise StoreError(f"{what}: {size} bytes need {n_parts} parts of {self.part_size}; S3 allows 10000 "
                                 "(raise SHARDS_S3_PART_SIZE)")

            def send(i: int) -> dict:
                offset = i * self.part_size
                length = min(self.part_size, size - offset)
                with open(path, "rb") as f:
                    data = os.pread(f.fileno(), length, offset)
                r = self._call(f"{what} part {i + 1}/{n_parts}", self.client.upload_part, Bucket=self.bucket, Key=key,
                               UploadId=upload_id, PartNumber=i + 1, Body=data, ContentLength=length)
                return {"PartNumber": i + 1, "ETag": r["ETag"]}

            with ThreadPoolExecutor(max_workers=min(self.concurrency, n_parts)) as pool:
                parts = list(pool.map(send, range(n_parts)))
            cond = {"IfNoneMatch": "*"} if self.conditional_writes else {}

            def complete() -> bool:
                try:
                    self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                          MultipartUpload={"Parts": parts}, **cond)
                except Exception as e:
                    code, status = _status(e)
                    if status == 412 or code == "PreconditionFailed":
                        return False
                    if code == "NoSuchUpload":
                        # A retried complete whose first try went through, or an abort by gc or
                        # a second writer: the object (if any) decides which, in _check_same.
                        return False
                    raise
                return True

            created = retry_call(complete, what=what, policy=self.policy, classify=classify, hint=self._hint())
        except BaseException:
            self._abort_quietly(key, upload_id)
            raise
        if not created:
            self._abort_quietly(key, upload_id)
        return created

    def _check_same(self, rel: str, size: int, sha: str) -> None:
        """The object exists although we did not create it: fine only if it holds our bytes."""
        try:
            head = self._head(rel)
        except FileNotFoundError:
            raise StoreError(
                f"{self.display(rel)}: the upload was aborted before it completed (by `shards gc`, or by another "
                f"process writing the same shard); re-run{self._hint()}"
            ) from None
        theirs = (head.get("Metadata") or {}).get("sha256")
        if theirs is None and int(head["ContentLength"]) == size:
            # A server that keeps no x-amz-meta-* (or a lost response to our own PUT): the bytes decide.
            with self.open_read(rel) as f:
                theirs = stream_sha256(f)
        if int(head["ContentLength"]) == size and theirs == sha:
            log.info("%s: already present with the same content (sha256 %s...); kept", self.display(rel), sha[:12])
            return
        raise S3PublishConflictError(conflict_message(
            self.display(rel), self.url, theirs=f"{head['ContentLength']} bytes, sha256 {theirs or 'unknown'}",
            ours=f"{size} bytes, sha256 {sha}",
        ))

    # -- unfinished uploads --------------------------------------------------------------------
    def list_uploads(self, prefix: str = "") -> list[tuple[str, str]]:
        """(key, upload id) of every unfinished multipart upload of this cache's own files (and
        under `prefix`): uploads of other keys under the prefix, or anywhere in the bucket of a
        cache at its root, belong to others. [] (with one warning) from a server that cannot list
        them: one without ListMultipartUploads, or a key without its permission."""
        base = (self._key(prefix)) if prefix else (f"{self.prefix}/" if self.prefix else "")
        out = []
        kwargs: dict = {"Bucket": self.bucket, "Prefix": base}

        def page_of() -> dict:
            try:
                return self.client.list_multipart_uploads(**kwargs)
            except Exception as e:
                code, status = _status(e)
                # Not implemented, or this one permission missing; other 403s (a wrong key, a bad
                # signature) are the credentials' and fail as everywhere else.
                if status == 501 or code in ("NotImplemented", "AccessDenied"):
                    raise _CannotListUploads(f"{code or status}") from None
                raise

        while True:
            try:
                page = retry_call(page_of, what=f"{self.url}: listing unfinished uploads", policy=self.policy,
                                  classify=classify, hint=self._hint())
            except _CannotListUploads as e:
                if not self._warned_uploads:
                    self._warned_uploads = True
                    log.warning(
                        "%s: the server does not list unfinished multipart uploads (%s: it lacks ListMultipartUploads, "
                        "or the key lacks the s3:ListBucketMultipartUploads permission), so those left by a killed "
                        "run cannot be found and aborted here: they stay invisible, and billed on AWS, until a "
                        "lifecycle rule or the server's own tools remove them", self.url, e)
                return []
            out.extend((u["Key"], u["UploadId"]) for u in page.get("Uploads", [])
                       # the cache's shards are the only files it uploads in parts
                       if u["Key"].startswith(base) and schema.index_of(self._rel(u["Key"])) is not None)
            if not page.get("IsTruncated"):
                return out
            kwargs.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))

    def _abort_uploads(self, key_or_prefix: str, *, exact: bool) -> list[str]:
        base = (f"{self.prefix}/" if self.prefix else "")
        rel_prefix = key_or_prefix[len(base):] if exact else key_or_prefix
        done = []
        for key, upload_id in self.list_uploads(rel_prefix):
            if exact and key != key_or_prefix:
                continue
            self._call(f"{self.url}/{self._rel(key)}: abort upload", self.client.abort_multipart_upload,
                       Bucket=self.bucket, Key=key, UploadId=upload_id)
            done.append(self._rel(key))
        return done

    def _abort_quietly(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as e:  # best effort: gc (and the next put of this key) abort it later
            log.warning("%s/%s: could not abort multipart upload %s (%s); `python -m shards gc %s` will",
                        self.url, self._rel(key), upload_id, describe(e), self.url)

    def cleanup_incomplete(self, *, tmp_dir: str | Path | None = None, dry_run: bool = False) -> list[str]:
        """Abort every unfinished multipart upload under this store (their cache-relative keys
        come first in the answer), then empty this machine's staging folder for `tmp_dir`
        (absolute paths). Only while no writer runs."""
        if dry_run:
            uploads = sorted(self._rel(k) for k, _ in self.list_uploads())
        else:
            uploads = sorted(self._abort_uploads("", exact=False))
        return uploads + self.cleanup_staging(tmp_dir=tmp_dir, dry_run=dry_run)
