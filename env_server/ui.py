"""`GET /`: the env server's own page (`ui.html`, served as is: no build step, nothing loaded from elsewhere).

A person plays an episode by hand through the same public API any client uses (`/v1/info`, `/v1/episodes`, its
step, `/v1/snapshots/{id}/episodes` to fork at any turn, `GET /v1/snapshots/{id}` to export, `POST /v1/snapshots` and
`?view=json` to continue an exported state: a file the person picks, read by the browser only to send it). The page
itself holds no data, so the route needs no token (a browser navigation sends no bearer header); when the API answers
401 the page asks for the token and keeps it in its memory only (no storage, no cookie), sending it on every call.
Every text from the server goes into the page as text (`textContent`), never as markup; the Content-Security-Policy
admits only the page's own inline script and style (by their hashes) and calls to this origin (no image, frame, form
or other source), so even a mistake there could not run a script or load anything that came with a passage. Starting
a new question (or state) deletes the previous tree's episodes and imported snapshots. `ServerConfig.ui` (`--no-ui`)
removes the route.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from aiohttp import web

PAGE = (Path(__file__).parent / "ui.html").read_bytes()


def _hashes(tag: str) -> list[str]:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>".encode(), PAGE, re.S)
    assert blocks, f"ui.html has no inline <{tag}>"
    return [f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'" for b in blocks]


CSP = (
    "default-src 'none'; "
    f"script-src {' '.join(_hashes('script'))}; "
    f"style-src {' '.join(_hashes('style'))}; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def page(request: web.Request) -> web.Response:
    """`GET /` handler."""
    return web.Response(body=PAGE, content_type="text/html", charset="utf-8", headers=HEADERS)
