"""Media uploads, in the three shapes real clients use (contract §3.4):

- two-step ticket (SDK >= 1.0.11, npm 0.3): `POST /api/v3/media/uploads` answers a one-time
  `PUT` URL that authorises itself (the SDK sends no Authorization on the PUT);
- multipart `POST /api/v3/media/upload/binary` (field `file`), also under `/api/v2` (ComfyUI,
  old SDKs, desktop app);
- `POST /api/v3/upload` (one doc revision), answering `url` as well as `download_url`.

The content type is sniffed from the bytes; the client's claim is not trusted. The resulting
`download_url` is on this server, and the worker reads it from storage directly.

Two routers: `router` needs an API key; `signed` holds the ticket's `PUT`, which must not (its
signed token is the authorisation). Tickets are signed with the uploads' own secret, kept in the
store, so they stay valid across restarts and replicas of one store and are worth nothing
anywhere else.

With S3 storage and `WAN_VACE_MEDIA_URLS=presigned`, the ticket's `PUT` URL is a presigned PUT
of the bucket instead (`Storage.presigned_put`), so the bytes go straight to it, and its
`download_url` a presigned GET. The Content-Type the ticket was asked for is signed into it (a
PUT with another one is refused by the bucket), and it expires after `upload_ticket_seconds`.
What such a PUT does not enforce, because no code of ours sees it: the size cap (only a size
declared on the ticket is checked, here), one-time use (the URL may be PUT to again, replacing
the object, until it expires), and the sniffed type (the bytes may be anything). Those are
enforced when the upload is used instead: the worker reads it from the bucket under the
per-field size limits (`max_image_bytes`, `max_video_bytes`, server/fetch.py) and its decoder
refuses bytes that are not the media the field takes (the job fails with code 1402), and
retention deletes uploads that no job names after `retention_seconds`. In "api" mode every upload goes
through this module and is checked here, as with the local folder.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from server.auth import require_key
from server.diskspace import check_free_space
from server.kernel.errors import ApiError, bad_request
from server.kernel.media_types import media_filename, sniff
from server.predictions import success
from server.routes.body import read_capped
from server.state import AppState, state_of

router = APIRouter(dependencies=[Depends(require_key)])
signed = APIRouter()


def _limit(st: AppState, kind: str) -> int:
    return st.settings.max_video_bytes if kind == "video" else st.settings.max_image_bytes


def _human(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.4g} MB"
    if n >= 2**10:
        return f"{n / 2**10:.4g} KB"
    return f"{n} bytes"


def _too_large(kind: str, limit: int) -> ApiError:
    return ApiError(413, f"{kind} uploads are limited to {_human(limit)} ({limit} bytes)")


def _check(st: AppState, data: bytes) -> tuple[str, str]:
    """(kind, mime) of uploaded bytes, or 400/413."""
    if not data:
        raise bad_request("the uploaded file is empty")
    found = sniff(data)
    if found is None:
        raise bad_request("unsupported file type: upload an image (PNG, JPEG, WebP, GIF, BMP) or a video (MP4, MOV, WebM, MKV, AVI)")
    kind, mime = found
    if len(data) > _limit(st, kind):
        raise _too_large(kind, _limit(st, kind))
    return kind, mime


def _save(st: AppState, request: Request, data: bytes, filename: str) -> dict[str, Any]:
    kind, mime = _check(st, data)
    check_free_space(st.settings)
    stored_name = media_filename(filename or "upload", mime)
    key = st.storage.put_bytes(st.storage.new_key("uploads", stored_name), data)
    url = st.storage.url(st.base_url(request), key)
    return {"type": kind, "content_type": mime, "filename": filename, "size": len(data), "download_url": url, "url": url}


@router.post("/api/v3/media/upload/binary")
@router.post("/api/v2/media/upload/binary")
@router.post("/api/v3/upload")
async def upload_binary(request: Request, file: UploadFile | None = None) -> dict[str, Any]:
    st = state_of(request)
    if file is None:
        raise bad_request("send the file as multipart/form-data in a field named 'file'")
    # Read at most the video limit plus one byte: enough to refuse larger files without
    # holding them.
    cap = max(st.settings.max_video_bytes, st.settings.max_image_bytes)
    data = await file.read(cap + 1)
    if len(data) > cap:
        raise _too_large("media", cap)
    return success(await run_in_threadpool(_save, st, request, data, file.filename or "upload"))


# Two-step tickets -------------------------------------------------------------------------------
# A ticket is a signed token (no table needed): it names the storage key, expiry and size cap.
# "Works once" holds because a PUT to a key that already exists is refused.

_SECRET = "upload_ticket_secret"  # the store setting that holds the signing secret


def _ticket_key(st: AppState) -> bytes:
    # Read first: the insert takes the store's write lock, and it is needed once per store.
    secret = st.store.get_setting(_SECRET) or st.store.set_setting_if_absent(_SECRET, secrets.token_hex(32))
    return hashlib.sha256(b"upload-ticket:" + secret.encode()).digest()


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _sign(st: AppState, claims: dict[str, Any]) -> str:
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = _b64(hmac.new(_ticket_key(st), body.encode(), hashlib.sha256).digest())
    return f"{body}.{sig}"


def _verify(st: AppState, token: str) -> dict[str, Any]:
    body, _, sig = token.partition(".")
    # Bytes, not str: compare_digest refuses non-ASCII strings, and the token is whatever the
    # caller put in the path.
    good = _b64(hmac.new(_ticket_key(st), body.encode(), hashlib.sha256).digest()).encode()
    if not sig or not hmac.compare_digest(sig.encode("utf-8", "replace"), good):
        raise ApiError(403, "invalid upload URL")
    try:
        claims = json.loads(_unb64(body))
        key, exp = str(claims["key"]), float(claims["exp"])
    except (ValueError, TypeError, KeyError):
        raise ApiError(403, "invalid upload URL") from None
    if exp < time.time():
        raise ApiError(403, "this upload URL has expired; ask for a new one")
    return {"key": key, "exp": exp}


@router.post("/api/v3/media/uploads")
async def upload_ticket(request: Request) -> dict[str, Any]:
    st = state_of(request)
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        raise bad_request("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    filename = str(body.get("filename") or "upload")
    size = body.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise bad_request("size must be the file size in bytes (a non-negative integer)")
    ctype = str(body.get("content_type") or "").strip()
    kind = "video" if ctype.lower().startswith("video/") else "image"
    cap = max(st.settings.max_video_bytes, st.settings.max_image_bytes)
    if size is not None:
        # The declared type only refuses early; the PUT checks the sniffed type's limit again.
        if ctype.lower().startswith(("image/", "video/")) and size > _limit(st, kind):
            raise _too_large(kind, _limit(st, kind))
        if size > cap:
            raise _too_large("media", cap)
    check_free_space(st.settings)  # refused now rather than at the PUT
    key = st.storage.new_key("uploads", media_filename(filename, ctype))
    base = st.base_url(request)
    # Presigned mode: a PUT straight to the bucket (what it leaves unchecked: the docstring).
    put_url = await run_in_threadpool(st.storage.presigned_put, key, ctype, st.settings.upload_ticket_seconds)
    if put_url is None:
        token = _sign(st, {"key": key, "exp": time.time() + st.settings.upload_ticket_seconds})
        put_url = f"{base}/api/v3/media/uploads/{token}"
    headers = {"Content-Type": ctype} if ctype else {}
    return success(
        {
            "type": kind,
            "filename": filename,
            "size": size,
            "download_url": st.storage.url(base, key),
            "upload": {"method": "PUT", "url": put_url, "headers": headers},
        }
    )


# Keys with a PUT in progress in this process: two concurrent PUTs of one ticket must not both
# pass the "already used" check.
_in_flight: set[str] = set()


@signed.put("/api/v3/media/uploads/{token}")
async def upload_put(token: str, request: Request) -> dict[str, Any]:
    """No Authorization: the SDKs send only the ticket's headers; the signed token in the path
    is the authorisation. A ticket stores one file, once; a PUT refused for its content (type,
    size) leaves it unused."""
    st = state_of(request)
    claims = _verify(st, token)
    key = claims["key"]
    used = ApiError(409, "this upload URL was already used; ask for a new one")
    if key in _in_flight:
        raise used
    # Reserved before the existence check, which is a network round trip on object storage and
    # so runs off the event loop: a second PUT of the ticket meanwhile finds the reservation.
    _in_flight.add(key)
    try:
        if await run_in_threadpool(st.storage.exists, key):
            raise used
        cap = max(st.settings.max_video_bytes, st.settings.max_image_bytes)
        data = await read_capped(request, cap, _too_large("media", cap))
        kind, mime = await run_in_threadpool(_check, st, data)
        check_free_space(st.settings)
        await run_in_threadpool(st.storage.put_bytes, key, data)
    finally:
        _in_flight.discard(key)
    url = st.storage.url(st.base_url(request), key)
    return success({"type": kind, "content_type": mime, "size": len(data), "download_url": url, "url": url})
