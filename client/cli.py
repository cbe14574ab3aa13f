"""`trifecta`: run the service (up, api, worker), manage models, and use it (submit, status, fetch, cancel, bench)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
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

    s = _settings()
    common: dict[str, Any] = dict(host=a.host, port=a.port or s.api_port, loop="uvloop", http="httptools", log_level=a.log_level.lower(), access_log=False, timeout_keep_alive=30, backlog=4096)
    if a.workers > 1:
        # several processes: prometheus-client keeps their counters in files under
        # PROMETHEUS_MULTIPROC_DIR and any process's /metrics adds them all up; the
        # directory is emptied first so a restart does not count old processes twice
        d = Path(s.prometheus_multiproc_dir or Path(s.run_dir) / "prometheus").resolve()
        d.mkdir(parents=True, exist_ok=True)
        for f in d.glob("*.db"):
            f.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(d)
        uvicorn.run("api.app:create_app", factory=True, workers=a.workers, **common)
        return 0
    if s.prometheus_multiproc_dir:  # one process of several started elsewhere: the directory must exist
        Path(s.prometheus_multiproc_dir).mkdir(parents=True, exist_ok=True)
    from api.app import create_app

    uvicorn.run(create_app(s), **common)
    return 0


def cmd_flower(a: argparse.Namespace) -> int:
    """Flower on the same broker; FLOWER_BASIC_AUTH travels in the environment (never on the command line)."""
    s = _settings()
    env = dict(os.environ, CELERY_BROKER_URL=s.redis_url)
    if s.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = s.flower_basic_auth
    # Flower turns on per-task events in every worker unless told not to: follow TASK_EVENTS
    # (workers, queues and heartbeats show either way; the task list needs TASK_EVENTS=true)
    argv = [sys.executable, "-m", "celery", "flower", f"--port={a.port or s.flower_port}", f"--address={a.host}", f"--enable_events={s.task_events}"]
    os.execve(sys.executable, argv, env)
    return 0  # pragma: no cover - execve does not return


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


def _progress_of(st: dict[str, Any]) -> tuple[float | None, float, str]:
    """(total, completed, description) of a job's progress, whatever kind of job it is."""
    p = st.get("progress") or {}
    if p.get("samples_total"):  # shard jobs
        return p["samples_total"], p.get("samples_done", 0) + p.get("samples_failed", 0), f"{p.get('shards_done', 0)}/{p.get('shards_total', '?')} shards"
    if p.get("total"):  # video / frames jobs: clips
        return p["total"], p.get("done", 0), f"{st['status']} {p.get('done', 0)}/{p['total']}"
    return None, 0, st["status"]


def cmd_submit(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    c = _client(a)
    params = json.loads(a.params) if a.params else {}
    if a.format:
        params["format"] = a.format
    if not a.files and not a.shards:
        print("error: give image files and/or --shards", file=sys.stderr)
        return 2
    jobs = []
    if a.shards:
        jobs.append(c.submit_shards(a.model, a.shards, params, a.idempotency_key, a.callback_url))
    for f in a.files:
        jobs.append(c.submit_image(a.model, f, params, a.idempotency_key if len(a.files) == 1 else None, a.callback_url))
    if not a.wait:
        _out(a, jobs, "\n".join(f"{j['job_id']} {j['status']}" for j in jobs))
        return 0
    # progress goes to stderr, so stdout stays the result (and pure JSON with --json)
    console = Console(stderr=True)
    final: list[dict[str, Any]] = []
    cols = (SpinnerColumn(), TextColumn("{task.fields[job]}"), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*cols, console=console, disable=a.json or not console.is_terminal, transient=False) as prog:
        tasks = {j["job_id"]: prog.add_task("queued", total=None, job=j["job_id"][:12]) for j in jobs}
        pending = [j["job_id"] for j in jobs]
        done: dict[str, dict[str, Any]] = {}
        while pending:
            for jid in list(pending):
                st = c.job(jid)
                total, completed, desc = _progress_of(st)
                if st["status"] in TERMINAL:
                    pending.remove(jid)
                    done[jid] = st
                    total = total or 1
                    completed = total
                prog.update(tasks[jid], total=total, completed=completed, description=desc)
            if pending:
                time.sleep(0.2)
        final = [done[j["job_id"]] for j in jobs]
    human = []
    for st in final:
        outs = ((st.get("result") or {}).get("outputs")) or []
        where = ", ".join(o.get("url", o["path"]) for o in outs)
        human.append(f"{st['job_id']} {st['status']} {where}{' ' + json.dumps(st['error']) if st.get('error') else ''}")
    _out(a, final, "\n".join(human))
    return 0 if all(s["status"] == "succeeded" for s in final) else 1


TERMINAL = ("succeeded", "failed", "cancelled", "expired")


def _job_line(st: dict[str, Any]) -> str:
    total, completed, _ = _progress_of(st)
    prog = f" {int(completed)}/{int(total)}" if total else ""
    t = (st.get("result") or {}).get("timing") or {}
    times = f" queue {t['queue_ms']:.0f} ms, model {t['model_ms']:.0f} ms" if "queue_ms" in t and "model_ms" in t else ""
    err = f" {st['error'].get('code')}: {st['error'].get('message')}" if st.get("error") else ""
    outs = ", ".join(o["key"] for o in ((st.get("result") or {}).get("outputs") or []))
    return f"{st['job_id']} {st['status']} {st.get('model', '')}{prog}{times}{' outputs: ' + outs if outs else ''}{err}"


def cmd_status(a: argparse.Namespace) -> int:
    c = _client(a)
    if a.job_id:
        st = c.job(a.job_id)
        _out(a, st, _job_line(st))
        return 0
    lst = c.jobs(a.limit)
    _out(a, lst, "\n".join(_job_line(j) if "model" in j else f"{j['job_id']} {j['status']}" for j in lst["jobs"]) or "no jobs")
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


def cmd_storage(a: argparse.Namespace) -> int:
    from client.storage_cmd import main as storage_main

    return storage_main(a)


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
    s.add_argument("--workers", type=int, default=1, help="API processes (metrics add up through PROMETHEUS_MULTIPROC_DIR)")
    s.set_defaults(fn=cmd_api)

    s = sub.add_parser("flower", help="run Flower (Celery's dashboard) on the same broker: workers, queues, tasks")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=None, help="default FLOWER_PORT")
    s.set_defaults(fn=cmd_flower)

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

    s = sub.add_parser("storage", help="storage upkeep: `lifecycle [--apply]` prints (sets) the S3 lifecycle rule backing the janitor; `sweep [--all]` runs one janitor pass")
    s.add_argument("action", choices=["lifecycle", "sweep"])
    s.add_argument("--apply", action="store_true", help="lifecycle: set the rule on the bucket (other rules kept)")
    s.add_argument("--days", type=int, default=None, help="lifecycle: expire job objects after this many days (default: RESULT_TTL_SECONDS in days + 1)")
    s.add_argument("--all", action="store_true", help="sweep: list the whole store and delete every job prefix without a record (one-off; costs what is stored)")
    s.set_defaults(fn=cmd_storage)

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
    s.add_argument("--callback-url", default=None, help="POSTed the job's status JSON when it finishes (signed; see WEBHOOK_*)")
    s.add_argument("--wait", action="store_true", help="wait for the jobs, with progress bars on stderr")
    client_args(s)
    s.set_defaults(fn=cmd_submit)

    s = sub.add_parser("status", help="a job's status (or the job list)")
    s.add_argument("job_id", nargs="?")
    s.add_argument("--limit", type=int, default=20, help="jobs listed without a job id")
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
            if getattr(args, "json", False):  # scripts get the service's error body on stdout too
                print(json.dumps({"status": e.status, **(e.body if isinstance(e.body, dict) else {"error": {"message": str(e.body)}})}, indent=2))
            return 2
        import httpx

        if isinstance(e, httpx.TransportError):
            print(f"error: cannot reach {getattr(args, 'url', None) or os.environ.get('TRIFECTA_URL') or 'http://127.0.0.1:8080'} ({e})", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
