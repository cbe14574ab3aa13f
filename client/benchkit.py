"""Processes of a whole Trifecta stack for tests and `trifecta bench`, each a real subprocess.

A Redis-protocol server, worker processes and an API process.

    stack = Stack.create(redis_url, tmp_dir, env={...})
    stack.start_worker("textmask", "w1"); stack.start_api(); stack.wait_live("textmask")
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from tasks.embedded_redis import free_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Proc:
    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    p: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.p = subprocess.Popen(self.cmd, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        return self

    def kill(self) -> None:
        if self.p and self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(10)

    def stop(self) -> None:
        if self.p and self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(6)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return bool(self.p and self.p.poll() is None)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Stack:
    env: dict[str, str]
    tmp: Path
    redis: redis.Redis
    url: str = ""
    api: Proc | None = None
    workers: list[Proc] = field(default_factory=list)

    def start_worker(self, model: str, name: str, env: dict[str, str] | None = None, wait: bool = True) -> Proc:
        e = {**self.env, **(env or {})}
        w = Proc(name, [sys.executable, "-m", "client.cli", "worker", "--model", model, "--name", name], e, self.tmp / f"worker-{name}.log").start()
        self.workers.append(w)
        if wait:
            self.wait_worker(name, w)
        return w

    def wait_worker(self, name: str, w: Proc, timeout: float = 90) -> None:
        t_end = time.time() + timeout
        while time.time() < t_end:
            if self.redis.exists(f"tf:worker:{name}") and b"ready" in (w.log.read_bytes() if w.log.exists() else b""):
                return
            if not w.alive():
                raise RuntimeError(f"worker {name} died:\n{w.tail()}")
            time.sleep(0.1)
        raise RuntimeError(f"worker {name} not ready in {timeout}s:\n{w.tail()}")

    def start_api(self, env: dict[str, str] | None = None) -> str:
        port = free_port()
        e = {**self.env, **(env or {})}
        self.api = Proc("api", [sys.executable, "-m", "client.cli", "api", "--port", str(port)], e, self.tmp / "api.log").start()
        self.url = f"http://127.0.0.1:{port}"
        t_end = time.time() + 30
        while time.time() < t_end:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code in (200, 503):
                    return self.url
            except httpx.HTTPError:
                pass
            if not self.api.alive():
                raise RuntimeError(f"api died:\n{self.api.tail()}")
            time.sleep(0.1)
        raise RuntimeError("api did not start")

    def wait_live(self, model: str, n: int = 1, timeout: float = 10) -> None:
        """Until the API sees n live workers of model."""
        t_end = time.time() + timeout
        while time.time() < t_end:
            h = httpx.get(self.url + "/health", timeout=2).json()
            if len(h.get("queues", {}).get(model, {}).get("workers", [])) >= n:
                return
            time.sleep(0.1)
        raise RuntimeError(f"API does not see {n} {model} worker(s)")

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        if self.api:
            self.api.stop()

    @classmethod
    def create(cls, redis_url: str, tmp: Path, env: dict[str, str] | None = None, storage: str | None = None, model_dir: str | Path | None = None) -> Stack:
        r = redis.Redis.from_url(redis_url)
        r.flushdb()
        tmp.mkdir(parents=True, exist_ok=True)
        base = {
            **os.environ,
            "REDIS_URL": redis_url,
            "STORAGE_URL": storage or f"file://{tmp / 'data'}",
            "MODEL_DIR": str(model_dir or ROOT / "models"),
            "WORKER_HEARTBEAT_S": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        return cls(env=base, tmp=tmp, redis=r)
