"""API keys, tenants and the per-tenant rate limit: one ASGI middleware in front of every route.

- `API_KEYS` (`key1:tenantA,key2:tenantB`) and `API_KEYS_FILE` (`key:tenant` lines, `#` comment lines)
  map keys to tenants. Once either is set, every request except the ops endpoints `/health`,
  `/metrics` and `/ping` (those too with `PROTECT_OPS_ENDPOINTS=true`) and a browser's `GET /`
  (the results page's shell, asked for with `Accept: text/html`, which asks for a key and
  sends it on each API call; no tenant data) must carry a key, as `Authorization: Bearer KEY`
  or `X-API-Key: KEY`, or gets 401 (unknown routes and the JSON index at `GET /` too, so they
  do not reveal what exists). A set but empty key file fails closed (every request 401).
- API_KEYS_FILE is re-read within a second of a change. A deleted or unreadable file gives
  no keys from it (logged at error level) until it is back: deleting the file revokes its
  keys. A file that no longer parses keeps the keys loaded before (also logged).
  The tenant lands in `request.state.tenant`, which `api.deps.TenantDep` reads; job records,
  job indexes, idempotency keys and storage keys are all namespaced by it.
- Keys are compared in constant time: the SHA-256 of the presented key against the SHA-256 of
  every configured key with `hmac.compare_digest`, never stopping at a match, so neither which
  key matched nor how long the keys are shows in the timing.
- `RATE_LIMIT_PER_MINUTE`: a token bucket per tenant in this process's memory (capacity one
  minute's worth, refilled continuously). It costs no Redis round trip; with N API processes a
  tenant can reach N times the rate, so it stops floods rather than metering a quota.
  Over the limit: 429 with `Retry-After` (seconds until the next token).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import time
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from tasks.errors import RateLimited, TrifectaError, Unauthorized
from tasks.settings import Settings

log = logging.getLogger("trifecta.api")

# /ping is a constant liveness answer (health.py): as open as /health, since it tells nothing
OPS_PATHS = frozenset({"/health", "/metrics", "/ping"})
# a tenant name becomes a storage prefix and part of Redis keys: one safe path segment
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RELOAD_EVERY_S = 1.0


def parse_keys(text: str, where: str) -> dict[str, str]:
    """`key:tenant` entries separated by commas or newlines → {key: tenant}; ValueError on a bad entry."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):  # whole-line comments only: a key may contain '#'
            continue
        for entry in line.split(","):
            entry = entry.strip()
            if not entry:
                continue
            key, sep, tenant = entry.rpartition(":")
            key, tenant = key.strip(), tenant.strip()
            if not sep or not key:
                raise ValueError(f"{where} line {n}: an entry is not `key:tenant`")
            if not TENANT_RE.match(tenant):
                raise ValueError(f"{where} line {n}: tenant {tenant!r} must be 1-64 of A-Z a-z 0-9 _ . - (it becomes a storage prefix)")
            if out.get(key, tenant) != tenant:
                raise ValueError(f"{where} line {n}: one key is given to two tenants")
            out[key] = tenant
    return out


class KeyRing:
    """The configured keys (digests only), re-reading API_KEYS_FILE when it changes."""

    def __init__(self, settings: Settings) -> None:
        self.inline = settings.api_keys or ""
        self.file = settings.api_keys_file
        self.enabled = bool(self.inline.strip() or self.file)
        self._mtime: float | None = None
        self._checked = 0.0
        self._digests: list[tuple[bytes, str]] = []
        self._load(strict=True)

    def _load(self, *, strict: bool) -> None:
        keys = parse_keys(self.inline, "API_KEYS")
        if self.file:
            try:
                self._mtime = os.stat(self.file).st_mtime
                with open(self.file, encoding="utf-8") as f:
                    keys.update(parse_keys(f.read(), "API_KEYS_FILE"))
            except OSError as e:
                if strict:
                    raise ValueError(f"API_KEYS_FILE {self.file}: {e}") from e
                # fail closed: a deleted or unreadable file gives no keys (API_KEYS stay) until it is back
                log.error("API_KEYS_FILE %s is gone or unreadable (%s); none of its keys are accepted until it is back", self.file, e)
                self._mtime = None if isinstance(e, FileNotFoundError) else self._mtime
            except ValueError as e:
                if strict:
                    raise ValueError(f"API_KEYS_FILE {self.file}: {e}") from e
                log.error("API_KEYS_FILE %s could not be parsed (%s); keeping the keys loaded before", self.file, e)
                return
        self._digests = [(hashlib.sha256(k.encode()).digest(), t) for k, t in keys.items()]

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if not self.file or now - self._checked < RELOAD_EVERY_S:
            return
        self._checked = now
        try:
            mtime: float | None = os.stat(self.file).st_mtime
        except FileNotFoundError:
            mtime = None  # deleted: its keys are revoked (and a file put back is read again)
        except OSError:
            mtime = -1.0  # unreadable: _load logs it and drops the file's keys
        if mtime != self._mtime:
            self._load(strict=False)

    def tenant(self, presented: str | None) -> str | None:
        """The tenant of a presented key, or None; the same work whatever the key."""
        self._maybe_reload()
        d = hashlib.sha256((presented or "").encode()).digest()
        found = None
        for digest, tenant in self._digests:
            if hmac.compare_digest(d, digest) and presented:
                found = tenant
        return found


class TokenBuckets:
    """Per-tenant token buckets; `take` returns 0 when a request may pass, else the seconds to wait."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.state: dict[str, tuple[float, float]] = {}

    def take(self, tenant: str) -> float:
        now = time.monotonic()
        tokens, last = self.state.get(tenant, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self.state[tenant] = (tokens - 1.0, now)
            return 0.0
        self.state[tenant] = (tokens, now)
        return (1.0 - tokens) / self.rate


def presented_key(scope: Scope) -> str | None:
    auth = xkey = None
    for k, v in scope.get("headers", []):
        if k == b"authorization":
            auth = v.decode("latin-1")
        elif k == b"x-api-key":
            xkey = v.decode("latin-1").strip()
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return xkey or None


class TenantGate:
    """ASGI middleware: 401 without a valid key, 429 over the rate, else `state.tenant` and on."""

    def __init__(self, app: ASGIApp, keys: KeyRing, settings: Settings) -> None:
        self.app, self.keys = app, keys
        self.protect_ops = settings.protect_ops_endpoints
        self.buckets = TokenBuckets(settings.rate_limit_per_minute) if settings.rate_limit_per_minute > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        ops = scope["path"] in OPS_PATHS
        # the results page's HTML shell only: `GET /` for JSON (or */*) lists every route, so it needs a key
        page = scope["path"] == "/" and scope.get("method") in ("GET", "HEAD") and _wants_html(scope)
        tenant = "default"
        if self.keys.enabled and not page and (self.protect_ops or not ops):
            found = self.keys.tenant(presented_key(scope))
            if found is None:
                err = Unauthorized("a valid API key is required: send `Authorization: Bearer KEY` or `X-API-Key: KEY`", headers={"WWW-Authenticate": 'Bearer realm="trifecta"'})
                await _reject(err, scope, receive, send)
                return
            tenant = found
        if self.buckets is not None and not (ops or page):
            wait = self.buckets.take(tenant)
            if wait > 0:
                err = RateLimited(f"tenant {tenant!r} is over RATE_LIMIT_PER_MINUTE; retry after the Retry-After header", headers={"Retry-After": str(max(1, math.ceil(wait)))})
                await _reject(err, scope, receive, send)
                return
        state: dict[str, Any] = scope.setdefault("state", {})
        state["tenant"] = tenant
        await self.app(scope, receive, send)


def _wants_html(scope: Scope) -> bool:
    """A browser's navigation: its Accept names text/html (curl, httpx and the SDK send */* or JSON)."""
    for k, v in scope.get("headers", []):
        if k == b"accept":
            return b"text/html" in v.lower()
    return False


async def _reject(err: TrifectaError, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":  # no route uses one yet; refused the same way before any accept
        await send({"type": "websocket.close", "code": 1008, "reason": err.code})
        return
    await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)
