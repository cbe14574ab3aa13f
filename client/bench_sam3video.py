"""`trifecta bench --only sam3video`: SAM3 video propagation through the API vs the tracker itself.

The runner's tracker is called directly: same run, same video, same checkpoint, same prompts.

    API     `POST /api/v1/video/session/{id}/propagate` (forward over the whole video) on a
            session held by a real sam3 worker process: API → Redis → the session's worker
            (propagate, RLE-encode every mask) → the reply with every frame → JSON to the client.
    direct  `Sam3VideoTracker.propagate` (workers/runners/sam3_video.py) in this process: the
            same transformers models and sessions, the masks at the video's size, nothing else.

Both sessions hold the same prompts (a text prompt, so `Sam3VideoModel` detects and tracks,
and a box, so `Sam3TrackerVideoModel` tracks too; the frames merge both), on the same video
(written here with PyAV), with the same torch threads. Segments alternate (direct, API,
direct, job, direct, …); each API segment is compared with the mean of the direct segments
on either side, so a change in the machine's load falls on both sides alike; the figure is
the median. A second, reported row does the same for the propagation as a job (`"async":
true`: each frame written to storage, progress in the job record), timed from the submit to
the poll that sees `succeeded`.

The checkpoint is the tiny random-init one (`trifecta models tiny sam3`: 112 px input, a
2-layer ViT): its frames cost tens of milliseconds, so the service's fixed costs weigh far
more than they would with facebook/sam3 (1008 px, ViT-L: seconds per frame on this CPU)
— the worst case for this ratio.

    python -m client.bench_sam3video [--quick]
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tasks import keys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads here must not spin while the worker computes

import httpx

from client.benchkit import Stack
from tasks.embedded_redis import EmbeddedRedis

TEXT = [{"type": "text", "text": "moving object"}]
POLL_S = 0.1  # the job's status polls: a client's, not a busy loop competing with the worker for the CPU
BOX = [{"type": "box", "box": [0.5, 0.5, 0.3, 0.3]}]


def row(goal: str, figure: float, target: float, unit: str = "x", **details: Any) -> dict[str, Any]:
    return {"goal": goal, "figure": round(float(figure), 3), "target": target, "higher_is_better": True, "pass": bool(figure >= target), "unit": unit, "details": details}


def write_video(path: Path, n: int, w: int, h: int, fps: int = 25) -> None:
    """Moving shapes (a square crossing, a disc falling) on a noisy background, H.264."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    bg = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            im = bg.copy()
            x = int(i * (w - h // 4) / max(1, n - 1))
            im[h // 4 : h // 2, x : x + h // 4] = (240, 40, 40)
            cy = int(h / 8 + i * (h * 3 / 4) / max(1, n - 1))
            im[(yy - cy) ** 2 + (xx - w // 2) ** 2 < (h // 10) ** 2] = (40, 220, 60)
            for p in s.encode(av.VideoFrame.from_ndarray(im, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def run(quick: bool) -> list[dict[str, Any]]:
    import av
    import torch

    from tasks.sam3_video import parse_prompts
    from tasks.settings import Settings
    from workers.device import Device
    from workers.runners.sam3 import write_tiny
    from workers.runners.sam3_video import Sam3VideoTracker

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per status poll
    threads = max(1, len(os.sched_getaffinity(0)))
    # short segments, many rounds: on a shared machine, neighbours' load changes by the second,
    # and a segment is only compared with the ones right before and after it
    n_frames, (w, h) = (12, (320, 240)) if quick else (24, (320, 240))
    rounds = 3 if quick else 8
    tmp = Path(tempfile.mkdtemp(prefix="trifecta-bench-sam3video-"))
    ckpt = write_tiny(str(tmp / "sam3-tiny"))
    vdir = tmp / "videos"
    vdir.mkdir()
    video = vdir / "shapes.mp4"
    write_video(video, n_frames, w, h)
    srv = EmbeddedRedis(tmp / "redis", appendonly=False).start()
    env = {
        "SAM3_CHECKPOINT": ckpt, "ALLOWED_INPUT_ROOTS": str(vdir), "INTRA_OP_THREADS": str(threads), "MAX_BATCH_SIZE": "1",
        "MAX_CONCURRENCY_PER_GPU": "1", "SESSION_CALL_TIMEOUT_S": "3600", "MAX_PROMPTS": "8",
    }
    st = Stack.create(f"redis://127.0.0.1:{srv.port}/4", tmp / "stack", env=env)
    try:
        w0 = st.start_worker("sam3", "sam3v-bench", wait=False)
        st.wait_worker("sam3v-bench", w0, timeout=600)
        st.start_api()
        st.wait_live("sam3")
        api = st.url + "/api/v1/video"

        # the API's session: started from the file, a text prompt and a box on frame 0
        with httpx.Client(timeout=3600) as c:
            r = c.post(api + "/session/start", json={"video_path": str(video), "session_id": "bench"})
            r.raise_for_status()
            for prompts in (TEXT, BOX):
                c.post(api + "/session/bench/prompt", json={"frame_index": 0, "prompts": prompts}).raise_for_status()

            # the same in this process: the runner's tracker on the same frames, checkpoint and prompts
            torch.set_num_threads(threads)
            with av.open(str(video)) as f:
                frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
            tracker = Sam3VideoTracker(Settings(sam3_checkpoint=ckpt), Device("cpu", 0, None, threads))
            cache: dict[str, Any] = {}
            state = tracker.new_state(frames, cache)
            tracker.add_text(state, 0, [TEXT[0]["text"]])
            gstate = tracker.new_geometric_state(frames, cache)
            tracker.add_geometric(gstate, 0, 1_000, parse_prompts(BOX, max_prompts=8))

            def direct() -> tuple[float, int, int]:
                t = time.perf_counter()
                n = objs = 0
                for fr in tracker.propagate(state, gstate, 0, None, False):
                    n += 1
                    objs += len(fr.obj_ids)
                return time.perf_counter() - t, n, objs

            worker_ms: list[float] = []

            def through_api() -> tuple[float, int, int]:
                t = time.perf_counter()
                r = c.post(api + "/session/bench/propagate", json={"direction": "forward", "start_frame_index": 0})
                dt = time.perf_counter() - t
                r.raise_for_status()
                b = r.json()
                worker_ms.append(b["processing_time_ms"])
                return dt, b["total_frames"], sum(len(v["objects"]) for v in b["results"].values())

            def as_job() -> tuple[float, int]:
                t = time.perf_counter()
                r = c.post(api + "/session/bench/propagate", json={"direction": "forward", "start_frame_index": 0, "async": True})
                r.raise_for_status()
                jid = r.json()["job_id"]
                while (j := c.get(f"{st.url}/v1/jobs/{jid}").json())["status"] not in keys.TERMINAL:
                    time.sleep(POLL_S)
                dt = time.perf_counter() - t
                if j["status"] != "succeeded":
                    raise RuntimeError(f"propagate job {jid}: {j}")
                return dt, len(j["result"]["outputs"])

            direct()  # untimed: first-call allocations on both sides
            through_api()
            as_job()
            worker_ms.clear()
            d_s: list[float] = []
            a_s: list[float] = []
            j_s: list[float] = []
            objects: dict[str, list[int]] = {"direct": [], "api": []}

            def timed_direct() -> None:
                dt, n, o = direct()
                d_s.append(dt)
                objects["direct"].append(o)

            # direct, API, direct, job, direct, API, direct, job, direct …
            timed_direct()
            for _ in range(rounds):
                dt, na, o = through_api()
                if na != n_frames:
                    raise RuntimeError(f"the API propagated {na} frames, not {n_frames}")
                a_s.append(dt)
                objects["api"].append(o)
                timed_direct()
                dt, nj = as_job()
                if nj != n_frames:
                    raise RuntimeError(f"the job stored {nj} frames, not {n_frames}")
                j_s.append(dt)
                timed_direct()
        api_pairs = [((d_s[2 * i] + d_s[2 * i + 1]) / 2) / a_s[i] for i in range(rounds)]
        job_pairs = [((d_s[2 * i + 1] + d_s[2 * i + 2]) / 2) / j_s[i] for i in range(rounds)]
        direct_fps = n_frames / statistics.median(d_s)
        api_fps = n_frames / statistics.median(a_s)
        job_fps = n_frames / statistics.median(j_s)
        common = {
            "checkpoint": "tiny random-init SAM3 (`trifecta models tiny sam3`: 112 px input, 2-layer ViT 32 wide, FPN/tracker 128 wide, 2 objects max); not facebook/sam3",
            "video": f"{n_frames} frames {w}x{h} H.264 (moving shapes)",
            "prompts": "text 'moving object' (Sam3VideoModel: 2 objects) + one box (Sam3TrackerVideoModel) on frame 0, forward over the whole video",
            "threads": threads,
            "direct_frames_per_s": round(direct_fps, 2),
        }
        return [
            row(
                "SAM3 video propagation frames/s through the API (POST propagate) / the runner's tracker in-process",
                statistics.median(api_pairs), 0.9,
                measure=f"median over {rounds} API propagations of {n_frames} frames, each against the direct propagations before and after it",
                pair_ratios=[round(x, 3) for x in api_pairs], api_frames_per_s=round(api_fps, 2), api_s=[round(x, 3) for x in a_s], direct_s=[round(x, 3) for x in d_s],
                api_worker_propagate_s=[round(x / 1000, 3) for x in worker_ms], best_of_ratio=round(min(d_s) / min(a_s), 3),
                objects_per_run=objects, **common,
            ),
            row(
                "SAM3 video propagation as a job (async: frames to storage, progress) frames/s / the runner's tracker in-process (reported)",
                statistics.median(job_pairs), 0.0,
                measure=f"median over {rounds} jobs (submit → GET /v1/jobs/{{id}} says succeeded, polled every {POLL_S:g} s), each against the direct propagations before and after it",
                pair_ratios=[round(x, 3) for x in job_pairs], job_frames_per_s=round(job_fps, 2), job_s=[round(x, 3) for x in j_s], **common,
            ),
        ]
    finally:
        st.stop()
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=2))
