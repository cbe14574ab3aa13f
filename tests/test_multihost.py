"""Several hosts (`make chaos`): Trifecta across five machines made of Linux network
namespaces on one bridge, sharing nothing but the network.

    redis  10.x.y.1   redis-server
    s3     10.x.y.2   moto's S3 server (the only storage: STORAGE_URL=s3://...)
    api    10.x.y.3   trifecta api
    w1     10.x.y.4   trifecta worker textmask + echo (video sessions), its own directory and MODEL_DIR
    w2     10.x.y.5   the same

Every process is started with `ip netns exec <host> ...` and reaches the others by address
only; the worker hosts share no file (their own working directory, model copy and TMPDIR).
Sync calls, jobs, a shard job and an echo video session run across them; then every process
of one worker host is SIGKILLed mid-run, and everything completes on the other (its session
answers 410). The test runs as root (CI does); without `ip netns` it is skipped.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from storage import codecs
from tasks import keys
from tasks.embedded_redis import server_binary
from tests.conftest import wait_job, with_text
from tests.helpers.videos import write_video

pytestmark = pytest.mark.slow
PNG = {"Content-Type": "image/png"}
B = 60.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class Net:
    """Hosts as network namespaces on one Linux bridge (veth pairs), the bridge's own address
    on the test's side so this process reaches every host. `close()` kills every process in
    every namespace and removes them all."""

    def __init__(self, tag: str, subnet: str) -> None:
        self.tag, self.subnet = tag, subnet
        self.bridge = f"{tag}br"
        self.hosts: dict[str, tuple[str, str]] = {}  # name -> (namespace, address)
        self.procs: list[subprocess.Popen[bytes]] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def host(self, name: str) -> str:
        i = len(self.hosts) + 1
        ns, veth, peer, addr = f"{self.tag}{name}", f"{self.tag}v{i}", f"{self.tag}p{i}", f"{self.subnet}.{i}"
        _ip("netns", "add", ns)
        self.hosts[name] = (ns, addr)
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", ns)
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", peer)
        _ip("-n", ns, "link", "set", peer, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        return addr

    def run(self, host: str, cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["ip", "netns", "exec", self.hosts[host][0], *cmd], env=env, cwd=cwd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def pids(self, host: str) -> list[int]:
        return [int(x) for x in _ip("netns", "pids", self.hosts[host][0], check=False).stdout.split()]

    def kill_host(self, host: str) -> list[int]:
        """SIGKILL every process of the host at once: a machine lost."""
        pids = self.pids(host)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def close(self) -> None:
        for host in self.hosts:
            self.kill_host(host)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for ns, _ in self.hosts.values():
            _ip("netns", "del", ns, check=False)  # its end of each veth pair goes with it, and so the pair
        _ip("link", "del", self.bridge, check=False)


def _netns_permitted() -> str | None:
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"tfprobe{os.getpid() % 100000}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode:
        return f"`ip netns add` is not permitted here: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def wait_http(url: str, timeout: float = 60, ok: tuple[int, ...] = (200,)) -> None:
    t_end = time.time() + timeout
    while time.time() < t_end:
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code in ok:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer in {timeout}s")


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return bio.getvalue()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[dict]:
    why = _netns_permitted()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("hosts")
    tag = f"tf{os.getpid() % 100000}"
    net = Net(tag, f"10.213.{os.getpid() % 200 + 20}")
    try:
        ip = {h: net.host(h) for h in ("redis", "s3", "api", "w1", "w2")}
        dirs = {h: tmp / h for h in ip}
        for d in dirs.values():
            (d / "tmp").mkdir(parents=True)
        env = {
            **os.environ,
            "REDIS_URL": f"redis://{ip['redis']}:6379/0",
            "STORAGE_URL": "s3://trifecta/mh",  # never file:// across hosts
            "S3_ENDPOINT_URL": f"http://{ip['s3']}:5000",
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "WORKER_HEARTBEAT_S": "1", "VISIBILITY_TIMEOUT_S": "5", "VIDEO_SESSION_MODEL": "echo", "INPUT_SIZE": "320",
            "INTRA_OP_THREADS": "1", "MAX_BATCH_SIZE": "4", "MAX_SAMPLES_PER_SHARD": "200", "SYNC_TIMEOUT_S": "60", "PYTHONUNBUFFERED": "1",
        }
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALLOWED_INPUT_ROOTS"):
            env.pop(k, None)
        net.run("redis", [server_binary(), "--bind", ip["redis"], "--port", "6379", "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", str(dirs["redis"])], env, dirs["redis"], dirs["redis"] / "redis.log")
        net.run("s3", [sys.executable, "-m", "moto.server", "-H", ip["s3"], "-p", "5000"], env, dirs["s3"], dirs["s3"] / "moto.log")
        wait_http(f"http://{ip['s3']}:5000/moto-api/", 60)
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"], aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
        s3.create_bucket(Bucket="trifecta")
        r = redis.Redis(host=ip["redis"], port=6379, socket_timeout=5)
        t_end = time.time() + 30
        while True:
            try:
                r.ping()
                break
            except redis.RedisError:
                assert time.time() < t_end, "redis did not start"
                time.sleep(0.1)
        net.run("api", [sys.executable, "-m", "client.cli", "api", "--host", ip["api"], "--port", "8080"], {**env, "TMPDIR": str(dirs["api"] / "tmp")}, dirs["api"], dirs["api"] / "api.log")
        workers: dict[str, list[str]] = {}
        for h in ("w1", "w2"):
            models = dirs[h] / "models"
            shutil.copytree(model_dir / "textmask", models / "textmask")  # each host its own copy of the model
            wenv = {**env, "MODEL_DIR": str(models), "TMPDIR": str(dirs[h] / "tmp")}
            workers[h] = [f"{h}-textmask", f"{h}-echo"]
            for model, name in (("textmask", f"{h}-textmask"), ("echo", f"{h}-echo")):
                net.run(h, [sys.executable, "-m", "client.cli", "worker", "--model", model, "--name", name], wenv, dirs[h], dirs[h] / f"{name}.log")
        url = f"http://{ip['api']}:8080"
        wait_http(url + "/health", 60, ok=(200, 503))
        t_end = time.time() + 120
        while True:
            q = httpx.get(url + "/health", timeout=5, trust_env=False).json()["queues"]
            live = {m: sorted(q.get(m, {}).get("workers", [])) for m in ("textmask", "echo")}
            if live == {"textmask": ["w1-textmask", "w2-textmask"], "echo": ["w1-echo", "w2-echo"]}:
                break
            assert time.time() < t_end, f"workers not live: {live}\n" + "\n".join(f"{p}: {p.read_text()[-1500:]}" for p in tmp.rglob("*.log"))
            time.sleep(0.3)
        yield {"net": net, "ip": ip, "dirs": dirs, "url": url, "redis": r, "s3": s3, "workers": workers, "tmp": tmp}
    finally:
        net.close()


def sync_textmask(url: str, data: bytes) -> httpx.Response:
    return httpx.post(url + "/run_textmask?format=png", content=data, headers=PNG, timeout=B, trust_env=False)


def job(url: str, body: dict) -> str:
    r = httpx.post(url + "/v1/jobs", json=body, timeout=B, trust_env=False)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def assert_text_mask(content: bytes, gt) -> None:  # noqa: ANN001
    m = codecs.decode_png(content)
    assert m.shape == gt.shape and m.sum() > 500 and m[gt].sum() / m.sum() > 0.9


def objects(s3, prefix: str) -> list[str]:  # noqa: ANN001
    out = s3.list_objects_v2(Bucket="trifecta", Prefix=prefix).get("Contents", [])
    return sorted(o["Key"][len(prefix) :] for o in out)


def test_across_hosts_then_one_worker_host_dies(cluster: dict) -> None:
    url, s3, rd, net = cluster["url"], cluster["s3"], cluster["redis"], cluster["net"]
    data, gt = with_text("chelsea.png")
    seen: set[str] = set()  # workers that answered something

    # -- sync calls: real masks, through storage on another host
    for _ in range(6):
        r = sync_textmask(url, data)
        assert r.status_code == 200, r.text
        assert_text_mask(r.content, gt)
        seen.add(r.headers["x-worker"])

    # -- jobs: outputs in S3, each exactly once
    image = base64.b64encode(data).decode()
    jobs = [job(url, {"model": "textmask", "input": {"image": image}, "params": {"format": "png"}}) for _ in range(6)]
    for j in jobs:
        st = wait_job(url, j, 60)
        assert st["status"] == "succeeded", st
        seen.add(st["result"]["worker"])
        assert objects(s3, f"mh/default/jobs/{j}/") == ["_in/input", "mask.png", "result.json"]  # the staged input (over INLINE_INPUT_BYTES), the mask, the record
        assert_text_mask(s3.get_object(Bucket="trifecta", Key=f"mh/default/jobs/{j}/mask.png")["Body"].read(), gt)

    # -- a shard job: two shards read from S3, WebDataset shards written back
    for i in range(2):
        s3.put_object(Bucket="trifecta", Key=f"mh/default/inputs/text-{i}.tar", Body=tar_of([(f"t{i}/k{j}.png", data) for j in range(4)]))
    sj = job(url, {"model": "textmask", "input": {"shards": "s3://trifecta/mh/default/inputs/text-{0..1}.tar"}, "params": {"format": "png"}})
    st = wait_job(url, sj, 90)
    assert st["status"] == "succeeded" and st["progress"]["samples_done"] == 8, st
    seen.update(s["worker"] for s in json.loads(httpx.get(f"{url}/v1/jobs/{sj}/result", params={"key": "manifest.json"}, timeout=B, trust_env=False).content)["shards"])
    out = st["result"]["outputs"][0]
    with tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket="trifecta", Key=f"mh/{out['path']}")["Body"].read())) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    assert sorted(n for n in members if n.endswith(".png")) == [f"t0/k{j}.png" for j in range(4)]
    assert_text_mask(members["t0/k0.png"], gt)

    # -- an echo video session, its upload in S3, decoded on a worker host
    video = write_video(cluster["tmp"] / "shapes.mp4")
    r = httpx.post(url + "/api/v1/video/session/upload", files={"file": ("clip.mp4", video.read_bytes(), "video/mp4")}, timeout=B, trust_env=False)
    assert r.status_code == 200, r.text
    sid, session_worker = r.json()["session_id"], r.json()["worker"]
    assert r.json()["video_info"]["total_frames"] == 12
    assert objects(s3, f"mh/default/videos/{sid}/") == ["video.mp4"]
    st = httpx.get(f"{url}/api/v1/video/session/{sid}/status", timeout=B, trust_env=False)
    assert st.status_code == 200 and st.json()["worker"] == session_worker, st.text
    victim = session_worker.split("-")[0]  # the host holding the session dies
    survivor = "w2" if victim == "w1" else "w1"
    assert {w.split("-")[0] for w in seen} == {"w1", "w2"}, f"both worker hosts served requests: {seen}"

    # -- mid-run: slow shards, jobs and a stream of sync calls; then the victim host is lost
    for i in range(2):
        s3.put_object(Bucket="trifecta", Key=f"mh/default/inputs/slow-{i}.tar", Body=tar_of([(f"s{i}/k{j:03d}.png", data) for j in range(60)]))
    slow = job(url, {"model": "textmask", "input": {"shards": "s3://trifecta/mh/default/inputs/slow-{0..1}.tar"}, "params": {"format": "png"}})
    late_jobs = [job(url, {"model": "textmask", "input": {"image": image}, "params": {"format": "png"}}) for _ in range(6)]
    answers: list[httpx.Response] = []

    def stream() -> None:
        for _ in range(10):
            answers.append(sync_textmask(url, data))

    t = threading.Thread(target=stream)
    t.start()
    t_end = time.time() + 60
    while f"{victim}-textmask" not in {json.loads(v).get("worker") for v in rd.hvals(keys.shards_running(slow))}:
        assert time.time() < t_end, "the victim host never took a shard"
        time.sleep(0.05)
    killed = net.kill_host(victim)
    assert len(killed) >= 2  # its two worker processes (and whatever they started)
    t.join(120)
    assert not t.is_alive()

    # everything completes on the survivor
    for a in answers:
        assert a.status_code == 200, a.text
        assert_text_mask(a.content, gt)
    for j in late_jobs:
        st = wait_job(url, j, 90)
        assert st["status"] == "succeeded", st
        assert objects(s3, f"mh/default/jobs/{j}/") == ["_in/input", "mask.png", "result.json"]  # the staged input (over INLINE_INPUT_BYTES), the mask, the record
    st = wait_job(url, slow, 180)
    assert st["status"] == "succeeded" and st["progress"]["samples_done"] == 120, st
    manifest = json.loads(httpx.get(f"{url}/v1/jobs/{slow}/result", params={"key": "manifest.json"}, timeout=B, trust_env=False).content)
    assert manifest["counts"]["done"] == 120 and all(s["worker"] == f"{survivor}-textmask" for s in manifest["shards"]), manifest["shards"]
    # the session died with its host: 410 once its heartbeat is stale, then forgotten
    t_end = time.time() + 30
    while (st := httpx.get(f"{url}/api/v1/video/session/{sid}/status", timeout=B, trust_env=False)).status_code != 410:
        assert st.status_code == 200 and time.time() < t_end, st.text
        time.sleep(0.2)
    assert session_worker in st.json()["error"]["message"] and "start a new session" in st.json()["error"]["message"]
    assert httpx.get(f"{url}/api/v1/video/session/{sid}/status", timeout=B, trust_env=False).status_code == 404
    r = httpx.post(url + "/api/v1/video/session/upload", files={"file": ("clip.mp4", video.read_bytes(), "video/mp4")}, timeout=B, trust_env=False)
    assert r.status_code == 200 and r.json()["worker"] == f"{survivor}-echo", r.text
    # the API lists the survivor's workers alone, and they still answer
    t_end = time.time() + 30
    while sorted(httpx.get(url + "/health", timeout=5, trust_env=False).json()["queues"]["textmask"]["workers"]) != [f"{survivor}-textmask"]:
        assert time.time() < t_end
        time.sleep(0.2)
    r = sync_textmask(url, data)
    assert r.status_code == 200 and r.headers["x-worker"] == f"{survivor}-textmask"
    assert net.pids(victim) == [] and len(net.pids(survivor)) >= 2
