"""The job store's lifecycle on a real Redis: create, start, progress, finish, cancel, detach, webhook hand-off.

Every transition runs through both faces (`Jobs` on redis.Redis, `AsyncJobs` on redis.asyncio)
against the session's Redis; the terminal set is checked to be spelled out once in the source
tree, and the scripts to be generated from it.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
import uuid

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from tasks import jobstore, keys
from tasks.errors import Gone, Unprocessable
from tasks.jobstore import clips as clipjobs
from tasks.jobstore import lua
from tasks.jobstore import shards as shardjobs

ROOT = pathlib.Path(__file__).resolve().parents[1]
DB = 12


@pytest.fixture(scope="module")
def r(redis_server) -> redis.Redis:
    return redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/{DB}")


def _doc(job_id: str, **kw: object) -> dict:
    return {"id": job_id, "model": "echo", "kind": "job", "tenant": "t1", "created_at": time.time(), "params": {}, **kw}


def _new(r: redis.Redis, lifetime: str = "job", ttl: int = 600, **kw: object) -> str:
    job_id = uuid.uuid4().hex
    pipe = r.pipeline(transaction=True)
    jobstore.create(pipe, _doc(job_id, **kw), ttl=ttl, lifetime=lifetime)
    pipe.execute()
    return job_id


def _field(r: redis.Redis, job_id: str, name: str) -> object:
    v = r.hget(keys.job(job_id), name)
    return orjson.loads(v) if v is not None else None


# -- the terminal set: one place, the scripts generated from it --------------------------------
def test_every_script_that_asks_terminal_is_generated_from_keys_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    fn = lua.terminal_function()
    assert fn == lua.TERMINAL_FN
    assert sorted(re.findall(r"st == '(\w+)'", fn)) == sorted(keys.TERMINAL)
    for name, script in {
        "START": lua.START_LUA,
        "FINISH": lua.FINISH_LUA,
        "DETACH": lua.DETACH_LUA,
        "CANCEL": lua.CANCEL_LUA,
        "PROGRESS": lua.PROGRESS_LUA,
        "SHARD": shardjobs.SHARD_LUA,
        "RECORD": clipjobs.RECORD_LUA,
        "EMITTED": clipjobs.EMITTED_LUA,
        "CHUNK_START": clipjobs.CHUNK_START_LUA,
    }.items():
        assert lua.TERMINAL_FN in script, name
        assert script.count("'succeeded'") == 1, name  # only inside the generated function
    assert lua.FINISH_LUA.startswith("#!lua\n")  # the shebang stays first (refused whole at maxmemory)
    # a status added to the set reaches the generated function
    monkeypatch.setattr(keys, "TERMINAL", frozenset({*keys.TERMINAL, "archived"}))
    assert "st == 'archived'" in lua.terminal_function()


def test_the_terminal_statuses_are_spelled_out_only_in_tasks_keys() -> None:
    """Three or more of the terminal statuses quoted close together is a spelled-out set: only keys.py has one."""
    pat = re.compile(r"""(['"])(succeeded|failed|cancelled|expired)\1""")
    found = []
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT)
        if rel.parts[0].startswith(".") or "node_modules" in rel.parts or rel == pathlib.Path("tests/test_jobstore.py"):
            continue
        text = p.read_text(errors="ignore")
        hits = [(m.start(), m.group(2)) for m in pat.finditer(text)]
        for pos, _ in hits:
            if len({s for q, s in hits if pos <= q < pos + 160}) >= 3:
                found.append(f"{rel}:{text[:pos].count(chr(10)) + 1}")
                break
    assert found == ["tasks/keys.py:9"], found


def test_the_sdk_and_cli_use_the_one_terminal_set() -> None:
    from client import cli, sdk

    assert sdk.TERMINAL is keys.TERMINAL and cli.TERMINAL is keys.TERMINAL


# -- create ----------------------------------------------------------------------------------
def test_create_gives_each_lifetime_its_keys(r: redis.Redis) -> None:
    job = _new(r, "job", ttl=600)
    assert _field(r, job, "status") == "queued" and int(r.hget(keys.job(job), "attempts")) == 0
    assert 590 <= r.ttl(keys.job(job)) <= 600
    assert r.get(keys.tomb(job)) == b"t1" and r.ttl(keys.tomb(job)) > keys.TOMBSTONE_S
    assert r.zscore(keys.EXPIRY, keys.job_prefix("t1", job)) is not None
    assert r.zscore(keys.jobs_index("t1"), job) is not None
    for lifetime in ("sync", "part"):
        other = _new(r, lifetime, ttl=300)
        assert _field(r, other, "status") == "queued" and 290 <= r.ttl(keys.job(other)) <= 300
        assert r.get(keys.tomb(other)) is None and r.zscore(keys.jobs_index("t1"), other) is None
    with pytest.raises(ValueError, match="lifetime"):
        jobstore.create(r.pipeline(), _doc("x"), ttl=1, lifetime="forever")


def test_create_adds_fields_in_the_same_write(r: redis.Redis) -> None:
    job_id = uuid.uuid4().hex
    pipe = r.pipeline(transaction=True)
    jobstore.create(pipe, _doc(job_id), ttl=60, fields={"worker": "w-1"})
    pipe.execute()
    assert r.hget(keys.job(job_id), "worker") == b"w-1"
    assert jobstore.Jobs(r).get(job_id)["worker"] == "w-1"


# -- start -----------------------------------------------------------------------------------
def test_start_counts_deliveries_and_dead_letters_past_the_limit(r: redis.Redis) -> None:
    jobs = jobstore.Jobs(r)
    job = _new(r)
    assert jobs.start(job, 2, "w-a") == ("running", 1)
    assert _field(r, job, "status") == "running" and r.hget(keys.job(job), "worker") == b"w-a"
    assert jobs.start(job, 2, "w-b") == ("running", 2)
    assert jobs.start(job, 2, "w-c") == ("dead", 3)
    rec = jobs.get(job)
    assert rec["status"] == "failed" and rec["finished_at"] is not None
    assert rec["error"]["code"] == "dead_lettered" and rec["error"]["status"] == 500 and "delivered 2 times" in rec["error"]["message"]
    assert set(rec["error"]) == set(jobstore.error("dead_lettered", "x"))  # the one error shape, from Lua too


def test_start_refuses_a_terminal_job_without_counting(r: redis.Redis) -> None:
    jobs = jobstore.Jobs(r)
    for end in ("succeeded", "cancelled"):
        job = _new(r)
        assert jobs.start(job, 5) == ("running", 1)
        if end == "succeeded":
            assert jobs.finish(job, "succeeded", "result", {"outputs": []}) == 1
        else:
            assert jobs.cancel(job) == "cancelled"
        assert jobs.start(job, 5) == (end, 1)
        assert int(r.hget(keys.job(job), "attempts")) == 1
    assert jobs.start(uuid.uuid4().hex, 5) == ("missing", 0)


def test_unstart_gives_a_delivery_back_only_to_its_own_worker(r: redis.Redis) -> None:
    jobs = jobstore.Jobs(r)
    job = _new(r)
    jobs.start(job, 5, "w-a")
    assert not jobs.unstart(job, "w-b")
    assert jobs.unstart(job, "w-a")
    assert _field(r, job, "status") == "queued" and int(r.hget(keys.job(job), "attempts")) == 0 and r.hget(keys.job(job), "worker") is None


# -- progress, finish, cancel ------------------------------------------------------------------
def test_progress_is_written_until_the_job_is_over(r: redis.Redis) -> None:
    jobs = jobstore.Jobs(r)
    job = _new(r)
    assert jobs.progress(job, {"done": 1, "total": 3}) == "queued"
    assert _field(r, job, "progress") == {"done": 1, "total": 3}
    jobs.cancel(job)
    assert jobs.progress(job, {"done": 2, "total": 3}) == "cancelled"
    assert _field(r, job, "progress") == {"done": 1, "total": 3}
    assert jobs.progress(uuid.uuid4().hex, {}) == "missing"


def test_finish_lands_once_on_a_queued_or_running_job(r: redis.Redis) -> None:
    jobs = jobstore.Jobs(r)
    queued, running = _new(r), _new(r)
    jobs.start(running, 5)
    assert jobs.finish(queued, "succeeded", "result", {"outputs": [1]}) == 1
    assert jobs.finish(running, "failed", "error", jobstore.error(Unprocessable("bad frame"))) == 1
    assert jobs.finish(queued, "failed", "error", {"code": "x", "message": "late"}) == 0  # already over: refused
    assert jobs.get(queued)["result"] == {"outputs": [1]} and jobs.get(queued)["error"] is None
    rec = jobs.get(running)
    assert rec["status"] == "failed" and rec["error"] == {"code": "unprocessable", "message": "bad frame", "status": 422}
    assert jobs.finish(uuid.uuid4().hex, "succeeded", "result", {}) == 0  # no record: nothing written
    assert not jobs.fail(queued, Gone("too late"))


def test_a_sync_finish_shortens_the_record_unless_the_api_detached_it(r: redis.Redis) -> None:
    jobs = jobstore.Jobs(r)
    answered = _new(r, "sync", ttl=600)
    assert jobs.finish(answered, "succeeded", "result", {}, sync_ttl=30) == 1
    assert r.ttl(keys.job(answered)) <= 30 and r.get(keys.tomb(answered)) is None
    late = _new(r, "sync", ttl=60)
    assert jobs.detach(late, "t1", 600) == "detached"
    assert r.get(keys.tomb(late)) == b"t1" and r.ttl(keys.job(late)) > 60
    assert jobs.finish(late, "succeeded", "result", {}, sync_ttl=30, inline=True) == -1  # store the outputs first
    assert jobs.finish(late, "succeeded", "result", {}, sync_ttl=30) == 1
    assert r.ttl(keys.job(late)) > 60  # kept the job lifetime
    assert jobs.detach(answered, "t1", 600) == "succeeded"  # a finished one is left as it is


def test_cancel_racing_finish_ends_in_exactly_one_state(r: redis.Redis) -> None:
    """Many jobs, each cancelled by one thread while another finishes it: every record ends
    either cancelled (no result) or succeeded (with its result), never both or neither."""
    jobs = jobstore.Jobs(r)
    ids = [_new(r) for _ in range(60)]
    for j in ids[::2]:
        jobs.start(j, 5)
    said: dict[str, tuple[str, int]] = {}
    go = threading.Barrier(2)

    def canceller() -> None:
        c = jobstore.Jobs(redis.Redis(connection_pool=r.connection_pool))
        go.wait()
        for j in ids:
            said[j] = (c.cancel(j), said.get(j, ("", 0))[1])

    def finisher() -> None:
        f = jobstore.Jobs(redis.Redis(connection_pool=r.connection_pool))
        go.wait()
        for j in reversed(ids):
            landed = f.finish(j, "succeeded", "result", {"outputs": [j]})
            said[j] = (said.get(j, ("", 0))[0], landed)

    threads = [threading.Thread(target=canceller), threading.Thread(target=finisher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes = set()
    for j in ids:
        rec = jobs.get(j)
        cancel_said, landed = said[j]
        if rec["status"] == "cancelled":
            assert cancel_said == "cancelled" and landed == 0 and rec["result"] is None
        else:
            assert rec["status"] == "succeeded" and cancel_said == "succeeded" and landed == 1 and rec["result"] == {"outputs": [j]}
        assert rec["finished_at"] is not None
        outcomes.add(rec["status"])
    assert outcomes <= {"cancelled", "succeeded"}


# -- webhook hand-off ----------------------------------------------------------------------------
def test_every_terminal_transition_hands_a_callback_job_to_the_webhook_queue(r: redis.Redis) -> None:
    jobs = jobstore.Jobs(r)
    hook = {"callback_url": "https://example.test/hook"}
    finished, cancelled, dead, silent = _new(r, **hook), _new(r, **hook), _new(r, **hook), _new(r)
    jobs.finish(finished, "succeeded", "result", {})
    jobs.cancel(cancelled)
    jobs.start(dead, 0)
    jobs.finish(silent, "succeeded", "result", {})
    queued = {x.decode() for x in r.lrange(keys.WEBHOOK_QUEUE, 0, -1)}
    assert {finished, cancelled, dead} <= queued and silent not in queued
    jobs.finish(finished, "failed", "error", {})  # refused: not queued twice
    assert [x.decode() for x in r.lrange(keys.WEBHOOK_QUEUE, 0, -1)].count(finished) == 1


# -- the async face ------------------------------------------------------------------------------
def test_the_async_face_runs_the_same_transitions(r: redis.Redis, redis_server) -> None:
    async def main() -> list[object]:
        ar = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/{DB}")
        jobs = jobstore.AsyncJobs(ar)
        job_id = uuid.uuid4().hex
        pipe = ar.pipeline(transaction=True)
        jobstore.create(pipe, _doc(job_id), ttl=60)
        await pipe.execute()
        out = [await jobs.start(job_id, 3, "w"), await jobs.progress(job_id, {"done": 1}), await jobs.fail(job_id, Gone("its worker left")), await jobs.cancel(job_id)]
        out += [await jobs.status(job_id), (await jobs.get(job_id))["error"], await jobs.tombstone(job_id), await jobs.tombstone(uuid.uuid4().hex)]
        pipe = ar.pipeline(transaction=False)
        jobstore.queue(pipe, jobstore.cancel_call(job_id))
        out += await pipe.execute()
        await ar.aclose()
        return out

    assert asyncio.run(main()) == [("running", 1), "running", True, "failed", "failed", {"code": "gone", "message": "its worker left", "status": 410}, "t1", None, b"failed"]


# -- the one error shape -------------------------------------------------------------------------
def test_one_error_shape() -> None:
    assert jobstore.error(Unprocessable("no")) == {"code": "unprocessable", "message": "no", "status": 422}
    assert jobstore.error("gone", "left") == {"code": "gone", "message": "left", "status": 410}
    assert jobstore.error("refused", "a link", status=422, clips_failed=2) == {"code": "refused", "message": "a link", "status": 422, "clips_failed": 2}
    internal = jobstore.error(RuntimeError("secret detail"))
    assert internal["code"] == "internal" and internal["status"] == 500 and "secret detail" not in internal["message"]


def test_dead_letter_list_is_trimmed(r: redis.Redis) -> None:
    pipe = r.pipeline(transaction=False)
    jobstore.dead_letter(pipe, {"id": "x", "model": "vjepa2", "chunk": 3})
    pipe.execute()
    assert orjson.loads(r.lindex(keys.DEADLETTER, 0)) == {"id": "x", "model": "vjepa2", "chunk": 3}


# -- test-only hooks live in tests -----------------------------------------------------------------
def test_no_crash_hook_in_production_code_and_the_test_one_patches_the_runner() -> None:
    for d in ("api", "tasks", "workers", "storage"):
        for p in (ROOT / d).rglob("*.py"):
            assert "TRIFECTA_CRASH_CLIP" not in p.read_text() and "os._exit(17)" not in p.read_text(), p
    from tests.helpers import faults

    code = "import workers.runners.vjepa2 as v; print(v.VJEPA2Runner.prepare.__name__)"
    env = {**os.environ, **faults.env(TRIFECTA_CRASH_CLIP="2")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True, cwd=ROOT)
    assert out.stdout.strip() == "poisoned", out.stderr
    env.pop("TRIFECTA_CRASH_CLIP")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True, cwd=ROOT)
    assert out.stdout.strip() == "prepare", out.stderr
    echo = "import workers.runners.echo as e; print(e.EchoRunner.prepare.__name__)"
    out = subprocess.run([sys.executable, "-c", echo], env={**env, "TRIFECTA_CRASH_ECHO": "1"}, capture_output=True, text=True, timeout=120, check=True, cwd=ROOT)
    assert out.stdout.strip() == "poisoned", out.stderr
    out = subprocess.run([sys.executable, "-c", echo], env=env, capture_output=True, text=True, timeout=120, check=True, cwd=ROOT)
    assert out.stdout.strip() == "prepare", out.stderr
