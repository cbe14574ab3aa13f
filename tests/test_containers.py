"""Dockerfile and docker-compose.yml, checked without a Docker engine: every target exists,
every COPY'd path exists, the entrypoint is our console script, every service's command
parses with the real CLI parser, and every variable set for our services is a real setting."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from client.cli import build_parser
from tasks.settings import Settings
from tests.helpers.dockerfile import TARGETS, dockerfile_stages

ROOT = Path(__file__).resolve().parents[1]
KNOWN_FOREIGN = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_REGION", "FLOWER_UNAUTHENTICATED_API"}
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(v: str) -> str:
    """What compose makes of `${VAR:-default}` with nothing set in the environment."""
    return _VAR.sub(lambda m: m.group(2) or "", v)


def test_dockerfile_targets_copies_and_entrypoint() -> None:
    all_stages = dockerfile_stages()
    assert [s["name"] for s in all_stages] == ["python-base", "api", "worker-onnx", "worker-torch", "cuda-base", "worker-onnx-cuda", "worker-torch-cuda"]
    by = {s["name"]: s for s in all_stages}
    assert by["cuda-base"]["base"] == "${CUDA_IMAGE}" and "nvidia/cuda:" in (ROOT / "Dockerfile").read_text()
    assert {by[t]["base"] for t in TARGETS} == {"python-base", "cuda-base"}
    stages = [by[t] for t in TARGETS]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    ignored = set((ROOT / ".dockerignore").read_text().split())
    for s in stages:
        assert s["copy"], s["name"]
        for srcs in s["copy"]:
            for src in srcs:
                assert (ROOT / src).exists(), f"COPY {src} in stage {s['name']}: no such path"
                assert src not in ignored, f"COPY {src} but .dockerignore leaves it out of the context"
        assert s["entrypoint"] == ["trifecta"] and scripts["trifecta"] == "client.cli:main"
        build_parser().parse_args(s["cmd"])  # the default command is a real `trifecta` command line
    # the packages the images install hold the whole code base, the page included
    copied = {src for s in stages for srcs in s["copy"] for src in srcs}
    assert {"pyproject.toml", "api", "tasks", "workers", "storage", "client"} <= copied
    assert "static/*" in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["api"]
    # what each image installs: the API no model runtime, the ONNX workers no torch, CUDA images onnxruntime-gpu
    runs = {t: " ".join(by[t]["run"][1:]) for t in TARGETS}  # [0] is the base stage's own RUN
    assert re.search(r"pip install \.(\s|$)", runs["api"]) and "torch" not in runs["api"] and "[worker" not in runs["api"]
    for t in ("worker-onnx", "worker-onnx-cuda"):
        assert 'pip install ".[worker]"' in runs[t] and "torch" not in runs[t]
    for t in ("worker-torch", "worker-torch-cuda"):
        assert 'pip install ".[worker,torch]"' in runs[t] and '"torch==${TORCH_VERSION}"' in runs[t]
    for t in ("worker-onnx-cuda", "worker-torch-cuda"):
        assert runs[t].index("pip uninstall -y onnxruntime") < runs[t].index('pip install ".[gpu]"')
        assert "cuda:0" in by[t]["cmd"]
    for t in TARGETS[1:]:
        assert "trifecta models fetch textmask" in runs[t] and build_parser().parse_args(by[t]["cmd"]).cmd == "worker"
    assert build_parser().parse_args(by["api"]["cmd"]).cmd == "api"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def ours(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if str(s.get("image", "")).startswith("trifecta:")}


def test_compose_services_and_their_commands(compose: dict) -> None:
    svc = compose["services"]
    assert {"redis", "minio", "minio-init", "api", "worker-cpu", "worker-gpu0", "worker-gpu1", "flower"} <= set(svc)
    assert svc["redis"]["command"][:3] == ["redis-server", "--appendonly", "yes"]
    init = " ".join(svc["minio-init"]["command"])
    bucket = interpolate(svc["api"]["environment"]["STORAGE_URL"]).split("/")[2]
    assert f"mc mb --ignore-existing local/{bucket}" in init
    assert svc["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    parser = build_parser()
    cmds = {}
    for name, s in ours(compose).items():
        args = [interpolate(a) for a in s["command"]]
        cmds[name] = parser.parse_args(args)  # argparse exits on an unknown command or option
        assert s["build"]["target"] == s["image"].split(":")[1]
    assert cmds["api"].cmd == "api" and cmds["api"].host == "0.0.0.0" and cmds["api"].workers == 2
    assert cmds["flower"].cmd == "flower" and cmds["flower"].host == "0.0.0.0"
    assert cmds["worker-cpu"].cmd == "worker" and cmds["worker-cpu"].device == "cpu"
    for dep in ("redis", "minio-init"):
        assert dep in svc["api"]["depends_on"] and dep in svc["worker-cpu"]["depends_on"]


def test_one_worker_per_gpu_with_a_device_reservation(compose: dict) -> None:
    parser = build_parser()
    gpus = {n: s for n, s in ours(compose).items() if n.startswith("worker-gpu")}
    assert sorted(gpus) == ["worker-gpu0", "worker-gpu1"]
    seen = set()
    for name, s in gpus.items():
        a = parser.parse_args([interpolate(x) for x in s["command"]])
        n = int(name.removeprefix("worker-gpu"))
        assert a.cmd == "worker" and a.device == f"cuda:{n}" and a.name == f"gpu{n}" and a.model == "segmentation"
        seen.add(a.device)
        assert s["image"] == "trifecta:worker-torch-cuda" and s["profiles"] == ["gpu"]
        (dev,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
    assert seen == {"cuda:0", "cuda:1"}


def test_every_variable_set_for_our_services_is_a_real_setting(compose: dict) -> None:
    fields = {f.upper() for f in Settings.model_fields}
    for name, s in ours(compose).items():
        env = {k: interpolate(str(v)) for k, v in s["environment"].items()}
        unknown = sorted(k for k in env if k not in fields and k not in KNOWN_FOREIGN and not k.startswith("FLOWER_"))
        assert not unknown, f"{name} sets {unknown}, which no setting reads"
        # and the values (defaults filled in as compose does) are valid settings
        Settings(**{k.lower(): v for k, v in env.items() if k in fields and v != ""})
    api_env, flower_env = compose["services"]["api"]["environment"], compose["services"]["flower"]["environment"]
    assert flower_env["REDIS_URL"] == api_env["REDIS_URL"] == compose["services"]["worker-gpu1"]["environment"]["REDIS_URL"]
    assert "FLOWER_BASIC_AUTH" in flower_env and "FLOWER_BASIC_AUTH" in {f.upper() for f in Settings.model_fields}
    assert "PROMETHEUS_MULTIPROC_DIR" in api_env


def test_readme_and_makefile_cover_the_operator_path() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    for heading in ("## Flower", "## Metrics", "## Health", "## Webhooks", "## Result lifetime", "## Python SDK", "## CLI", "## Results page", "## Docker Compose"):  # docs/operations.md
        assert heading in doc, heading
    mk = (ROOT / "Makefile").read_text()
    assert re.search(r"^install: .*browser", mk, re.M) and "apt-get install -y -qq chromium chromium-driver" in mk
    assert "command -v chromium" in mk and "command -v chromedriver" in mk  # skipped when present
