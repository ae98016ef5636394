"""The embedded backend: a folder in the data dir, served by the app at `/media/{key}`.

Atomic writes: bytes go to a uniquely named temporary file beside the target, which is flushed
to disk and then renamed over it (`os.replace` is atomic within a file system). Concurrent
writers of one key each have their own temporary file; the last rename wins whole. A write that
fails for any reason (ENOSPC on a full disk included) removes its temporary file and the
folders it created for the key, and raises the error.

Listing walks the folder without following symbolic links and leaves out the temporary files of
writes in progress. Deleting removes the files, then the folders left empty, up to (not
including) the top-level folder (`outputs/`, `uploads/` ...), which a writer may be using.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from server.diskspace import is_disk_full
from server.storage.base import InvalidKey, Storage, StoredObject, check_key, check_prefix

# The temporary file of a write in progress (`_write`): not an object.
_PART = re.compile(r"\.[0-9a-f]{16}\.part")


class LocalStorage(Storage):
    has_local_files = True

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

    def stat(self, key: str) -> StoredObject:
        try:
            st = self.local_path(key).stat()
        except (FileNotFoundError, NotADirectoryError):  # removed between the check and the stat
            raise KeyError(key) from None
        return StoredObject(key, st.st_size, st.st_mtime)

    def open_range(self, key: str, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        try:
            f = open(self.local_path(key), "rb")  # noqa: SIM115 - closed by the generator
        except (FileNotFoundError, IsADirectoryError):
            raise KeyError(key) from None
        return _chunks(f, start, stop)

    def exists(self, key: str) -> bool:
        try:
            self.local_path(key)
        except KeyError:
            return False
        return True

    # Listing and deleting (retention) ---------------------------------------------------------
    def iter_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        top = self._path(check_prefix(prefix)) if prefix else self.root
        try:
            if top.is_file() and not top.is_symlink():  # the prefix names one object
                st = top.stat()
                yield StoredObject(prefix, st.st_size, st.st_mtime)
                return
        except OSError:
            return
        stack = [top]
        while stack:
            try:
                entries = list(os.scandir(stack.pop()))
            except OSError:  # removed meanwhile, or not a folder
                continue
            for e in entries:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(Path(e.path))
                        continue
                    if _PART.fullmatch(e.name) or not e.is_file(follow_symlinks=False):
                        continue
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                yield StoredObject(Path(e.path).relative_to(self.root).as_posix(), st.st_size, st.st_mtime)

    def delete(self, key: str) -> bool:
        try:
            p = self._path(key)
            if p.is_symlink() or not p.is_file():
                return False
            p.unlink()
        except (FileNotFoundError, InvalidKey):
            return False
        self._prune_empty(p.parent)
        return True

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise InvalidKey(prefix)  # never "everything": retention always names what goes
        top = self._path(check_prefix(prefix))
        if not top.is_dir() or top.is_symlink():
            return int(self.delete(prefix))
        removed = 0
        for folder, _dirs, files in os.walk(top, topdown=False):
            for name in files:
                p = Path(folder) / name
                if _PART.fullmatch(name) or p.is_symlink():
                    continue
                try:
                    p.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
            if Path(folder).parent == self.root:
                continue  # a top-level folder stays, as in _prune_empty
            try:
                os.rmdir(folder)
            except OSError:  # not empty: something stays (a write in progress, a link)
                pass
        self._prune_empty(top.parent)
        return removed

    def _prune_empty(self, d: Path) -> None:
        """Remove `d` and its parents while empty, keeping the root and its top-level folders."""
        while d != self.root and d.parent != self.root and self.root in d.parents:
            try:
                d.rmdir()
            except OSError:
                return
            d = d.parent


def _chunks(f: BinaryIO, start: int, stop: int | None, size: int = 1 << 20) -> Iterator[bytes]:
    """`f`'s bytes from `start` to `stop`, then closes it (also when the reader stops early)."""
    with f:
        f.seek(start)
        left = None if stop is None else max(0, stop - start)
        while left is None or left > 0:
            chunk = f.read(size if left is None else min(size, left))
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk
