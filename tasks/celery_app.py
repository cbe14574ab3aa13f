"""The Celery app both halves share: Redis broker, JSON only, late acks, short visibility.

Why the visibility timeout is short and safe: every worker refreshes the unacked-index
score of each message it holds on every heartbeat (`WorkerService.beat` in workers/membership.py), so a message
whose worker is alive is never restored, however long the task runs; a message whose
worker died (SIGKILL, OOM, lost machine) stops being refreshed and any live worker's
kombu restores it after VISIBILITY_TIMEOUT_S (checked every 2 s).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from tasks import keys
from tasks.models import MODELS
from tasks.settings import Settings


def make_app(settings: Settings) -> Celery:
    app = Celery("trifecta", broker=settings.redis_url, backend=None)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_default_queue="default",
        # every model's shared queue, declared as a worker would create it: Flower lists these (with
        # their depths) when no worker is up to name its active queues; a worker's private queue
        # `<model>.<worker-id>` is created when it starts and listed by Flower from then on
        task_queues=[Queue(q, Exchange(q), routing_key=q) for q in (keys.shared_queue(m) for m in MODELS)],
        worker_hijack_root_logger=False,
        worker_send_task_events=settings.task_events,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options=transport_options(settings),
        broker_heartbeat=0,
    )
    return app


def transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's Redis channel options: also what tasks.queuekeys names the queue keys from."""
    opts: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": 2,
        "unacked_restore_throttle": 1,
        # kombu's restore holds a mutex that expires after 300 s by default: a worker killed
        # while holding it would stop every restore for five minutes
        "unacked_mutex_expire": 15,
        "socket_timeout": 10,
        "socket_connect_timeout": 5,
        "retry_on_timeout": True,
        "health_check_interval": 10,
    }
    if settings.broker_global_keyprefix:
        # kombu prefixes every key it writes (queues, unacked, bindings); our own scripts and
        # pushes add it through tasks.queuekeys. Our own `tf:` keys are not kombu's: unprefixed.
        opts["global_keyprefix"] = settings.broker_global_keyprefix
    return opts
