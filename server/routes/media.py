"""Serves outputs, uploads and inline inputs from storage at /media/{key}. No API key: keys
carry a random token, and media players and browsers cannot send bearer headers.

A backend that keeps files (the local folder) hands over the object's file
(`Storage.local_path`), and FileResponse answers HEAD and Range requests (players seek with them)
itself. Any other backend (an S3 bucket) is streamed: `stat` gives the size a Range header is
checked against, `open_range` the bytes. One range is served (`bytes=a-b`, `bytes=a-`,
`bytes=-n`) with 206 and Content-Range; a range that starts past the end is 416; a Range header
this route does not serve (several ranges, another unit, bad syntax) gets the whole file, which
RFC 9110 allows. A storage that cannot be reached answers 503 (`StorageUnavailable`).

A file of a job whose files retention deleted answers 410 Gone, saying after how long
(server/retention.py), rather than a bare 404.
"""

from __future__ import annotations

import mimetypes
import re
from email.utils import formatdate

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, StreamingResponse

from server.kernel.errors import ApiError
from server.retention import expired_message, job_of_key, upload_gone_hint
from server.state import AppState, state_of

router = APIRouter()

# One range of bytes; the unit is case-insensitive (RFC 9110 §14.1).
_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.IGNORECASE)


def _not_found(st: AppState, key: str) -> ApiError:
    job_id = job_of_key(key)
    job = st.store.get(job_id) if job_id else None
    if job is not None and job.outputs_expired_at is not None:
        return ApiError(410, expired_message(key, st.settings))
    return ApiError(404, "media not found" + upload_gone_hint(key, st.settings))


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, stop) of the one range `header` asks for in a file of `size` bytes, stop
    excluded; None to answer the whole file (no header, or one this route does not serve).
    ApiError 416 when the range is well-formed but no byte of the file is in it."""
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None or not (m[1] or m[2]):
        return None
    unsatisfiable = ApiError(
        416,
        f"the requested range ({header.strip()}) is outside the file, which is {size} bytes long",
        headers={"Content-Range": f"bytes */{size}"},
    )
    if m[1]:
        start = int(m[1])
        if m[2] and int(m[2]) < start:
            return None  # "bytes=5-2" is not a valid range: ignored, like any other
        if start >= size:
            raise unsatisfiable
        return start, size if not m[2] else min(int(m[2]) + 1, size)
    suffix = int(m[2])  # the last n bytes
    if suffix == 0 or size == 0:
        raise unsatisfiable
    return max(0, size - suffix), size


@router.get("/media/{key:path}")
@router.head("/media/{key:path}")
def media(key: str, request: Request) -> Response:
    # Any key that names no stored object is a 404, whether nothing is stored under it or it is
    # not a key at all (it leaves the root, or is too long or has a NUL byte to be one).
    st = state_of(request)
    storage = st.storage
    ctype = mimetypes.guess_type(key.rsplit("/", 1)[-1])[0] or "application/octet-stream"
    # nosniff: browsers must not second-guess the type into something executable.
    headers = {"X-Content-Type-Options": "nosniff"}
    try:
        if storage.has_local_files:
            return FileResponse(storage.local_path(key), media_type=ctype, headers=headers)
        obj = storage.stat(key)
    except KeyError:
        raise _not_found(st, key) from None
    headers |= {"Accept-Ranges": "bytes", "Last-Modified": formatdate(obj.mtime, usegmt=True)}
    wanted = byte_range(request.headers.get("range"), obj.size)
    start, stop = wanted or (0, obj.size)
    status = 200
    if wanted is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{obj.size}"
    headers["Content-Length"] = str(stop - start)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=ctype)
    try:
        # Opened here, before the response starts: a key deleted since the stat is still a 404.
        chunks = storage.open_range(key, start, stop)
    except KeyError:
        raise _not_found(st, key) from None
    return StreamingResponse(chunks, status_code=status, headers=headers, media_type=ctype)
