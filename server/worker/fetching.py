"""A job's media inputs, fetched by the worker: every media field of the typed request, in the
order of the kernel's media-field table, each under its own size limit. One of our own media
URLs (an upload, an inline input moved to storage at submit) is read from storage, not over
HTTP; anything else goes through `server.fetch` and its address guard.
"""

from __future__ import annotations

from server.diskspace import human
from server.kernel.errors import MediaAccessError
from server.kernel.request import VaceRequest
from server.kernel.runner import Media
from server.settings import Settings
from server.storage import Storage


def fetch_inputs(
    req: VaceRequest, *, settings: Settings, storage: Storage, base_urls: list[str]
) -> Media:
    """{field name: bytes} for each media field given (`images`: a list of bytes)."""
    from server.fetch import FetchPolicy, fetch_media

    limits = {"image": settings.max_image_bytes, "video": settings.max_video_bytes}

    def local(url: str, label: str, limit: int) -> bytes | None:
        key = storage.key_from_url(url, base_urls)
        if key is None:
            return None
        try:
            size = storage.stat(key).size
        except KeyError:
            raise MediaAccessError(f"{label}: no such file on this server") from None
        # Checked before reading: an upload through a presigned PUT (object storage) was never
        # size-checked by the API, and must not be read whole into memory first.
        if size > limit:
            raise MediaAccessError(f"{label}: the file is larger than the {human(limit)} limit ({human(size)})")
        return storage.read_bytes(key)

    media: Media = {}
    for label, field, url in req.media():
        policy = FetchPolicy(
            max_bytes=limits[field.holds],
            timeout_s=settings.fetch_timeout,
            allow_private=settings.allow_private_urls,
        )
        data = fetch_media(
            url, label, policy, local_resolver=lambda u, lb=label, m=policy.max_bytes: local(u, lb, m)
        )
        if field.many:
            media.setdefault(field.name, []).append(data)
        else:
            media[field.name] = data
    return media
