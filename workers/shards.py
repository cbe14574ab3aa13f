"""WebDataset shard jobs on the worker: the `trifecta.shard` task, one message per input shard.

    kwargs: job, index, uri, model, format, params, tenant, out_prefix, created

Every worker of a model that takes images registers the task and consumes `<model>:shards`
besides its usual queues (`register(app, svc)`). Per shard:

1. Lua `start` (tasks/jobstore/shards.py, beside the job store): skip a shard whose result is already recorded or whose job is over
   (cancelled, finished); count the delivery and give up past MAX_DELIVERIES.
2. Stream the tar (`tasks.inputs.open_uri`; gzip inflated by `tasks.shardsource` under
   MAX_SHARD_BYTES and a ratio cap) through `tasks.tars.iter_members` (refuses links, devices, traversal,
   oversize, and stops at a sparse member or past MAX_SHARD_BYTES declared in all, before
   reading it) into webdataset's own `group_by_keys`.
3. A small pipeline keeps the model busy: a reader thread groups samples and hands them
   to a pool that decodes and preprocesses (`runner.prepare`); one model thread calls
   `runner.predict` on batches, one call at a time; the pool runs `runner.finish` and
   encodes the masks; this thread appends to a temp tar in input order and reports
   progress (and notices a cancel) about once a second.
4. Upload the output tar, then the shard manifest (each written whole: temp file + rename
   or one S3 PUT/multipart completion), then Lua `done` records the shard's result once
   (HSETNX) and adds its counts; whoever records the last shard writes the job manifest
   and finishes the job (`tasks.jobstore.shards.finish`).

Redelivery: a shard whose worker died is restored by kombu after VISIBILITY_TIMEOUT_S
(live workers refresh the visibility of the messages they hold on every heartbeat, so a
long shard needs no chunking) and redone whole by another worker. Its output keys are
fixed per (job, shard index) and written atomically, and its counts are added once, so
nothing is duplicated; a shard already recorded is never redone.

The parts: workers/shardpipe.py (one shard: steps 1 to 4 up to its result) and workers/shardout.py
(the job manifest and the job's end); this module registers the task.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from tasks import keys
from tasks.jobstore import shards as shardjobs
from workers.shardout import finish_job, write_job_manifest  # noqa: F401 - the module's names, kept here
from workers.shardpipe import PROGRESS_EVERY_S, Cancelled, Entry, Refused, ShardRun, grouped  # noqa: F401 - the module's names, kept here


# ---------------------------------------------------------------- registration
def register(app: Any, svc: Any) -> list[str]:
    """Add `trifecta.shard` to this worker and consume `<model>:shards`."""
    from celery import signals

    from tasks.wire import build_message

    s = svc.settings
    lua = svc.r.register_script(shardjobs.SHARD_LUA)
    pool = ThreadPoolExecutor(max_workers=s.shard_decode_threads * s.shard_concurrency, thread_name_prefix="shard-io")
    slots = threading.BoundedSemaphore(s.shard_concurrency)

    q = keys.shard_queue(svc.model)

    @app.task(name=keys.TASK_SHARD, acks_late=True, ignore_result=True)
    def shard(**kw: Any) -> None:
        # A worker busy with SHARD_CONCURRENCY shards hands the next back to the queue's tail
        # rather than holding it: an idle worker takes it, and a pool thread stays free for
        # sync batches. A fresh copy is pushed, then this one acked (Celery's Reject would do
        # the same but log a traceback each time); dying in between leaves two copies, which
        # the shard's once-only bookkeeping makes harmless.
        if not slots.acquire(timeout=0.25):
            st = svc.r.hget(keys.job(kw["job"]), "status")
            if st is not None and orjson.loads(st) in ("queued", "running"):
                svc.r.lpush(svc.kombu_keys.queue(q), build_message(keys.TASK_SHARD, f"{kw['job']}.{kw['index']}", kw, q, origin=svc.worker_id))
            return
        try:
            ShardRun(svc, kw, pool, lua).run()
        finally:
            slots.release()

    @signals.celeryd_after_setup.connect(weak=False)
    def _consume_shards(sender: Any = None, instance: Any = None, **_: Any) -> None:
        instance.app.amqp.queues.select_add(q)

    return [keys.TASK_SHARD]
