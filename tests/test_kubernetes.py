"""deploy/kubernetes: the base and each overlay build with `kubectl kustomize`, every core
resource validates against the Kubernetes schemas (kubernetes-validate), every worker
Deployment has a KEDA ScaledObject watching the Redis lists the API really pushes to, and
a model scaled to zero still takes work (QUEUE_WITHOUT_WORKERS) that a new worker then runs."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from client.cli import build_parser
from tasks import keys
from tasks.models import MODELS
from tasks.settings import Settings
from tests.conftest import photo, png_bytes
from tests.helpers.dockerfile import TARGETS, dockerfile_stages

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
BUILDS = {"base": K8S, "cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
K8S_VERSION = "1.35.0"  # a current release; kubernetes-validate is pinned, its schemas with it
FOREIGN_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "FLOWER_BASIC_AUTH", "POD_NAME", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
ONNX_FAMILIES = {"onnxseg", "textdet", "echo", "simulated"}
KUBECTL = shutil.which("kubectl")


def build(path: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=list(BUILDS))
def built(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the kustomizations are not built (test_raw_manifests_validate still checks every file)")
    return request.param, build(BUILDS[request.param])


def one(docs: list[dict], kind: str, name: str) -> dict:
    (d,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return d


def test_every_core_resource_validates(built: tuple[str, list[dict]]) -> None:
    name, docs = built
    core = [d for d in docs if not d["apiVersion"].startswith("keda.sh/")]
    assert {d["kind"] for d in core} >= {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet", "PodDisruptionBudget"}
    for d in core:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)  # raises ValidationError with the path of the bad field
        assert d["metadata"].get("namespace", "trifecta") == "trifecta"
    # a broken resource is refused (the validator is not a no-op)
    bad = {**one(docs, "Deployment", "api")}
    bad["spec"] = {**bad["spec"], "replicas": "two"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def _config(docs: list[dict]) -> dict[str, str]:
    return one(docs, "ConfigMap", "trifecta-config")["data"]


def test_every_worker_has_its_scaled_object_on_its_real_queue(built: tuple[str, list[dict]]) -> None:
    name, docs = built
    cfg = _config(docs)
    redis_host, redis_db = re.fullmatch(r"redis://([^:/]+):6379/(\d+)", cfg["REDIS_URL"]).groups()
    ns = one(docs, "Namespace", "trifecta")["metadata"]["name"]
    workers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"}
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert set(workers) == set(scaled) and len(scaled) == len([d for d in docs if d["kind"] == "ScaledObject"])
    want = {"base": {"worker-textmask", "worker-segmentation"}, "cpu": {"worker-textmask", "worker-segmentation"}, "gpu": {"worker-textmask", "worker-segmentation", "worker-mask2former"}}[name]
    assert set(workers) == want
    assert one(docs, "Service", redis_host)["spec"]["ports"][0]["port"] == 6379
    parser = build_parser()
    for wname, dep in workers.items():
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        a = parser.parse_args([x.replace("$(POD_NAME)", "worker-pod-0") for x in c["args"]])
        assert a.cmd == "worker" and a.name == "worker-pod-0" and wname == f"worker-{a.model}" and a.model in MODELS
        assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in c["env"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        batch = int(env.get("MAX_BATCH_SIZE") or cfg["MAX_BATCH_SIZE"])
        # the image: a Dockerfile target with the model's runtime (no torch for the ONNX families)
        repo, tag = c["image"].split(":")
        assert repo == "trifecta" and tag in TARGETS and tag.startswith("worker-onnx" if MODELS[a.model].family in ONNX_FAMILIES else "worker-torch")
        gpu = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        if name == "gpu":
            assert gpu == 1 and a.device == "cuda:0" and tag.endswith("-cuda"), wname
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in dep["spec"]["template"]["spec"]["tolerations"]
        else:
            assert gpu is None and a.device == "cpu" and not tag.endswith("-cuda"), wname
        # the memory guard is below the pod's limit: the worker exits between batches, not OOM-killed in one
        lim = c["resources"]["limits"]["memory"]
        assert int(env["WORKER_MAX_MEMORY_MB"]) < int(lim.removesuffix("Gi")) * 1024, wname
        # the metrics port (probes, Prometheus) is the one the worker serves
        assert env["WORKER_METRICS_PORT"] == str(c["ports"][0]["containerPort"]) == dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
        # KEDA: redis list triggers on the model's shared queue and its shard queue, as tasks/keys.py names them
        so = scaled[wname]
        assert so["apiVersion"] == "keda.sh/v1alpha1" and 0 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
        trig = {t["metadata"]["listName"]: t for t in so["spec"]["triggers"]}
        assert set(trig) == {keys.shared_queue(a.model), keys.shard_queue(a.model)}
        for t in trig.values():
            assert t["type"] == "redis"
            assert t["metadata"]["address"] == f"{redis_host}.{ns}.svc.cluster.local:6379" and t["metadata"]["databaseIndex"] == redis_db
            assert t["metadata"]["activationListLength"] == "0"
        assert trig[keys.shared_queue(a.model)]["metadata"]["listLength"] == str(batch)  # one full batch per worker
        # a PodDisruptionBudget covers the worker's pods
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items() and p["spec"].get("maxUnavailable") == 1]
    if name == "cpu":
        assert scaled["worker-segmentation"]["spec"]["minReplicaCount"] == 0 and cfg["QUEUE_WITHOUT_WORKERS"] == "true"
        assert cfg["S3_ENDPOINT_URL"] == "http://minio:9000" and one(docs, "Deployment", "minio")


def test_api_flower_redis_and_settings(built: tuple[str, list[dict]]) -> None:
    _, docs = built
    fields = {f.upper() for f in Settings.model_fields}
    cfg = _config(docs)
    assert not [k for k in cfg if k not in fields and k not in FOREIGN_ENV]
    Settings(**{k.lower(): v for k, v in cfg.items() if k in fields})  # the values are valid settings
    assert cfg["STORAGE_URL"].startswith("s3://")  # shared object storage: never file:// across pods
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                unknown = [e["name"] for e in c.get("env", []) if e["name"] not in fields and e["name"] not in FOREIGN_ENV]
                assert not unknown, (d["metadata"]["name"], unknown)
                for src in c.get("envFrom", []):
                    ref = src.get("configMapRef") or src.get("secretRef")
                    assert one(docs, "ConfigMap" if "configMapRef" in src else "Secret", ref["name"])
    for s in (d for d in docs if d["kind"] == "Secret"):
        assert not [k for k in s["stringData"] if k not in fields and k not in FOREIGN_ENV]
    api = one(docs, "Deployment", "api")["spec"]["template"]["spec"]["containers"][0]
    a = build_parser().parse_args(api["args"])
    assert (a.cmd, a.host, a.port) == ("api", "0.0.0.0", api["ports"][0]["containerPort"]) and api["image"] == "trifecta:api"
    assert api["readinessProbe"]["httpGet"]["path"] == "/health" and api["livenessProbe"]["httpGet"]["path"] == "/ping"
    flower = one(docs, "Deployment", "flower")["spec"]["template"]["spec"]["containers"][0]
    assert build_parser().parse_args(flower["args"]).cmd == "flower"
    redis = one(docs, "StatefulSet", "redis")
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert redis["spec"]["template"]["spec"]["containers"][0]["args"][:3] == ["redis-server", "--appendonly", "yes"]
    assert {s["name"] for s in dockerfile_stages()} >= {
        c["image"].split(":")[1] for d in docs if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"] if c["image"].startswith("trifecta:")
    }


def test_raw_manifests_validate() -> None:
    """Without kubectl as well: every plain manifest file validates as it stands."""
    n = 0
    for f in sorted(K8S.rglob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if not isinstance(d, dict) or "kind" not in d or d["kind"] in ("Kustomization", "Component", "ScaledObject"):
                continue
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            n += 1
    assert n >= 15


def _scaled_list(model: str) -> str:
    so = yaml.safe_load_all((K8S / "base" / f"worker-{model}.yaml").read_text())
    (d,) = [x for x in so if x and x["kind"] == "ScaledObject"]
    return d["spec"]["triggers"][0]["metadata"]["listName"]


def test_a_model_at_zero_workers_queues_work_where_keda_looks(make_stack) -> None:  # noqa: ANN001
    """KEDA minReplicaCount 0: with QUEUE_WITHOUT_WORKERS the API takes a job for a model with no
    worker, the job waits in the very Redis list the ScaledObject watches, and the worker that
    KEDA would start runs it."""
    body = {"model": "textmask", "input": {"image": base64.b64encode(png_bytes(photo("text.png"))).decode()}}
    off = make_stack(models=[])
    r = httpx.post(f"{off.url}/v1/jobs", json=body, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"
    assert httpx.get(f"{off.url}/health", timeout=10).status_code == 200

    st = make_stack(models=[], env={"QUEUE_WITHOUT_WORKERS": "true"})
    listname = _scaled_list("textmask")
    r = httpx.post(f"{st.url}/v1/jobs", json=body, timeout=30)
    assert r.status_code == 202, r.text
    jid = r.json()["job_id"]
    assert st.redis.llen(listname) == 1  # what KEDA's redis scaler reads (LLEN), activation at > 0
    assert httpx.get(f"{st.url}/v1/jobs/{jid}", timeout=10).json()["status"] == "queued"
    st.start_worker("textmask", "scaled-from-zero")
    t_end = time.time() + 60
    while (j := httpx.get(f"{st.url}/v1/jobs/{jid}", timeout=10).json())["status"] != "succeeded":
        assert j["status"] in ("queued", "running") and time.time() < t_end, j
        time.sleep(0.1)
    assert j["result"]["worker"] == "scaled-from-zero" and st.redis.llen(listname) == 0
    assert j["result"]["outputs"][0]["shape"] == list(photo("text.png").size[::-1])
