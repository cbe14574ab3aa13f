"""The HTTP protocol `trifecta api` serves with: uvicorn's, plus a header timeout and a per-client cap.

uvicorn's httptools protocol plus a header read timeout and a cap on connections per client address.

Why a subclass: uvicorn has neither (its `timeout_keep_alive` only runs between requests,
`limit_concurrency` is one global count, and `h11_max_incomplete_event_size` caps header
bytes, not time), so a client that sends one header byte every few seconds holds its
connection, and a coroutine slot, forever; twenty such sockets from one address were all
still open after 70 s. Neither hypercorn nor granian is installed, and a reverse proxy is
not always there. The timer and the count live in the protocol, one per connection, on the
event loop: no thread, no task per connection.

- HEADER_TIMEOUT_S: from the connection's start, or from the first byte of the next request on
  a kept-alive connection, to the end of the request's headers. Past it: `408` and the
  connection is closed (nginx's `client_header_timeout`).
- MAX_CONNECTIONS_PER_CLIENT: open connections per client address in this process; one more
  gets `503` with `Retry-After` and is closed at once, before any byte of it is parsed.

Used as `uvicorn.run(..., http="api.server:GuardedHttpToolsProtocol")`; checked against
uvicorn 0.55's `HttpToolsProtocol` (its `connection_made`, `connection_lost`,
`on_message_begin`, `on_headers_complete`, `data_received` and `handle_websocket_upgrade`;
a WebSocket leaves the count when it upgrades).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tasks.settings import get_settings


def _raw_response(status: str, code: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}connection: close\r\n\r\n"
    return head.encode("latin-1") + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    per_client: ClassVar[Counter[str]] = Counter()  # open connections per client address (this process, one event loop)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = get_settings()
        self.header_timeout = s.header_timeout_s
        self.cap = s.max_connections_per_client
        self._timer: asyncio.TimerHandle | None = None
        self._counted: str | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else None
        if host is not None and self.cap:
            if self.per_client[host] >= self.cap:
                self._refused = True
                msg = f"this address holds {self.cap} open connections (MAX_CONNECTIONS_PER_CLIENT); close some or retry later"
                transport.write(_raw_response("503 Service Unavailable", "overloaded", msg, "retry-after: 1\r\n"))
                transport.close()
                return
            self.per_client[host] += 1
            self._counted = host
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._release()  # the WebSocket protocol takes the transport over: this one never sees its end
        super().handle_websocket_upgrade()

    def _release(self) -> None:
        self._disarm()
        if self._counted is not None:
            self.per_client[self._counted] -= 1
            if self.per_client[self._counted] <= 0:
                del self.per_client[self._counted]
            self._counted = None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered 503 and closing: nothing of it is parsed
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._timer is None:  # the next request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.header_timeout, self._header_timeout)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_timeout(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # no answer of an earlier request is being written
            msg = f"the request's headers did not arrive within {self.header_timeout:g} s (HEADER_TIMEOUT_S)"
            self.transport.write(_raw_response("408 Request Timeout", "timeout", msg))
        self.transport.close()
