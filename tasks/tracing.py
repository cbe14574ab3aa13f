"""OpenTelemetry tracing, off by default, configured by the standard `OTEL_*` variables.

One trace follows a request from the API through the queue to the worker:

    POST /run_textmask                  SERVER   API (FastAPI's own span; continues a caller's `traceparent`)
    ├── queue textmask                  INTERNAL from enqueue to the start of the worker's batch
    └── process textmask                CONSUMER worker: one request of a batch
        ├── decode                      runner.prepare (decode + preprocess)
        ├── model                       runner.predict, shared by the batch (links to the batch's own `model`)
        ├── encode                      runner.finish (prediction → masks, blobs, meta)
        └── storage                     codec + writes of the outputs
    batch textmask                      INTERNAL worker: the batch, a trace of its own, linked to each request's span
    └── model                           the one model call of the batch

The context travels in the Celery message headers (`traceparent`, plus `tracestate` or `baggage`
when set) by the global propagator (W3C trace context and baggage, or OTEL_PROPAGATORS).

Tracing is on when OTEL_TRACES_EXPORTER names an exporter (`otlp`, `console`, or any installed
`opentelemetry_traces_exporter` entry point, comma-separated), or when it is unset and an OTLP
endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT). Everything
else is the SDK's own environment handling: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
(`Resource.create`), OTEL_TRACES_SAMPLER(_ARG) (`TracerProvider`), OTEL_BSP_* (`BatchSpanProcessor`),
and the endpoint, headers, timeout, compression and certificate of the OTLP exporter.

When it is off nothing here imports OpenTelemetry: the hot path reads the module flag `ON`.
The SDK and the OTLP/HTTP exporter are the optional `tracing` extra (`pip install trifecta[tracing]`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from typing import Any

ON = False  # set once per process by setup(); read on the hot path
_tracer: Any = None

SERVICE_API = "trifecta-api"
SERVICE_WORKER = "trifecta-worker"


def exporter_names(env: MutableMapping[str, str] | None = None) -> list[str]:
    """The span exporters the environment asks for; [] = tracing off."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = env.get("OTEL_TRACES_EXPORTER")
    if raw is None or not raw.strip():
        # the specification's default exporter is otlp; this service sends spans only when told
        # where (an endpoint) or what (an exporter), so that tracing costs nothing by default
        return ["otlp"] if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") else []
    return [n for n in (x.strip().lower() for x in raw.split(",")) if n and n != "none"]


def setup(service: str, **attributes: str) -> bool:
    """Install the tracer provider of this process when the environment asks for tracing.
    `service`: service.name unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) names one;
    `attributes`: more resource attributes (service.instance.id ...). Returns whether tracing is on."""
    global ON, _tracer
    names = exporter_names()
    if ON or not names:
        return ON
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        raise SystemExit(f"OTEL_TRACES_EXPORTER={','.join(names)} needs the OpenTelemetry SDK: pip install 'trifecta[tracing]' ({e})") from None
    resource = Resource.create({k: v for k, v in attributes.items() if v})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER (default: parent-based, always on)
    for name in names:
        # BatchSpanProcessor for every exporter, as the SDK's own configurator does: spans are
        # exported from its thread, never on the request's path (OTEL_BSP_SCHEDULE_DELAY etc.)
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("trifecta", "0.1.0")
    ON = True
    return True


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # one JSON object per line on stdout (the SDK's default is indented over many lines),
        # so a log pipeline or `grep` takes each span whole
        return ConsoleSpanExporter(out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + "\n")
    if name == "otlp":
        protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
        # http/protobuf is the specification's default and the exporter the `tracing` extra installs;
        # grpc works once opentelemetry-exporter-otlp-proto-grpc is installed
        name = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}.get(protocol, "")
        if not name:
            raise SystemExit(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported; use http/protobuf (or grpc with opentelemetry-exporter-otlp-proto-grpc installed)")
    if name == "otlp_proto_http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint, headers, timeout, compression from OTEL_EXPORTER_OTLP_*
    from importlib.metadata import entry_points

    found = entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        raise SystemExit(f"OTEL_TRACES_EXPORTER names {name!r}, which is not installed; use otlp, console or none")
    return next(iter(found)).load()()


def tracer() -> Any:
    """This process's tracer (only while ON)."""
    return _tracer


def inject(headers: dict[str, Any]) -> None:
    """Write the current trace context into message headers (`traceparent` ...)."""
    from opentelemetry import propagate

    propagate.inject(headers)


def extract(carrier: dict[str, Any] | None) -> Any:
    """The trace context carried by message headers (an empty context when none)."""
    from opentelemetry import propagate

    return propagate.extract(carrier or {})


def name_server_span(route: str) -> None:
    """Name the current server span after a route the router did not match (the sync fast path)."""
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.update_name(f"POST {route}")
        span.set_attribute("http.route", route)


def trace_id() -> str | None:
    """The current span's trace id in hex (log lines), or None."""
    if not ON:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
