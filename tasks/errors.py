"""Every error a client can see, each with its HTTP status.

One handler in `api.app` renders them all as `{"error": {"code", "message"}}`;
workers raise the same classes and report `(code, message)` in the job record,
so a worker-side 422 reaches the client as a 422.

    TrifectaError (500 internal)
    ├── BadRequest (400 bad_request)
    │   └── UnreadableVideo (400 unreadable_video)
    ├── Unauthorized (401 unauthorized)
    ├── Forbidden (403 forbidden)
    │   └── InputForbidden (403 input_forbidden)
    ├── NotFound (404 not_found)
    │   ├── UnknownModel (404 unknown_model)
    │   └── JobNotFound (404 job_not_found)
    ├── Conflict (409 conflict)
    ├── Gone (410 gone)
    ├── PayloadTooLarge (413 payload_too_large)
    │   ├── ImageTooLarge (413 image_too_large)
    │   └── TooManySamples (413 too_many_samples)
    ├── UnsupportedMediaType (415 unsupported_media_type)
    ├── Unprocessable (422 unprocessable)
    │   └── UndecodableImage (422 undecodable_image)
    ├── RateLimited (429 rate_limited)
    │   └── QuotaExceeded (429 quota_exceeded)
    ├── ModelError (500 model_error)
    ├── DeadLettered (500 dead_lettered)
    ├── Overloaded (503 overloaded)
    │   ├── NoWorker (503 no_worker)
    │   ├── BrokerUnavailable (503 broker_unavailable)
    │   └── RedisFull (503 redis_full)
    ├── StorageError (503 storage_error)
    └── SyncTimeout (504 timeout)

Messages quote user input only through `shown(value)`, which caps the quote at 100
characters, so a hostile value never comes back (or into a job record) at full size.

An exception that is none of these (a bug) never shows its text: `translate` logs it with
its traceback and a reference, and the client (or the job record) gets `internal` with
that reference only.
"""

from __future__ import annotations

import logging
import reprlib
import uuid
from typing import Any

log = logging.getLogger("trifecta.errors")


class TrifectaError(Exception):
    """Base class: an unexpected failure."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


class BadRequest(TrifectaError):
    """The request is malformed."""

    status, code = 400, "bad_request"


class UnreadableVideo(BadRequest):
    """A video that cannot be opened or decoded."""

    code = "unreadable_video"


class Unauthorized(TrifectaError):
    """A missing or unknown API key."""

    status, code = 401, "unauthorized"


class Forbidden(TrifectaError):
    """A path or URI the caller may not read."""

    status, code = 403, "forbidden"


class InputForbidden(Forbidden):
    """An input URI a worker refused to read: outside the tenant's prefix, the allowlist or ALLOWED_INPUT_ROOTS."""

    code = "input_forbidden"


class NotFound(TrifectaError):
    """Nothing by that name."""

    status, code = 404, "not_found"


class UnknownModel(NotFound):
    """A model name not in the model list, or not served."""

    code = "unknown_model"


class JobNotFound(NotFound):
    """A job id never issued (or another tenant's)."""

    code = "job_not_found"


class Conflict(TrifectaError):
    """The job is not in a state that allows this (e.g. result of an unfinished job)."""

    status, code = 409, "conflict"


class Gone(TrifectaError):
    """A session whose worker died or that expired."""

    status, code = 410, "gone"


class PayloadTooLarge(TrifectaError):
    """A body, member or video over a limit."""

    status, code = 413, "payload_too_large"


class ImageTooLarge(PayloadTooLarge):
    """An image over MAX_IMAGE_PIXELS."""

    code = "image_too_large"


class TooManySamples(PayloadTooLarge):
    """A sync tar with more samples than MAX_SYNC_BATCH."""

    code = "too_many_samples"


class UnsupportedMediaType(TrifectaError):
    """A content type or image format we do not read."""

    status, code = 415, "unsupported_media_type"


class Unprocessable(TrifectaError):
    """Well-formed but invalid input."""

    status, code = 422, "unprocessable"


class UndecodableImage(Unprocessable):
    """Image bytes that do not decode (truncated, corrupt)."""

    code = "undecodable_image"


class RateLimited(TrifectaError):
    """A tenant over its request rate."""

    status, code = 429, "rate_limited"


class QuotaExceeded(RateLimited):
    """A tenant holding all it may at once (MAX_SESSIONS_PER_TENANT video sessions)."""

    code = "quota_exceeded"


class ModelError(TrifectaError):
    """The model failed on an input."""

    status, code = 500, "model_error"


class DeadLettered(TrifectaError):
    """A message delivered MAX_DELIVERIES times without finishing (its worker died each time)."""

    status, code = 500, "dead_lettered"


class Overloaded(TrifectaError):
    """The queue is full; retry after the Retry-After header."""

    status, code = 503, "overloaded"


class NoWorker(Overloaded):
    """No live worker serves the model."""

    code = "no_worker"


class BrokerUnavailable(Overloaded):
    """Redis cannot be reached."""

    code = "broker_unavailable"


class RedisFull(Overloaded):
    """Redis is near or at its maxmemory; new work waits until records expire and queues drain."""

    code = "redis_full"


class StorageError(TrifectaError):
    """Storage failed after retries."""

    status, code = 503, "storage_error"


class SyncTimeout(TrifectaError):
    """The bounded wait ran out; the job goes on and can be polled."""

    status, code = 504, "timeout"


# reprlib shortens long strings and big containers without rendering them whole first
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = _SHOWN.maxlong = 60
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 4
_SHOWN.maxlevel = 2


def shown(value: Any, limit: int = 100) -> str:
    """`repr(value)` for an error message, at most `limit` characters (a 1 MB prompt stays a short quote)."""
    try:
        s = _SHOWN.repr(value)
    except Exception:  # noqa: BLE001 - an int past Python's digit limit, a broken __repr__
        s = f"<{type(value).__name__}>"
    return s if len(s) <= limit else s[: limit - 3] + "..."


def is_redis_oom(exc: BaseException) -> bool:
    """Redis refused a write at its maxmemory (noeviction): `OOM command not allowed ...`."""
    try:
        from redis.exceptions import OutOfMemoryError
    except ImportError:  # pragma: no cover - redis is a dependency of every process
        return False
    return isinstance(exc, OutOfMemoryError)


def redis_full(detail: str = "") -> RedisFull:
    return RedisFull(
        "the job store (Redis) is full" + (f" ({detail})" if detail else "") + "; new work is refused until results expire and queues drain — retry after a moment",
        headers={"Retry-After": "5"},
    )


_BY_CODE: dict[str, type[TrifectaError]] = {}


def _collect(cls: type[TrifectaError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _collect(sub)


_collect(TrifectaError)


def from_code(code: str, message: str) -> TrifectaError:
    """Rebuild an error reported by a worker from its code."""
    return _BY_CODE.get(code, TrifectaError)(message)


def translate(exc: BaseException) -> TrifectaError:
    """Any exception → the TrifectaError a client sees (storage's own errors mapped here,
    since `storage` sits below `tasks` and does not know this hierarchy)."""
    from storage.blob import BadKey, ObjectMissing, StorageFailure

    if isinstance(exc, TrifectaError):
        return exc
    if isinstance(exc, ObjectMissing):
        return NotFound(str(exc))
    if isinstance(exc, BadKey):
        return Forbidden(str(exc))
    if isinstance(exc, StorageFailure):
        return StorageError(str(exc))
    if is_redis_oom(exc):
        return redis_full()
    status = getattr(exc, "status_code", None)  # Starlette's HTTPException (e.g. a form over max_fields) keeps its 4xx
    if isinstance(status, int) and 400 <= status < 500:
        cls = next((c for c in _BY_CODE.values() if c.status == status and c.__base__ is TrifectaError), BadRequest)
        err = cls(str(getattr(exc, "detail", "") or exc))
        err.status = status
        return err
    return internal(exc)


def internal(exc: BaseException, what: str = "an internal error", cls: type[TrifectaError] = TrifectaError) -> TrifectaError:
    """A 500 that names a log reference, never the exception's text (which may quote paths,
    keys or another tenant's data); the exception and its traceback go to the log."""
    ref = uuid.uuid4().hex[:12]
    log.error("%s (ref %s): %s: %s", what, ref, type(exc).__name__, exc, exc_info=exc)
    return cls(f"{what} occurred (ref {ref}); the details are in the server's log")
