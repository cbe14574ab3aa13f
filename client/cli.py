"""`trifecta`: run the service (up, api, worker), manage models, and use it (submit, status, fetch, cancel, bench)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("trifecta.cli")


def _settings() -> Any:
    from tasks.settings import get_settings

    return get_settings()


# ---------------------------------------------------------------- server side
def cmd_api(a: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app

    s = _settings()
    uvicorn.run(create_app(s), host=a.host, port=a.port or s.api_port, loop="uvloop", http="httptools", log_level=a.log_level.lower(), access_log=False, timeout_keep_alive=30, backlog=4096)
    return 0


def cmd_worker(a: argparse.Namespace) -> int:
    from workers.service import run_worker

    run_worker(a.model, a.device, a.name, _settings(), loglevel=a.log_level.upper())
    return 0


def cmd_up(a: argparse.Namespace) -> int:
    from client.supervisor import up

    return up(api_host=a.host, api_port=a.port, no_flower=a.no_flower)


def cmd_models(a: argparse.Namespace) -> int:
    s = _settings()
    if a.action == "fetch":
        from workers.modelfiles import ensure_segmentation, fetch_textmask

        for m in a.names or list(s.models):
            if m == "textmask":
                print(fetch_textmask(s.model_dir, s.textmask_onnx_filename))
            elif m == "segmentation" and not s.hf_repo_id:
                print(ensure_segmentation(s.model_dir))
            else:
                from workers.tiny import ensure_model

                print(ensure_model(m, s))
        return 0
    if a.action == "tiny":
        from workers.tiny import write_tiny

        print(write_tiny(a.names[0], a.names[1] if len(a.names) > 1 else os.path.join(s.model_dir, a.names[0])))
        return 0
    from tasks.models import MODELS

    for name, spec in MODELS.items():
        print(f"{name:14s} {spec.description}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from workers.modelfiles import export_segformer

    print(export_segformer(a.output_dir, pretrained=a.pretrained, random_init=a.random_init or not a.pretrained, input_size=a.input_size))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from client.bench import main as bench_main

    return bench_main(a)


def cmd_settings(a: argparse.Namespace) -> int:
    from tasks.settings import Settings

    print("| variable | default | what it does |\n| --- | --- | --- |")
    for name, f in Settings.model_fields.items():
        d = f.default if f.default_factory is None else f.default_factory()
        d = ",".join(map(str, d)) if isinstance(d, list) else d
        print(f"| `{name.upper()}` | `{d}` | {f.description or ''} |")
    return 0


# ---------------------------------------------------------------- client side
def _client(a: argparse.Namespace) -> Any:
    from client.sdk import Client

    return Client(a.url, a.api_key)


def _out(a: argparse.Namespace, obj: Any, human: str) -> None:
    print(json.dumps(obj, indent=2) if a.json else human)


def cmd_submit(a: argparse.Namespace) -> int:
    from rich.progress import Progress

    c = _client(a)
    params = json.loads(a.params) if a.params else {}
    if a.format:
        params["format"] = a.format
    jobs = []
    if a.shards:
        jobs.append(c.submit({"model": a.model, "input": {"shards": a.shards}, "params": params}, a.idempotency_key))
    for f in a.files:
        jobs.append(c.submit_image(a.model, f, params, a.idempotency_key if len(a.files) == 1 else None))
    if not a.wait:
        _out(a, jobs, "\n".join(f"{j['job_id']} {j['status']}" for j in jobs))
        return 0
    final = []
    with Progress(disable=a.json or (len(jobs) < 2 and not a.shards)) as prog:
        task = prog.add_task("jobs", total=len(jobs))
        for j in jobs:
            while True:
                st = c.job(j["job_id"])
                p = st.get("progress") or {}
                if p.get("samples_total"):
                    prog.update(task, total=p["samples_total"], completed=p.get("samples_done", 0) + p.get("samples_failed", 0), description=f"{p.get('shards_done', 0)}/{p.get('shards_total', '?')} shards")
                if st["status"] in ("succeeded", "failed", "cancelled", "expired"):
                    break
                time.sleep(0.2)
            final.append(st)
            if not p.get("samples_total"):
                prog.advance(task)
    human = []
    for st in final:
        outs = ((st.get("result") or {}).get("outputs")) or []
        where = ", ".join(o.get("url", o["path"]) for o in outs)
        human.append(f"{st['job_id']} {st['status']} {where}{' ' + json.dumps(st['error']) if st.get('error') else ''}")
    _out(a, final, "\n".join(human))
    return 0 if all(s["status"] == "succeeded" for s in final) else 1


def cmd_status(a: argparse.Namespace) -> int:
    c = _client(a)
    st = c.job(a.job_id) if a.job_id else c.jobs()
    _out(a, st, json.dumps(st, indent=2))
    return 0


def cmd_fetch(a: argparse.Namespace) -> int:
    c = _client(a)
    data = c.fetch(a.job_id, a.key)
    Path(a.output).write_bytes(data)
    _out(a, {"job_id": a.job_id, "output": a.output, "bytes": len(data)}, f"wrote {len(data)} bytes to {a.output}")
    return 0


def cmd_cancel(a: argparse.Namespace) -> int:
    r = _client(a).cancel(a.job_id)
    _out(a, r, f"{r['job_id']} {r['status']}")
    return 0


def cmd_overlay(a: argparse.Namespace) -> int:
    from client.overlay import overlay_files

    overlay_files(a.image, a.mask, a.output)
    print(a.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tasks.models import MODEL_NAMES

    p = argparse.ArgumentParser(prog="trifecta", description=__doc__)
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("up", help="start Redis (if needed), one worker per model, the API and Flower; Ctrl-C stops all")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--no-flower", action="store_true")
    s.set_defaults(fn=cmd_up)

    s = sub.add_parser("api", help="run the HTTP API")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=None)
    s.set_defaults(fn=cmd_api)

    s = sub.add_parser("worker", help="run one worker: one model on one device")
    s.add_argument("--model", required=True, choices=MODEL_NAMES)
    s.add_argument("--device", default="cpu", help="cpu or cuda:N")
    s.add_argument("--name", default=None, help="worker id (default host-pid); its private queue is <model>.<id>")
    s.set_defaults(fn=cmd_worker)

    s = sub.add_parser("models", help="list models; `models fetch [NAME…]` gets default models; `models tiny NAME DIR` writes a tiny random-init checkpoint")
    s.add_argument("action", nargs="?", default="list", choices=["list", "fetch", "tiny"])
    s.add_argument("names", nargs="*")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("export-onnx", help="export a SegFormer to segmentation.onnx + config (pretrained id, or --random-init offline)")
    s.add_argument("--output-dir", default="./models/segmentation")
    s.add_argument("--pretrained", default=None, help="hub id, e.g. nvidia/segformer-b0-finetuned-ade-512-512")
    s.add_argument("--random-init", action="store_true", help="small untrained SegFormer (clearly labelled)")
    s.add_argument("--input-size", type=int, default=512)
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("bench", help="measure end-to-end against the raw model, in one run")
    s.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    s.add_argument("--only", default=None, help="comma-separated sections")
    s.add_argument("--output", default="bench.json")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("settings", help="print every setting as a Markdown table")
    s.set_defaults(fn=cmd_settings)

    def client_args(x: argparse.ArgumentParser) -> None:
        x.add_argument("--url", default=None, help="server URL (TRIFECTA_URL)")
        x.add_argument("--api-key", default=None, help="API key (TRIFECTA_API_KEY)")
        x.add_argument("--json", action="store_true", help="machine-readable output")

    s = sub.add_parser("submit", help="submit images (or --shards) as jobs")
    s.add_argument("files", nargs="*")
    s.add_argument("--model", required=True, choices=MODEL_NAMES)
    s.add_argument("--shards", nargs="*", default=None, help="WebDataset shard URIs (brace notation allowed)")
    s.add_argument("--format", default=None, choices=["packbits", "png", "rle"])
    s.add_argument("--params", default=None, help="JSON object")
    s.add_argument("--idempotency-key", default=None)
    s.add_argument("--wait", action="store_true")
    client_args(s)
    s.set_defaults(fn=cmd_submit)

    s = sub.add_parser("status", help="a job's status (or the job list)")
    s.add_argument("job_id", nargs="?")
    client_args(s)
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("fetch", help="download a job's output")
    s.add_argument("job_id")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--key", default=None)
    client_args(s)
    s.set_defaults(fn=cmd_fetch)

    s = sub.add_parser("cancel", help="cancel a job")
    s.add_argument("job_id")
    client_args(s)
    s.set_defaults(fn=cmd_cancel)

    s = sub.add_parser("overlay", help="draw a mask over a photo into a PNG")
    s.add_argument("image")
    s.add_argument("mask")
    s.add_argument("-o", "--output", default="overlay.png")
    s.set_defaults(fn=cmd_overlay)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from client.sdk import TrifectaClientError

        if isinstance(e, TrifectaClientError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
