"""A plain HTTP server over a local folder, for tests: `with serve(folder) as server: server.url`.

Python's own `http.server` in a thread of the test process: GET and HEAD with Content-Length and
Last-Modified, which is all `shards.http.HttpStore` needs to read a cache or a tar (ranges are
asked for only to resume a dropped transfer). Query strings are ignored when files are looked up,
as a CDN in front of a bucket ignores a token it does not check; every request line is recorded
(`server.requests`), so a test can see which tokens were sent.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # recorded, not printed
        self.server.requests.append(self.requestline)


class FolderServer:
    def __init__(self, folder: Path):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
        self.httpd.daemon_threads = True
        self.httpd.requests = []  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="http-test-server", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests  # type: ignore[attr-defined]

    def url(self, path: str = "", *, userinfo: str = "", query: str = "") -> str:
        auth = f"{userinfo}@" if userinfo else ""
        return f"http://{auth}127.0.0.1:{self.port}/{path.lstrip('/')}" + (f"?{query}" if query else "")


@contextmanager
def serve(folder: Path) -> Iterator[FolderServer]:
    server = FolderServer(Path(folder))
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
