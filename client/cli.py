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
from urllib.parse import urljoin

from tasks.keys import TERMINAL

log = logging.getLogger("trifecta.cli")
# the commands that talk to a running service as a client: quiet by default (warnings only, no
# httpx request lines), a user mistake is one line on stderr and exit status 2
CLIENT_COMMANDS = ("submit", "status", "fetch", "cancel", "overlay")


class UserError(Exception):
    """A mistake the user can fix (a missing file, an output the command cannot write): one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake on one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _settings() -> Any:
    from tasks.settings import get_settings

    return get_settings()


# ---------------------------------------------------------------- server side
def cmd_api(a: argparse.Namespace) -> int:
    import uvicorn

    s = _settings()
    common: dict[str, Any] = dict(host=a.host, port=a.port or s.api_port, loop="uvloop", http="api.server:GuardedHttpToolsProtocol", log_level=_log_level(a).lower(), access_log=False, timeout_keep_alive=30, backlog=4096)
    if s.log_format == "json":  # uvicorn's own lines go to the root logger's JSON handler, not its text one
        common["log_config"] = None
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
    s.require_deployable("flower")  # outside ENV=local: no Flower without FLOWER_BASIC_AUTH
    env = dict(os.environ, CELERY_BROKER_URL=s.redis_url)
    if s.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = s.flower_basic_auth
    # Flower turns on per-task events in every worker unless told not to: follow TASK_EVENTS
    # (workers, queues and heartbeats show either way; the task counts and list need TASK_EVENTS=true).
    # Our app (tasks/flower_app.py) declares every model's queue, so the Broker page lists them.
    argv = [sys.executable, "-m", "celery", "-A", "tasks.flower_app", "flower", f"--port={a.port or s.flower_port}", f"--address={a.host}", f"--enable_events={s.task_events}"]
    os.execve(sys.executable, argv, env)
    return 0  # pragma: no cover - execve does not return


def cmd_worker(a: argparse.Namespace) -> int:
    from workers.main import run_worker

    run_worker(a.model, a.device, a.name, _settings(), loglevel=_log_level(a))
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

    try:
        params = json.loads(a.params) if a.params else {}
    except json.JSONDecodeError as e:
        raise UserError(f"--params is not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise UserError('--params must be a JSON object, e.g. \'{"format": "png"}\'')
    if a.format:
        params["format"] = a.format
    if not a.files and not a.shards:
        raise UserError("give image files and/or --shards")
    for f in a.files:  # every file before any job is submitted: a typo submits nothing
        if not Path(f).is_file():
            raise UserError(f"{f}: no such file" if not Path(f).exists() else f"{f}: not a file")
    c = _client(a)
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
        for o in outs:  # the service gives a path on itself (or a presigned URL): absolute, to paste anywhere
            if o.get("url"):
                o["url"] = urljoin(c.url + "/", o["url"])
        where = ", ".join(o.get("url", o["path"]) for o in outs)
        human.append(f"{st['job_id']} {st['status']} {where}{' ' + json.dumps(st['error']) if st.get('error') else ''}")
    _out(a, final, "\n".join(human))
    return 0 if all(s["status"] == "succeeded" for s in final) else 1


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
    """The output as stored, or, for `-o NAME.png`, the mask as a PNG whatever it was stored as."""
    out = Path(a.output)
    if out.parent and not out.parent.is_dir():
        raise UserError(f"{a.output}: the directory {out.parent} does not exist")
    got = _client(a).fetch_output(a.job_id, a.key)
    data, fmt = got.data, got.format
    if out.suffix.lower() == ".png" and fmt != "png":
        from storage import codecs

        if fmt not in ("packbits", "rle"):
            raise UserError(f"the output is {fmt or got.content_type} (not a mask): it cannot be written as a PNG; use another file name than {a.output}")
        try:
            data = codecs.encode_png(codecs.decode(data, fmt))
        except Exception as e:  # an `rle` document of several objects (SAM3 instances) is not one mask
            raise UserError(f"the output is not a single {fmt} mask ({type(e).__name__}): it cannot be written as a PNG; use another file name than {a.output}") from None
        fmt = "png"
    out.write_bytes(data)
    _out(a, {"job_id": a.job_id, "output": a.output, "bytes": len(data), "format": fmt}, f"wrote {len(data)} bytes ({fmt}) to {a.output}")
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

    p = Parser(prog="trifecta", description=__doc__)
    p.add_argument("--log-level", default=None, help="INFO for the service commands; client commands log warnings only unless -v")
    p.add_argument("-v", "--verbose", action="count", default=0, help="client commands: log requests (-v) and more (-vv); any error with its traceback")
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
    s.add_argument("--device", default=None, help="device of the in-process torch section (cpu or cuda:N)")
    s.add_argument("--note", default=None, help="a line saying how this run was made, kept in bench.json and shown above the docs' table")
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
        x.add_argument("--json", action="store_true", help="machine-readable output: stdout holds only JSON (errors too)")
        x.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="log each request; show tracebacks")

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
    s.add_argument("-o", "--output", required=True, help="file to write; a name ending in .png gets the mask as a PNG whatever format it was stored in")
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
    s.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="show tracebacks")
    s.set_defaults(fn=cmd_overlay)
    return p


def _log_level(args: argparse.Namespace) -> str:
    if args.log_level:
        return args.log_level.upper()
    if args.cmd in CLIENT_COMMANDS:
        return "DEBUG" if args.verbose > 1 else "INFO" if args.verbose else "WARNING"
    return "INFO"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tasks import logs

    logs.setup(_log_level(args))  # text, or JSON lines with LOG_FORMAT=json (tasks/logs.py)
    if not args.verbose:  # httpx logs every request at INFO: noise in a terminal and in the service logs
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.cmd not in CLIENT_COMMANDS or args.verbose:
            raise
        return _report(args, e)


def _report(args: argparse.Namespace, e: Exception) -> int:
    """A client command's failure as one line on stderr (and, with --json, one JSON object on stdout)."""
    import httpx

    from client.sdk import TrifectaClientError

    status: int | None = None
    if isinstance(e, TrifectaClientError):
        body = e.body if isinstance(e.body, dict) and isinstance(e.body.get("error"), dict) else {"error": {"code": "http_error", "message": str(e.body)}}
        status, code, msg = e.status, body["error"].get("code", "http_error"), str(e)
    elif isinstance(e, httpx.TransportError):
        url = getattr(args, "url", None) or os.environ.get("TRIFECTA_URL") or "http://127.0.0.1:8080"
        code, msg = "unreachable", f"cannot reach {url} ({e or type(e).__name__}); is `trifecta up` running there? (--url / TRIFECTA_URL)"
    elif isinstance(e, UserError):
        code, msg = "usage", str(e)
    elif isinstance(e, OSError):  # a file that is missing, unreadable or not an image
        code, msg = "file", f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
    else:
        print(f"error: unexpected {type(e).__name__}: {' '.join(str(e).split())} (run with -v for the traceback)", file=sys.stderr)
        return 1
    msg = " ".join(msg.split())  # one line, whatever the server or the OS said
    print(f"error: {msg}", file=sys.stderr)
    if getattr(args, "json", False):  # scripts get the error on stdout too, as JSON
        out: dict[str, Any] = {"error": {"code": code, "message": msg}}
        if isinstance(e, TrifectaClientError):
            out = {"status": status, **body}
        print(json.dumps(out, indent=2))
    return 2


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
