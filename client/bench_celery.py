"""The stock-Celery baseline of `trifecta bench`: a plain solo worker with a no-op task.

Redis broker and Redis result backend, called with `apply_async().get()`."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("bare", broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), backend=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"], worker_hijack_root_logger=False)


@app.task(name="bare.noop")
def noop(x: int = 0) -> int:
    return x
