"""A model family is one declaration (`tasks.models.ModelSpec`): every table of models follows from the specs,
and a family declared outside the repository's table (tests/helpers/shout*.py) serves through a real
worker and the API with no shared table edited."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from client.benchkit import ROOT
from client.sdk import AsyncClient, Client
from tasks import keys, models
from tasks.models import MODELS, Admission, ModelSpec
from tasks.wire import build_message
from tests.helpers.shout import SPEC
from tests.helpers.stacks import start_stack

PLUGIN = {"TRIFECTA_MODEL_MODULES": "tests.helpers.shout"}


# ---------------------------------------------------------------- the derived tables
def test_sync_models_fast_path_and_sync_routes_follow_the_specs() -> None:
    from api.fastpath import PATHS
    from api.routes.sync import SYNC_MODELS, router

    assert SYNC_MODELS == tuple(m for m, s in MODELS.items() if s.sync) == ("segmentation", "textmask", "facemask", "echo", "simulated")
    assert PATHS == {f"/run_{m}": m for m in SYNC_MODELS}
    assert {r.path for r in router.routes} == set(PATHS)


def test_admission_table_follows_the_specs() -> None:
    from api import admission
    from api.routes.mask2former import gate_model

    assert set(admission.GATED) == {f"/run_{m}" for m, s in MODELS.items() if s.sync} | {p for s in MODELS.values() for p in s.admission.paths}
    assert set(admission.GATED) == {
        *(f"/run_{m}" for m in ("segmentation", "textmask", "facemask", "echo", "simulated")),
        "/api/v1/infer", "/segment", "/segment-batch", "/api/v1/image/segment", "/api/v1/image/cached-features",
    }  # fmt: skip
    scope = {"headers": [], "query_string": b""}
    assert {p: f(scope) for p, f in admission.GATED.items() if p != "/segment" and p != "/segment-batch"} == {
        **{f"/run_{m}": m for m in ("segmentation", "textmask", "facemask", "echo", "simulated")},
        "/api/v1/infer": "vjepa2", "/api/v1/image/segment": "sam3", "/api/v1/image/cached-features": "sam3",
    }  # fmt: skip
    assert admission.GATED["/segment"] is gate_model and gate_model({"headers": [(b"x-model", b"nope")], "query_string": b""}) is None
    assert gate_model(scope) == "mask2former"
    assert admission.NO_WORKER_TO_ROUTE == {"/run_facemask", "/api/v1/image/segment", "/api/v1/image/cached-features"}
    assert admission.BROKER_ONLY == ("/api/v1/video/",)


def test_routers_tiny_writers_runners_and_torch_follow_the_specs() -> None:
    from workers.tiny import writers

    assert models.router_paths(MODELS.values()) == ("api.routes.sam3_image:router", "api.routes.sam3_video:router", "api.routes.vjepa2:router", "api.routes.mask2former:router")
    assert writers() == {m: s.tiny for m, s in MODELS.items() if s.tiny}
    assert set(writers()) == {"segmentation", "sam3", "vjepa2", "mask2former"}
    assert models.runner_paths(MODELS.values())["onnxseg"] == "workers.runners.onnxseg:OnnxSegRunner"
    assert {m for m, s in MODELS.items() if s.torch} == {"sam3", "vjepa2", "mask2former"}
    from workers.runners.base import Runner, runner_class

    for fam in ("onnxseg", "textdet", "echo", "simulated"):  # the ONNX families: importing them needs no torch
        cls = runner_class(fam)
        assert issubclass(cls, Runner) and cls.family == fam
    with pytest.raises(KeyError, match="no model of family 'nope'"):
        runner_class("nope")


def test_app_includes_each_family_router() -> None:
    from api.app import create_app

    paths = set(create_app().openapi()["paths"])
    assert {"/api/v1/infer", "/segment", "/segment-batch", "/api/v1/image/segment", "/api/v1/video/session/start"} <= paths


def test_sdk_shortcuts_follow_the_specs() -> None:
    names = {m for m, s in MODELS.items() if s.sdk}
    assert names == {"textmask", "segmentation", "facemask"}
    for m in names:
        assert getattr(Client, m).__name__ == m and getattr(AsyncClient, m).__name__ == m
    assert not hasattr(Client, "echo") and not hasattr(Client, "shout")  # not declared here: no shortcut


def test_job_kinds_follow_the_specs() -> None:
    assert MODELS["vjepa2"].jobs == ("video", "frames")
    assert MODELS["textmask"].jobs == models.IMAGE_JOBS and SPEC.jobs == ("image",)


def test_a_new_spec_changes_every_derived_table() -> None:
    from api.admission import gated

    specs = [*MODELS.values(), SPEC]
    assert models.sync_models(specs)[-1] == "shout" and models.sdk_models(specs)[-1] == "shout"
    assert models.tiny_writers(specs)["shout"] == "tests.helpers.shout_runner:write_tiny"
    assert models.router_paths(specs)[-1] == "tests.helpers.shout_routes:router"
    assert models.runner_paths(specs)["shout"] == "tests.helpers.shout_runner:ShoutRunner"
    g = gated(specs)
    assert g["/run_shout"]({}) == "shout" and g["/v1/shout/loud"]({}) == "shout"


@pytest.fixture
def restore_models() -> Iterator[None]:
    before = dict(MODELS)
    yield
    MODELS.clear()
    MODELS.update(before)
    models.MODEL_NAMES = tuple(MODELS)


def test_register_adds_a_model_and_refuses_ambiguous_ones(restore_models: None) -> None:
    models.register(SPEC)
    assert models.MODELS["shout"] is SPEC and models.MODEL_NAMES[-1] == "shout"
    with pytest.raises(ValueError, match="declared twice"):
        models.register(SPEC)
    with pytest.raises(ValueError, match="names runner"):
        models.register(ModelSpec("other", "onnxseg", True, "x", runner="somewhere:Else"))
    with pytest.raises(ValueError, match="gated for both"):
        models.register(ModelSpec("other", "other", True, "x", admission=Admission(paths=("/api/v1/infer",))))
    with pytest.raises(ValueError, match="lower-case"):
        models.register(ModelSpec("Bad-Name", "bad", True, "x"))
    with pytest.raises(ValueError, match="needs a sync endpoint"):
        models.register(ModelSpec("other", "other", True, "x", sdk=True))
    with pytest.raises(ValueError, match="must look like"):
        models.resolve("no_colon")


# ---------------------------------------------------------------- the family served, end to end
def test_family_declared_outside_the_table_serves_through_a_real_worker(redis_server, tmp_path: Path) -> None:  # noqa: ANN001
    model_dir = tmp_path / "models"
    out = subprocess.run([sys.executable, "-m", "client.cli", "models", "tiny", "shout", str(model_dir / "shout")], cwd=ROOT, env={**_env(), **PLUGIN}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((model_dir / "shout" / "config.json").read_text()) == {"threshold": 100}

    st = start_stack(redis_server.port, model_dir, tmp_path / "stack", ["shout"], {**PLUGIN, "MODEL_DIR": str(model_dir)})
    try:
        gray = np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) % 256
        png = io.BytesIO()
        Image.fromarray(gray.astype(np.uint8)).save(png, format="PNG")
        with Client(st.url) as c:
            res = c.run_timed("shout", png.getvalue())
            assert res.mask.shape == (48, 64) and np.array_equal(res.mask, gray > 100)  # the threshold its tiny checkpoint holds
            assert res.mask.sum() == int((gray > 100).sum()) > 0
        r = httpx.post(st.url + "/run_shout?format=png", content=png.getvalue(), headers={"Content-Type": "image/png"}, timeout=30)
        assert r.status_code == 200 and r.headers["x-model-untrained"] == "true"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))) > 0, gray > 100)

        assert httpx.get(st.url + "/v1/shout/about").json() == {"model": "shout", "description": SPEC.description}  # its router
        assert "shout" in httpx.get(st.url + "/models/info").json()["models"]
        bad = httpx.post(st.url + "/v1/jobs", json={"model": "shout", "input": {"uri": "file:///nowhere.png"}})
        assert bad.status_code == 422 and "input.image" in bad.json()["error"]["message"]  # its job kinds

        # the typed hook: a registration field and an extra Celery task, on the worker's private queue
        (wid,) = [w.name for w in st.workers]
        assert st.redis.hget(keys.worker(wid), "shout") == f"shout@{wid}:100".encode()
        ps = st.redis.pubsub()
        ps.subscribe("tf:test:shout-ping")
        ps.get_message(timeout=2)
        queue = keys.private_queue("shout", wid)
        st.redis.lpush(queue, build_message("trifecta.shout.ping", "ping-1", {"reply": "tf:test:shout-ping"}, queue))
        msg = _next_message(ps, 30)
        assert msg == wid.encode()
        ps.close()

        # with its worker gone, the admission gate (from the spec) answers /run_shout's 503 before routing
        st.workers[0].stop()
        _until(lambda: not httpx.get(st.url + "/health").json().get("queues", {}).get("shout", {}).get("workers"), 30)
        r = httpx.post(st.url + "/run_shout", content=png.getvalue(), headers={"Content-Type": "image/png"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"
        assert httpx.get(st.url + "/health").status_code in (200, 503)  # the service still answers
    finally:
        st.stop()


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _next_message(ps, timeout: float) -> bytes | None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = ps.get_message(timeout=1)
        if m and m["type"] == "message":
            return m["data"]
    return None


def _until(cond, timeout: float) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached")
