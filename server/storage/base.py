"""The storage contract every backend keeps, and the key rules they share.

A key is a relative, `/`-separated name such as `outputs/<job>/<token>/output.mp4`. The rules
are checked here, once, so a key valid on one backend is valid on all: non-empty components,
none of them `.` or `..`, no leading `/`, no NUL byte or backslash, at most 255 UTF-8 bytes a
component and 1024 in all (S3's limit; local file systems allow about as much). A key that breaks
them names nothing: `InvalidKey`, a `KeyError` like "not stored", so a reader answers 404 without
telling the two apart.

Listing and deleting, for retention (server/retention.py): `iter_objects(prefix)` walks the
objects under a key prefix with their size and modification time, `delete(key)` and
`delete_prefix(prefix)` remove them. A prefix names whole key components (`outputs/<job>` is
`outputs/<job>/...`, never `outputs/<job>x/...`), which is how an object store lists (by prefix,
with LastModified) and deletes (in batches) too.

Serving: `local_path(key)` hands the route a file, and `FileResponse` answers Range requests
(video players seek with them) itself. An object store has no such file; it will answer `url()`
with its own (presigned) address instead, so `/media/` is never asked for its keys.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

MEDIA_PREFIX = "/media/"
_MAX_COMPONENT_BYTES = 255
_MAX_KEY_BYTES = 1024


class InvalidKey(KeyError):
    """A key that can name no stored object (it would leave the root, or no backend can hold it)."""


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise InvalidKey(key)
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates: what undecodable bytes in a URL path become
        raise InvalidKey(key) from None
    if size > _MAX_KEY_BYTES or "\0" in key or "\\" in key:
        raise InvalidKey(key)
    for part in key.split("/"):
        if part in ("", ".", "..") or len(part.encode("utf-8")) > _MAX_COMPONENT_BYTES:
            raise InvalidKey(key)
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: "" (everything) or whole key components, without a trailing `/`."""
    if prefix:
        check_key(prefix)
    return prefix


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int  # bytes
    mtime: float  # when it was last written (Unix time), S3's LastModified


class Usage(NamedTuple):
    bytes: int
    files: int


def media_url(base_url: str, key: str) -> str:
    """The URL of a key on this server's `/media/` route."""
    return base_url.rstrip("/") + MEDIA_PREFIX + key


class Storage(ABC):
    """Where outputs, uploads and inline inputs live. Writes are atomic: a reader sees a whole
    object under its key or nothing, never a part; a write that fails leaves nothing behind."""

    # The last write refused for want of space (ENOSPC, EDQUOT) and when, until a write
    # succeeds again (/health reads them).
    write_error: OSError | None = None
    write_error_at: float = 0.0

    def new_key(self, prefix: str, filename: str) -> str:
        """A fresh key `prefix/<token>/<filename>`; the random token makes it unguessable, which
        is what lets media URLs go without an API key."""
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in filename)[-100:]
        while len(safe.encode("utf-8")) > 200:  # non-ASCII letters take up to 4 bytes each
            safe = safe[1:]
        if safe in ("", ".", ".."):
            safe = "file"
        return f"{prefix}/{secrets.token_hex(16)}/{safe}"

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str:
        """Store `data` under `key` (replacing what was there); returns the key."""

    @abstractmethod
    def put_file(self, key: str, src: str | Path) -> str:
        """Store a copy of the file `src` under `key`; returns the key."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The stored bytes; KeyError when the key names no stored object."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key` (False for keys that are not valid)."""

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """The file holding the object, for the `/media/` route to serve with ranged reads;
        KeyError when the key names no stored object."""

    @abstractmethod
    def iter_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        """Every stored object under `prefix` ("" for all), in no particular order; objects
        written or removed meanwhile may or may not appear. Writes still in progress are not
        objects yet and never appear. InvalidKey for a prefix that breaks the key rules."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove one object; False when nothing was stored under `key`."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under `prefix` (a non-empty one: there is no "delete all");
        returns how many were removed."""

    def iter_older_than(self, prefix: str, cutoff: float) -> Iterator[StoredObject]:
        """The objects under `prefix` last written before `cutoff` (Unix time)."""
        return (o for o in self.iter_objects(prefix) if o.mtime < cutoff)

    def usage(self, prefix: str = "") -> Usage:
        """Bytes and objects stored under `prefix`. Walks them all: callers cache it."""
        size = files = 0
        for o in self.iter_objects(prefix):
            size, files = size + o.size, files + 1
        return Usage(size, files)

    def url(self, base_url: str, key: str) -> str:
        """The URL clients fetch the object at."""
        return media_url(base_url, key)

    def key_from_url(self, url: str, base_urls: list[str]) -> str | None:
        """The key of one of our own media URLs (on any of `base_urls`), else None."""
        for base in base_urls:
            prefix = base.rstrip("/") + MEDIA_PREFIX
            if base and url.startswith(prefix):
                return url[len(prefix) :].split("?", 1)[0]
        return None
