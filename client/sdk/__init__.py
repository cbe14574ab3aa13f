"""A typed Python client for Trifecta (sync and async, on httpx) that returns numpy masks.

    from client.sdk import Client
    with Client("http://127.0.0.1:8080") as c:
        mask = c.textmask(open("photo.jpg", "rb").read())        # H x W bool array
        job = c.submit_image("textmask", "photo.jpg")             # {"job_id", ...}
        c.wait(job["job_id"]); mask = c.fetch_mask(job["job_id"])

    async with AsyncClient(url) as c:                             # the same calls, awaited
        mask = await c.textmask(data)

Every endpoint family has its calls: sync masks (`run`, `textmask`, `segmentation`,
`facemask`, `run_tar`), jobs (`submit*`, `job`, `jobs`, `wait`, `cancel`, `fetch*`),
WebDataset shards (`submit_shards`, `upload_shard`), SAM3 images (`sam3_segment`,
`sam3_cached_features`), V-JEPA 2 (`vjepa2_infer`, `submit_video`, `submit_frames`),
Mask2Former (`m2f_segment`, `m2f_segment_batch`) and operations (`health`,
`models_info`, `metrics`, `service_info`). Masks arrive as packbits, PNG or COCO RLE and
are decoded into `numpy` bool arrays (storage/codecs.py, the server's own codecs).

Both clients share one description of each call (`_Call`: the request and how to parse
its answer), so the sync and async versions cannot drift apart.
"""

from client.sdk.clients import AsyncClient, Client
from client.sdk.core import (
    TERMINAL,
    ClipResult,
    Fetched,
    ImageInput,
    MaskResult,
    Prediction,
    Sam3Instances,
    Sam3Result,
    Timing,
    TrifectaClientError,
    decode_mask_response,
)

__all__ = [
    "TERMINAL",
    "AsyncClient",
    "Client",
    "ClipResult",
    "Fetched",
    "ImageInput",
    "MaskResult",
    "Prediction",
    "Sam3Instances",
    "Sam3Result",
    "Timing",
    "TrifectaClientError",
    "decode_mask_response",
]
