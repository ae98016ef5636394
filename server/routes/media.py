"""Serves outputs, uploads and inline inputs from storage at /media/{key}. No API key: keys
carry a random token, and media players and browsers cannot send bearer headers. The storage
hands over the object's file (`Storage.local_path`); FileResponse answers HEAD and Range
requests (players seek with them) itself. A file of a job whose files retention deleted answers
410 Gone, saying after how long (server/retention.py), rather than a bare 404."""

from __future__ import annotations

import mimetypes

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from server.kernel.errors import ApiError
from server.retention import expired_message, job_of_key, upload_gone_hint
from server.state import state_of

router = APIRouter()


@router.get("/media/{key:path}")
@router.head("/media/{key:path}")
def media(key: str, request: Request) -> FileResponse:
    # Any key that names no stored object is a 404, whether nothing is stored under it or it is
    # not a key at all (it leaves the root, or is too long or has a NUL byte to be one).
    st = state_of(request)
    try:
        path = st.storage.local_path(key)
    except KeyError:
        job_id = job_of_key(key)
        job = st.store.get(job_id) if job_id else None
        if job is not None and job.outputs_expired_at is not None:
            raise ApiError(410, expired_message(key, st.settings)) from None
        raise ApiError(404, "media not found" + upload_gone_hint(key, st.settings)) from None
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    # nosniff: browsers must not second-guess the type into something executable.
    return FileResponse(path, media_type=ctype, headers={"X-Content-Type-Options": "nosniff"})
