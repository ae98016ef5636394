"""The playground page at `/` and its assets under `/playground/`.

`GET /` answers the page to browsers (an Accept header naming text/html) and the JSON links
to everyone else (curl, SDKs, scripts), so neither has to know another address. The page is
plain HTML, JS and CSS shipped as package data (server/static/playground/): nothing from a CDN,
so it works air-gapped. It builds its form at run time from `GET /api/v3/models`, the schema the
validator's field table generates, so the form never drifts from what the server accepts.

No API key here: the page and its assets hold no data; the calls the page makes carry the key
the user typed (kept in the browser's localStorage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from server.kernel.errors import ApiError
from server.settings import MODEL_ID
from server.state import state_of

router = APIRouter()

STATIC = Path(__file__).resolve().parent.parent / "static" / "playground"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
HEADERS = {
    # Scripts and styles from this server only, none inline: a CDN reference or an injected
    # script cannot run. Media and the upload PUT may live elsewhere (a public URL, S3).
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src * data: blob:; "
        "media-src * data: blob:; connect-src *; frame-ancestors 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Upgrades must show at once; the files are small.
    "Cache-Control": "no-cache",
}


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "").lower()


@router.get(
    "/",
    responses={
        200: {
            "description": "The playground page (browsers) or the JSON links (others)",
            "content": {"text/html": {}, "application/json": {}},
        }
    },
)
def root(request: Request) -> Response:
    """The playground to a browser; where to go from here to API clients."""
    # Vary: one URL, two bodies, so caches must key on Accept.
    if _wants_html(request):
        return FileResponse(
            STATIC / "index.html", media_type=TYPES[".html"], headers={**HEADERS, "Vary": "Accept"}
        )
    return JSONResponse(links(request), headers={"Vary": "Accept"})


def links(request: Request) -> dict[str, Any]:
    st = state_of(request)
    base = st.base_url(request)
    return {
        "name": "wan-vace",
        "model": MODEL_ID,
        "submit": f"POST {base}/api/v3/{MODEL_ID}",
        "links": {
            "docs": f"{base}/docs",
            "health": f"{base}/health",
            "model_schema": f"{base}/api/v3/models",
            "openapi": f"{base}/openapi.json",
        },
        "playground": f"open {base}/ in a browser",
        "auth": "open" if st.auth.open else "send 'Authorization: Bearer <key>'",
    }


@router.get("/playground/{name}", include_in_schema=False)
def asset(name: str) -> FileResponse:
    # Only the files shipped in the folder, by exact name: no path ever leaves it.
    shipped = {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in TYPES}
    path = shipped.get(name)
    if path is None:
        raise ApiError(404, f"no playground file named {name!r}")
    return FileResponse(path, media_type=TYPES[path.suffix], headers=HEADERS)
