"""Payload and result schemas that travel between the API and the workers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

MaskFormat = Literal["packbits", "png", "rle"]


class InferInput(BaseModel):
    """The input of one request: inline bytes (base64) below INLINE_INPUT_BYTES, else a storage URI."""

    b64: str | None = None
    uri: str | None = None  # a key in our storage ("key:<key>") or an s3:// / file:// URI
    content_type: str | None = None
    size: int = 0


class InferRequest(BaseModel):
    """The kwargs of a `trifecta.infer` task: one sample for one model."""

    id: str  # the job id; outputs are written under `out_prefix`, keyed by it (idempotent)
    model: str
    input: InferInput
    params: dict[str, Any] = Field(default_factory=dict)
    format: MaskFormat = "packbits"
    deadline: float  # unix seconds; a worker drops work past it
    reply: str | None = None  # pub/sub channel of the API waiting on it (sync requests)
    tenant: str = "default"
    kind: Literal["sync", "job"] = "job"
    out_prefix: str
    created: float
    write_result_json: bool = False


class Output(BaseModel):
    key: str
    format: str
    shape: list[int] = Field(default_factory=list)
    path: str  # storage key (where it is, or would be when `inline`)
    bytes: int = 0
    content_type: str = "application/octet-stream"
    # STORE_SYNC_RESULTS=false: not stored; the bytes travel base64 in `data` of the worker's
    # reply only (the job record keeps `inline: true` and no data). A sync output up to
    # SYNC_REPLY_INLINE_BYTES has `data` in the reply too while stored (`inline: false`)
    inline: bool = False
    data: str | None = None
