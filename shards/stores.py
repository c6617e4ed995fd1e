"""open_store(url): the Store for a cache location, the one place that knows every backend.

It sits above the backends (`store.LocalStore`, `s3.S3Store`, `http.HttpStore`), which never
import it, so `shards/` imports stay a DAG. boto3 is imported only when an s3:// URL is opened.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from .secrets import redact
from .store import LocalStore, Store


def open_store(url: str | Path) -> Store:
    """The Store for a local path, file://, s3:// or (read-only) http(s):// URL.

    Opening does no I/O: a wrong endpoint or missing credentials surface at the first call, as a
    StoreError naming the file and the cause.
    """
    if isinstance(url, Path):
        return LocalStore(url)
    if not isinstance(url, str) or not url:
        raise ValueError(f"invalid cache location {url!r}")
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URL {redact(url)!r} names host {parsed.netloc!r}; only local files are supported")
        return LocalStore(unquote(parsed.path))
    if scheme == "s3":
        from .s3 import S3Store  # boto3 is imported only by caches that need it

        return S3Store(url)
    if scheme in ("http", "https"):
        from .http import HttpStore

        return HttpStore(url)
    if scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive letter
        raise ValueError(
            f"cache location {redact(url)!r}: unknown URL scheme {scheme!r} (use a local path, file://, s3:// or "
            "https://)"
        )
    return LocalStore(url)
