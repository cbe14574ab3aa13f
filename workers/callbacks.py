"""Job callbacks: POST a finished job's status JSON to the `callback_url` given at submit time.

Sent by the worker that finishes the job, from a background thread (a slow receiver never
holds a batch), with a few retries. When CALLBACK_SECRET is set the body is signed:
`X-Trifecta-Signature: sha256=<hex HMAC-SHA256 of the raw body>`; a receiver recomputes it
over the bytes it got and compares in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from typing import Any

import orjson

log = logging.getLogger("trifecta.callbacks")
RETRY_DELAYS_S = (0.0, 1.0, 4.0)


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post_status(url: str, status: dict[str, Any], secret: str | None, timeout_s: float = 10.0) -> bool:
    """POST once per attempt until a 2xx; False when every attempt failed (logged, never raised)."""
    import httpx

    body = orjson.dumps(status)
    headers = {"Content-Type": "application/json", "User-Agent": "trifecta-callback/1", "X-Trifecta-Job": str(status.get("job_id", ""))}
    if secret:
        headers["X-Trifecta-Signature"] = sign(body, secret)
    for i, delay in enumerate(RETRY_DELAYS_S):
        time.sleep(delay)
        try:
            r = httpx.post(url, content=body, headers=headers, timeout=timeout_s, follow_redirects=False)
            if 200 <= r.status_code < 300:
                log.info("job=%s callback delivered to %s (%d)", status.get("job_id"), url, r.status_code)
                return True
            log.warning("job=%s callback to %s answered %d (attempt %d)", status.get("job_id"), url, r.status_code, i + 1)
        except Exception as e:  # noqa: BLE001 - a receiver's failure must not touch the worker
            log.warning("job=%s callback to %s failed: %s (attempt %d)", status.get("job_id"), url, e, i + 1)
    return False


def post_later(url: str, status: dict[str, Any], secret: str | None) -> threading.Thread:
    t = threading.Thread(target=post_status, args=(url, status, secret), daemon=True, name="callback")
    t.start()
    return t
