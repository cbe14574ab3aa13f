"""Job webhooks: signing, verification, target checks and retry delays (pure functions).

A finished job whose record has a `callback_url` is POSTed its status JSON (the body of
`GET /v1/jobs/{id}`) by the API's sender (`api/webhooks.py`), signed with WEBHOOK_SECRET:

    X-Trifecta-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

A receiver recomputes the HMAC over the raw bytes it got, compares in constant time and
refuses an old `t` (replays) — `verify()` below does exactly that and is what the README
tells receivers to copy. Putting `t` inside the signed text is why a captured request
cannot be replayed later with a fresh timestamp (the Stripe scheme).

Targets are limited to WEBHOOK_ALLOWED_HOSTS so the service cannot be turned into a proxy
towards internal addresses: `host`, `host:port` or `*.domain` entries. An exact entry is
the operator's explicit choice (it may be `127.0.0.1:9000` in a test); a wildcard match
must also resolve to public addresses only, checked again right before each send.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
import socket
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from tasks.settings import Settings

SIGNATURE_HEADER = "X-Trifecta-Signature"
DEFAULT_TOLERANCE_S = 300


def sign(secret: str, body: bytes, t: int) -> str:
    """Hex HMAC-SHA256 of `"<t>.<body>"`."""
    return hmac.new(secret.encode(), str(int(t)).encode() + b"." + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, t: int | None = None) -> str:
    """The `X-Trifecta-Signature` value for `body` sent at unix time `t` (now by default)."""
    t = int(time.time()) if t is None else int(t)
    return f"t={t},v1={sign(secret, body, t)}"


def parse_signature(header: str) -> tuple[int | None, list[str]]:
    """`t=…,v1=…[,v1=…]` → (t, [v1 signatures]); several v1 entries allow key rotation."""
    t: int | None = None
    sigs: list[str] = []
    for part in header.split(","):
        k, _, v = part.strip().partition("=")
        if k == "t" and v.isdigit():
            t = int(v)
        elif k == "v1" and v:
            sigs.append(v.strip().lower())
    return t, sigs


def verify(secret: str, header: str | None, body: bytes, tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None) -> bool:
    """True when `header` signs `body` with `secret` and its time is within `tolerance_s` of now."""
    if not header:
        return False
    t, sigs = parse_signature(header)
    if t is None or not sigs:
        return False
    now = time.time() if now is None else now
    if abs(now - t) > tolerance_s:
        return False
    want = sign(secret, body, t)
    return any(hmac.compare_digest(want, s) for s in sigs)


def backoff_s(attempt: int, base_s: float, cap_s: float = 3600.0, jitter: float = 0.2) -> float:
    """Delay after failed attempt number `attempt` (1-based): base, 2·base, 4·base … ≤ cap, ±jitter."""
    d = min(cap_s, base_s * (2 ** max(0, attempt - 1)))
    return max(0.0, d * (1 + random.uniform(-jitter, jitter)))


def _split_hostport(entry: str) -> tuple[str, int | None]:
    entry = entry.strip().lower()
    if entry.startswith("["):  # [v6]:port
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port) if port.isdigit() else None
    return entry, None


def target_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; ValueError with a user-facing reason otherwise."""
    if not isinstance(url, str) or len(url) > 2048:
        raise ValueError("callback_url must be a URL of at most 2048 characters")
    try:
        u = urlsplit(url.strip())
        port = u.port
    except ValueError:
        raise ValueError("callback_url is not a valid URL") from None
    if u.scheme not in ("http", "https"):
        raise ValueError("callback_url must be an http:// or https:// URL")
    if u.username is not None or u.password is not None:
        raise ValueError("callback_url must not carry credentials (user:password@)")
    host = (u.hostname or "").lower().rstrip(".")
    if not host:
        raise ValueError("callback_url has no host")
    return u.scheme, host, port or (443 if u.scheme == "https" else 80)


def match_allowed(url: str, allowed: list[str]) -> str:
    """The allowlist entry that admits `url`; ValueError saying why not otherwise.

    Returns "exact" or "wildcard" (a wildcard match must also resolve to public addresses)."""
    _, host, port = target_of(url)
    if not allowed:
        raise ValueError("webhooks are disabled on this server: WEBHOOK_ALLOWED_HOSTS is empty")
    for entry in allowed:
        h, p = _split_hostport(entry)
        if p is not None and p != port:
            continue
        if h == host:
            return "exact"
        if h.startswith("*.") and host.endswith(h[1:]) and host != h[2:]:
            return "wildcard"
    raise ValueError(f"callback_url host {host}:{port} is not in WEBHOOK_ALLOWED_HOSTS")


def is_public(ip: str) -> bool:
    a = ipaddress.ip_address(ip)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
        a = a.ipv4_mapped
    return a.is_global and not (a.is_private or a.is_loopback or a.is_link_local or a.is_multicast or a.is_reserved or a.is_unspecified)


def resolve(host: str, port: int) -> list[str]:
    return sorted({ai[4][0] for ai in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})


def check_target(url: str, allowed: list[str], resolver=resolve) -> None:  # noqa: ANN001 - resolver is injectable for tests
    """Raise ValueError unless `url` may be called now (allowlist + public addresses for wildcards)."""
    how = match_allowed(url, allowed)
    if how == "wildcard":
        _, host, port = target_of(url)
        try:
            ips = resolver(host, port)
        except OSError as e:
            raise ValueError(f"callback_url host {host} does not resolve ({e})") from None
        bad = [ip for ip in ips if not is_public(ip)]
        if bad or not ips:
            raise ValueError(f"callback_url host {host} resolves to a non-public address ({', '.join(bad) or 'none'})")


def check_callback_url(url: str, settings: Settings) -> None:
    """Submit-time check of a job's `callback_url`: 422 (Unprocessable) with the reason."""
    from tasks.errors import Unprocessable

    if not settings.webhook_secret:
        raise Unprocessable("callback_url needs WEBHOOK_SECRET set on the server (webhooks are always signed)")
    try:
        match_allowed(url, settings.webhook_allowed_hosts)
    except ValueError as e:
        raise Unprocessable(str(e)) from None
