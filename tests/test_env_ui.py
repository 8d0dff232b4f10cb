"""The env server's own page at `GET /` (issue 26), over HTTP: open without a token while the API is not, a
self-contained page (nothing loaded from elsewhere) under a Content-Security-Policy that admits exactly its own inline
script and style, documented in /openapi.json, and gone with `--no-ui`. What the page does in a browser is
tests/test_env_ui_browser.py's (the browser tier)."""

from __future__ import annotations

import base64
import hashlib
import re

import aiohttp

from env_server.config import parse_serve_args
from env_server.ui import PAGE


async def test_the_page_is_open_self_contained_and_locked_down(make_env_server) -> None:
    server = await make_env_server(auth_token="s3cret")
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/") as r:  # a browser's navigation: no Authorization header
            assert r.status == 200 and r.content_type == "text/html" and r.charset == "utf-8"
            body = await r.read()
            csp = r.headers["Content-Security-Policy"]
            assert r.headers["X-Content-Type-Options"] == "nosniff"
        async with http.get(server.url + "/v1/info") as r:
            assert r.status == 401, "the API still needs the token"
        async with http.get(server.url + "/v1/info", headers={"Authorization": "Bearer s3cret"}) as r:
            assert r.status == 200
        async with http.get(server.url + "/openapi.json") as r:
            doc = await r.json()
    assert body == PAGE
    text = body.decode()
    # nothing from elsewhere: no src= at all, no absolute URL in an href, every API path relative
    assert not re.search(r"\bsrc\s*=", text) and not re.search(r"href=\"(https?:)?//", text)
    assert "@import" not in text and "url(" not in text
    for call in re.findall(r'api\("\w+", "([^"]+)"', text):
        assert not call.startswith(("/", "http")), call
    # the CSP admits the page's own inline blocks, by hash, and nothing else
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'" and directives["connect-src"] == "'self'"
    for tag in ("script", "style"):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.S)
        want = {f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks}
        assert blocks and set(directives[f"{tag}-src"].split()) == want, tag
    assert "style=" not in text, "an inline style attribute would be blocked by the CSP"
    # text from the server goes in as text: the script never assigns markup
    script = re.search(r"<script>(.*?)</script>", text, re.S).group(1)
    assert "innerHTML" not in script and "outerHTML" not in script and "insertAdjacentHTML" not in script
    assert "localStorage" not in script and "sessionStorage" not in script and "document.cookie" not in script
    op = doc["paths"]["/"]["get"]
    assert op["security"] == [] and "text/html" in op["responses"]["200"]["content"]


async def test_no_ui_removes_the_route_and_its_documentation(make_env_server) -> None:
    assert parse_serve_args(["--no-ui"]).ui is False and parse_serve_args([]).ui is True
    server = await make_env_server(ui=False)
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with http.get(server.url + "/openapi.json") as r:
            doc = await r.json()
    assert "/" not in doc["paths"] and "/v1/info" in doc["paths"]
