"""Tenants: API keys, isolation of jobs and storage, input URI checks, presigned URLs, rate limits.

One stack on moto's S3 (over HTTP) with a textmask and an echo worker, and two API processes
on it: the main one (keys from API_KEYS and API_KEYS_FILE, ops endpoints open) and a strict
one (RATE_LIMIT_PER_MINUTE=5, PROTECT_OPS_ENDPOINTS=true).
"""

from __future__ import annotations

import base64
import hmac
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import boto3
import httpx
import pytest

from api import security
from client.benchkit import Proc
from storage import codecs
from tasks import keys
from tasks.embedded_redis import free_port
from tasks.settings import Settings
from tests.conftest import make_bucket, photo, png_bytes

BUCKET, PREFIX = "tenants-bkt", "pfx"
KEY_A = "ka-7f3c1e9b2d4a6f8e0c1b3d5f7a9e2c4b"
KEY_B = "kb-1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d"
KEY_C = "kc-from-the-keys-file-0123456789abcdef"
KEY_D = "kd-added-while-running-fedcba9876543210"
URL_TTL = 900


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("keys") / "api-keys.txt"
    p.write_text(f"# key:tenant, one per line\n{KEY_C}:tenantC\n")
    return p


@pytest.fixture(scope="module")
def s3(moto_s3: str):
    for b in (BUCKET, "shared-in", "private-other"):
        make_bucket(moto_s3, b)
    return boto3.client("s3", endpoint_url=moto_s3)


@pytest.fixture(scope="module")
def stack(make_stack, moto_s3: str, s3, keys_file: Path):
    env = {
        "S3_ENDPOINT_URL": moto_s3,
        "API_KEYS": f"{KEY_A}:tenantA, {KEY_B}:tenantB",
        "API_KEYS_FILE": str(keys_file),
        "INPUT_URI_ALLOWLIST": "s3://shared-in/public,s3://shared-in/per-tenant/{tenant}/",
        "RESULT_URL_TTL_S": str(URL_TTL),
        "MAX_CONCURRENCY_PER_GPU": "1",  # one batch at a time, so a sleeping echo job keeps the next one queued
    }
    return make_stack(models=["textmask", "echo"], env=env, storage=f"s3://{BUCKET}/{PREFIX}")


@pytest.fixture(scope="module")
def strict(stack):
    """A second API process on the same Redis and workers: rate limited, ops endpoints protected."""
    port = free_port()
    env = {**stack.env, "RATE_LIMIT_PER_MINUTE": "5", "PROTECT_OPS_ENDPOINTS": "true"}
    p = Proc("api-strict", [sys.executable, "-m", "client.cli", "api", "--port", str(port)], env, stack.tmp / "api-strict.log").start()
    url = f"http://127.0.0.1:{port}"
    t_end = time.time() + 30
    while True:
        try:
            if httpx.get(url + "/health", headers=auth(KEY_B), timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert p.alive() and time.time() < t_end, p.tail()
        time.sleep(0.1)
    yield url
    p.stop()


def small_png() -> bytes:
    return png_bytes(photo("coffee.png").resize((64, 48)))


def submit(url: str, key: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(url + "/v1/jobs", json=body, headers={**auth(key), **headers}, timeout=30)


def wait_job(url: str, key: str, job_id: str, timeout: float = 60) -> dict:
    t_end = time.time() + timeout
    while time.time() < t_end:
        j = httpx.get(f"{url}/v1/jobs/{job_id}", headers=auth(key), timeout=5).json()
        if j["status"] in keys.TERMINAL:
            return j
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {j}")


def image_job(model: str = "textmask", **params: object) -> dict:
    return {"model": model, "input": {"image": base64.b64encode(small_png()).decode()}, "params": {"format": "png", **params}}


# ------------------------------------------------------------------ keys
PROTECTED = [
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/" + "0" * 32),
    ("GET", "/v1/jobs/" + "0" * 32 + "/result"),
    ("DELETE", "/v1/jobs/" + "0" * 32),
    ("POST", "/run_textmask"),
    ("POST", "/run_echo"),
    ("POST", "/api/v1/image/segment"),
    ("GET", "/models/info"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/no/such/route"),
]
BAD_CREDENTIALS = [
    {},
    {"Authorization": "Bearer wrong-key"},
    {"X-API-Key": "wrong-key"},
    {"Authorization": f"Basic {KEY_A}"},
    {"Authorization": "Bearer"},
    {"Authorization": f"Bearer {KEY_A}x"},
    {"Authorization": f"Bearer {KEY_A[:-1]}"},
    {"X-API-Key": KEY_A.upper()},
    {"Authorization": f"Bearer {KEY_A}:tenantA"},
]


@pytest.mark.parametrize("method,path", PROTECTED)
def test_every_endpoint_but_ops_needs_a_valid_key(stack, method: str, path: str) -> None:
    for creds in BAD_CREDENTIALS:
        r = httpx.request(method, stack.url + path, headers={"Content-Type": "image/png", **creds}, content=small_png() if method == "POST" else None, timeout=10)
        assert r.status_code == 401, (creds, r.status_code, r.text[:200])
        assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"].startswith("Bearer")


def test_ops_endpoints_open_without_key_unless_protected(stack, strict: str) -> None:
    for path in ("/health", "/metrics", "/ping"):
        assert httpx.get(stack.url + path, timeout=10).status_code == 200, path
        assert httpx.get(strict + path, timeout=10).status_code == 401, path
        assert httpx.get(strict + path, headers={"X-API-Key": KEY_A}, timeout=10).status_code == 200, path
    assert httpx.get(stack.url + "/health", timeout=10).json()["ready"] is True
    # the results page's shell: no tenant data, it asks for the key and sends it on each call
    for url in (stack.url, strict):
        r = httpx.get(url + "/", headers={"Accept": "text/html"}, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert httpx.post(url + "/", timeout=10).status_code == 401


def test_both_key_headers_and_the_keys_file_give_the_right_tenant(stack) -> None:
    r = httpx.post(stack.url + "/run_echo", content=b"abc", headers={"X-API-Key": KEY_B, "Content-Type": "application/octet-stream"}, timeout=30)
    assert r.status_code == 200 and r.json()["bytes"] == 3
    # the sync request's record belongs to tenantB: its id is visible to B's key only
    jid = r.json()["job_id"]
    assert httpx.get(f"{stack.url}/v1/jobs/{jid}", headers=auth(KEY_B)).status_code == 200
    assert httpx.get(f"{stack.url}/v1/jobs/{jid}", headers=auth(KEY_A)).status_code == 404
    r = submit(stack.url, KEY_C, image_job("echo"))
    assert r.status_code == 202
    assert wait_job(stack.url, KEY_C, r.json()["job_id"])["status"] == "succeeded"
    assert [j["job_id"] for j in httpx.get(stack.url + "/v1/jobs", headers={"X-API-Key": KEY_C}).json()["jobs"]] == [r.json()["job_id"]]


# ------------------------------------------------------------------ isolation
def test_tenant_isolation_matrix(stack, s3) -> None:
    a = submit(stack.url, KEY_A, image_job())
    assert a.status_code == 202, a.text
    ja = a.json()["job_id"]
    assert len(ja) == 32 and int(ja, 16) >= 0 and ja[12] == "4"  # uuid4: 122 random bits
    done = wait_job(stack.url, KEY_A, ja)
    assert done["status"] == "succeeded" and done["result"]["outputs"][0]["shape"] == [48, 64]
    assert "tenant" not in done
    mask = httpx.get(f"{stack.url}/v1/jobs/{ja}/result", headers=auth(KEY_A), timeout=10)
    assert mask.status_code == 200 and codecs.decode_png(mask.content).shape == (48, 64)

    for other in (KEY_B, KEY_C):
        for method, path in (("GET", f"/v1/jobs/{ja}"), ("GET", f"/v1/jobs/{ja}/result"), ("GET", f"/v1/jobs/{ja}/result?key=mask"), ("DELETE", f"/v1/jobs/{ja}")):
            r = httpx.request(method, stack.url + path, headers=auth(other), timeout=10)
            assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", (method, path, r.text)
        listed = httpx.get(stack.url + "/v1/jobs?limit=200", headers=auth(other)).json()
        assert ja not in [j["job_id"] for j in listed["jobs"]]
    assert ja in [j["job_id"] for j in httpx.get(stack.url + "/v1/jobs?limit=200", headers=auth(KEY_A)).json()["jobs"]]
    assert wait_job(stack.url, KEY_A, ja)["status"] == "succeeded", "B's DELETE must not have touched it"

    # the storage keys are under the tenant's prefix
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/tenantA/jobs/{ja}/")["Contents"]]
    assert f"{PREFIX}/tenantA/jobs/{ja}/mask.png" in keys
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/tenantB/jobs/{ja}/").get("KeyCount") == 0


def test_other_tenant_cannot_cancel_a_queued_job_but_its_owner_can(stack) -> None:
    busy = submit(stack.url, KEY_A, image_job("echo", sleep_ms=2500)).json()["job_id"]
    time.sleep(0.3)  # the echo worker is now sleeping on `busy`
    queued = submit(stack.url, KEY_A, image_job("echo")).json()["job_id"]
    r = httpx.delete(f"{stack.url}/v1/jobs/{queued}", headers=auth(KEY_B))
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    r = httpx.delete(f"{stack.url}/v1/jobs/{queued}", headers=auth(KEY_A))
    assert r.status_code == 200 and r.json() == {"job_id": queued, "status": "cancelled"}
    assert wait_job(stack.url, KEY_A, busy)["status"] == "succeeded"
    assert wait_job(stack.url, KEY_A, queued)["status"] == "cancelled"


def test_idempotency_keys_are_per_tenant(stack) -> None:
    first = submit(stack.url, KEY_A, image_job("echo"), **{"Idempotency-Key": "order-42"})
    again = submit(stack.url, KEY_A, image_job("echo"), **{"Idempotency-Key": "order-42"})
    other = submit(stack.url, KEY_B, image_job("echo"), **{"Idempotency-Key": "order-42"})
    assert first.status_code == 202 and again.status_code == 200 and again.json()["job_id"] == first.json()["job_id"]
    assert other.status_code == 202 and other.json()["job_id"] != first.json()["job_id"]
    assert httpx.get(f"{stack.url}/v1/jobs/{other.json()['job_id']}", headers=auth(KEY_A)).status_code == 404


def test_result_url_is_presigned_with_expiry(stack) -> None:
    ja = submit(stack.url, KEY_A, image_job()).json()["job_id"]
    out = wait_job(stack.url, KEY_A, ja)["result"]["outputs"][0]
    u = urlparse(out["url"])
    q = parse_qs(u.query)
    assert u.path == f"/{BUCKET}/{PREFIX}/tenantA/jobs/{ja}/mask.png"
    assert q["X-Amz-Expires"] == [str(URL_TTL)] and q["X-Amz-Signature"][0]
    direct = httpx.get(out["url"], timeout=10)
    via_api = httpx.get(f"{stack.url}/v1/jobs/{ja}/result", headers=auth(KEY_A), timeout=10)
    assert direct.status_code == 200 and direct.content == via_api.content and codecs.decode_png(direct.content).shape == (48, 64)


# ------------------------------------------------------------------ input URIs
def test_input_uris_are_confined_to_own_prefix_and_allowlist(stack, s3) -> None:
    png = small_png()
    for bucket, key in (
        (BUCKET, f"{PREFIX}/tenantA/uploads/in.png"),
        (BUCKET, f"{PREFIX}/tenantB/uploads/in.png"),
        ("shared-in", "public/in.png"),
        ("shared-in", "public-evil/in.png"),
        ("shared-in", "per-tenant/tenantA/in.png"),
        ("private-other", "in.png"),
    ):
        s3.put_object(Bucket=bucket, Key=key, Body=png)
    allowed = [
        f"s3://{BUCKET}/{PREFIX}/tenantA/uploads/in.png",  # A's own prefix
        "s3://shared-in/public/in.png",  # INPUT_URI_ALLOWLIST
        "s3://shared-in/per-tenant/tenantA/in.png",  # allowlist with {tenant} = tenantA
    ]
    for uri in allowed:
        r = submit(stack.url, KEY_A, {"model": "textmask", "input": {"uri": uri}, "params": {"format": "png"}})
        assert r.status_code == 202, (uri, r.text)
        j = wait_job(stack.url, KEY_A, r.json()["job_id"])
        assert j["status"] == "succeeded" and j["result"]["outputs"][0]["shape"] == [48, 64], (uri, j)
    refused = [
        (f"s3://{BUCKET}/{PREFIX}/tenantB/uploads/in.png", 403),  # another tenant's object
        (f"s3://{BUCKET}/{PREFIX}/tenantA/../tenantB/uploads/in.png", 403),
        (f"s3://{BUCKET}/{PREFIX}/tenantA/./x/../../tenantB/uploads/in.png", 403),
        (f"s3://{BUCKET}/{PREFIX}//tenantA/uploads/in.png", 403),
        (f"s3://{BUCKET}/{PREFIX}/tenantAB/uploads/in.png", 403),  # a tenant name sharing A's prefix
        (f"s3://{BUCKET}/{PREFIX}/tenantA", 403),  # the prefix itself is no object
        (f"s3://{BUCKET}/tenantA/uploads/in.png", 403),  # outside STORAGE_URL's prefix
        ("s3://shared-in/public-evil/in.png", 403),  # allowlist matches whole segments
        ("s3://shared-in/per-tenant/tenantB/in.png", 403),  # {tenant} is the caller's
        ("s3://private-other/in.png", 403),
        (f"s3://{BUCKET}/{PREFIX}/tenantA/uploads/in.png?versionId=1", 400),
        (f"s3://{BUCKET}/{PREFIX}/tenantA/uploads/in.png#frag", 400),
        ("file:///etc/passwd", 403),
        ("https://example.com/in.png", 400),
        (f"key:{PREFIX}/tenantB/uploads/in.png", 400),
    ]
    for uri, status in refused:
        r = submit(stack.url, KEY_A, {"model": "textmask", "input": {"uri": uri}})
        assert r.status_code == status, (uri, r.status_code, r.text)
        assert r.json()["error"]["code"] == ("forbidden" if status == 403 else "bad_request")
    # B cannot read A's object, and the shard job kind applies the same rule
    r = submit(stack.url, KEY_B, {"model": "textmask", "input": {"uri": f"s3://{BUCKET}/{PREFIX}/tenantA/uploads/in.png"}})
    assert r.status_code == 403
    r = submit(stack.url, KEY_B, {"model": "textmask", "input": {"shards": [f"s3://{BUCKET}/{PREFIX}/tenantA/shard-000.tar"]}})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


# ------------------------------------------------------------------ rate limit
def test_rate_limit_per_tenant_with_retry_after(stack, strict: str) -> None:
    for i in range(5):
        assert httpx.get(strict + "/v1/jobs", headers=auth(KEY_A), timeout=5).status_code == 200, i
    r = httpx.get(strict + "/v1/jobs", headers=auth(KEY_A), timeout=5)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert r.headers["retry-after"] in ("11", "12")  # one token per 12 s at 5 per minute
    r = httpx.post(strict + "/run_echo", content=b"abc", headers={**auth(KEY_A), "Content-Type": "image/png"}, timeout=5)
    assert r.status_code == 429
    # another tenant has its own bucket; ops endpoints are not counted; a bad key is 401 before any bucket
    assert httpx.get(strict + "/v1/jobs", headers=auth(KEY_B), timeout=5).status_code == 200
    assert httpx.get(strict + "/health", headers=auth(KEY_A), timeout=5).status_code == 200
    assert httpx.get(strict + "/v1/jobs", headers=auth("nope"), timeout=5).status_code == 401
    # the main API process has no limit
    assert httpx.get(stack.url + "/v1/jobs", headers=auth(KEY_A), timeout=5).status_code == 200


# ------------------------------------------------------------------ key file reload and KeyRing
def test_keys_file_is_reread_when_it_changes(stack, keys_file: Path) -> None:
    keys_file.write_text(f"{KEY_D}:tenantD\n")
    t_end = time.time() + 10
    while httpx.get(stack.url + "/v1/jobs", headers=auth(KEY_D), timeout=5).status_code != 200:
        assert time.time() < t_end, "the new key was not picked up"
        time.sleep(0.2)
    assert httpx.get(stack.url + "/v1/jobs", headers=auth(KEY_C), timeout=5).status_code == 401
    assert httpx.get(stack.url + "/v1/jobs", headers=auth(KEY_A), timeout=5).status_code == 200  # API_KEYS stay
    keys_file.write_text(f"{KEY_D}:../escape\n")  # a broken file keeps the keys loaded before
    time.sleep(1.5)
    assert httpx.get(stack.url + "/v1/jobs", headers=auth(KEY_D), timeout=5).status_code == 200


def test_keyring_compares_every_key_and_refuses_bad_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ring = security.KeyRing(Settings(api_keys="k1:t1,k2:t2,k3:t3"))
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    for presented, tenant in (("k1", "t1"), ("k3", "t3"), ("nope", None), ("", None), (None, None)):
        calls.clear()
        assert ring.tenant(presented) == tenant
        assert len(calls) == 3, "every key is compared, whether or not one matched"
    for bad in ("k1:../up", "k1:", ":t1", "k1:t1,k1:t2", "k1:a/b", "k1"):
        with pytest.raises(ValueError):
            security.KeyRing(Settings(api_keys=bad))
    empty = tmp_path / "keys"
    empty.write_text("# no keys yet\n")
    ring = security.KeyRing(Settings(api_keys_file=str(empty)))
    assert ring.enabled and ring.tenant("anything") is None  # a configured but empty file fails closed
    with pytest.raises(ValueError):
        security.KeyRing(Settings(api_keys_file=str(tmp_path / "missing")))
