"""Hostile-upload tools shared by the hostile-input tests: raw-socket POSTs that stop when the
server answers, a process's peak memory, and JPEGs with many scans.

status, body, sent, total = post_until_answered(url, "/v1/jobs", ctype, pieces, chunked=True)
peak_rss_mb(api_pid)                     # VmHWM: the most the process ever held
many_scans(progressive_jpeg, 200)        # its last scan repeated 200 more times
"""

from __future__ import annotations

import json
import select
import socket
from pathlib import Path
from urllib.parse import urlsplit


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def post_until_answered(url: str, path: str, ctype: str, pieces: list[bytes], chunked: bool) -> tuple[int, dict, int, int]:
    """POST a body piece by piece over a raw socket, stopping as soon as the server answers.

    (httpx writes the whole body before it reads the answer, so it cannot tell when the
    server refused.) Returns (status, JSON body, bytes of body sent, bytes of body in all).
    """
    u = urlsplit(url)
    total = sum(len(x) for x in pieces)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)  # little in flight beyond what the server has read
        sock.settimeout(30)
        sock.connect((u.hostname, u.port))
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: {ctype}\r\n{framing}\r\n\r\n".encode())
        sent = 0
        for piece in pieces:
            if select.select([sock], [], [], 0)[0]:  # an answer (or a close) is waiting: stop sending
                break
            try:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
            except OSError:
                break
            sent += len(piece)
        else:
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += sock.recv(65536)
        head, rest = raw.split(b"\r\n\r\n", 1)
        status = int(head.split()[1])
        n = int(next(ln.split(b":", 1)[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")))
        while len(rest) < n:
            rest += sock.recv(65536)
    return status, json.loads(rest[:n]), sent, total


def many_scans(jpeg: bytes, copies: int) -> bytes:
    """A progressive JPEG with its last scan repeated: libjpeg still decodes it (a repeated
    refinement scan is only a warning), so only a scan count can stop it."""
    last = jpeg.rindex(b"\xff\xda")  # the last SOS (entropy-coded data has no FFDA)
    assert jpeg.endswith(b"\xff\xd9")
    return jpeg[:-2] + jpeg[last:-2] * copies + b"\xff\xd9"
