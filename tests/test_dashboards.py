"""deploy/grafana and deploy/prometheus: every PromQL expression parses, and every metric it reads
is one the running service exports (the live API's /metrics and a worker's own metrics port)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tasks.embedded_redis import free_port
from tests.conftest import photo, png_bytes

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "trifecta.json"
RULES = ROOT / "deploy" / "prometheus" / "trifecta-rules.yaml"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",), "summary": ("_sum", "_count", "_created", "")}


def grafana_exprs() -> dict[str, str]:
    d = json.loads(DASHBOARD.read_text())
    out = {}
    for p in d["panels"]:
        for t in p.get("targets", []):
            out[f"{p['title']} / {t['refId']}"] = t["expr"]
    return out


def rule_exprs() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


def metric_names(expr: str) -> set[str]:
    # Grafana's variables as Grafana fills them in, then the real PromQL parser (the Rust
    # promql-parser crate that GreptimeDB uses) walks the expression for its selectors
    expr = expr.replace("$__rate_interval", "5m").replace("$model", ".*")
    names: set[str] = set()

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def exported(text: str) -> set[str]:
    """Every series name an exposition declares, with or without samples yet."""
    out: set[str] = set()
    for fam in text_string_to_metric_families(text):
        out.update(fam.name + s for s in SUFFIXES.get(fam.type, ("",)))
        out.update(s.name for s in fam.samples)
    return out


def test_expressions_parse_and_cover_what_operators_look_for() -> None:
    g, r = grafana_exprs(), rule_exprs()
    for e in [*g.values(), *r.values()]:
        assert metric_names(e), e
    titles = " | ".join(g)
    for want in ("Request rate by route", "Responses by status", "503", "504", "Queue depth by model", "Queue wait", "Model time", "Batch size", "Live workers", "Worker memory", "GPU memory"):
        assert want in titles, want
    assert {"TrifectaBacklogGrowing", "TrifectaHigh5xxRate", "TrifectaNoLiveWorker", "TrifectaWorkerMemoryNearLimit"} <= set(r)
    for rule in (x for grp in yaml.safe_load(RULES.read_text())["groups"] for x in grp["rules"]):
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"] and re.fullmatch(r"\d+[smh]", rule["for"])
    with pytest.raises(ValueError):  # a broken expression is refused (the parser is not a no-op)
        metric_names("sum(rate(trifecta_http_requests_total[5m])")


def test_every_metric_used_is_exported(make_stack) -> None:  # noqa: ANN001
    wport = free_port()
    st = make_stack(models=["textmask"], env={"WORKER_METRICS_PORT": str(wport), "WORKER_MAX_MEMORY_MB": "4000"})
    body = png_bytes(photo("text.png"))
    assert httpx.post(f"{st.url}/run_textmask?format=png", content=body, headers={"Content-Type": "image/png"}, timeout=60).status_code == 200
    assert httpx.get(f"{st.url}/no/such/route", timeout=10).status_code == 404
    api_text = httpx.get(f"{st.url}/metrics", timeout=10).text
    worker_text = httpx.get(f"http://127.0.0.1:{wport}/metrics", timeout=10).text
    have = exported(api_text) | exported(worker_text)
    used = {n: e for k, e in {**grafana_exprs(), **rule_exprs()}.items() for n in metric_names(e)}
    missing = sorted(set(used) - have)
    assert not missing, f"used but not exported: {missing}"
    assert len(used) >= 15

    # the series the memory alert divides carry real values, on the API and on the worker's port
    def value(text: str, name: str) -> float:
        (v,) = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name and s.labels.get("model") == "textmask"]
        return v

    assert value(worker_text, "trifecta_worker_memory_limit_bytes") == 4000e6
    assert 10e6 < value(worker_text, "trifecta_worker_rss_bytes") < 4000e6
    assert value(worker_text, "trifecta_worker_gpu_memory_bytes") == 0  # a CPU worker
    assert value(api_text, "trifecta_worker_memory_limit_bytes") == 4000e6  # from the worker's registration
    assert 10e6 < value(api_text, "trifecta_worker_rss_bytes") < 4000e6
    assert value(api_text, "trifecta_workers_live") == 1
