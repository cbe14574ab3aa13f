"""One shard on a worker: its tar read into webdataset samples, the read → model → write thread pipeline, its output tar and manifest."""

from __future__ import annotations

import io
import logging
import queue
import re
import tarfile
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from storage import codecs
from tasks import keys
from tasks.errors import ModelError, TrifectaError, internal, translate
from tasks.inputs import open_uri
from tasks.jobstore import error
from tasks.schemas import InferRequest
from tasks.shardsource import ShardSource, ShardTooLarge, content_length
from tasks.tars import IMAGE_EXTS, iter_members, split_key
from workers.shardout import finish_job

log = logging.getLogger("trifecta.shards")


PROGRESS_EVERY_S = 1.0

# ---------------------------------------------------------------- reading a shard
@dataclass
class Refused:
    name: str
    reason: str


def grouped(members: Any, problems: list[dict[str, Any]]) -> Any:
    """Samples as webdataset groups them (`__key__` + one entry per extension).

    Refused members ride along as `Refused` values under a reserved extension so each is
    reported with its sample; a member whose extension starts with `__` is refused (it
    would overwrite webdataset's `__key__`/`__url__`). Tar-level problems go to `problems`.
    """
    from webdataset.tariterators import group_by_keys

    def members_for_wds() -> Any:
        n = 0
        for m in members:
            name = m["fname"]
            if name is None:  # the tar ended badly: what came before stands
                problems.append({"key": None, "status": "refused", "error": _refused(m["refused"])})
                return
            key, ext = split_key(name)
            if m.get("refused") is None and ext is not None and ext.startswith("__"):
                m = {"fname": name, "data": None, "refused": f"member {name!r} has a reserved extension"}
            if m.get("refused") is not None:
                n += 1
                yield {"fname": f"{key or _flat(name)}.__refused{n}__", "data": Refused(name, m["refused"]), "__url__": ""}
            else:
                yield {"fname": name, "data": m["data"], "__url__": ""}

    def handler(exn: Exception) -> bool:
        msg = (str(exn.args[0]) if exn.args else repr(exn)).split(" dict_keys(")[0]  # "x.jpg: duplicate file name in tar file jpg"
        problems.append({"key": None, "status": "refused", "error": _refused(msg)})
        return True

    return group_by_keys(members_for_wds(), handler=handler)


def _flat(name: str) -> str:
    """A key for a refused member whose name has none (no extension, odd characters)."""
    s = re.sub(r"[^\w/\-]", "_", name)[:200] or "_"
    return s if split_key(s + ".x")[0] else "_"


# ---------------------------------------------------------------- one shard
@dataclass
class Entry:
    n: int
    key: str
    error: dict[str, Any] | None = None
    prep: Future | None = None
    item: Any = None
    prepared: Any = None
    done: Future | None = None
    members: list[str] = field(default_factory=list)


_END = object()


class Cancelled(Exception):
    """The job ended (cancelled) or another delivery recorded this shard first."""


class ShardRun:
    def __init__(self, svc: Any, kw: dict[str, Any], pool: ThreadPoolExecutor, lua: Any) -> None:
        self.svc, self.kw, self.pool, self.lua = svc, kw, pool, lua
        s = svc.settings
        self.s = s
        self.job, self.index, self.uri = kw["job"], int(kw["index"]), kw["uri"]
        self.fmt = kw.get("format", "packbits")
        self.batch = s.shard_batch_size or s.max_batch_size
        self.stop = threading.Event()
        self.problems: list[dict[str, Any]] = []
        self.seen = self.ok = self.failed = 0
        self.source: ShardSource | None = None
        self.size = 0
        self.model_ms = 0.0
        from workers.runners.base import Runner

        # the hooks are driven one by one so decode overlaps the model; a runner with its own
        # run_batch (grouping, sessions ...) gets whole batches through it instead
        self.hooks = type(svc.runner).run_batch is Runner.run_batch
        self.keys_json = [keys.job(self.job), keys.shards(self.job), keys.shards_running(self.job)]
        stem = re.sub(r"\.(tar|tar\.gz|tgz)$", "", self.uri.rstrip("/").rsplit("/", 1)[-1]) or "shard"
        self.name = f"{self.index:05d}-{re.sub(r'[^A-Za-z0-9._-]', '_', stem)[:80]}"
        self.out_key = f"{kw['out_prefix']}/shards/{self.name}.tar"
        self.manifest_key = f"{kw['out_prefix']}/shards/{self.name}.manifest.json"
        self.base = InferRequest.model_validate(
            {
                "id": self.job, "model": kw["model"], "input": {}, "params": kw.get("params") or {}, "format": self.fmt,
                "deadline": float(kw.get("created", time.time())) + s.result_ttl_seconds, "tenant": kw.get("tenant", "default"),
                "kind": "job", "out_prefix": kw["out_prefix"], "created": float(kw.get("created", time.time())),
            }
        )

    # -- Redis bookkeeping -------------------------------------------------
    def call(self, op: str, payload: dict[str, Any] | None = None) -> str:
        st, _ = self.lua(keys=self.keys_json, args=[op, self.index, orjson.dumps(payload or {}), time.time(), self.s.max_deliveries, self.s.result_ttl_seconds])
        return st.decode() if isinstance(st, bytes) else st

    def snapshot(self) -> dict[str, Any]:
        src = self.source
        return {"seen": self.seen, "done": self.ok, "failed": self.failed, "read": src.read_in if src else 0, "size": self.size, "worker": self.svc.worker_id}

    # -- the run -----------------------------------------------------------
    def run(self) -> None:
        t0 = time.time()
        state = self.call("start", self.snapshot())
        if state == "dead":
            log.error("job=%s shard=%d dead-lettered after %d deliveries", self.job, self.index, self.s.max_deliveries)
            err = error("dead_lettered", f"the shard was delivered {self.s.max_deliveries} times without finishing (its worker died each time); not retried")
            self.record(self.result("failed", error=err, output=None, seconds=0.0), t0)
            return
        if state in ("done", "complete"):
            log.info("job=%s shard=%d already recorded; not redone", self.job, self.index)
            if state == "complete":
                finish_job(self.svc, self.kw)
            return
        if state != "run":
            log.info("job=%s shard=%d skipped (job %s)", self.job, self.index, state)
            return
        try:
            output = self.process()
        except Cancelled as e:
            log.info("job=%s shard=%d stopped: %s", self.job, self.index, e)
            self.svc.r.hdel(keys.shards_running(self.job), self.index)
            return
        except Exception as e:  # the shard could not be opened, or storage failed after retries
            te = translate(e)
            log.warning("job=%s shard=%d failed: %s", self.job, self.index, te.message)
            try:
                self.write_manifest([], error=_err(te))
            except Exception as e2:  # noqa: BLE001 - the shard's result in Redis still says why
                log.warning("job=%s shard=%d manifest not written: %s", self.job, self.index, e2)
            self.ok = self.failed = 0
            self.record(self.result("failed", error=_err(te), output=None, seconds=time.time() - t0), t0)
            return
        status = "ok" if not (self.failed or self.problems) else "partial" if self.ok else "failed"
        self.record(self.result(status, error=None, output=output, seconds=time.time() - t0), t0)

    def result(self, status: str, *, error: dict[str, Any] | None, output: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
        return {
            "index": self.index, "input": self.uri, "status": status, "samples": self.ok + self.failed, "done": self.ok, "failed": self.failed,
            "errors": len(self.problems), "output": output, "manifest": self.manifest_key, "error": error, "worker": self.svc.worker_id,
            "seconds": round(seconds, 3),
        }

    def record(self, res: dict[str, Any], t0: float) -> None:
        state = self.call("done", res)
        log.info(
            "job=%s shard=%d model=%s device=%s status=%s samples=%d done=%d failed=%d seconds=%.2f model_ms=%.0f",
            self.job, self.index, self.kw["model"], self.svc.device, res["status"], res["samples"], res["done"], res["failed"], time.time() - t0, self.model_ms,
        )
        if state == "complete":
            finish_job(self.svc, self.kw)

    def process(self) -> dict[str, Any]:
        try:
            raw = open_uri(self.uri, self.svc.store, self.s, tenant=self.base.tenant)  # checked for the job's tenant first (403)
        except Exception as e:
            raise translate(e) from e
        with raw, tempfile.TemporaryFile(prefix="trifecta-shard-", suffix=".tar") as tmp:
            self.size = content_length(raw)
            manifest: list[dict[str, Any]] = []
            with tarfile.open(fileobj=tmp, mode="w|", format=tarfile.PAX_FORMAT) as out:
                self.pipeline(raw, out, manifest)
            tmp.flush()
            size = tmp.tell()
            tmp.seek(0)
            n = self.svc.store.put_stream(self.out_key, tmp, "application/x-tar")
            self.write_manifest(manifest)
        return {"key": f"{self.name}.tar", "format": "tar", "path": self.out_key, "bytes": n or size, "content_type": "application/x-tar"}

    def write_manifest(self, samples: list[dict[str, Any]], error: dict[str, Any] | None = None) -> None:
        doc = {
            "job_id": self.job, "shard": self.index, "input": self.uri, "output": None if error else self.out_key, "model": self.kw["model"], "format": self.fmt,
            "worker": self.svc.worker_id, "error": error, "counts": {"samples": self.ok + self.failed, "done": self.ok, "failed": self.failed, "errors": len(self.problems)},
            "samples": samples, "errors": self.problems,
        }
        self.svc.store.put(self.manifest_key, orjson.dumps(doc), "application/json")

    # -- the pipeline ------------------------------------------------------
    def pipeline(self, raw: IO[bytes], out: tarfile.TarFile, manifest: list[dict[str, Any]]) -> None:
        to_model: queue.Queue = queue.Queue(maxsize=self.batch * 2 + self.s.shard_decode_threads)
        to_writer: queue.Queue = queue.Queue(maxsize=self.batch * 2 + self.s.shard_decode_threads)
        threads = [
            threading.Thread(target=self._reader, args=(raw, to_model), daemon=True, name=f"shard{self.index}-read"),
            threading.Thread(target=self._model, args=(to_model, to_writer), daemon=True, name=f"shard{self.index}-model"),
        ]
        for t in threads:
            t.start()
        cancelled: str | None = None
        last = time.monotonic()
        mtime = int(self.base.created)
        while True:
            e = to_writer.get()
            if e is _END:
                break
            if cancelled:
                continue  # drain so the other threads can end
            self.write_entry(e, out, manifest, mtime)
            if time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                st = self.call("progress", self.snapshot())
                if st not in ("running", "queued"):
                    cancelled = "job cancelled" if st == "cancelled" else f"job {st}" if st != "done" else "another delivery recorded this shard first"
                    self.stop.set()
        for t in threads:
            t.join()
        if cancelled:
            raise Cancelled(cancelled)

    def _reader(self, raw: IO[bytes], to_model: queue.Queue) -> None:
        seen_keys: set[str] = set()
        try:
            self.source = ShardSource(raw, self.s.max_shard_bytes)
            members = iter_members(self.source, max_member=self.s.max_sample_bytes, max_members=self.s.max_samples_per_shard, max_total=self.s.max_shard_bytes)  # type: ignore[arg-type]
            for n, sample in enumerate(grouped(members, self.problems)):
                if self.stop.is_set():
                    break
                key = sample["__key__"]
                exts = [k for k in sample if not k.startswith("__")]
                refused = [v for v in sample.values() if isinstance(v, Refused)]
                e = Entry(n, key, members=[f"{key}.{k}" for k in exts] + [r.name for r in refused])
                if key in seen_keys:
                    e.error = _refused(f"duplicate __key__ {key!r}: its members are not next to each other in the tar")
                elif refused:
                    e.error = _refused("; ".join(r.reason for r in refused))
                else:
                    img = next((x for x in IMAGE_EXTS if x in sample and isinstance(sample[x], bytes)), None)
                    if img is None:
                        found = ", ".join("." + x for x in exts) or "nothing"
                        e.error = error("unsupported_media_type", f"no image member ({', '.join('.' + x for x in IMAGE_EXTS[:4])} ...); found {found}")
                    else:
                        req = self.base.model_copy(update={"id": f"{self.job}:{self.index}:{n}"})
                        from workers.runners.base import Item

                        e.item = Item(req, sample[img])
                        if self.hooks:
                            e.prep = self.pool.submit(self.svc.runner.prepare, e.item)
                seen_keys.add(key)
                self.seen += 1
                to_model.put(e)
        except ShardTooLarge as ex:
            self.problems.append({"key": None, "status": "refused", "error": error(ex.code, str(ex))})
        except Exception as ex:  # storage dropped mid-shard, or anything unforeseen: keep what was read
            te = translate(ex)
            log.warning("job=%s shard=%d reading stopped: %s", self.job, self.index, te.message)
            self.problems.append({"key": None, "status": "refused", "error": _err(te)})
        finally:
            to_model.put(_END)

    def _model(self, to_model: queue.Queue, to_writer: queue.Queue) -> None:
        pending: list[Entry] = []
        try:
            while True:
                live = sum(1 for e in pending if e.error is None)
                try:
                    e = to_model.get(timeout=0.2) if pending else to_model.get()
                except queue.Empty:  # the reader is slow: run what we have
                    self._flush(pending, to_writer)
                    pending = []
                    continue
                if e is _END:
                    self._flush(pending, to_writer)
                    break
                pending.append(e)
                if e.error is None:
                    live += 1
                if live >= self.batch:
                    self._flush(pending, to_writer)
                    pending = []
        except Exception as ex:  # never leave the writer waiting
            log.exception("job=%s shard=%d model stage failed", self.job, self.index)
            for p in pending:
                p.error = p.error or _err(translate(ex))
                to_writer.put(p)
        finally:
            to_writer.put(_END)

    def _flush(self, pending: list[Entry], to_writer: queue.Queue) -> None:
        if not self.hooks:
            self._flush_run_batch(pending, to_writer)
            return
        live = []
        for e in pending:
            if e.error is None and e.prep is not None:
                try:
                    e.prepared = e.prep.result()
                    live.append(e)
                except Exception as ex:  # this sample alone fails
                    e.error = _err(translate(ex))
        if live and not self.stop.is_set():
            r = self.svc.runner
            t = time.perf_counter()
            try:
                preds = r.predict_counted([e.prepared for e in live])
                pairs = list(zip(live, preds, strict=True))
            except Exception as ex:
                pairs = []
                if len(live) > 1:
                    log.warning("job=%s shard=%d batched call of %d failed (%s); one by one", self.job, self.index, len(live), ex)
                for e in live:
                    try:
                        pairs.append((e, r.predict_counted([e.prepared])[0]))
                    except Exception as ex1:
                        e.error = _model_err(ex1)
            self.model_ms += (time.perf_counter() - t) * 1000
            for e, y in pairs:
                e.done = self.pool.submit(self._finish, e, y)
        for e in pending:
            to_writer.put(e)

    def _flush_run_batch(self, pending: list[Entry], to_writer: queue.Queue) -> None:
        live = [e for e in pending if e.error is None and e.item is not None]
        if live and not self.stop.is_set():
            t = time.perf_counter()
            results = self.svc.runner.run_batch([e.item for e in live])
            self.model_ms += (time.perf_counter() - t) * 1000
            for e, res in zip(live, results, strict=True):
                if isinstance(res, TrifectaError):
                    e.error = _err(res)
                else:
                    e.done = self.pool.submit(self._encode, e, res)
        for e in pending:
            to_writer.put(e)

    def _finish(self, e: Entry, pred: Any) -> list[tuple[str, bytes]]:
        prepared, e.prepared = e.prepared, None
        return self._encode(e, self.svc.runner.finish(e.item, prepared, pred))

    def _encode(self, e: Entry, produced: Any) -> list[tuple[str, bytes]]:
        files: list[tuple[str, bytes]] = []
        ext = codecs.EXTENSIONS[self.fmt]
        shapes: dict[str, list[int]] = {}
        for name, mask in produced.masks.items():
            files.append((ext if name == "mask" else f"{name}.{ext}", codecs.encode(mask, self.fmt)))
            shapes[name] = [int(x) for x in mask.shape]
        for name, (data, _fmt, _ctype) in produced.blobs.items():
            files.append((re.sub(r"[^A-Za-z0-9._-]", "_", name), data))
        doc: dict[str, Any] = {"__key__": e.key, "model": self.kw["model"], "format": self.fmt, "shape": shapes.get("mask") or next(iter(shapes.values()), [])}
        if len(shapes) > 1:
            doc["masks"] = shapes
        doc.update(produced.meta)
        files.append(("json", orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)))
        return files

    def write_entry(self, e: Entry, out: tarfile.TarFile, manifest: list[dict[str, Any]], mtime: int) -> None:
        files: list[tuple[str, bytes]] = []
        if e.error is None and e.done is not None:
            try:
                files = e.done.result()
            except Exception as ex:
                e.error = _err(translate(ex))
        elif e.error is None:
            e.error = error("cancelled", "the shard stopped before this sample ran", status=409)
        if e.error is None:
            for suffix, data in files:
                ti = tarfile.TarInfo(f"{e.key}.{suffix}")
                ti.size, ti.mtime, ti.mode = len(data), mtime, 0o644
                out.addfile(ti, io.BytesIO(data))
            self.ok += 1
            shape = next((orjson.loads(d).get("shape") for s, d in files if s == "json"), None)
            manifest.append({"key": e.key, "status": "ok", "error": None, "shape": shape})
        else:
            self.failed += 1
            manifest.append({"key": e.key, "status": "failed", "error": e.error, "members": e.members})


def _err(e: TrifectaError) -> dict[str, Any]:
    return error(e)


def _refused(message: str) -> dict[str, Any]:
    """A tar member or sample the shard reader refused (a link, a traversal, a duplicate key ...)."""
    return error("refused", message, status=422)


def _model_err(e: Exception) -> dict[str, Any]:
    return error(e if isinstance(e, TrifectaError) else internal(e, "the model failed on this input: an error", ModelError))  # logged, never its text
