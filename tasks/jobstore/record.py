"""The job record's fields: a fresh record, its lifetime, the one error shape, and reading it back."""

from __future__ import annotations

import time
from typing import Any

import orjson

from tasks import keys

# How long a record lives, by who made it (`create`):
#   "job"   a job: RESULT_TTL_SECONDS, a tombstone, the expiry index, the tenant's job list (`keep`)
#   "sync"  a sync request: the TTL only; FINISH shortens it, a 504 detaches it into a job (DETACH)
#   "part"  a part of a job (a clip of a video job): the TTL only, never listed; its parent lists
LIFETIMES = ("job", "sync", "part")


def create(pipe: Any, doc: dict[str, Any], *, ttl: int, lifetime: str = "job", fields: dict[str, Any] | None = None) -> None:
    """Queue a fresh job record on a pipeline (sync or asyncio: it only buffers commands, so it
    adds no round trip): the record `new_record(doc)` plus `fields` (e.g. the worker already
    chosen), and its lifetime. Every kind of job is created here."""
    if lifetime not in LIFETIMES:
        raise ValueError(f"lifetime must be one of {LIFETIMES}, got {lifetime!r}")
    pipe.hset(keys.job(doc["id"]), mapping={**new_record(doc), **(fields or {})})
    if lifetime == "job":
        keep(pipe, doc["id"], doc.get("tenant", "default"), ttl, doc["created_at"])
    else:
        pipe.expire(keys.job(doc["id"]), ttl)


def error(code: str | BaseException, message: str | None = None, status: int | None = None, **extra: Any) -> dict[str, Any]:
    """The one shape of an error stored in a job record, a reply or a manifest:
    `{"code", "message", "status"}` (status: the HTTP status its code maps to), plus `extra`.

    `error(exc)` for any exception (translated as the API would answer it), or `error(code,
    message)` for a code of the error tree (`status` for a code outside it, e.g. a manifest's
    `refused` sample)."""
    from tasks.errors import _BY_CODE, TrifectaError, translate

    if isinstance(code, BaseException):
        e = translate(code)
        return {"code": e.code, "message": e.message, "status": e.status, **extra}
    if status is None:
        status = _BY_CODE.get(code, TrifectaError).status
    return {"code": code, "message": message or "", "status": status, **extra}


def dead_letter(pipe: Any, entry: dict[str, Any]) -> None:
    """Add a dead-lettered message's summary to `tf:deadletter` (trimmed: it must not grow with traffic)."""
    pipe.lpush(keys.DEADLETTER, orjson.dumps(entry))
    pipe.ltrim(keys.DEADLETTER, 0, keys.DEADLETTER_KEEP - 1)


def keep(pipe: Any, job_id: str, tenant: str, ttl: int, now: float) -> None:
    """A job's lifetime on a submit pipeline (its record already HSET): the record's TTL, the
    tombstone that makes an expired id answer `expired`, the expiry index entry of its storage
    prefix (the janitor's work list), and the tenant's job list trimmed of ids past their tombstone."""
    pipe.expire(keys.job(job_id), ttl)
    pipe.set(keys.tomb(job_id), tenant, ex=ttl + keys.TOMBSTONE_S)
    pipe.zadd(keys.EXPIRY, {keys.job_prefix(tenant, job_id): now + ttl})
    pipe.zadd(keys.jobs_index(tenant), {job_id: now})
    pipe.zremrangebyscore(keys.jobs_index(tenant), "-inf", now - ttl - keys.TOMBSTONE_S)


def new_record(doc: dict[str, Any]) -> dict[str, bytes]:
    """Fields of a freshly queued job."""
    return {
        "doc": orjson.dumps(doc),
        "status": b'"queued"',
        "attempts": b"0",
        "progress": orjson.dumps(doc.get("progress") or {}),
    }


def parse_record(raw: dict[bytes | str, bytes | str]) -> dict[str, Any]:
    """A job hash as read from Redis → the job's status document (without links)."""
    f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    doc = orjson.loads(f["doc"])
    out: dict[str, Any] = {
        "job_id": doc["id"],
        "model": doc["model"],
        "kind": doc.get("kind", "job"),
        "status": orjson.loads(f.get("status", b'"queued"')),
        "created_at": doc.get("created_at"),
        "started_at": _num(f.get("started_at")),
        "finished_at": _num(f.get("finished_at")),
        "attempts": int(f.get("attempts", 0) or 0),
        "progress": orjson.loads(f["progress"]) if f.get("progress") else {},
        "params": doc.get("params", {}),
        "input": doc.get("input", {}),
        "error": orjson.loads(f["error"]) if f.get("error") else None,
        "result": orjson.loads(f["result"]) if f.get("result") else None,
        "tenant": doc.get("tenant", "default"),
        "worker": (f["worker"].decode() if isinstance(f.get("worker"), bytes) else f.get("worker")),
    }
    if doc.get("callback_url"):
        out["callback_url"] = doc["callback_url"]
    return out


def _num(v: bytes | str | None) -> float | None:
    return float(v) if v not in (None, b"", "") else None


def now() -> float:
    return round(time.time(), 6)


def reply_payload(job_id: str, status: str, body: dict[str, Any]) -> bytes:
    return orjson.dumps({"id": job_id, "status": status, **body})


def job_key(job_id: str) -> str:
    return keys.job(job_id)
