"""The embedded backend: a folder in the data dir, served by the app at `/media/{key}`.

Atomic writes: bytes go to a uniquely named temporary file beside the target, which is flushed
to disk and then renamed over it (`os.replace` is atomic within a file system). Concurrent
writers of one key each have their own temporary file; the last rename wins whole. A write that
fails for any reason (ENOSPC on a full disk included) removes its temporary file and the
folders it created for the key, and raises the error.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from server.diskspace import is_disk_full
from server.storage.base import InvalidKey, Storage, check_key


class LocalStorage(Storage):
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        p = (self.root / check_key(key)).resolve()
        # The key rules already rule out `..`; this catches a symlink inside the root that points
        # out of it.
        if self.root not in p.parents:
            raise InvalidKey(key)
        return p

    def _make_parents(self, d: Path) -> list[Path]:
        """Create `d` and its missing parents; returns those this call created, outermost first."""
        missing = []
        while not d.exists() and d != d.parent:
            missing.append(d)
            d = d.parent
        made = []
        for m in reversed(missing):
            try:
                m.mkdir()
            except FileExistsError:  # another writer made it meanwhile: not ours to remove
                continue
            made.append(m)
        return made

    def _write(self, key: str, fill: Callable[[BinaryIO], None]) -> str:
        p = self._path(key)
        made: list[Path] = []
        # A hidden name of fixed length, so a key near the name-length limit still has room.
        tmp = p.with_name(f".{secrets.token_hex(8)}.part")
        try:
            made = self._make_parents(p.parent)
            # os.open with 0o666: the umask decides the mode, as for any file this process writes.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())  # a job is recorded complete only after its output is durable
            os.replace(tmp, p)
        except BaseException as e:
            self._undo(tmp, made)
            if is_disk_full(e):  # remembered for /health until a write succeeds
                self.write_error, self.write_error_at = e, time.time()
            raise
        self.write_error = None
        return key

    @staticmethod
    def _undo(tmp: Path, made: list[Path]) -> None:
        """What a failed write leaves: its temporary file, and the folders it made (innermost
        first; one another writer has put something in meanwhile stays)."""
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                break

    def put_bytes(self, key: str, data: bytes) -> str:
        return self._write(key, lambda f: f.write(data))

    def put_file(self, key: str, src: str | Path) -> str:
        def copy(f: BinaryIO) -> None:
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, 1 << 20)

        return self._write(key, copy)

    def local_path(self, key: str) -> Path:
        try:
            p = self._path(key)
            found = p.is_file()
        except OSError:  # a name the OS cannot look up
            found = False
        if not found:
            raise KeyError(key)
        return p

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.local_path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):  # removed between the check and the read
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        try:
            self.local_path(key)
        except KeyError:
            return False
        return True
