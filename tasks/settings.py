"""Every setting of every Trifecta process, read from the environment.

The names are the ones our source services used (`HF_REPO_ID`, `GPU_IDS`,
`MAX_BATCH_SIZE`, ...) so their deployments keep working. The README's settings
table is generated from this class's field descriptions (`trifecta settings`).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tasks.models import DEFAULT_MODELS, MODELS

# passwords that ship in examples and compose defaults: refused outside ENV=local
DEFAULT_SECRETS = frozenset({"", "change-me", "changeme", "changethis", "change_me", "admin", "password", "secret", "minioadmin", "trifecta-secret"})
PLACEHOLDER_PREFIX = "replace-me"  # the Kubernetes manifests' Secret placeholders (deploy/kubernetes/base/secrets.yaml)


def is_default_secret(value: str) -> bool:
    v = value.strip().lower()
    return v in DEFAULT_SECRETS or v.startswith(PLACEHOLDER_PREFIX)


def _split(v: object) -> object:
    if isinstance(v, str):
        return [p.strip() for p in v.split(",") if p.strip()]
    return v


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # --- broker, API, client ---
    env: str = Field("local", description="`local` allows the default and empty secrets a trial needs; any other value (compose sets `production`) refuses to start with a default password in FLOWER_BASIC_AUTH, AWS_SECRET_ACCESS_KEY or WEBHOOK_SECRET, and `trifecta api` / `trifecta flower` refuse to start without API keys / FLOWER_BASIC_AUTH.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Broker and result store for every process (Redis protocol).")
    broker_global_keyprefix: str = Field("", description="kombu's `global_keyprefix` transport option: every key Celery/kombu write in Redis (queues, `unacked`, bindings) starts with it, for sharing a Redis with other Celery apps. Every process of a deployment must use the same value. Trifecta's own keys keep their `tf:` prefix.")
    api_port: int = Field(8080, description="Port of `trifecta api` / `trifecta up`.")
    trifecta_url: str = Field("http://127.0.0.1:8080", description="Where the client CLI and SDK find the server.")
    trifecta_api_key: str | None = Field(None, description="API key the client CLI and SDK send.")
    models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(DEFAULT_MODELS), description="Models `trifecta up` starts workers for (comma separated).")
    run_dir: str = Field("./run", description="Where `trifecta up` keeps its embedded Redis data (append-only file) and logs.")

    # --- workers and batching ---
    gpu_ids: Annotated[list[int], NoDecode] = Field(default_factory=list, description="GPUs to use; `trifecta up` and compose start one worker per GPU per model. Empty: one CPU worker per model.")
    use_cuda: bool = Field(True, description="Use CUDA when a GPU is present; on a machine without one this falls back to CPU with a warning.")
    max_batch_size: int = Field(4, ge=1, le=256, description="Dynamic batching: most requests gathered into one model call.")
    batch_timeout_ms: float = Field(4, ge=0, le=10_000, description="Dynamic batching: longest wait for a batch to fill.")
    max_concurrency_per_gpu: int = Field(2, ge=1, le=64, description="In-flight batches per device (overlaps decode/encode with inference).")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime / torch intra-op threads per worker; 0 = the cores this worker owns.")
    worker_heartbeat_s: float = Field(3.0, gt=0, description="How often a worker refreshes its registration and the visibility of the messages it holds.")
    visibility_timeout_s: float = Field(20.0, gt=0, description="A message held by a worker whose heartbeat stopped is redelivered after this many seconds.")
    max_deliveries: int = Field(3, ge=1, description="A request delivered this many times without finishing is dead-lettered as failed.")
    worker_max_memory_mb: int = Field(0, ge=0, description="A worker whose RSS passes this finishes its batch and exits to be restarted (0 = no limit).")
    worker_shutdown_grace_s: float = Field(25.0, gt=0, description="On SIGTERM a worker stops taking work, finishes its running batches, gives back what it holds and exits; still busy after this many seconds, it gives back its running work too and exits (25 fits Kubernetes' default 30 s grace).")
    bulk_drain: bool = Field(True, description="A worker tops up a batch straight from its queue in one round trip (kombu's own unacked/visibility bookkeeping), instead of one broker round trip per message.")
    task_events: bool = Field(True, description="Send per-task Celery events: Flower's Processed/Succeeded/Failed counts and task list (buffered, one PUBLISH every 0.5 s); worker events and heartbeats are always on.")

    # --- accelerators (ONNX Runtime and torch on a GPU) ---
    ort_spinning: bool = Field(False, description="ONNX models on a CPU: let ONNX Runtime's idle intra-op threads spin (its own default) instead of sleeping; spinning threads take the cores the worker decodes and encodes on (see docs/performance.md for the measurement behind the default).")
    ort_io_binding: bool = Field(True, description="ONNX models on a CUDA device: bind inputs and outputs (IO binding) so each call copies its input in and its output out once, with no per-call allocation of device buffers.")
    ort_cuda_graph: bool = Field(False, description="ONNX models on a CUDA device: capture one CUDA graph per input shape and replay it (needs ORT_IO_BINDING; pays off for fixed shapes: the letterboxed ONNX models, one graph per batch size).")
    ort_tensorrt: bool = Field(False, description="ONNX models on a CUDA device: try ONNX Runtime's TensorRT execution provider first (onnxruntime-gpu built with TensorRT); engines are built on first use, which takes minutes.")
    ort_trt_fp16: bool = Field(True, description="With ORT_TENSORRT: build fp16 TensorRT engines.")
    ort_trt_cache_dir: str | None = Field(None, description="With ORT_TENSORRT: where engines and timing caches are kept between starts; unset: `<MODEL_DIR>/.trt-cache`.")
    ort_device_preprocess: Literal["auto", "on", "off"] = Field("auto", description="textmask: resize and normalise on the model's device (ONNX nodes in front of the model; the host sends the decoded uint8 image, a quarter of the bytes). auto = on an accelerator only; on a CPU the host path is the same work and RapidOCR's answer bit for bit. Needs the `onnx` package (the `gpu` extra).")
    torch_dtype: str = Field("auto", description="Torch families (SAM3, Mask2Former, V-JEPA 2): auto, fp32, fp16 or bf16. auto = fp32 on a CPU; on a GPU bf16 for SAM3 (fp16 where the GPU has no bf16), fp16 for the others.")
    image_model_compile: bool = Field(False, description="Torch families: `torch.compile` the main network at start (the SAM3 source service's setting; the first call of each input shape compiles, minutes on a big model).")
    sim_batch_ms: float = Field(8.0, ge=0, le=10_000, description="`simulated` model: fixed cost of one model call in ms (a GPU's launch and weight-read cost), slept without using CPU.")
    sim_image_ms: float = Field(2.0, ge=0, le=10_000, description="`simulated` model: cost per image of one model call in ms; a batch of n sleeps SIM_BATCH_MS + SIM_IMAGE_MS x n.")

    # --- models ---
    model_dir: str = Field("./models", description="Local model directory; `<MODEL_DIR>/<model>/` holds each model's files.")
    hf_repo_id: str | None = Field(None, description="Hugging Face repo holding `segmentation.onnx` + config. Unset: `MODEL_DIR/segmentation` is used.")
    hf_revision: str | None = Field(None, description="Revision (branch, tag or commit) of `HF_REPO_ID`.")
    hf_token: str | None = Field(None, description="Token for a private `HF_REPO_ID`.")
    hf_local_files_only: bool = Field(False, description="Never reach the hub; use the local Hugging Face cache only.")
    seg_onnx_filename: str = Field("segmentation.onnx", description="ONNX file name of the segmentation model.")
    seg_config_filename: str = Field("segmentation_config.json", description="Config file name of the segmentation model.")
    facemask_onnx_filename: str = Field("facemask.onnx", description="ONNX file of the facemask model; `/run_facemask` answers 204 until one is served.")
    textmask_onnx_filename: str = Field("textmask.onnx", description="ONNX file of the textmask model inside `MODEL_DIR/textmask`.")
    input_size: int | None = Field(None, ge=32, le=4096, description="Overrides the model config's square input size (smaller = faster); `segmentation` and `facemask` only (`textmask` sizes each image as RapidOCR does, see TEXTMASK_LIMIT_SIDE_LEN).")

    # --- textmask: PP-OCRv4 text detection, defaults = RapidOCR 1.4.4's (rapidocr_onnxruntime/config.yaml) ---
    textmask_limit_side_len: int = Field(736, ge=32, le=4096, description="textmask: with TEXTMASK_LIMIT_TYPE=min an image whose short side is below this is enlarged to it (then both sides rounded to multiples of 32); RapidOCR's `Det.limit_side_len`. With `max` RapidOCR ignores it (its 960/1500/2000 tiers), and so does textmask.")
    textmask_limit_type: Literal["min", "max"] = Field("min", description="textmask: `min` (short side up to TEXTMASK_LIMIT_SIDE_LEN) or `max` (long side down to 960, 1500 or 2000 px by the image's own long side); RapidOCR's `Det.limit_type`.")
    textmask_max_side_len: int = Field(2000, ge=32, le=8192, description="textmask: an image whose long side is above this is first scaled down to it (RapidOCR's `Global.max_side_len`); boxes and mask come back at the original size.")
    textmask_thresh: float = Field(0.3, gt=0.0, lt=1.0, description="textmask: probability above which a pixel of the model's map is text (DB post-processing `thresh`).")
    textmask_box_thresh: float = Field(0.5, ge=0.0, le=1.0, description="textmask: a region whose mean probability is below this is dropped (`box_thresh`).")
    textmask_unclip_ratio: float = Field(1.6, gt=0.0, le=10.0, description="textmask: how far each region's box is grown past the model's shrunk text kernel (`unclip_ratio`; offset = area x ratio / perimeter).")
    textmask_max_candidates: int = Field(1000, ge=1, le=100_000, description="textmask: most contours of the binarised map turned into regions (`max_candidates`).")

    # --- V-JEPA 2 / Mask2Former ---
    vjepa2_checkpoint: str = Field("facebook/vjepa2-vitl-fpc16-256-ssv2", description="V-JEPA 2 video classifier (`VJEPA2ForVideoClassification`): a Hugging Face id or a local directory.")
    vjepa2_frames_per_clip: int = Field(16, ge=2, le=128, description="Frames in one V-JEPA 2 clip; `/api/v1/infer` takes exactly this many.")
    vjepa2_top_k: int = Field(5, ge=1, le=100, description="Labels answered per clip, most confident first.")
    clip_stride: int = Field(16, ge=1, le=10_000, description="Video jobs: source frames between the starts of consecutive clips (16 = back to back); `params.stride` overrides it per job.")
    video_chunk_clips: int = Field(8, ge=1, le=256, description="Video jobs: clips one decode task emits before it hands the rest of the video back to the queue (bounds queue depth and task length).")
    max_video_frames: int = Field(108_000, ge=1, description="Video jobs: most frames decoded from one video (1 h at 30 fps); a longer video fails its job with 413.")
    max_video_pixels: int = Field(3840 * 2160, ge=1, description="Video jobs: largest frame (width x height) decoded; larger → 413.")
    max_video_bytes: int = Field(4 << 30, ge=1, description="Video jobs: largest video read from a URI or a multipart upload.")
    video_decode_timeout_s: float = Field(300.0, gt=0, description="Video jobs: longest one decode task may spend decoding before its job fails.")
    m2f_checkpoint: str = Field("facebook/mask2former-swin-large-ade-semantic", description="Mask2Former semantic segmentation (`Mask2FormerForUniversalSegmentation`): a Hugging Face id or a local directory.")
    m2f_long_side: int = Field(768, ge=32, le=4096, description="Mask2Former: an image's long side over this is scaled down to it before the checkpoint's image processor (as the source service did); masks come back at the original size.")
    m2f_max_pixels: int = Field(40_000_000, ge=1, description="Largest image (width x height) Mask2Former segments; larger → 422 (the masks are made at the original size).")

    # --- SAM3 ---
    sam3_checkpoint: str = Field("facebook/sam3", description="SAM3 checkpoint (`Sam3Model` / `Sam3Processor`): a Hugging Face id or a local directory (`trifecta models tiny sam3 DIR` writes a tiny random-init one).")
    image_model_resolution: int | None = Field(None, ge=56, le=2016, description="SAM3 square input side in pixels, rounded down to a multiple of the patch size (14); unset: the checkpoint's own (1008 for facebook/sam3). Lower is faster.")
    image_model_confidence_threshold: float = Field(0.5, ge=0.0, le=1.0, description="SAM3: default minimum score (detection x presence) of a returned mask; a request's `confidence_threshold` overrides it.")
    enable_feature_cache: bool = Field(True, description="SAM3: keep each image's vision features on its worker, keyed by the image's SHA-256, so new prompts on the same image skip the vision encoder.")
    feature_cache_ttl_seconds: float = Field(600.0, gt=0, description="SAM3: an image's cached features are dropped this long after their last use.")
    feature_cache_max_entries: int = Field(32, ge=1, description="SAM3: most images whose features a worker keeps (least recently used dropped first).")
    feature_cache_max_mb: int = Field(2048, ge=1, description="SAM3: most memory (MB) a worker's feature cache holds; about 110 MB per image at 1008 px in fp32, half in fp16/bf16.")
    max_prompts: int = Field(32, ge=1, le=1024, description="SAM3: most prompts (text + box) in one request; more → 422.")

    # --- SAM3 video sessions (/api/v1/video/session/*) ---
    max_sessions_per_worker: int = Field(4, ge=1, le=1024, description="SAM3 video: most open sessions (decoded frames + tracking state) one worker holds; every worker full → 503 with Retry-After.")
    max_sessions_per_tenant: int = Field(4, ge=1, le=100_000, description="SAM3 video: most open sessions one tenant holds over every worker; one more → 429 `quota_exceeded`. Keep it under workers x MAX_SESSIONS_PER_WORKER so one tenant cannot take every slot. Session ids are per tenant: two tenants may use the same id.")
    session_ttl_seconds: float = Field(1800.0, gt=0, description="SAM3 video: a session unused this long is closed by its worker (and its record in Redis expires).")
    session_call_timeout_s: float = Field(600.0, gt=0, le=7200, description="SAM3 video: longest wait of one session call (start, prompt, propagate) before 504.")
    video_session_model: str = Field("sam3", description="Model whose workers hold video sessions (sam3; `echo` holds decode-only sessions without a model, for tests).")

    # --- storage ---
    storage_url: str = Field("file://./data", description="`file://DIR` or `s3://bucket/prefix` for masks, staged inputs and results.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto); AWS when unset. Credentials from the usual AWS variables.")
    inline_input_bytes: int = Field(64 << 10, ge=0, description="Inputs up to this size travel inside the queue message; larger ones are staged in storage (an inline input is base64-encoded twice and copied through Redis three times), except a sync request's (SYNC_REDIS_INPUT_MAX_BYTES).")
    sync_redis_input_max_bytes: int = Field(16 << 20, ge=0, le=256 << 20, description="A sync call's input over INLINE_INPUT_BYTES (an image on any sync route, a V-JEPA 2 clip; a tar's such samples: up to this size together) waits for its worker in Redis (one key, written in the submit transaction, with a TTL of the request's deadline; the worker deletes it once answered), not in storage: no storage request on the way in. It counts against Redis's maxmemory (503 `redis_full` when full). Larger inputs are staged in storage; 0 = always storage.")
    sync_reply_inline_bytes: int = Field(1 << 20, ge=0, le=4 << 20, description="A sync request's mask up to this size rides in the worker's reply to the API, which answers from it without reading storage back; it is still written to storage for the record when STORE_SYNC_RESULTS=true. Larger masks are read back from storage. 0 = always read back.")
    result_ttl_seconds: int = Field(86_400, ge=1, description="Lifetime of job records and stored masks (jobs, and sync requests that timed out with 504); an expired job answers `expired` for 7 more days, and the API's janitor deletes its stored outputs.")
    sync_result_ttl_s: int = Field(300, ge=1, description="Lifetime of the record (and stored outputs) of a sync request answered in time: `GET /v1/jobs/{X-Job-Id}` works this long, then answers 404. No tombstone is kept for it.")
    store_sync_results: bool = Field(True, description="Sync requests write their masks to storage (kept SYNC_RESULT_TTL_S). false: an answered sync request's mask travels in the worker's reply only and nothing is stored (a 504 still stores it, as a job).")
    allowed_input_roots: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Local directories that `file://` inputs may be read from (comma separated); empty = none. Checked by the API and again by the workers, so set it on both.")

    # --- API limits ---
    output_format: str = Field("packbits", description="Default mask format of the sync endpoints: packbits, png or rle.")
    allow_webdataset: bool = Field(True, description="Accept WebDataset tar bodies on the sync endpoints.")
    sync_timeout_s: float = Field(30.0, gt=0, le=3600, description="Longest wait of a sync request before 504 (a request may lower it with `?timeout=`).")
    sync_grace_s: float = Field(60.0, ge=0, description="After a 504 the work stays valid this long for polling; later it is dropped unrun.")
    max_queue_depth: int = Field(64, ge=1, description="Requests waiting per model (its shared queue plus its live workers' private queues) at or above which new work gets 503; one worker's private queue alone is held to its share, MAX_QUEUE_DEPTH / live workers.")
    queue_without_workers: bool = Field(False, description="Take work for a model with no live worker (it waits in the model's queue until a worker starts), for autoscalers that scale workers from zero (KEDA, docs/deploy.md); off: 503 no_worker.")
    max_image_pixels: int = Field(50_000_000, ge=1, description="Largest image (width x height) accepted; larger → 413, decided from the header.")
    max_jpeg_scan_pixels: int = Field(1_000_000_000, ge=1, description="Most work one JPEG decode may cost, as width x height x scans (a baseline JPEG has 1 scan, a progressive one ~10; every scan walks every pixel): bounds one decode's CPU time on a worker (~2 s per 1e9 on one core). Larger → 413, decided from the headers before decoding, by the API and again by the worker.")
    max_body_bytes: int = Field(100 << 20, ge=1, description="Largest request body, counted while streaming and after gzip decompression.")
    max_inflight_body_bytes: int = Field(512 << 20, ge=1, description="Most request-body bytes one API process holds at once, over all requests (each counts what it has sent, at most MAX_BODY_BYTES: larger uploads stream to disk); past it → 503 with Retry-After, decided from Content-Length before reading when it is declared. A request is always admitted when no other body is held.")
    header_timeout_s: float = Field(10.0, gt=0, le=3600, description="Longest time a client may take to send a request's headers (from connecting, or from the first byte of the next request on a kept-alive connection); then 408 and the connection is closed.")
    max_connections_per_client: int = Field(1024, ge=0, description="Most connections one client address may hold open to one API process; more → 503 and closed at once. 0 = no cap (behind a reverse proxy every client shares the proxy's address: cap there).")
    max_sync_batch: int = Field(64, ge=1, description="Most samples in a sync WebDataset tar; more → 413 pointing to the job API.")
    max_sample_bytes: int = Field(64 << 20, ge=1, description="Largest tar member accepted.")
    max_samples_per_shard: int = Field(100_000, ge=1, description="Most members read from one tar.")

    # --- WebDataset shard jobs ---
    max_shards_per_job: int = Field(10_000, ge=1, description="Most shards in one job after brace expansion; more → 413.")
    max_shard_bytes: int = Field(64 << 30, ge=1, description="Most bytes read from one shard, counted after gzip decompression (a gzip bomb stops here and is recorded).")
    max_shard_upload_bytes: int = Field(4 << 30, ge=1, description="Largest shard uploaded as a multipart `file` (streamed to storage, never held in memory).")
    shard_batch_size: int = Field(0, ge=0, le=256, description="Samples per model call in shard jobs; 0 = MAX_BATCH_SIZE.")
    shard_decode_threads: int = Field(2, ge=1, le=64, description="Threads per shard task that decode, preprocess and encode while the model runs.")
    shard_concurrency: int = Field(1, ge=1, le=64, description="Shard tasks one worker runs at once; a worker already that busy hands further shards back to the queue for another worker.")

    # --- tenants ---
    api_keys: str | None = Field(None, description="`key1:tenantA,key2:tenantB`. When set (or API_KEYS_FILE), every endpoint but /health and /metrics needs a key (`Authorization: Bearer KEY` or `X-API-Key: KEY`), else 401; a tenant sees only its own jobs, sessions and storage prefix.")
    api_keys_file: str | None = Field(None, description="A file of `key:tenant` lines (`#` comments), used with API_KEYS; re-read when it changes.")
    protect_ops_endpoints: bool = Field(False, description="Require a key on /health and /metrics as well.")
    rate_limit_per_minute: int = Field(0, ge=0, description="Requests per minute per tenant (a token bucket in each API process's memory, bursts up to one minute's worth); over it: 429 with Retry-After. 0 = off.")
    input_uri_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list, description="s3:// prefixes (comma separated) a job's `input.uri` may read besides the tenant's own `<STORAGE_URL>/<tenant>/`; `{tenant}` stands for the caller's tenant. Others: 403. Checked by the API and again by the workers, so set it on both.")
    result_url_ttl_s: int = Field(3600, ge=1, le=7 * 86400, description="Lifetime of the presigned S3 URLs handed out for job results (at most RESULT_TTL_SECONDS).")
    max_params_bytes: int = Field(65536, ge=2, description="Largest `params` of a job, as JSON; larger: 413.")

    # --- operations: Flower, metrics, webhooks, janitor ---
    flower_port: int = Field(5555, ge=1, le=65535, description="Port of Flower (`trifecta flower`, started by `trifecta up` and compose).")
    flower_basic_auth: str | None = Field(None, description="`user:password[,user2:password2]` protecting Flower's UI and API; unset: the UI is open and Flower's HTTP API answers 401.")
    worker_metrics_port: int = Field(0, ge=0, le=65535, description="Each worker serves its own Prometheus metrics on this port (`trifecta up` gives the Nth worker PORT+N); 0 = off (the API's /metrics still shows every worker's figures from Redis).")
    prometheus_multiproc_dir: str | None = Field(None, description="Directory shared by several API processes (`trifecta api --workers N`) so /metrics adds up all of them; `trifecta api --workers N` uses `<RUN_DIR>/prometheus` when unset.")
    webhook_secret: str | None = Field(None, description="HMAC-SHA256 key of job webhooks: `X-Trifecta-Signature: t=<unix s>,v1=<hex HMAC of \"<t>.<body>\">`. Jobs with a `callback_url` need it set.")
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Hosts a job's `callback_url` may target (comma separated; `host`, `host:port` or `*.domain`); empty = webhooks off (422). A wildcard match must resolve to public addresses.")
    webhook_max_attempts: int = Field(8, ge=1, le=100, description="Deliveries tried per webhook before it is given up (retries back off exponentially).")
    webhook_backoff_s: float = Field(5.0, gt=0, le=3600, description="Delay before the first webhook retry; each further retry waits twice as long (at most 1 h), with jitter.")
    webhook_timeout_s: float = Field(10.0, gt=0, le=300, description="Longest wait for a webhook receiver to answer one POST.")
    log_format: Literal["text", "json"] = Field("text", description="`text`, or `json`: one JSON object per line (time, level, logger, message, and job_id, model, tenant, worker, device, trace_id where known) from the API, the workers and `trifecta up`.")
    janitor_interval_s: float = Field(60.0, ge=0, description="How often the API deletes the stored outputs of jobs and sync requests whose record expired (from the expiry index `tf:expiry`: a pass costs what expired, not what is stored); 0 = off.")
    redis_maxmemory: str = Field("1gb", description="`maxmemory` of the Redis `trifecta up` starts (with `maxmemory-policy noeviction`: queued work is never evicted); `0` = no limit. A Redis you run yourself: set both in its own config.")
    redis_memory_warn_ratio: float = Field(0.8, gt=0, le=1, description="`/health` reports `degraded` once Redis's used memory passes this share of its `maxmemory`.")
    redis_memory_admit_ratio: float = Field(0.9, gt=0, le=1, description="New work gets 503 `redis_full` (with Retry-After) once Redis's used memory passes this share of its `maxmemory`, keeping the rest for work already queued to finish; 1 = only Redis's own OOM refusals.")

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _webhook_hosts_csv(cls, v: object) -> object:
        return _split(v)

    @field_validator("input_uri_allowlist", mode="before")
    @classmethod
    def _allowlist_csv(cls, v: object) -> object:
        return _split(v)

    @field_validator("models", "allowed_input_roots", mode="before")
    @classmethod
    def _csv(cls, v: object) -> object:
        return _split(v)

    @field_validator("gpu_ids", mode="before")
    @classmethod
    def _gpus(cls, v: object) -> object:
        v = _split(v)
        return [int(x) for x in v] if isinstance(v, list) else v

    @field_validator("torch_dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        v = v.strip().lower()
        if v not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError("TORCH_DTYPE must be auto, fp32, fp16 or bf16")
        return v

    @field_validator("output_format")
    @classmethod
    def _fmt(cls, v: str) -> str:
        v = v.lower()
        if v not in ("packbits", "png", "rle"):
            raise ValueError("OUTPUT_FORMAT must be packbits, png or rle")
        return v

    @model_validator(mode="after")
    def _models_known(self) -> Settings:
        unknown = [m for m in self.models if m not in MODELS]  # the dict: families registered later count too
        if unknown:
            raise ValueError(f"MODELS has unknown model(s) {unknown}; known: {', '.join(MODELS)}")
        return self

    @property
    def local(self) -> bool:
        return self.env.strip().lower() == "local"

    @model_validator(mode="after")
    def _no_default_secrets(self) -> Settings:
        """Outside ENV=local, a secret left at a well-known default stops every process at start
        (full-stack-fastapi-template's `_check_default_secret`)."""
        if self.local:
            return self
        found = []
        for entry in (self.flower_basic_auth or "").split(","):
            if entry.strip() and is_default_secret(entry.partition(":")[2]):
                found.append("FLOWER_BASIC_AUTH")
        aws = os.environ.get("AWS_SECRET_ACCESS_KEY")
        if aws is not None and is_default_secret(aws):
            found.append("AWS_SECRET_ACCESS_KEY")
        if self.webhook_secret is not None and (is_default_secret(self.webhook_secret) or len(self.webhook_secret) < 16):
            found.append("WEBHOOK_SECRET (at least 16 characters)")
        if any(is_default_secret(entry.partition(":")[0]) for entry in (self.api_keys or "").split(",") if entry.strip()):
            found.append("API_KEYS")
        if found:
            raise ValueError(f"ENV={self.env} refuses default or weak secrets: {', '.join(dict.fromkeys(found))}. Set real ones (or ENV=local for a trial on a trusted machine)")
        return self

    def require_deployable(self, role: str) -> None:
        """Outside ENV=local: the API needs keys and Flower its basic auth (other processes need neither)."""
        if self.local:
            return
        if role == "api" and not ((self.api_keys or "").strip() or self.api_keys_file):
            raise ValueError(f"ENV={self.env}: the API would be open to anyone; set API_KEYS or API_KEYS_FILE (or ENV=local on a trusted machine)")
        if role == "flower" and not (self.flower_basic_auth or "").strip():
            raise ValueError(f"ENV={self.env}: Flower would be open to anyone; set FLOWER_BASIC_AUTH=user:password (or ENV=local on a trusted machine)")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests and `trifecta up` change the environment)."""
    get_settings.cache_clear()


def env_flag(name: str, default: bool = False) -> bool:
    v = os.environ.get(name)
    return default if v is None else v.strip().lower() in ("1", "true", "yes", "on")
