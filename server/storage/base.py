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

Serving: a backend that keeps files (`has_local_files`, the local folder) hands the `/media/`
route one with `local_path(key)`, and `FileResponse` answers Range requests (video players seek
with them) itself. An object store has no such file, so every backend also reads by range:
`stat(key)` gives the size the route checks a Range header against, and `open_range(key, start,
stop)` streams those bytes. In presigned mode an object store answers `url()` with its own
address instead, and `presigned_put` lets the two-step upload go straight to it.

Errors: a key that names nothing is a KeyError; a backend that cannot be reached right now (an
object store's endpoint down, throttling, credentials refused) raises `StorageUnavailable`,
which the API answers with 503 and Retry-After in the contract's envelope.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from server.kernel.errors import ApiError

MEDIA_PREFIX = "/media/"
_MAX_COMPONENT_BYTES = 255
_MAX_KEY_BYTES = 1024


class InvalidKey(KeyError):
    """A key that can name no stored object (it would leave the root, or no backend can hold it)."""


class StorageUnavailable(ApiError):
    """The storage backend cannot answer right now: its endpoint is unreachable or failing, it
    throttles, or it refuses our credentials. Transient for the caller (the same call can succeed
    later). An `ApiError` (503, Retry-After) so that any route that touches storage answers it in
    the contract's envelope without a handler of its own."""

    # A job that fails on it is run again while attempts remain (server/worker/job.py reads it).
    retryable = True

    def __init__(self, message: str):
        super().__init__(503, message, headers={"Retry-After": "5"})


class NoLocalFiles(TypeError):
    """`local_path` on a backend that keeps no files (see `Storage.has_local_files`): read with
    `stat` and `open_range` instead. A programming error, not a missing key, so not a KeyError."""


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

    # Whether `local_path` can hand out a file (the local folder); an object store keeps none.
    has_local_files: bool = False

    def local_path(self, key: str) -> Path:
        """The file holding the object, for the `/media/` route to serve with ranged reads;
        KeyError when the key names no stored object. Only backends with `has_local_files`:
        the others raise NoLocalFiles."""
        raise NoLocalFiles(
            f"{type(self).__name__} keeps no local files; read objects with stat() and open_range()"
        )

    @abstractmethod
    def stat(self, key: str) -> StoredObject:
        """The object's size and modification time; KeyError when the key names no stored object."""

    @abstractmethod
    def open_range(self, key: str, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """The object's bytes `start` (included) to `stop` (excluded; None: the end), in chunks.
        The object is opened before this returns, so a missing key raises KeyError here and not
        halfway through a response; the caller checks the range against `stat` first (a range
        past the end yields what there is). Close the iterator (or exhaust it) to release it."""

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

    def presigned_put(self, key: str, content_type: str, expires_s: float) -> str | None:
        """A URL a client can PUT the object's bytes to directly (sending `Content-Type:
        content_type` when one is given), valid `expires_s` seconds; None when uploads go through
        the API (every backend but an object store in presigned mode)."""
        return None

    def key_from_url(self, url: str, base_urls: list[str]) -> str | None:
        """The key of one of our own media URLs (on any of `base_urls`), else None."""
        for base in base_urls:
            prefix = base.rstrip("/") + MEDIA_PREFIX
            if base and url.startswith(prefix):
                return url[len(prefix) :].split("?", 1)[0]
        return None
