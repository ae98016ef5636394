"""Where outputs, uploads and inputs given inline live. The embedded storage is a folder in the
data dir served at `/media/{key}`; an S3-compatible store (scale-out issue) implements the same
methods. Keys contain a random token, so a media URL is unguessable and needs no API key.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path, PurePosixPath

MEDIA_PREFIX = "/media/"


class LocalStorage:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_key(prefix: str, filename: str) -> str:
        """A fresh key `prefix/<token>/<filename>`; the token makes it unguessable."""
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in filename)[-100:]
        return f"{prefix}/{secrets.token_hex(16)}/{safe or 'file'}"

    def path(self, key: str) -> Path:
        """The file of a key; refuses keys that would leave the root (`..`, absolute)."""
        pure = PurePosixPath(key)
        if pure.is_absolute() or ".." in pure.parts or not pure.parts:
            raise KeyError(key)
        p = (self.root / pure).resolve()
        if self.root not in p.parents:
            raise KeyError(key)
        return p

    def put_bytes(self, key: str, data: bytes) -> str:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, p)  # readers never see a half-written file
        return key

    def put_file(self, key: str, src: str | Path) -> str:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, p)
        return key

    def exists(self, key: str) -> bool:
        try:
            return self.path(key).is_file()
        except (KeyError, OSError, ValueError):  # not a key, or not a name the OS can look up
            return False

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    @staticmethod
    def url(base_url: str, key: str) -> str:
        return base_url.rstrip("/") + MEDIA_PREFIX + key

    @staticmethod
    def key_from_url(url: str, base_urls: list[str]) -> str | None:
        """The key of one of our own media URLs (on any of `base_urls`), else None."""
        for base in base_urls:
            prefix = base.rstrip("/") + MEDIA_PREFIX
            if base and url.startswith(prefix):
                return url[len(prefix) :].split("?", 1)[0]
        return None
