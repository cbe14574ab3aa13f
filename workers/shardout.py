"""A shard job's end: the job manifest (every sample of every shard) written once, and the job finished."""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import orjson

from tasks.errors import TrifectaError, translate
from tasks.jobstore import error
from tasks.jobstore import shards as shardjobs

log = logging.getLogger("trifecta.shards")


# ---------------------------------------------------------------- the job's end
def finish_job(svc: Any, kw: dict[str, Any]) -> None:
    """Write the job manifest (every sample of every shard) and finish the job once.

    Any delivery that finds every shard recorded may run this; the manifest is the same
    whoever writes it, and the FINISH script lands once.
    """
    job = kw["job"]
    results = shardjobs.results(svc.r, job)
    manifest_key = f"{kw['out_prefix']}/manifest.json"
    done = sum(x["done"] for x in results)
    failed = sum(x["failed"] for x in results)
    try:
        nbytes = write_job_manifest(svc, kw, results, manifest_key, done, failed)
    except Exception as e:  # storage failed after retries: finish anyway, saying so
        te = translate(e)
        log.error("job=%s manifest not written: %s", job, te.message)
        nbytes = -1
    outputs = [x["output"] for x in results if x.get("output")]
    if nbytes >= 0:
        outputs.append({"key": "manifest.json", "format": "json", "path": manifest_key, "bytes": nbytes, "content_type": "application/json"})
    result = {
        "outputs": outputs,
        "manifest": manifest_key if nbytes >= 0 else None,
        "shards": [{k: x[k] for k in ("index", "input", "status", "samples", "done", "failed", "errors", "error", "worker")} for x in results],
        "counts": {"shards": len(results), "samples": done + failed, "done": done, "failed": failed},
        "worker": svc.worker_id,
        "device": str(svc.device),
        "trained": svc.runner.trained,
    }
    status, landed = shardjobs.finish(svc.r, job, result, done, failed, manifest_written=nbytes >= 0)
    if landed:
        log.info("job=%s model=%s status=%s shards=%d done=%d failed=%d manifest=%s", job, kw["model"], status, len(results), done, failed, manifest_key)


def write_job_manifest(svc: Any, kw: dict[str, Any], results: list[dict[str, Any]], manifest_key: str, done: int, failed: int) -> int:
    """Stream the job manifest to a temp file (never the whole list in memory), then store it whole."""
    job = kw["job"]
    with tempfile.TemporaryFile(prefix="trifecta-manifest-") as f:
        f.write(b'{"job_id":' + orjson.dumps(job) + b',"model":' + orjson.dumps(kw["model"]) + b',"format":' + orjson.dumps(kw.get("format", "packbits")))
        f.write(b',"counts":' + orjson.dumps({"shards": len(results), "samples": done + failed, "done": done, "failed": failed}))
        f.write(b',"shards":' + orjson.dumps([{k: x[k] for k in ("index", "input", "status", "samples", "done", "failed", "errors", "error", "worker", "manifest")} | {"output": (x.get("output") or {}).get("path")} for x in results]))
        f.write(b',"samples":[')
        first = True
        for x in results:
            try:
                sm = orjson.loads(svc.store.get(x["manifest"]))
            except Exception as e:  # a shard whose manifest could not be written: its summary stands
                sm = {"samples": [], "errors": [{"key": None, "status": "failed", "error": _err(translate(e))}]}
            for s in sm.get("samples", []) + sm.get("errors", []):
                f.write((b"" if first else b",") + orjson.dumps({"shard": x["index"], **s}))
                first = False
        f.write(b"]}")
        nbytes = f.tell()
        f.seek(0)
        svc.store.put_stream(manifest_key, f, "application/json")
    return nbytes


def _err(e: TrifectaError) -> dict[str, Any]:
    return error(e)
