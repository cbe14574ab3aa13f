"""Where a request's input bytes come from: inline, our own storage, or a user's URI.

A user-supplied `file://` path must lie under ALLOWED_INPUT_ROOTS (resolved, so `..`
and symlinks cannot escape); an `s3://` URI is read with the service's S3 client.

The API checks every URI a tenant submits (`check_input_uri`, 403). The workers check
again before reading (`check_worker_input`, given the message's tenant): a message that
reached the queue some other way still cannot read another tenant's objects, and is
failed with 403 `input_forbidden` before a byte is read.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlparse

from storage.blob import BlobStore, S3Store, open_store
from tasks.errors import BadRequest, Forbidden, InputForbidden, NotFound, PayloadTooLarge, Unprocessable, shown
from tasks.schemas import InferInput
from tasks.settings import Settings

STAGED = "key:"  # prefix of a URI naming an object in our own store
# the URI of a sync request's input held in Redis under keys.sync_input(job id): the worker reads
# that key itself (workers/service.py), so a message cannot point a worker at any other key
IN_REDIS = "redis:"


def decode_b64(b64: str) -> bytes:
    try:
        return base64.b64decode(b64, validate=True)
    except Exception:
        raise Unprocessable("the input is not valid base64") from None


def local_path(uri: str, settings: Settings) -> Path:
    """The resolved path of a file:// URI or bare path, if it lies under ALLOWED_INPUT_ROOTS."""
    u = urlparse(uri)
    raw = unquote(u.netloc + u.path) if u.scheme == "file" else uri
    p = Path(raw).resolve()
    for root in settings.allowed_input_roots:
        r = Path(root).resolve()
        if p == r or r in p.parents:
            return p
    raise Forbidden(f"{uri} is not under ALLOWED_INPUT_ROOTS; local paths outside them are refused")


def check_input_uri(uri: str, tenant: str, settings: Settings) -> None:
    """Refuse (403) a URI a tenant submits that lies outside its reach.

    An `s3://` object must lie under the tenant's own `<STORAGE_URL>/<tenant>/` (when storage
    is S3) or under an INPUT_URI_ALLOWLIST prefix; prefixes match whole path segments, so
    `s3://b/data` does not admit `s3://b/data-private/x`. A local path must lie under
    ALLOWED_INPUT_ROOTS. The URI is parsed exactly as the worker's reader parses it.
    """
    u = urlparse(uri)
    if u.scheme == "file" or (u.scheme == "" and uri.startswith("/")):
        local_path(uri, settings)
        return
    if u.scheme != "s3" or not u.netloc:
        raise BadRequest("input.uri must be s3://bucket/key or file:///path")
    if u.query or u.fragment or u.params:
        raise BadRequest("an s3:// input URI may not carry ?query, ;params or #fragment")
    parts = u.path.lstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts) or "\\" in u.path:
        raise Forbidden(f"{uri} has an empty, '.' or '..' path segment")
    roots = [p.replace("{tenant}", tenant) for p in settings.input_uri_allowlist]
    own = urlparse(settings.storage_url)
    if own.scheme == "s3":
        roots.append(f"s3://{own.netloc}/{own.path.strip('/')}/{tenant}")
    for root in roots:
        r = urlparse(root)
        prefix = [p for p in r.path.split("/") if p]
        if r.scheme == "s3" and r.netloc == u.netloc and parts[: len(prefix)] == prefix and len(parts) > len(prefix):
            return
    raise Forbidden(f"{uri} is outside your storage prefix and INPUT_URI_ALLOWLIST; other tenants' objects and other buckets are refused")


def check_worker_input(uri: str, tenant: str, settings: Settings) -> None:
    """The worker's own check before it reads an input (defence in depth behind the API's).

    A `key:` object of our own store must lie under `<tenant>/` (where the API stages a
    tenant's uploads); any other URI must pass `check_input_uri` for that tenant. Anything
    else raises InputForbidden (403 `input_forbidden`).
    """
    if uri.startswith(STAGED):
        parts = uri[len(STAGED) :].replace("\\", "/").split("/")
        if len(parts) >= 2 and parts[0] == tenant and not any(p in ("", ".", "..") for p in parts):
            return
        raise InputForbidden(f"refused to read {shown(uri)}: staged inputs of tenant {shown(tenant)} lie under {shown(tenant + '/')}")
    try:
        check_input_uri(uri, tenant, settings)
    except (Forbidden, BadRequest) as e:
        raise InputForbidden(f"refused to read {shown(uri)} for tenant {shown(tenant)}: {e.message[:200]}") from None


def open_uri(uri: str, store: BlobStore, settings: Settings, tenant: str | None = None) -> IO[bytes]:
    """The input's bytes as a stream; with `tenant`, checked by `check_worker_input` first."""
    if tenant is not None:
        check_worker_input(uri, tenant, settings)
    if uri.startswith(STAGED):
        return store.open(uri[len(STAGED):])
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        s3 = store if isinstance(store, S3Store) else open_store("s3://_/", settings.s3_endpoint_url)
        return s3.read_uri(uri)  # type: ignore[union-attr]
    if scheme in ("file", ""):
        p = local_path(uri, settings)
        if not p.is_file():
            raise NotFound(f"no file at {uri}")
        return open(p, "rb")
    raise BadRequest(f"unsupported input URI scheme {scheme!r}: use s3:// or file://")


def read_input(inp: InferInput, store: BlobStore, settings: Settings, limit: int | None = None, tenant: str | None = None) -> bytes:
    if inp.b64 is not None:
        return decode_b64(inp.b64)
    if not inp.uri:
        raise BadRequest("the input has neither inline bytes nor a URI")
    limit = limit or settings.max_body_bytes
    with open_uri(inp.uri, store, settings, tenant) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"the input at {inp.uri} is over {limit} bytes")
    return data


def stage_key(tenant: str, job_id: str, name: str = "input") -> str:
    return os.path.join(tenant, "jobs", job_id, "_in", name)
