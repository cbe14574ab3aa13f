"""The client experience against a real stack: `trifecta submit|status|fetch|cancel|overlay`
run as subprocesses (human and `--json` output, progress bars on a terminal, exit codes),
and the Python SDK (sync and async) returning numpy masks."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from client.benchkit import ROOT
from client.sdk import AsyncClient, Client, TrifectaClientError
from storage import codecs
from tests.conftest import with_text


@pytest.fixture(scope="module")
def stack(make_stack):
    st = make_stack(models=["textmask"])
    st.start_worker("echo", "echo-cli", env={"MAX_CONCURRENCY_PER_GPU": "1", "MAX_BATCH_SIZE": "1"})
    st.wait_live("echo")
    return st


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    data, gt = with_text("coffee.png")
    p = tmp_path_factory.mktemp("cli") / "coffee-text.png"
    p.write_bytes(data)
    truth = np.asarray(Image.open(p).convert("RGB"))
    return p, gt, truth


def cli(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    if check:
        assert r.returncode == 0, f"{args} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def test_submit_wait_status_fetch_and_overlay(stack, photo_file, tmp_path: Path) -> None:
    img, gt, rgb = photo_file
    r = cli("submit", str(img), "--model", "textmask", "--format", "png", "--wait", "--json", "--url", stack.url)
    (job,) = json.loads(r.stdout)  # --json: stdout is pure JSON, progress never mixes in
    assert job["status"] == "succeeded" and job["model"] == "textmask"
    (out,) = job["result"]["outputs"]
    assert out["format"] == "png" and out["shape"] == [400, 600]
    jid = job["job_id"]

    st = json.loads(cli("status", jid, "--json", "--url", stack.url).stdout)
    assert st["job_id"] == jid and st["status"] == "succeeded" and st["result"]["outputs"][0]["key"] == "mask"
    human = cli("status", jid, "--url", stack.url).stdout.strip()
    assert human.startswith(f"{jid} succeeded textmask") and "outputs: mask" in human and " ms" in human
    listed = cli("status", "--url", stack.url, env={"TRIFECTA_URL": stack.url}).stdout
    assert jid in listed

    mask_png = tmp_path / "mask.png"
    f = json.loads(cli("fetch", jid, "-o", str(mask_png), "--json", "--url", stack.url).stdout)
    assert f == {"job_id": jid, "output": str(mask_png), "bytes": mask_png.stat().st_size, "format": "png"}
    mask = codecs.decode_png(mask_png.read_bytes())
    assert mask.shape == gt.shape and mask.sum() > 300 and mask[gt].sum() / mask.sum() > 0.9

    ov = tmp_path / "overlay.png"
    assert cli("overlay", str(img), str(mask_png), "-o", str(ov)).stdout.strip() == str(ov)
    got = np.asarray(Image.open(ov).convert("RGB"), np.float32)
    blended = rgb.astype(np.float32) * 0.5 + np.array([255, 0, 80], np.float32) * 0.5
    assert np.abs(got[mask] - blended[mask]).max() <= 1 and (got[~mask] == rgb[~mask]).all()
    # the overlay reads packbits masks as well
    pb = tmp_path / "mask.packbits"
    pb.write_bytes(codecs.encode_packbits(mask))
    cli("overlay", str(img), str(pb), "-o", str(tmp_path / "ov2.png"))
    assert (np.asarray(Image.open(tmp_path / "ov2.png").convert("RGB")) == np.asarray(Image.open(ov).convert("RGB"))).all()


def test_cancel_a_queued_job_and_exit_codes(stack, tmp_path: Path) -> None:
    blob = tmp_path / "x.bin"
    blob.write_bytes(b"payload")
    first = json.loads(cli("submit", str(blob), "--model", "echo", "--params", '{"sleep_ms": 6000}', "--json", "--url", stack.url).stdout)[0]
    second = json.loads(cli("submit", str(blob), "--model", "echo", "--json", "--url", stack.url).stdout)[0]
    assert first["status"] == second["status"] == "queued"
    # the second waits in the queue behind the first (the worker sleeps 6 s in it): cancelled there.
    # It goes first: once the first is cancelled the worker is free and the second would run at once.
    out = cli("cancel", second["job_id"], "--url", stack.url).stdout.strip()
    assert out == f"{second['job_id']} cancelled"
    # the first one is running: a cancel lands, and its result never does
    assert json.loads(cli("cancel", first["job_id"], "--json", "--url", stack.url).stdout) == {"job_id": first["job_id"], "status": "cancelled"}
    for jid in (first["job_id"], second["job_id"]):
        assert json.loads(cli("status", jid, "--json", "--url", stack.url).stdout)["status"] == "cancelled"

    r = cli("status", "f" * 32, "--json", "--url", stack.url, check=False)
    assert r.returncode == 2 and "job_not_found" in r.stderr and json.loads(r.stdout)["error"]["code"] == "job_not_found"
    r = cli("status", "f" * 32, "--url", "http://127.0.0.1:1", check=False)
    assert r.returncode == 2 and "cannot reach http://127.0.0.1:1" in r.stderr
    r = cli("submit", "--model", "echo", "--url", stack.url, check=False)
    assert r.returncode == 2 and "give image files" in r.stderr


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """A user mistake: exit status 2, one line on stderr, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_user_mistakes_are_one_line_and_exit_2(stack, photo_file, tmp_path: Path) -> None:
    img, _, _ = photo_file
    jobs_before = [j["job_id"] for j in json.loads(cli("status", "--json", "--limit", "100", "--url", stack.url).stdout)["jobs"]]
    # a missing file: nothing is submitted, even with a good file next to it
    line = one_line_error(cli("submit", str(img), str(tmp_path / "nope.png"), "--model", "textmask", "--url", stack.url, check=False))
    assert line == f"error: {tmp_path / 'nope.png'}: no such file"
    assert [j["job_id"] for j in json.loads(cli("status", "--json", "--limit", "100", "--url", stack.url).stdout)["jobs"]] == jobs_before
    # an unknown model name: argparse's message, on one line
    line = one_line_error(cli("submit", str(img), "--model", "unicorn", "--url", stack.url, check=False))
    assert line.startswith("trifecta submit: error: argument --model: invalid choice: 'unicorn'") and "textmask" in line and "--help" in line
    # a known model nobody serves here: the service's 503, on one line
    line = one_line_error(cli("submit", str(img), "--model", "segmentation", "--url", stack.url, check=False))
    assert line.startswith("error: 503 no_worker: no live worker serves 'segmentation'")
    # a server that is not there (nothing listens on port 1)
    line = one_line_error(cli("status", "--url", "http://127.0.0.1:1", check=False))
    assert line.startswith("error: cannot reach http://127.0.0.1:1 (") and "trifecta up" in line
    # bad --params, a missing image for overlay, a directory that does not exist for fetch
    assert "--params is not valid JSON" in one_line_error(cli("submit", str(img), "--model", "echo", "--params", "{nope", "--url", stack.url, check=False))
    assert one_line_error(cli("overlay", str(tmp_path / "gone.png"), str(img), check=False)) == f"error: {tmp_path / 'gone.png'}: No such file or directory"
    assert "does not exist" in one_line_error(cli("fetch", "0" * 32, "-o", str(tmp_path / "no" / "dir" / "m.png"), "--url", stack.url, check=False))
    # --json: stdout holds only JSON, errors included
    r = cli("status", "--json", "--url", "http://127.0.0.1:1", check=False)
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["code"] == "unreachable"
    r = cli("submit", str(tmp_path / "nope.png"), "--model", "echo", "--json", "--url", stack.url, check=False)
    assert r.returncode == 2 and json.loads(r.stdout) == {"error": {"code": "usage", "message": f"{tmp_path / 'nope.png'}: no such file"}}
    # and the service still answers afterwards
    assert json.loads(cli("submit", str(img), "--model", "echo", "--wait", "--json", "--url", stack.url).stdout)[0]["status"] == "succeeded"


def test_client_commands_are_quiet_unless_verbose(stack, photo_file) -> None:
    img, _, _ = photo_file
    r = cli("submit", str(img), "--model", "echo", "--wait", "--url", stack.url)
    assert r.stderr == "" and "HTTP Request" not in r.stdout  # no httpx INFO lines, no progress off a terminal
    (line,) = r.stdout.strip().splitlines()
    assert line.split()[1] == "succeeded"
    r = cli("submit", str(img), "--model", "echo", "--wait", "--url", stack.url, "-v")
    assert "HTTP Request: POST " + stack.url + "/v1/jobs" in r.stderr and 'HTTP/1.1 202 Accepted"' in r.stderr
    assert len(r.stdout.strip().splitlines()) == 1  # logs go to stderr, the result stays on stdout
    # -v anywhere: before the command as well
    r = cli("-v", "status", "--url", stack.url)
    assert "HTTP Request: GET " + stack.url + "/v1/jobs" in r.stderr


def test_wait_prints_absolute_urls_and_fetch_writes_a_png(stack, photo_file, tmp_path: Path) -> None:
    img, gt, _ = photo_file
    # packbits (the default format) stored; the human --wait line names the output by an absolute URL
    r = cli("submit", str(img), "--model", "textmask", "--wait", "--url", stack.url)
    jid, status, url = r.stdout.split()
    assert status == "succeeded" and url == f"{stack.url}/v1/jobs/{jid}/result?key=mask"
    fetched = httpx.get(url, timeout=10)
    assert fetched.status_code == 200 and fetched.headers["x-mask-format"] == "packbits"
    stored = codecs.decode_packbits(fetched.content)
    assert stored.shape == gt.shape and stored[gt].sum() / stored.sum() > 0.9
    # --json with --wait: the same absolute URL, stdout pure JSON
    (job,) = json.loads(cli("submit", str(img), "--model", "textmask", "--wait", "--json", "--url", stack.url).stdout)
    assert job["result"]["outputs"][0]["url"] == f"{stack.url}/v1/jobs/{job['job_id']}/result?key=mask"

    # -o NAME.png: a real PNG of the same mask, whatever it was stored as
    png = tmp_path / "mask.png"
    out = cli("fetch", jid, "-o", str(png), "--url", stack.url).stdout.strip()
    assert out == f"wrote {png.stat().st_size} bytes (png) to {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (codecs.decode_png(png.read_bytes()) == stored).all()
    # any other name: the bytes as stored
    raw = tmp_path / "mask.packbits"
    f = json.loads(cli("fetch", jid, "-o", str(raw), "--json", "--url", stack.url).stdout)
    assert f == {"job_id": jid, "output": str(raw), "bytes": len(fetched.content), "format": "packbits"} and raw.read_bytes() == fetched.content
    # an RLE-stored mask converts too
    (rle_job,) = json.loads(cli("submit", str(img), "--model", "textmask", "--format", "rle", "--wait", "--json", "--url", stack.url).stdout)
    png2 = tmp_path / "rle.png"
    cli("fetch", rle_job["job_id"], "-o", str(png2), "--url", stack.url)
    assert (codecs.decode_png(png2.read_bytes()) == stored).all()
    # echo writes no mask: a PNG is refused with a message, and nothing is written
    (echo_job,) = json.loads(cli("submit", str(img), "--model", "echo", "--wait", "--json", "--url", stack.url).stdout)
    no = tmp_path / "echo.png"
    line = one_line_error(cli("fetch", echo_job["job_id"], "-o", str(no), "--url", stack.url, check=False))
    assert "cannot be written as a PNG" in line and not no.exists()


def test_wait_shows_a_progress_bar_on_a_terminal(stack, photo_file) -> None:
    img, _, _ = photo_file
    master, slave = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "submit", str(img), str(img), "--model", "textmask", "--wait", "--url", stack.url],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=slave, text=True, env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(slave)
    term = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        term += chunk
    out, _ = p.communicate(timeout=60)
    os.close(master)
    assert p.returncode == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all(ln.split()[1] == "succeeded" for ln in lines)  # stdout: one line per job
    screen = term.decode(errors="replace")
    for ln in lines:
        assert ln.split()[0][:12] in screen  # a bar per job, on the terminal (stderr)
    assert "━" in screen and "succeeded" in screen


# ---------------------------------------------------------------- the SDK
def test_sdk_returns_numpy_masks_in_every_format(stack, photo_file) -> None:
    img, gt, _ = photo_file
    with Client(stack.url) as c:
        ref = c.textmask(img)  # a path works as well as bytes
        assert ref.dtype == np.bool_ and ref.shape == (400, 600) and ref[gt].sum() / ref.sum() > 0.9
        for fmt in ("png", "rle"):
            assert (c.run("textmask", img.read_bytes(), fmt=fmt) == ref).all()
        timed = c.run_timed("textmask", img)
        assert (timed.mask == ref).all() and timed.timing.worker.startswith("textmask-") and timed.timing.model_ms > 0 and len(timed.timing.job_id) == 32
        # a WebDataset tar in one request: one mask per sample, in order
        bio = io.BytesIO()
        with tarfile.open(fileobj=bio, mode="w") as tf:
            for key in ("a", "b"):
                data = img.read_bytes()
                ti = tarfile.TarInfo(f"{key}.png")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        masks = c.run_tar("textmask", bio.getvalue())
        assert len(masks) == 2 and all((m == ref).all() for m in masks)
        # jobs
        acc = c.submit_image("textmask", img, {"format": "rle"})
        j = c.wait(acc["job_id"], timeout=60)
        assert j["status"] == "succeeded" and (c.fetch_mask(acc["job_id"]) == ref).all()
        assert c.jobs()["jobs"][0]["job_id"] == acc["job_id"]
        # operations
        assert c.health()["ready"] is True
        info = c.models_info()
        assert info["textmask"]["live_workers"] == 1 and info["echo"]["live_workers"] == 1
        assert c.service_info()["service"] == "Trifecta"
        assert 'trifecta_workers_live{model="textmask"} 1.0' in c.metrics()
        with pytest.raises(TrifectaClientError) as e:
            c.run("segmentation", img)
        assert e.value.status == 503 and e.value.code == "no_worker"
        with pytest.raises(TrifectaClientError) as e:
            c.job("0" * 32)
        assert e.value.status == 404 and e.value.code == "job_not_found"


def test_async_sdk_gives_the_same_masks_concurrently(stack, photo_file) -> None:
    img, _, _ = photo_file
    ref = codecs.decode_png(httpx.post(stack.url + "/run_textmask?format=png", content=img.read_bytes(), headers={"Content-Type": "image/png"}, timeout=60).content)

    async def go() -> tuple[list[np.ndarray], np.ndarray, dict]:
        async with AsyncClient(stack.url) as c:
            masks = await asyncio.gather(*(c.textmask(img, fmt=f) for f in ("packbits", "png", "rle", "packbits")))
            acc = await c.submit_image("textmask", img)
            j = await c.wait(acc["job_id"], timeout=60)
            assert j["status"] == "succeeded"
            return list(masks), await c.fetch_mask(acc["job_id"]), await c.health()

    masks, fetched, health = asyncio.run(go())
    assert all((m == ref).all() for m in masks) and (fetched == ref).all() and health["status"] == "healthy"
