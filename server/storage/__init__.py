"""Where outputs, uploads and inputs given inline live.

`Storage` (base.py) is the contract: atomic puts, reads, existence, fresh unguessable keys, and
the URL <-> key mapping. Backends implement it; the API and the workers hold one instance, made
by `open_storage(settings)`, and go through it for every key and URL, so a second backend (S3,
the scale-out issue) changes no caller. `LocalStorage` (local.py) is the embedded one: a folder
in the data dir served at `/media/{key}`. Retention (server/retention.py) lists and deletes
through the same contract (`iter_objects`, `delete`, `delete_prefix`, `usage`). Keys contain a random token, so a media URL is
unguessable and needs no API key.
"""

from __future__ import annotations

from typing import Any

from server.storage.base import (
    MEDIA_PREFIX,
    InvalidKey,
    Storage,
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
    "Storage",
    "StoredObject",
    "Usage",
    "check_key",
    "media_url",
    "open_storage",
]


def open_storage(settings: Any) -> Storage:
    """The backend `settings` name: `storage_url` unset is the local folder in the data dir."""
    if settings.storage_url:
        # Refused rather than ignored: outputs silently landing on local disk would be lost to
        # every other replica.
        raise NotImplementedError(
            "WAN_VACE_STORAGE_URL (S3-compatible storage) is not supported yet; unset it to keep "
            "outputs and uploads in the data dir"
        )
    return LocalStorage(settings.storage_dir)
