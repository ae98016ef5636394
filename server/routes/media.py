"""Serves outputs, uploads and inline inputs from storage at /media/{key}. No API key: keys
carry a random token, and media players and browsers cannot send bearer headers."""

from __future__ import annotations

import mimetypes

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from server.app import state_of
from server.kernel.errors import ApiError

router = APIRouter()


@router.get("/media/{key:path}")
@router.head("/media/{key:path}")
def media(key: str, request: Request) -> FileResponse:
    st = state_of(request)
    # Any key that cannot name a stored file is a 404: a key that leaves the root (KeyError), and
    # one the OS cannot even look up (a name too long, a NUL byte: OSError, ValueError).
    try:
        path = st.storage.path(key)
        found = path.is_file()
    except (KeyError, OSError, ValueError):
        found = False
    if not found:
        raise ApiError(404, "media not found")
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    # nosniff: browsers must not second-guess the type into something executable.
    return FileResponse(path, media_type=ctype, headers={"X-Content-Type-Options": "nosniff"})
