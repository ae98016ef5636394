"""Fetching weights: a `weights.toml` entry downloaded from the Hugging Face Hub, verified, and
recorded in a manifest. The body of `wan-vace weights fetch` and `scripts/fetch_weights.py`.

The fetch is the only step of this project that talks to the Hub. It reads the file list and
checksums of the catalog's revision first, downloads exactly that commit with huggingface_hub
(its progress bars; an interrupted fetch resumes when run again), then checks every file (a
progress bar over the bytes hashed): sha256 for LFS files, git blob id for the small ones. Only
then does it write `<folder>/.wan-vace-manifest.json`, which the server requires before it loads
the folder. `verify_only` re-hashes a local folder against that manifest, offline.

Exit status: 0 ok, 1 fetch or verification failed, 2 bad usage (unknown model, bad catalog).
Gated or private repositories need a token (`hf auth login` or HF_TOKEN); HF_ENDPOINT selects a
mirror. No torch here: huggingface_hub only, imported when a fetch starts.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import manifest, weights

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def say(msg: str = "") -> None:
    print(msg, flush=True)


def err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


# The two calls that reach the network; tests hand in others.


def hub_model_info(repo_id: str, revision: str) -> Any:
    from huggingface_hub import HfApi

    return HfApi().model_info(repo_id, revision=revision, files_metadata=True)


def hub_snapshot_download(*, repo_id: str, revision: str, local_dir: Path, allow_patterns: list[str]) -> Any:
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_id=repo_id, revision=revision, local_dir=local_dir, allow_patterns=allow_patterns
    )


@dataclass(frozen=True)
class Hub:
    model_info: Callable[[str, str], Any] = hub_model_info
    snapshot_download: Callable[..., Any] = hub_snapshot_download


def remote_files(siblings: Iterable, allow_patterns: Iterable[str]) -> list[manifest.RemoteFile]:
    """The Hub's files selected by `allow_patterns` (huggingface_hub's own matching rules)."""
    from huggingface_hub.utils import filter_repo_objects

    selected = filter_repo_objects(
        list(siblings), allow_patterns=list(allow_patterns), key=lambda s: s.rfilename
    )
    out = []
    for s in selected:
        lfs = getattr(s, "lfs", None)
        sha256 = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        out.append(
            manifest.RemoteFile(
                path=s.rfilename,
                size=getattr(s, "size", None),
                sha256=sha256,
                git_sha1=None if sha256 else getattr(s, "blob_id", None),
            )
        )
    return out


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


class HashProgress:
    """The verification's progress: a bar over the bytes hashed on a terminal, one line per
    file elsewhere (a log keeps lines, not carriage returns). `manifest` calls it before it
    hashes each file."""

    def __init__(self, total: int, label: str = "verifying"):
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal.
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=None, leave=True)
        self.pending = 0

    def __call__(self, path: str, size: int) -> None:
        if self.bar.disable:
            say(f"  checking {path} ({_gb(size)})")
            return
        self.bar.update(self.pending)
        self.pending = size
        self.bar.set_postfix_str(path, refresh=True)

    def close(self) -> None:
        self.bar.update(self.pending)
        self.pending = 0
        self.bar.close()


def _verify(folder: Path, remote: list[manifest.RemoteFile]) -> tuple[list[str], dict]:
    progress = HashProgress(sum(r.size or 0 for r in remote))
    try:
        return manifest.verify_remote_files(folder, remote, progress=progress)
    finally:
        progress.close()


def fetch(entry: weights.ModelEntry, weights_root: Path, hub: Hub = Hub()) -> int:
    folder = entry.local_dir(weights_root)
    rev = entry.revision or "main"
    say(f"{entry.name}: {entry.repo_id} @ {rev} -> {folder}")
    if not entry.pinned:
        say(f"warning: revision {rev!r} is not a commit id; the commit it resolves to is recorded")

    try:
        info = hub.model_info(entry.repo_id, rev)
    except Exception as e:  # noqa: BLE001 - any Hub/network failure ends here, in one clear line
        err(
            f"could not read {entry.repo_id} @ {rev} from the Hugging Face Hub "
            f"({type(e).__name__}: {e}). Check network access, HF_ENDPOINT, HF_HUB_OFFLINE "
            "(must be unset) and, for gated repositories, HF_TOKEN."
        )
        return EXIT_FAILED
    commit = getattr(info, "sha", None) or rev
    remote = remote_files(info.siblings or [], entry.allow_patterns)
    absent = [
        piece
        for piece in entry.required
        if not any(r.path == piece or (piece.endswith("/") and r.path.startswith(piece)) for r in remote)
    ]
    if absent:
        err(f"{entry.repo_id} @ {commit} has no {', '.join(absent)}: check weights.toml")
        return EXIT_FAILED
    total = sum(r.size or 0 for r in remote)
    say(f"commit {commit}: {len(remote)} files, {_gb(total)}")

    folder.mkdir(parents=True, exist_ok=True)
    # A manifest means "complete and verified"; it must not survive into a half-done refetch.
    (folder / manifest.MANIFEST_NAME).unlink(missing_ok=True)

    todo = sum(
        r.size or 0
        for r in remote
        if not ((folder / r.path).is_file() and (folder / r.path).stat().st_size == r.size)
    )
    free = shutil.disk_usage(folder).free
    if todo > free:
        err(f"{folder} needs {_gb(todo)} more free space; only {_gb(free)} is free")
        return EXIT_FAILED

    patterns = list(entry.allow_patterns)
    problems: list[str] = []
    files: dict = {}
    for attempt in (1, 2):
        try:
            # The resolved commit, so the files match the checksums read above even if the
            # branch moves meanwhile.
            hub.snapshot_download(repo_id=entry.repo_id, revision=commit, local_dir=folder, allow_patterns=patterns)
        except Exception as e:  # noqa: BLE001 - idem
            err(f"download failed ({type(e).__name__}: {e}); run the same command to resume")
            return EXIT_FAILED
        say("verifying checksums")
        problems, files = _verify(folder, remote)
        if not problems or attempt == 2:
            break
        say(f"{len(problems)} file(s) failed verification; downloading them again:")
        for p in problems:
            say(f"  {p}")
        for rel in (r.path for r in remote if r.path not in files):
            (folder / rel).unlink(missing_ok=True)
            # huggingface_hub would otherwise trust its record of the earlier download.
            meta = folder / manifest.HF_LOCAL_CACHE / "huggingface" / "download" / f"{rel}.metadata"
            meta.unlink(missing_ok=True)

    if problems:
        err(f"{entry.name}: {len(problems)} file(s) failed verification:")
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_FAILED

    record = manifest.build_manifest(folder, files, model=entry.name, repo_id=entry.repo_id, revision=commit)
    manifest.write_manifest(folder, record)
    say(f"ok: {len(files)} files verified; manifest {folder / manifest.MANIFEST_NAME}")
    if not entry.pinned:
        say(f'to pin this download, set revision = "{commit}" for {entry.name} in weights.toml')
    return EXIT_OK


def verify_only(entry: weights.ModelEntry, weights_root: Path) -> int:
    folder = entry.local_dir(weights_root)
    cmd = weights.fetch_command(entry, weights_root)
    missing = weights.check_complete(entry, weights_root)
    if missing:
        err(f"{entry.name}: {folder} is incomplete:")
        for m in missing:
            print(f"  {m}", file=sys.stderr)
        print(f"fetch it with: {cmd}", file=sys.stderr)
        return EXIT_FAILED
    say(f"{entry.name}: verifying {folder} against {manifest.MANIFEST_NAME}")
    sizes = manifest.read_manifest(folder).get("files", {})
    progress = HashProgress(sum(int(m.get("size") or 0) for m in sizes.values()))
    try:
        problems = manifest.verify_manifest(folder, progress=progress)
    finally:
        progress.close()
    if problems:
        err(f"{entry.name}: {len(problems)} file(s) failed verification:")
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print(f"repair it with: {cmd}", file=sys.stderr)
        return EXIT_FAILED
    say(f"ok: {folder} is complete and every file matches the manifest")
    return EXIT_OK


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The fetch's flags, shared by `wan-vace weights fetch` and scripts/fetch_weights.py."""
    ap.add_argument(
        "names",
        nargs="*",
        metavar="name",
        help="models (e.g. wan2.1-vace-14b) or preprocessor entries (e.g. midas-dpt-hybrid) "
        "from weights.toml",
    )
    ap.add_argument(
        "--with-preprocessors",
        action="store_true",
        help="also fetch every preprocessor and the safety checker (the [preprocessors.*] "
        "entries; 'manual' ones print where to place their files)",
    )
    ap.add_argument(
        "--weights-dir",
        type=Path,
        default=None,
        help="weights root (default: $WAN_VACE_WEIGHTS_DIR, else $WAN_VACE_DATA_DIR/weights, "
        "else ./data/weights)",
    )
    ap.add_argument(
        "--verify-only",
        action="store_true",
        help="re-hash the local folder against its manifest (offline); download nothing",
    )
    ap.add_argument("--catalog", type=Path, default=None, help="another weights.toml")


def run(args: argparse.Namespace, usage_error: Callable[[str], Any], hub: Hub = Hub()) -> int:
    """Fetch (or verify) what `args` names; `usage_error` is the parser's `error`."""
    if not args.names and not args.with_preprocessors:
        usage_error("name a model or preprocessor entry, or give --with-preprocessors")
    try:
        catalog = weights.load_catalog(args.catalog)
        extra = weights.load_preprocessor_catalog(args.catalog)
        entries: list[weights.ModelEntry] = []
        for name in args.names:
            entry = extra.get(name) or weights.get_entry(name, catalog)
            if entry not in entries:
                entries.append(entry)
        if args.with_preprocessors:
            entries += [e for e in extra.values() if e not in entries]
    except (weights.CatalogError, weights.UnknownModel) as e:
        err(str(e))
        return EXIT_USAGE
    root = (args.weights_dir or weights.default_weights_root()).expanduser().resolve()
    status = EXIT_OK
    for entry in entries:
        if not entry.needs_files:
            say(f"{entry.name} is built in memory from random weights; there is nothing to fetch")
            continue
        if entry.kind == weights.KIND_MANUAL:
            missing = weights.check_files(entry, root)
            state = "in place" if not missing else "not in place"
            say(f"{entry.name} ({entry.license}): {state} at {entry.local_dir(root)}. {entry.how_to_get}")
            continue
        if entry.tasks:
            say(f"{entry.name}: for {', '.join(entry.tasks)}; licence {entry.license}")
        rc = verify_only(entry, root) if args.verify_only else fetch(entry, root, hub)
        status = status or rc
    return status
