"""A lean HTTP/1.1 load generator for `trifecta bench`.

Written by hand on purpose: on a 2-core machine the load generator's CPU counts against
the service it measures, and a general client (httpx) spends several times more CPU per
request than this keep-alive loop over raw asyncio streams, which only frames requests
and reads Content-Length bodies. It is used for measurement only, never by the service.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0
    errors: int = 0

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    def pct(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Conn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.r, self.w = await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        if self.w is None:
            await self.open()
        assert self.r and self.w
        h = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        for k, v in (headers or {}).items():
            h += f"{k}: {v}\r\n"
        self.w.write(h.encode() + b"\r\n" + body)
        head = await self.r.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        close = False
        for ln in lines[1:]:
            k, _, v = ln.partition(b":")
            k = k.strip().lower()
            if k == b"content-length":
                length = int(v)
            elif k == b"connection" and v.strip().lower() == b"close":
                close = True
        data = await self.r.readexactly(length) if length else b""
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        if self.w:
            self.w.close()
        self.r = self.w = None


async def run(url: str, method: str, path: str, body: bytes, headers: dict[str, str], concurrency: int, total: int | None = None, duration: float | None = None, ok: tuple[int, ...] = (200,)) -> Result:
    """`total` requests (or for `duration` seconds) from `concurrency` keep-alive connections."""
    u = urlparse(url)
    res = Result()
    issued = 0
    t_stop = time.perf_counter() + duration if duration else None

    async def worker() -> None:
        nonlocal issued
        c = Conn(u.hostname or "127.0.0.1", u.port or 80)
        try:
            while True:
                if total is not None and issued >= total:
                    return
                if t_stop is not None and time.perf_counter() >= t_stop:
                    return
                issued += 1
                t0 = time.perf_counter()
                try:
                    status, _ = await c.request(method, path, body, headers)
                except (OSError, asyncio.IncompleteReadError):
                    res.errors += 1
                    c.close()
                    continue
                res.statuses[status] = res.statuses.get(status, 0) + 1
                if status in ok:
                    res.latencies.append(time.perf_counter() - t0)
        finally:
            c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.elapsed = time.perf_counter() - t0
    return res
