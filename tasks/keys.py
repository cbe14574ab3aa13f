"""Redis key layout and queue names: the one place both halves agree on them."""

from __future__ import annotations

PREFIX = "tf"
TASK_INFER = "trifecta.infer"
TASK_SHARD = "trifecta.shard"  # one WebDataset shard of a bulk job (workers/shards.py)

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")


def shared_queue(model: str) -> str:
    """The queue every worker of `model` consumes."""
    return model


def private_queue(model: str, worker_id: str) -> str:
    """The queue only worker `worker_id` consumes (cache and session affinity)."""
    return f"{model}.{worker_id}"


def shard_queue(model: str) -> str:
    """Shard tasks of `model`: every worker of it consumes this queue besides the shared one,
    so a bulk job never sits in front of sync requests (nor counts toward their 503)."""
    return f"{model}:shards"


def shards(job_id: str) -> str:
    """Hash of a shard job's per-shard attempts and results (`a:<i>`, `r:<i>`) and totals."""
    return f"{PREFIX}:shards:{job_id}"


def shards_running(job_id: str) -> str:
    """Hash shard index → live progress of the shards being processed now."""
    return f"{PREFIX}:shards-running:{job_id}"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def sync_input(job_id: str) -> str:
    """A sync request's input bytes waiting for its worker (SYNC_REDIS_INPUT_MAX_BYTES); the
    worker derives the key from the job id, never from the message."""
    return f"{PREFIX}:in:{job_id}"


def tomb(job_id: str) -> str:
    """Kept 7 days past a job's expiry so an expired id answers `expired`, not 404."""
    return f"{PREFIX}:tomb:{job_id}"


def job_prefix(tenant: str, job_id: str) -> str:
    """A job's storage prefix: its outputs, staged inputs and result.json live under it."""
    return f"{tenant}/jobs/{job_id}"


# The expiry index: a sorted set of storage prefixes (`job_prefix`) scored by the earliest time
# their job record can have expired. The janitor reads only the due entries: a pass costs what
# expired, not what is stored. A due entry whose record still lives is re-scored to its TTL.
EXPIRY = f"{PREFIX}:expiry"


def jobs_index(tenant: str) -> str:
    return f"{PREFIX}:jobs:{tenant}"


def idempotency(tenant: str, key: str) -> str:
    return f"{PREFIX}:idem:{tenant}:{key}"


def worker(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


WORKERS = f"{PREFIX}:workers"
DEADLETTER = f"{PREFIX}:deadletter"
DEADLETTER_KEEP = 10_000  # the list is trimmed to the newest entries: it must not grow with traffic


def reply_channel(api_id: str) -> str:
    return f"{PREFIX}:reply:{api_id}"


TOMBSTONE_S = 7 * 86_400

# webhooks: finished jobs with a callback_url are LPUSHed here by the finishing Lua script;
# the API's sender claims them into the schedule (score = when to (re)try), so retries and
# in-flight deliveries survive an API restart.
WEBHOOK_QUEUE = f"{PREFIX}:webhooks:queue"
WEBHOOK_SCHEDULE = f"{PREFIX}:webhooks:schedule"


def webhook(job_id: str) -> str:
    """Delivery bookkeeping of one job's webhook: attempts, last status/error, delivered_at."""
    return f"{PREFIX}:webhook:{job_id}"


JANITOR_LOCK = f"{PREFIX}:janitor:lock"
