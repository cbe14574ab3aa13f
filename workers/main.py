"""The worker process's entry point: `run_worker` loads the model, wires WorkerService into Celery and consumes.

    trifecta worker --model textmask --device cpu|cuda:N [--name ID]

Order matters: pin the device (CUDA_VISIBLE_DEVICES) before any CUDA library loads,
load and warm the model, register, and only then start consuming. Dynamic batching is
celery-batches' `Batches` task (flush at MAX_BATCH_SIZE or BATCH_TIMEOUT_MS); the
threads pool with MAX_CONCURRENCY_PER_GPU threads lets one batch decode and encode
while another runs the model.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from tasks import keys, tracing
from tasks.models import MODELS
from tasks.settings import Settings
from workers.resources import gpu_memory_mb, rss_mb
from workers.service import WorkerService

log = logging.getLogger("trifecta.worker")


def run_worker(model: str, device: str, name: str | None, settings: Settings, loglevel: str = "INFO") -> None:
    from workers.device import keep_big_buffers, pin

    if model not in MODELS:
        raise SystemExit(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    dev = pin(device, use_cuda=settings.use_cuda, threads=settings.intra_op_threads)
    keep_big_buffers()
    from tasks import logs

    logs.setup(loglevel)
    from celery import signals

    from tasks.celery_app import make_app
    from workers.runners.base import runner_class

    worker_id = name or f"{socket.gethostname()}-{os.getpid()}"
    logs.bind_process(worker=worker_id, model=model, device=str(dev))  # on every line of this process
    runner = runner_class(MODELS[model].family)(model, settings, dev)
    if tracing.setup(tracing.SERVICE_WORKER, **{"service.instance.id": worker_id}):  # OTEL_* (tasks/tracing.py)
        from workers.tracing import instrument

        instrument(runner)
    t0 = time.time()
    runner.load()
    runner.warmup()
    log.info("worker %s: %s warm on %s in %.1fs", worker_id, model, dev, time.time() - t0)
    svc = WorkerService(settings, model, dev, worker_id, runner)
    if settings.worker_metrics_port:
        svc.metrics.gpu_memory.set_function(lambda: gpu_memory_mb(dev) * 1e6)
        svc.metrics.rss.set_function(lambda: rss_mb() * 1e6)
        svc.metrics.memory_limit.set(svc.memory_limit)
        svc.metrics.serve(settings.worker_metrics_port)
    app = make_app(settings)
    from workers import broker

    app.conf.broker_transport = broker.TRANSPORT  # kombu's Redis transport carrying START and acks (workers/broker.py)
    svc.kombu_keys = broker.KombuKeys.from_options(app.conf.broker_transport_options)
    broker.install(svc)

    from workers.batching import AdaptiveBatches

    conc = settings.max_concurrency_per_gpu

    @app.task(
        name=keys.TASK_INFER, base=AdaptiveBatches, flush_every=settings.max_batch_size, flush_interval=max(settings.batch_timeout_ms, 0.5) / 1000,
        max_in_flight=conc, acks_late=True, ignore_result=True,
    )
    def infer(requests: list[Any]) -> bool:
        return svc.handle([r.kwargs for r in requests], headers=[r.request_dict for r in requests] if tracing.ON else None)

    extra = _register_extra_tasks(app, svc)

    @signals.worker_ready.connect(weak=False)
    def _ready(sender: Any = None, **_: Any) -> None:
        svc.consumer = sender
        svc.nodename = sender.hostname
        if settings.task_events:  # its own connection: the events thread publishes while kombu's consumer reads
            svc.events = app.events.Dispatcher(app.connection_for_write(), hostname=sender.hostname, groups=["task"], buffer_group=["task"], buffer_limit=1 << 20, buffer_while_offline=False)
            threading.Thread(target=svc.events_forever, args=(stop,), daemon=True, name="task-events").start()
        svc.beat()

    @signals.worker_shutting_down.connect(weak=False)
    def _leaving(sig: str = "", how: str = "", **_: Any) -> None:  # Celery's SIGTERM/SIGINT/SIGQUIT handler
        svc.leave(f"{sig}, {how.lower()} shutdown")

    svc.on_leave.append(app.tasks[keys.TASK_INFER].stop_taking)

    stop = threading.Event()
    svc.beat()
    threading.Thread(target=svc.heartbeat_forever, args=(stop,), daemon=True, name="heartbeat").start()
    queues = [keys.shared_queue(model), keys.private_queue(model, worker_id)]
    argv = [
        "worker", "-P", "threads", "-c", str(conc), "-Q", ",".join(queues), "-n", f"{model}.{worker_id}@%h",
        # With BULK_DRAIN a batch fills itself from the queue atomically (Lua), so kombu needs to
        # hold just one message per in-flight batch: while every slot is busy no BRPOP is
        # outstanding, and a worker killed mid-batch cannot take a message popped-but-unrecorded
        # with it (kombu's BRPOP and its unacked record are two round trips).
        "--prefetch-multiplier", str(1 if settings.bulk_drain else max(1, settings.max_batch_size)), "--without-gossip", "--without-mingle", "-l", loglevel,
    ]
    if settings.task_events:
        argv.append("-E")
    if logs.is_json():
        _quiet_celery_stdout(argv)
    log.info("worker %s consuming %s (batch %d, timeout %.1f ms, %d in flight, extra tasks: %s)", worker_id, queues, settings.max_batch_size, settings.batch_timeout_ms, conc, extra)
    try:
        app.worker_main(argv)
    finally:
        stop.set()
        svc.flush_events()
        svc.hand_over()


def _quiet_celery_stdout(argv: list[str]) -> None:
    """With LOG_FORMAT=json every line must be JSON: no start-up banner (`--quiet`), and the
    notices Celery's signal handlers write straight to the terminal ("worker: Warm shutdown",
    "Hitting Ctrl+C again ...", through `celery.apps.worker.safe_say`, celery 5.5/5.6) become
    log records; the handlers themselves stay Celery's own."""
    import celery.apps.worker as cw

    argv.insert(0, "--quiet")  # an option of the `celery` command, before `worker`
    if callable(getattr(cw, "safe_say", None)):
        say = logging.getLogger("celery.apps.worker")
        cw.safe_say = lambda msg, f=None: say.info(str(msg).strip())


def _register_extra_tasks(app: Any, svc: WorkerService) -> list[str]:
    """Model families may add tasks of their own (sessions, video jobs: `Runner.extra_tasks`; shards)."""
    extra = []
    for t in svc.runner.extra_tasks(svc):
        app.task(name=t.name, acks_late=t.acks_late, ignore_result=t.ignore_result)(t.fn)
        extra.append(t.name)
    if MODELS[svc.model].takes_images:  # WebDataset shard jobs (workers/shards.py)
        from workers import shards

        extra += shards.register(app, svc)
    return extra
