"""The completion manifest of a model folder (`.wan-vace-manifest.json`) and the checksums
behind it.

`scripts/fetch_weights.py` writes the manifest only after every file matched the Hub's checksums
(sha256 for LFS files, git blob id for the others), so its presence marks a finished, verified
fetch; `--verify-only` re-hashes a folder against it, offline.

No torch and no Hub access here, like pipelines/weights.py, which reads the manifest to tell a
complete folder from a partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MANIFEST_NAME = ".wan-vace-manifest.json"
MANIFEST_FORMAT = 1
# snapshot_download(local_dir=...) keeps its resume metadata here; it is not part of the model.
HF_LOCAL_CACHE = ".cache"
_CHUNK = 8 * 1024 * 1024


def file_digests(path: str | os.PathLike[str], *, git_sha1: bool = False) -> tuple[str, str | None]:
    """(sha256, git blob sha1 or None) of a file, streamed in 8 MB chunks.

    The git blob id is what the Hub reports for files not stored in LFS."""
    path = Path(path)
    sha256 = hashlib.sha256()
    sha1 = None
    if git_sha1:
        sha1 = hashlib.sha1()
        sha1.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest() if sha1 is not None else None


def sha256_file(path: str | os.PathLike[str]) -> str:
    return file_digests(path)[0]


@dataclass(frozen=True)
class RemoteFile:
    """What the Hub says about one file: LFS files carry a sha256, the others a git blob id."""

    path: str
    size: int | None
    sha256: str | None = None
    git_sha1: str | None = None


def verify_remote_files(
    folder: str | os.PathLike[str],
    remote: Iterable[RemoteFile],
    *,
    reference: str = "the Hub",
    progress=None,
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Check every remote file against its local copy in `folder`.

    Returns (problems, manifest files {path: {sha256, size}}); the manifest part is meaningful
    only when problems is empty."""
    folder = Path(folder)
    problems: list[str] = []
    files: dict[str, dict[str, Any]] = {}
    for rf in sorted(remote, key=lambda r: r.path):
        p = folder / rf.path
        if not p.is_file():
            problems.append(f"{rf.path}: file missing")
            continue
        size = p.stat().st_size
        if rf.size is not None and size != rf.size:
            problems.append(f"{rf.path}: size {size}, {reference} says {rf.size}")
            continue
        if rf.sha256 is None and rf.git_sha1 is None:
            problems.append(f"{rf.path}: {reference} gives no checksum for it")
            continue
        if progress:
            progress(rf.path, size)
        sha256, sha1 = file_digests(p, git_sha1=rf.sha256 is None)
        if rf.sha256 is not None and sha256 != rf.sha256.lower():
            problems.append(f"{rf.path}: sha256 {sha256}, {reference} says {rf.sha256} (corrupted)")
            continue
        if rf.sha256 is None and sha1 != (rf.git_sha1 or "").lower():
            problems.append(f"{rf.path}: git blob id {sha1}, {reference} says {rf.git_sha1} (corrupted)")
            continue
        files[rf.path] = {"sha256": sha256, "size": size}
    return problems, files


def local_files(folder: str | os.PathLike[str]) -> list[str]:
    """Every file under `folder` (posix relative paths), minus the manifest and the Hub cache."""
    folder = Path(folder)
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if rel.parts[0] in (HF_LOCAL_CACHE, MANIFEST_NAME) or not p.is_file():
            continue
        out.append(rel.as_posix())
    return sorted(out)


def build_manifest(
    folder: str | os.PathLike[str],
    files: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    model: str | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """A manifest for `folder`; hashes every local file when `files` is not given."""
    if files is None:
        files = {}
        for rel in local_files(folder):
            p = Path(folder) / rel
            files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return {
        "format": MANIFEST_FORMAT,
        "model": model,
        "repo_id": repo_id,
        "revision": revision,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": {k: {"sha256": v["sha256"], "size": int(v["size"])} for k, v in sorted(files.items())},
    }


def write_manifest(folder: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Path:
    """Write atomically, so a crash never leaves a half-written manifest that looks complete."""
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(str(e)) from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(m, dict) and isinstance(m.get("sha256"), str) and isinstance(m.get("size"), int)
        for m in files.values()
    ):
        raise ValueError("no valid 'files' table ({path: {sha256, size}})")
    return data


def verify_manifest(folder: str | os.PathLike[str], *, progress=None) -> list[str]:
    """Re-hash every file the manifest lists (offline). [] = intact."""
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file():
        return [f"{MANIFEST_NAME}: missing (the fetch did not finish or was never run)"]
    try:
        manifest = read_manifest(folder)
    except ValueError as e:
        return [f"{MANIFEST_NAME}: unreadable ({e})"]
    remote = [
        RemoteFile(path=rel, size=m["size"], sha256=m["sha256"]) for rel, m in manifest["files"].items()
    ]
    problems, _ = verify_remote_files(folder, remote, reference="the manifest", progress=progress)
    return problems
