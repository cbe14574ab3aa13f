"""The Celery app Flower loads (`celery -A tasks.flower_app flower`, run by `trifecta flower`):
the broker from REDIS_URL and every model's queue (`task_queues`), no tasks of its own."""

from __future__ import annotations

from tasks.celery_app import make_app
from tasks.settings import get_settings

app = make_app(get_settings())
