"""Property-based fuzzing of the whole OpenAPI schema (schemathesis) against a live API + echo worker.

Every operation the API publishes is called with schema-conforming (positive) and
schema-violating (negative) requests; none may answer 5xx. The one 5xx that is a correct
answer here is `503 no_worker` from a route whose model has no worker in this stack (only
`echo` runs): the route is still exercised up to that point and nothing is excluded.
Examples are bounded (EXAMPLES per operation and mode, derandomized so a run is repeatable)
to keep the test under a minute on 2 cores.
"""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

EXAMPLES = 15
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


@pytest.fixture(scope="module")
def stack(make_stack):
    return make_stack(models=["echo"], env={"MAX_BODY_BYTES": str(4 << 20)})


def _server_error(r, served: set[str]) -> str | None:
    if r.status_code < 500:
        return None
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"{r.status_code} {r.text[:200]}"
    if r.status_code == 503 and err.get("code") == "no_worker" and not any(f"{m!r}" in err.get("message", "") for m in served):
        return None  # the documented answer for a model without a worker; `echo` must never get it
    return f"{r.status_code} {err}"


def fuzz(op, mode: GenerationMode, url: str) -> tuple[list[str], int]:
    """Up to EXAMPLES generated calls of one operation: (the 5xx answers, the number of calls)."""
    found: list[str] = []
    calls = [0]

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case) -> None:
        calls[0] += 1
        r = case.call(base_url=url, timeout=30)
        bad = _server_error(r, {"echo"})
        if bad:
            found.append(f"{case.method} {case.formatted_path}: {bad}\n  {case.as_curl_command()[:400]}")

    run()
    return found, calls[0]


def test_openapi_fuzz_no_server_errors(stack) -> None:
    schema = schemathesis.openapi.from_url(stack.url + "/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        op = result.ok()  # an Err here is a schema our app publishes but schemathesis cannot read: a failure
        operations.append(op)
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /v1/jobs", "GET /v1/jobs/{job_id}", "POST /run_echo", "GET /health"} <= labels, labels

    failures: list[str] = []
    no_negative: list[str] = []
    calls = 0
    t0 = time.monotonic()
    for op in operations:
        for mode in MODES:
            try:
                found, n = fuzz(op, mode, stack.url)
            except Unsatisfiable:
                # nothing in this operation's schema can be violated (no parameters, no body): no negative case exists
                assert mode is GenerationMode.NEGATIVE, f"{op.method.upper()} {op.path}: no positive case could be generated"
                no_negative.append(f"{op.method.upper()} {op.path}")
                continue
            calls += n
            failures.extend(f"({mode}) {f}" for f in found)
    elapsed = time.monotonic() - t0
    assert not failures, "\n".join(failures[:20])
    assert calls >= len(operations), (calls, len(operations))  # every operation called at least once
    # the service still answers a normal request after the whole run
    r = httpx.post(stack.url + "/run_echo", content=b"after the fuzz", headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert r.status_code == 200 and r.json()["bytes"] == len(b"after the fuzz")
    print(f"fuzzed {len(operations)} operations with {calls} requests in {elapsed:.1f}s; without negative cases: {no_negative}")
