"""The Python client's SAM3 video-session calls against a real API and session workers
(decode-only `echo` sessions, as in tests/test_sam3_video.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from client.sdk import AsyncClient, Client, TrifectaClientError
from tests.helpers.videos import write_video


@pytest.fixture(scope="module")
def vids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sdkvideos")
    write_video(d / "a.mp4", frames=10)
    return d


@pytest.fixture(scope="module")
def stack(make_stack, vids: Path):
    env = {"VIDEO_SESSION_MODEL": "echo", "MAX_SESSIONS_PER_WORKER": "3", "ALLOWED_INPUT_ROOTS": str(vids), "WORKER_HEARTBEAT_S": "1"}
    return make_stack(models=["echo"], env=env)


def test_sync_client_session_lifecycle(stack, vids: Path) -> None:
    with Client(stack.url) as c:
        s = c.video_start(str(vids / "a.mp4"), session_id="sdk-1")
        assert s["session_id"] == "sdk-1" and s["status"] == "ready"
        assert s["video_info"]["total_frames"] == 10 and s["video_info"]["resolution"] == {"width": 64, "height": 48}
        up = c.video_upload(vids / "a.mp4")
        assert up["video_info"]["total_frames"] == 10 and up["session_id"] != "sdk-1"
        ids = {x["session_id"] for x in c.video_sessions()["sessions"]}
        assert {"sdk-1", up["session_id"]} <= ids
        st = c.video_status("sdk-1")
        assert st["session_id"] == "sdk-1" and st["video_info"]["total_frames"] == 10
        with pytest.raises(TrifectaClientError) as e:  # decode-only sessions have no video model: 503, said clearly
            c.video_prompt("sdk-1", 0, ["a red square"])
        assert e.value.status == 503
        with pytest.raises(TrifectaClientError) as e:
            c.video_status("never-started")
        assert e.value.status == 404
        c.video_close("sdk-1")
        c.video_close(up["session_id"])
        assert not {"sdk-1", up["session_id"]} & {x["session_id"] for x in c.video_sessions()["sessions"]}


def test_async_client_session_calls(stack, vids: Path) -> None:
    async def go() -> tuple[dict, dict]:
        async with AsyncClient(stack.url) as c:
            s = await c.video_start(str(vids / "a.mp4"))
            st = await c.video_status(s["session_id"])
            await c.video_close(s["session_id"])
            return s, st

    s, st = asyncio.run(go())
    assert st["session_id"] == s["session_id"] and st["video_info"]["fps"] == pytest.approx(12.0)
