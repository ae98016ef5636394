"""Where outputs, uploads and inputs given inline live.

`Storage` (base.py) is the contract: atomic puts, reads, existence, fresh unguessable keys, and
the URL <-> key mapping. Backends implement it; the API and the workers hold one instance, made
by `open_storage(settings)`, and go through it for every key and URL, so the backend changes no
caller. `LocalStorage` (local.py) is the embedded one: a folder in the data dir served at
`/media/{key}`. `S3Storage` (s3.py, needs boto3: the `cluster` extra) is an S3-compatible
bucket shared by replicas and workers on many machines, chosen by `WAN_VACE_STORAGE_URL=
s3://bucket[/prefix]`; its files are streamed by `/media/` too, or reached at presigned bucket
URLs (`WAN_VACE_MEDIA_URLS=presigned`). Retention (server/retention.py) lists and deletes
through the same contract (`iter_objects`, `delete`, `delete_prefix`, `usage`). Keys contain a
random token, so a media URL is unguessable and needs no API key.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from server.storage.base import (
    MEDIA_PREFIX,
    InvalidKey,
    NoLocalFiles,
    Storage,
    StorageUnavailable,
    StoredObject,
    Usage,
    check_key,
    media_url,
)
from server.storage.local import LocalStorage

__all__ = [
    "MEDIA_PREFIX",
    "InvalidKey",
    "LocalStorage",
    "NoLocalFiles",
    "Storage",
    "StorageUnavailable",
    "StoredObject",
    "Usage",
    "check_key",
    "media_url",
    "open_storage",
]


def open_storage(settings: Any) -> Storage:
    """The backend `settings` name: `storage_url` unset is the local folder in the data dir,
    `s3://bucket[/prefix]` a bucket, checked here (RuntimeError when it is missing or refuses
    us, so a misconfigured server stops at start-up rather than failing every job)."""
    url = settings.storage_url
    presigned = getattr(settings, "media_urls", "api") == "presigned"
    if not url:
        if presigned:
            raise ValueError(
                "WAN_VACE_MEDIA_URLS=presigned needs S3 storage (WAN_VACE_STORAGE_URL=s3://bucket/prefix); "
                "files in the local folder are only served through /media/, so leave it at 'api'"
            )
        return LocalStorage(settings.storage_dir)
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"WAN_VACE_STORAGE_URL must be s3://bucket or s3://bucket/prefix, got {url!r}")
    try:
        from server.storage.s3 import S3Storage
    except ImportError as e:  # the optional client: the embedded default needs none
        raise RuntimeError(
            f"WAN_VACE_STORAGE_URL names an S3 bucket, but boto3 is not installed ({e}); "
            "install it with: pip install 'wan-vace[cluster]'"
        ) from e
    storage = S3Storage(
        parts.netloc,
        parts.path,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        presign_seconds=settings.presign_seconds,
        presigned_urls=presigned,
    )
    storage.check()
    return storage
