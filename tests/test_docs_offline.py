"""/docs and /redoc work with no internet: every script, style sheet and icon they reference is
served by the running API itself, and their HTML names no other host."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for k, v in attrs:
            if k in ("src", "href") and v:
                self.refs.append(v)


@pytest.fixture(scope="module")
def api(make_stack) -> str:  # noqa: ANN001
    return make_stack(models=[]).url


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_page_assets_are_served_by_the_api(api: str, page: str) -> None:
    r = httpx.get(api + page, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    # no other host anywhere in the page: not in a tag, not in the inline script
    assert not re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), re.findall(r"(?:https?:)?//[^\s'\"]+", html)
    p = _Refs()
    p.feed(html)
    # the inline script names the schema it loads (Swagger's `url:`, ReDoc's spec-url)
    spec = re.findall(r"""(?:url:\s*|spec-url=)['"]([^'"]+)['"]""", html)
    assert spec == ["/openapi.json"], spec
    assets = [u for u in p.refs if urlsplit(u).path.rsplit(".", 1)[-1] in ("js", "css", "png")]
    want = {"/docs": {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"}, "/redoc": {"redoc.standalone.js", "favicon.png"}}[page]
    assert {u.rsplit("/", 1)[-1] for u in assets} == want, p.refs
    for u in assets + spec:
        full = urljoin(api + page, u)
        assert urlsplit(full).netloc == urlsplit(api).netloc
        a = httpx.get(full, timeout=10)
        assert a.status_code == 200, (u, a.status_code)
        ext = "." + urlsplit(u).path.rsplit(".", 1)[-1]
        if ext == ".json":
            assert a.json()["info"]["title"] == "Trifecta" and "/v1/jobs" in a.json()["paths"]
            continue
        assert CONTENT_TYPES[ext] in a.headers["content-type"], (u, a.headers["content-type"])
        assert len(a.content) > {".js": 100_000, ".css": 10_000, ".png": 100}[ext]  # the real bundles, not a stub
    # a missing asset is a plain 404 and the page still answers afterwards
    miss = httpx.get(urljoin(api, assets[0].rsplit("/", 1)[0] + "/no-such.js"), timeout=10)
    assert miss.status_code == 404
    assert httpx.get(api + page, timeout=10).status_code == 200
