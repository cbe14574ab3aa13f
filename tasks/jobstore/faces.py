"""The job record's transitions as calls: one sync face (workers, `redis.Redis`) and one async face (API, `redis.asyncio`).

Each transition is described once (`Call`: which script, which keys, which arguments) and run by
either face; both faces' methods have the same names and arguments. Scripts are registered once
per client (EVALSHA, loaded on a NOSCRIPT), so a call is one round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from tasks import keys
from tasks.jobstore import lua
from tasks.jobstore.record import error, now, parse_record


@dataclass(frozen=True)
class Call:
    """One script call on a job record."""

    script: str
    keys: list[str]
    args: list[Any]


def _json(body: Any) -> bytes:
    return body if isinstance(body, (bytes, str)) else orjson.dumps(body)


def _str(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


# -- the calls ------------------------------------------------------------------
def start_call(job_id: str, max_deliveries: int, worker_id: str = "") -> Call:
    """Count a delivery and mark running; refused on a terminal job; dead-letters past `max_deliveries`."""
    return Call(lua.START_LUA, [keys.job(job_id)], [now(), max_deliveries, worker_id])


def unstart_call(job_id: str, worker_id: str) -> Call:
    return Call(lua.UNSTART_LUA, [keys.job(job_id)], [worker_id])


def progress_call(job_id: str, progress: dict[str, Any]) -> Call:
    return Call(lua.PROGRESS_LUA, [keys.job(job_id)], [orjson.dumps(progress)])


def finish_call(job_id: str, status: str, field: str, body: Any, *, reply: str = "", reply_msg: bytes = b"", sync_ttl: int | str = "", inline: bool = False) -> Call:
    """Land `status` with `field` (result|error) on a running or queued job, once; queues its webhook."""
    return Call(lua.FINISH_LUA, [keys.job(job_id)], [status, now(), field, _json(body), reply, reply_msg, sync_ttl, "1" if inline else ""])


def fail_call(job_id: str, err: BaseException | dict[str, Any]) -> Call:
    """Fail the job with `err` (an exception, or a dict already in the one error shape)."""
    return finish_call(job_id, "failed", "error", err if isinstance(err, dict) else error(err))


def cancel_call(job_id: str) -> Call:
    return Call(lua.CANCEL_LUA, [keys.job(job_id)], [now()])


def detach_call(job_id: str, tenant: str, ttl: int, force: bool = False) -> Call:
    """A sync request the API stopped waiting for becomes a job: job TTL and a tombstone."""
    return Call(lua.DETACH_LUA, [keys.job(job_id), keys.tomb(job_id)], [ttl, ttl + keys.TOMBSTONE_S, tenant, "1" if force else ""])


def queue(pipe: Any, c: Call) -> Any:
    """Queue a call on a pipeline as a plain EVAL: it rides in the pipeline's one round trip (a
    registered script on a pipeline would first cost a SCRIPT EXISTS round trip of its own)."""
    return pipe.eval(c.script, len(c.keys), *c.keys, *c.args)


class _Face:
    def __init__(self, r: Any) -> None:
        self.r = r
        self._scripts: dict[str, Any] = {}

    def script(self, src: str) -> Any:
        s = self._scripts.get(src)
        if s is None:
            s = self._scripts[src] = self.r.register_script(src)
        return s


class Jobs(_Face):
    """The sync face (workers): `Jobs(redis.Redis)`."""

    def run(self, c: Call, client: Any = None) -> Any:
        """Run a call (on `client`, a pipeline, to ride in its round trip: the reply is then the pipeline's)."""
        return self.script(c.script)(keys=c.keys, args=c.args, client=client)

    def start(self, job_id: str, max_deliveries: int, worker_id: str = "") -> tuple[str, int]:
        st, n = self.run(start_call(job_id, max_deliveries, worker_id))
        return _str(st), int(n)

    def unstart(self, job_id: str, worker_id: str) -> bool:
        return bool(self.run(unstart_call(job_id, worker_id)))

    def progress(self, job_id: str, progress: dict[str, Any]) -> str:
        return _str(self.run(progress_call(job_id, progress)))

    def finish(self, job_id: str, status: str, field: str, body: Any, **kw: Any) -> int:
        return int(self.run(finish_call(job_id, status, field, body, **kw)))

    def fail(self, job_id: str, err: BaseException | dict[str, Any]) -> bool:
        return bool(self.run(fail_call(job_id, err)))

    def cancel(self, job_id: str) -> str:
        return _str(self.run(cancel_call(job_id)))

    def detach(self, job_id: str, tenant: str, ttl: int, force: bool = False) -> str:
        return _str(self.run(detach_call(job_id, tenant, ttl, force)))

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(keys.job(job_id))
        return parse_record(raw) if raw else None

    def status(self, job_id: str) -> str | None:
        st = self.r.hget(keys.job(job_id), "status")
        return orjson.loads(st) if st else None

    def tombstone(self, job_id: str) -> str | None:
        t = self.r.get(keys.tomb(job_id))
        return _str(t) if t else None


class AsyncJobs(_Face):
    """The async face (API): `AsyncJobs(redis.asyncio.Redis)`, the same methods as coroutines."""

    async def run(self, c: Call, client: Any = None) -> Any:
        return await self.script(c.script)(keys=c.keys, args=c.args, client=client)

    async def start(self, job_id: str, max_deliveries: int, worker_id: str = "") -> tuple[str, int]:
        st, n = await self.run(start_call(job_id, max_deliveries, worker_id))
        return _str(st), int(n)

    async def unstart(self, job_id: str, worker_id: str) -> bool:
        return bool(await self.run(unstart_call(job_id, worker_id)))

    async def progress(self, job_id: str, progress: dict[str, Any]) -> str:
        return _str(await self.run(progress_call(job_id, progress)))

    async def finish(self, job_id: str, status: str, field: str, body: Any, **kw: Any) -> int:
        return int(await self.run(finish_call(job_id, status, field, body, **kw)))

    async def fail(self, job_id: str, err: BaseException | dict[str, Any]) -> bool:
        return bool(await self.run(fail_call(job_id, err)))

    async def cancel(self, job_id: str) -> str:
        return _str(await self.run(cancel_call(job_id)))

    async def detach(self, job_id: str, tenant: str, ttl: int, force: bool = False) -> str:
        return _str(await self.run(detach_call(job_id, tenant, ttl, force)))

    async def get(self, job_id: str) -> dict[str, Any] | None:
        raw = await self.r.hgetall(keys.job(job_id))
        return parse_record(raw) if raw else None

    async def status(self, job_id: str) -> str | None:
        st = await self.r.hget(keys.job(job_id), "status")
        return orjson.loads(st) if st else None

    async def tombstone(self, job_id: str) -> str | None:
        t = await self.r.get(keys.tomb(job_id))
        return _str(t) if t else None
