"""An HTTP proxy in front of the test S3 server that answers some requests as other S3-compatible
servers do: `with FaultProxy(server.endpoint) as proxy: proxy.rule(...); proxy.endpoint`.

Every request is forwarded to the real server (SeaweedFS, which checks no signature when it has
no identities, so a changed query string is still served); a rule alters the requests whose
method matches and whose path-and-query contains a substring, a given number of times (None:
always), with one or more actions (the first matching rule applies):

- `("status", 501, "NotImplemented")`: answer that status with an S3 XML error, nothing forwarded;
- `("query", "max-keys=2")`: forward with that added to the query string;
- `("unquery", "start-after")`: forward without that parameter (a server that ignores it);
- `"strip_meta"`: forward, drop the `x-amz-meta-*` headers of the answer;
- `"strip_token"`: forward, drop `<NextContinuationToken>` from a listing;
- `"chunked"`: forward, send the answer's body chunked, without Content-Length.

`proxy.seen` records (method, path) of every request.
"""

from __future__ import annotations

import http.client
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "proxy-connection"}


@dataclass
class Rule:
    method: str
    contains: str
    actions: tuple
    times: int | None = None
    applied: int = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:
        pass

    def _request_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._request_body()
        proxy.seen.append((self.command, self.path))
        rule = proxy.match(self.command, self.path)
        actions = {(a[0] if isinstance(a, tuple) else a): a for a in (rule.actions if rule else ())}
        if "status" in actions:
            _, status, code = actions["status"]
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected by the '
                       f"test proxy</Message></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        path = self.path
        if "unquery" in actions:
            head, _, query = path.partition("?")
            kept = [p for p in query.split("&") if p and p.split("=", 1)[0] != actions["unquery"][1]]
            path = head + ("?" + "&".join(kept) if kept else "")
        if "query" in actions:
            path += ("&" if "?" in path else "?") + actions["query"][1]
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
        try:
            conn.request(self.command, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            answer = resp.getheaders()
        finally:
            conn.close()
        out = [(k, v) for k, v in answer if k.lower() not in _HOP_BY_HOP]
        if "strip_meta" in actions:
            out = [(k, v) for k, v in out if not k.lower().startswith("x-amz-meta-")]
        if "strip_token" in actions:
            data = re.sub(rb"<NextContinuationToken>.*?</NextContinuationToken>", b"", data, flags=re.S)
        self.send_response(resp.status, resp.reason)
        for k, v in out:
            self.send_header(k, v)
        if self.command == "HEAD":
            self.send_header("Content-Length", dict((k.lower(), v) for k, v in answer).get("content-length", "0"))
            self.end_headers()
        elif "chunked" in actions:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(data), 1 << 16):
                chunk = data[i : i + (1 << 16)]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client hanging up is no error here
            super().handle_error(request, client_address)


class FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = urlparse(upstream)
        self.rules: list[Rule] = []
        self.seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.proxy = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="s3-fault-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def rule(self, method: str, contains: str, *actions: Any, times: int | None = None) -> Rule:
        r = Rule(method, contains, actions, times)
        with self._lock:
            self.rules.append(r)
        return r

    def match(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for r in self.rules:
                if r.method == method and r.contains in path and (r.times is None or r.applied < r.times):
                    r.applied += 1
                    return r
        return None

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
