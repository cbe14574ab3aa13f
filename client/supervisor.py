"""`trifecta up`: the whole stack in the foreground, restarting any worker that dies.

Redis (if REDIS_URL does not answer), one worker per model and device, the API and Flower.
Ctrl-C stops all of it."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tasks import logs
from tasks.embedded_redis import EmbeddedRedis, answers
from tasks.models import MODELS
from tasks.settings import get_settings, reset_settings
from workers.device import cores_owned, gpu_present, plan_workers

log = logging.getLogger("trifecta.up")


def _trifecta(*args: str) -> list[str]:
    return [sys.executable, "-m", "client.cli", *args]


def needs_torch(s: Any, have_torch: bool | None = None) -> list[str]:
    """The models in MODELS that cannot start without torch, when torch is not installed (`make up`
    installs `.[worker]` only): the torch families, and a segmentation model still to be exported."""
    if have_torch is None:
        have_torch = importlib.util.find_spec("torch") is not None
    if have_torch:
        return []
    seg_onnx = Path(s.model_dir) / "segmentation" / s.seg_onnx_filename
    return [m for m in s.models if MODELS[m].torch or (m == "segmentation" and not s.hf_repo_id and not seg_onnx.is_file())]


FLOWER_WAIT_S = 180.0  # Flower starts once every worker registered, or after this long


def _registered(redis_url: str, names: list[str]) -> bool:
    import redis

    from tasks import keys

    try:
        r = redis.Redis.from_url(redis_url, socket_timeout=2)
        return all(r.exists(keys.worker(n)) for n in names)
    except redis.RedisError:
        return False


def up(api_host: str = "127.0.0.1", api_port: int | None = None, no_flower: bool = False) -> int:
    s = get_settings()
    if missing := needs_torch(s):
        print(f"error: MODELS={','.join(s.models)}: {', '.join(missing)} need torch, which is not installed; run `make install` (everything) or `pip install -e '.[worker,torch]'`", file=sys.stderr)
        return 2
    procs: dict[str, tuple[list[str], dict[str, str], subprocess.Popen[bytes]]] = {}
    redis_srv = None
    if not answers(s.redis_url):
        redis_srv = EmbeddedRedis(Path(s.run_dir) / "redis", maxmemory=s.redis_maxmemory).start()
        os.environ["REDIS_URL"] = redis_srv.url
        reset_settings()
        s = get_settings()
        log.info("REDIS_URL did not answer: started %s on %s (append-only in %s, maxmemory %s, noeviction)", Path(redis_srv.binary).name, redis_srv.url, redis_srv.dir, s.redis_maxmemory)
    from client.cli import main as cli_main

    if logs.is_json():  # the paths `models fetch` prints, as one JSON record
        with contextlib.redirect_stdout(io.StringIO()) as out:
            cli_main(["models", "fetch", *s.models])
        log.info("models ready: %s", "; ".join(out.getvalue().splitlines()), extra={"models": list(s.models)})
    else:
        cli_main(["models", "fetch", *s.models])  # textmask from the wheel; others from the hub, or random-init (loudly) when asked for
    plan = plan_workers(list(s.models), s.gpu_ids, s.use_cuda, gpu_present())
    n_cpu = sum(1 for _, d in plan if d == "cpu") or 1
    env = dict(os.environ)
    for i, (model, device) in enumerate(plan):
        wenv = dict(env)
        if device == "cpu" and not s.intra_op_threads:
            wenv["INTRA_OP_THREADS"] = str(max(1, cores_owned() // n_cpu))  # don't oversubscribe the cores
        if s.worker_metrics_port:
            wenv["WORKER_METRICS_PORT"] = str(s.worker_metrics_port + i)  # one scrape port per worker on this host
        cmd = _trifecta("worker", "--model", model, "--device", device, "--name", f"{model}-{device.replace(':', '')}-{i}")
        procs[f"worker {model} {device}"] = (cmd, wenv, subprocess.Popen(cmd, env=wenv))
    port = api_port or s.api_port
    cmd = _trifecta("api", "--host", api_host, "--port", str(port))
    procs["api"] = (cmd, env, subprocess.Popen(cmd, env=env))
    flower_port = s.flower_port
    worker_names = [f"{model}-{device.replace(':', '')}-{i}" for i, (model, device) in enumerate(plan)]
    flower_due = None if no_flower else time.monotonic() + FLOWER_WAIT_S

    def start_flower() -> None:
        # Flower asks the workers which queues they consume once, when it starts (and on
        # ?refresh=1): started before the workers registered, its Broker view would miss their queues
        cmd = _trifecta("flower", "--host", "127.0.0.1", "--port", str(flower_port))  # FLOWER_BASIC_AUTH from the environment
        Path(s.run_dir).mkdir(parents=True, exist_ok=True)
        flower_log = open(Path(s.run_dir) / "flower.log", "ab")  # noqa: SIM115 - lives as long as the process
        procs["flower"] = (cmd, env, subprocess.Popen(cmd, env=env, stdout=flower_log, stderr=subprocess.STDOUT))
    base = f"http://{api_host}:{port}"
    banner = (
        f"\nTrifecta is starting:\n  API     {base}   (docs {base}/docs, health {base}/health)\n"
        + ("" if no_flower else f"  Flower  http://127.0.0.1:{flower_port}   (workers and queues{'; login from FLOWER_BASIC_AUTH' if s.flower_basic_auth else ''})\n")
        + f"  Metrics {base}/metrics   Page {base}/\n"
        + f"  Redis   {s.redis_url}\n  Workers {', '.join(f'{m}@{d}' for m, d in plan)}\n\n"
        f"Try:\n  curl -s -X POST '{base}/run_textmask?format=png' -H 'Content-Type: image/png' --data-binary @tests/data/images/text.png -o mask.png\n"
    )
    if logs.is_json():  # one JSON record like every other line, for a log pipeline reading this output
        log.info(banner.strip(), extra={"api_url": base, "workers": [f"{m}@{d}" for m, d in plan]})
    else:
        print(banner, flush=True)
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stopping:
            time.sleep(0.5)
            if flower_due is not None and (time.monotonic() > flower_due or _registered(s.redis_url, worker_names)):
                flower_due = None
                start_flower()
            for name, (cmd, penv, p) in list(procs.items()):
                if p.poll() is not None and not stopping:
                    log.warning("%s exited with %s; restarting", name, p.returncode)
                    procs[name] = (cmd, penv, subprocess.Popen(cmd, env=penv))
    finally:
        for _, _, p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        t_end = time.time() + 10
        for _, _, p in procs.values():
            try:
                p.wait(max(0.1, t_end - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
        if redis_srv:
            redis_srv.stop()
    return 0
