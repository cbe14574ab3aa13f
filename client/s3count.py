"""A counting HTTP proxy in front of an S3 endpoint (moto's server), for tests and the bench.

It records every storage request the stack makes, as the wire sees it.

    with S3Counter("http://127.0.0.1:5000") as c:     # point S3_ENDPOINT_URL at c.url
        ...                                           # c.requests: [(method, path, query, t0, t1)]
    with c.hold():                                    # storage requests wait at the proxy meanwhile
        ...                                           # c.waiting(): those that arrived and wait

Why a proxy rather than a wrapper around our S3 client: it counts what the API and worker
processes really send (botocore's retries, paginators and all), with no change to their code.
Path-style requests (moto, MinIO) name the bucket and key in the path.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class S3Counter:
    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.requests: list[tuple[str, str, str, float, float]] = []
        self._lock = threading.Lock()
        self._open = threading.Event()  # cleared while held: a request waits before it is forwarded
        self._open.set()
        self._waiting: list[tuple[str, str]] = []
        counter = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:  # quiet
                pass

            def _forward(self) -> None:
                t0 = time.monotonic()
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                path, _, query = self.path.partition("?")
                if not counter._open.is_set():
                    with counter._lock:
                        counter._waiting.append((self.command, path))
                    counter._open.wait()
                conn = http.client.HTTPConnection(counter.host, counter.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()
                with counter._lock:
                    counter.requests.append((self.command, path, query, t0, time.monotonic()))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="s3-counter")

    def __enter__(self) -> S3Counter:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Storage requests arriving meanwhile wait at the proxy (forwarded once it ends): whatever
        answers inside the block answered without waiting on storage."""
        with self._lock:
            self._waiting.clear()
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    def waiting(self) -> list[tuple[str, str]]:
        """(method, path) of the requests that arrived during the current (or last) hold."""
        with self._lock:
            return list(self._waiting)

    def mark(self) -> int:
        """The number of requests so far (a position to count from)."""
        with self._lock:
            return len(self.requests)

    def since(self, mark: int) -> list[tuple[str, str, str, float, float]]:
        with self._lock:
            return list(self.requests[mark:])
