"""Blob stores behind one small interface: `file://DIR` (default) and `s3://bucket/prefix`.

Writes are atomic: a reader never sees half an object. The file store writes a temp file
and renames it; S3 objects appear only when their PUT (or multipart upload) completes.
S3 calls retry with backoff (botocore's standard mode) under bounded timeouts; after the
last attempt they raise `StorageFailure` (which `tasks.errors.translate` turns into the
client's 503 `StorageError`); a missing object raises `ObjectMissing`, a key that leaves its
prefix `BadKey`.

On S3, objects under a job prefix (`<tenant>/jobs/<id>/`) are tagged `trifecta=job`, so a
bucket lifecycle rule can expire them (`lifecycle_rule`) without touching anything else a
tenant keeps under its prefix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import urlparse

JOB_TAG_KEY, JOB_TAG_VALUE = "trifecta", "job"
JOB_TAG = f"{JOB_TAG_KEY}={JOB_TAG_VALUE}"
LIFECYCLE_RULE_ID = "trifecta-job-objects"


class StorageFailure(Exception):
    """Storage did not answer correctly after retries."""


class ObjectMissing(KeyError):
    """No object under that key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "object missing"


class BadKey(ValueError):
    """A key that would leave its prefix."""


class BlobStore(Protocol):
    url: str

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...
    def put_stream(self, key: str, stream: IO[bytes], content_type: str = "application/octet-stream") -> int: ...
    def get(self, key: str) -> bytes: ...
    def open(self, key: str) -> IO[bytes]: ...
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def delete_prefixes(self, prefixes: list[str]) -> int: ...
    def list(self, prefix: str) -> list[str]: ...
    def uri(self, key: str) -> str: ...
    def presign(self, key: str, expires_s: int) -> str | None: ...


def _clean_key(key: str) -> str:
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise BadKey(f"storage key {key!r} leaves its prefix")
    return "/".join(parts)


class FileStore:
    """Objects as files under a root directory."""

    def __init__(self, root: str) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / _clean_key(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except BaseException:
            _unlink(tmp)
            raise

    def put_stream(self, key: str, stream: IO[bytes], content_type: str = "application/octet-stream") -> int:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(stream, f, 1 << 20)
                n = f.tell()
            os.replace(tmp, p)
            return n
        except BaseException:
            _unlink(tmp)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(f"no object {key!r} in storage") from None

    def open(self, key: str) -> IO[bytes]:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise ObjectMissing(f"no object {key!r} in storage") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> int:
        p = self._path(prefix)
        if p.is_dir():
            n = sum(1 for _ in p.rglob("*") if _.is_file())
            shutil.rmtree(p, ignore_errors=True)
            return n
        if p.is_file():
            p.unlink()
            return 1
        return 0

    def delete_prefixes(self, prefixes: list[str]) -> int:
        """Delete several prefixes; the number of objects deleted."""
        return sum(self.delete_prefix(p) for p in prefixes)

    def list(self, prefix: str) -> list[str]:
        p = self._path(prefix)
        if not p.is_dir():
            return []
        return sorted(str(f.relative_to(self.root)) for f in p.rglob("*") if f.is_file() and not f.name.startswith(".tmp-"))

    def uri(self, key: str) -> str:
        return f"file://{self._path(key)}"

    def presign(self, key: str, expires_s: int) -> str | None:
        return None  # local files are served through the API's result endpoint


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class S3Store:
    """Objects in an S3-compatible bucket (AWS, MinIO, moto) under a prefix."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        cfg = Config(
            retries={"max_attempts": int(os.environ.get("S3_MAX_ATTEMPTS", "4")), "mode": "standard"},
            connect_timeout=float(os.environ.get("S3_CONNECT_TIMEOUT_S", "3")),
            read_timeout=float(os.environ.get("S3_READ_TIMEOUT_S", "20")),
            max_pool_connections=32,
            signature_version="s3v4",  # presigned URLs too (botocore presigns with deprecated SigV2 otherwise): X-Amz-Expires, at most 7 days
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=cfg)
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)

    def _k(self, key: str) -> str:
        k = _clean_key(key)
        return f"{self.prefix}/{k}" if self.prefix else k

    def _fail(self, what: str, key: str, exc: Exception) -> StorageFailure:
        return StorageFailure(f"storage {what} of {key!r} failed after retries: {exc}")

    def _extra(self, key: str, content_type: str) -> dict[str, str]:
        extra = {"ContentType": content_type}
        parts = _clean_key(key).split("/", 2)
        if len(parts) == 3 and parts[1] == "jobs":  # a job's own object: the lifecycle rule may expire it
            extra["Tagging"] = JOB_TAG
        return extra

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **self._extra(key, content_type))
        except self._errors as e:
            raise self._fail("write", key, e) from e

    def put_stream(self, key: str, stream: IO[bytes], content_type: str = "application/octet-stream") -> int:
        counter = _CountingReader(stream)
        try:
            # upload_fileobj streams in parts (multipart above 8 MiB); the object appears only on completion
            self.client.upload_fileobj(counter, self.bucket, self._k(key), ExtraArgs=self._extra(key, content_type))
        except self._errors as e:
            raise self._fail("write", key, e) from e
        return counter.n

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except self._errors as e:
            if _is_missing(e):
                raise ObjectMissing(f"no object {key!r} in storage") from None
            raise self._fail("read", key, e) from e

    def open(self, key: str) -> IO[bytes]:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]
        except self._errors as e:
            if _is_missing(e):
                raise ObjectMissing(f"no object {key!r} in storage") from None
            raise self._fail("read", key, e) from e

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except self._errors as e:
            if _is_missing(e):
                return False
            raise self._fail("lookup", key, e) from e

    def delete_prefix(self, prefix: str) -> int:
        return self.delete_prefixes([prefix])

    def delete_prefixes(self, prefixes: list[str]) -> int:
        """One LIST per prefix (a job's few objects fit one page), then DeleteObjects in batches
        of 1,000 keys (the API's limit) across all of them; the number of objects deleted."""
        keys = [self._k(k) for p in prefixes for k in self.list(p)]
        for i in range(0, len(keys), 1000):
            try:
                resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True})
            except self._errors as e:
                raise self._fail("delete", prefixes[0], e) from e
            if resp.get("Errors"):
                e0 = resp["Errors"][0]
                raise StorageFailure(f"storage delete of {e0.get('Key')!r} failed: {e0.get('Code')} {e0.get('Message')} ({len(resp['Errors'])} key(s))")
        return len(keys)

    def lifecycle_rule(self, days: int) -> dict[str, object]:
        """The bucket lifecycle rule that backs the janitor up: objects under job prefixes
        (tagged `trifecta=job`) below this store's prefix expire `days` after they were written."""
        tag = {"Key": JOB_TAG_KEY, "Value": JOB_TAG_VALUE}
        flt: dict[str, object] = {"And": {"Prefix": f"{self.prefix}/", "Tags": [tag]}} if self.prefix else {"Tag": tag}
        return {"ID": LIFECYCLE_RULE_ID, "Status": "Enabled", "Filter": flt, "Expiration": {"Days": days}}

    def apply_lifecycle(self, days: int) -> list[dict[str, object]]:
        """Set `lifecycle_rule(days)` on the bucket, keeping its other rules; the rules now set."""
        try:
            rules = [r for r in self.client.get_bucket_lifecycle_configuration(Bucket=self.bucket).get("Rules", []) if r.get("ID") != LIFECYCLE_RULE_ID]
        except self._errors as e:
            if getattr(e, "response", {}).get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
                raise self._fail("lifecycle read", self.bucket, e) from e
            rules = []
        rules.append(self.lifecycle_rule(days))
        try:
            self.client.put_bucket_lifecycle_configuration(Bucket=self.bucket, LifecycleConfiguration={"Rules": rules})
        except self._errors as e:
            raise self._fail("lifecycle write", self.bucket, e) from e
        return rules

    def list(self, prefix: str) -> list[str]:
        out: list[str] = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._k(prefix) + "/"):
                out.extend(o["Key"][strip:] for o in page.get("Contents", []))
        except self._errors as e:
            raise self._fail("list", prefix, e) from e
        return sorted(out)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._k(key)}"

    def presign(self, key: str, expires_s: int) -> str | None:
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": self._k(key)}, ExpiresIn=expires_s)

    def read_uri(self, uri: str) -> IO[bytes]:
        """Open any `s3://bucket/key` (input shards may live in other buckets)."""
        u = urlparse(uri)
        try:
            return self.client.get_object(Bucket=u.netloc, Key=u.path.lstrip("/"))["Body"]
        except self._errors as e:
            if _is_missing(e):
                raise ObjectMissing(f"no object at {uri}") from None
            raise self._fail("read", uri, e) from e


def _is_missing(e: Exception) -> bool:
    code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
    return code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket")


class _CountingReader:
    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.n = f, 0

    def read(self, size: int = -1) -> bytes:
        b = self.f.read(size)
        self.n += len(b)
        return b


_lock = threading.Lock()
_stores: dict[tuple[str, str | None], BlobStore] = {}


def open_store(url: str, endpoint_url: str | None = None) -> BlobStore:
    """The store for a STORAGE_URL (cached per process)."""
    with _lock:
        key = (url, endpoint_url)
        if key not in _stores:
            u = urlparse(url)
            if u.scheme in ("", "file"):
                root = (u.netloc + u.path) if u.scheme == "file" else url
                _stores[key] = FileStore(root or ".")
            elif u.scheme == "s3":
                _stores[key] = S3Store(u.netloc, u.path, endpoint_url)
            else:
                raise ValueError(f"STORAGE_URL must be file://DIR or s3://bucket/prefix, got {url!r}")
        return _stores[key]


def iter_chunks(f: IO[bytes], size: int = 1 << 16) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk
