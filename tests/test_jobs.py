"""Submit-and-poll jobs on the file and the S3 (moto over HTTP) backends."""

from __future__ import annotations

import base64

import boto3
import httpx
import pytest

from storage import codecs
from tests.conftest import make_bucket, wait_job, with_text


@pytest.fixture(scope="module")
def file_stack(make_stack):
    return make_stack(models=["textmask"])


@pytest.fixture(scope="module")
def s3_stack(make_stack, moto_s3):
    make_bucket(moto_s3, "masks")
    return make_stack(models=["textmask"], env={"S3_ENDPOINT_URL": moto_s3}, storage="s3://masks/trifecta")


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_job_polled_to_succeeded_and_mask_read_back(backend: str, request: pytest.FixtureRequest, moto_s3: str) -> None:
    stack = request.getfixturevalue(f"{backend}_stack")
    data, gt = with_text("rocket.jpg")
    r = httpx.post(stack.url + "/v1/jobs", json={"model": "textmask", "input": {"image": base64.b64encode(data).decode()}, "params": {"format": "png"}}, timeout=30)
    assert r.status_code == 202, r.text
    acc = r.json()
    assert acc["status"] == "queued" and acc["links"]["self"] == f"/v1/jobs/{acc['job_id']}" and len(acc["job_id"]) == 32
    j = wait_job(stack.url, acc["job_id"])
    assert j["status"] == "succeeded", j
    assert j["created_at"] <= j["started_at"] <= j["finished_at"]
    (out,) = j["result"]["outputs"]
    assert out["key"] == "mask" and out["format"] == "png" and out["shape"] == [427, 640]
    mask = codecs.decode_png(httpx.get(stack.url + f"/v1/jobs/{acc['job_id']}/result", timeout=10).content)
    assert mask.shape == (427, 640) and mask.sum() > 300 and mask[gt].sum() / mask.sum() > 0.9
    if backend == "s3":
        # the object is really in the bucket under the job's own prefix, and the URL handed out is presigned
        key = f"trifecta/default/jobs/{acc['job_id']}/mask.png"
        body = boto3.client("s3", endpoint_url=moto_s3).get_object(Bucket="masks", Key=key)["Body"].read()
        assert (codecs.decode_png(body) == mask).all()
        assert "X-Amz-Signature" in out["url"] or "Signature" in out["url"]
        assert (codecs.decode_png(httpx.get(out["url"], timeout=10).content) == mask).all()
        res = boto3.client("s3", endpoint_url=moto_s3).get_object(Bucket="masks", Key=f"trifecta/default/jobs/{acc['job_id']}/result.json")["Body"].read()
        assert b'"model":"textmask"' in res
    else:
        assert out["url"] == f"/v1/jobs/{acc['job_id']}/result?key=mask"


def test_multipart_job_list_cancel_and_404(file_stack) -> None:
    data, _ = with_text("coffee.png")
    r = httpx.post(file_stack.url + "/v1/jobs", data={"model": "textmask", "params": '{"format": "packbits"}'}, files={"file": ("c.png", data, "image/png")}, timeout=30)
    assert r.status_code == 202, r.text
    jid = r.json()["job_id"]
    j = wait_job(file_stack.url, jid)
    m = codecs.decode_packbits(httpx.get(file_stack.url + f"/v1/jobs/{jid}/result").content)
    assert m.shape == (400, 600)
    lst = httpx.get(file_stack.url + "/v1/jobs?limit=50").json()
    assert lst["jobs"][0]["job_id"] == jid and lst["total"] >= 1
    assert j["status"] == "succeeded"
    # a finished job cannot be cancelled: it stays succeeded
    assert httpx.delete(file_stack.url + f"/v1/jobs/{jid}").json()["status"] == "succeeded"
    r = httpx.get(file_stack.url + "/v1/jobs/" + "0" * 32)
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    r = httpx.post(file_stack.url + "/v1/jobs", json={"model": "nope", "input": {"image": "AA=="}})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"
    r = httpx.post(file_stack.url + "/v1/jobs", json={"model": "textmask", "input": {"image": "!!notbase64"}})
    assert r.status_code == 422
    r = httpx.post(file_stack.url + "/v1/jobs", json={"model": "textmask", "input": {"uri": "file:///etc/passwd"}})
    assert r.status_code == 403
    assert httpx.get(file_stack.url + "/health").status_code == 200


def test_idempotency_key_returns_the_same_job(file_stack) -> None:
    data, _ = with_text("chelsea.png")
    body = {"model": "textmask", "input": {"image": base64.b64encode(data).decode()}}
    a = httpx.post(file_stack.url + "/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    b = httpx.post(file_stack.url + "/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    assert a.status_code == 202 and b.status_code == 200
    assert a.json()["job_id"] == b.json()["job_id"]


def test_large_input_is_staged_in_storage_not_inline(make_stack) -> None:
    st = make_stack(models=["textmask"], env={"INLINE_INPUT_BYTES": "1000"})
    data, gt = with_text("astronaut.png")
    r = httpx.post(st.url + "/run_textmask?format=png", content=data, headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200
    jid = r.headers["x-job-id"]
    m = codecs.decode_png(r.content)
    assert m.shape == (512, 512) and m[gt].sum() / max(1, m.sum()) > 0.9
    # a sync call's staged copy is deleted once its answer is in; the job's mask stays
    job_dir = st.tmp / "data" / "default" / "jobs" / jid
    assert not (job_dir / "_in").exists() and (job_dir / "mask.png").read_bytes() == r.content
    # a submitted job keeps its staged input (until the janitor sweeps the job)
    j = httpx.post(st.url + "/v1/jobs", files={"file": ("a.png", data, "image/png")}, data={"model": "textmask"}, timeout=60)
    assert j.status_code == 202, j.text
    assert wait_job(st.url, j.json()["job_id"], 60)["status"] == "succeeded"
    staged = list((st.tmp / "data" / "default" / "jobs" / j.json()["job_id"] / "_in").iterdir())
    assert [p.name for p in staged] == ["input"] and staged[0].read_bytes() == data
