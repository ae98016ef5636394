"""The model catalog (`weights.toml`) and the checks that tell a complete local folder from a
missing, partial or corrupted one.

No torch and no Hub access here: the API process, the loader and `scripts/fetch_weights.py` all
use this module, and only the fetch script ever talks to the network. Weights are loaded only from
local folders at run time ("Offline by construction", architecture.md).

A real model's folder is complete when it holds every `required` piece AND the manifest
`.wan-vace-manifest.json` (pipelines/manifest.py), which the fetch script writes only after every
file matched the Hub's checksums; the loader also checks each manifest file's size (cheap), while
`--verify-only` re-hashes everything (slow: 75 GB for the 14B model).
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.manifest import MANIFEST_NAME, read_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CATALOG = REPO_ROOT / "weights.toml"

KIND_DIFFUSERS = "diffusers"
KIND_RANDOM = "random"
# [preprocessors.*] entries: files of a Hub repository ("files"), or files the user places
# (and licenses) themselves ("manual"; the fetch step prints where they go).
KIND_FILES = "files"
KIND_MANUAL = "manual"
DTYPES = ("bfloat16", "float16", "float32")
# What a diffusers-format WanVACEPipeline folder holds; used for folders given by path.
DIFFUSERS_VACE_LAYOUT = (
    "model_index.json",
    "scheduler/",
    "text_encoder/",
    "tokenizer/",
    "transformer/",
    "vae/",
)
_FULL_SHA = re.compile(r"[0-9a-f]{40}")


class CatalogError(ValueError):
    """weights.toml is malformed; the message names the entry and key."""


class ModelNotAvailable(Exception):
    """The requested model cannot be loaded from local files. The message says what is missing
    and the exact command that fetches it; the server reports it at startup."""

    def __init__(
        self,
        message: str,
        *,
        name: str | None = None,
        missing: Iterable[str] = (),
        fetch_command: str | None = None,
    ):
        super().__init__(message)
        self.name = name
        self.missing = list(missing)
        self.fetch_command = fetch_command


class UnknownModel(ModelNotAvailable):
    """The name is not in the catalog."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str
    description: str = ""
    repo_id: str | None = None
    revision: str | None = None
    license: str | None = None
    folder: str | None = None
    required: tuple[str, ...] = ()
    allow_patterns: tuple[str, ...] = ()
    dtypes: Mapping[str, str] = field(default_factory=dict)
    approx_size_gb: float | None = None
    render_downscale: int = 1
    # Preprocessor entries: the tasks that use it, and the sub-folder of `folder` the
    # preprocessor reads its files from (the files keep their repository paths).
    tasks: tuple[str, ...] = ()
    subfolder: str | None = None
    how_to_get: str = ""  # "manual" entries: where the user obtains the files

    @property
    def needs_files(self) -> bool:
        return self.kind != KIND_RANDOM

    @property
    def pinned(self) -> bool:
        """True when `revision` is a full commit id, not a branch that can move."""
        return bool(self.revision and _FULL_SHA.fullmatch(self.revision))

    def local_dir(self, weights_root: str | os.PathLike[str]) -> Path:
        if self.folder is None:
            raise ValueError(f"model {self.name!r} ({self.kind}) has no local folder")
        return Path(weights_root).expanduser() / self.folder


# --------------------------------------------------------------------------------------------
# Catalog


def load_catalog(path: str | os.PathLike[str] | None = None) -> dict[str, ModelEntry]:
    """Parse weights.toml (the repository's by default) into {name: ModelEntry}."""
    path = Path(path) if path is not None else DEFAULT_CATALOG
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise CatalogError(f"model catalog not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise CatalogError(f"{path}: {e}") from None
    unknown = set(data) - {"schema_version", "models", "preprocessors"}
    if unknown:
        raise CatalogError(f"{path}: unknown top-level keys {sorted(unknown)}")
    if data.get("schema_version", 1) != 1:
        raise CatalogError(f"{path}: unsupported schema_version {data['schema_version']!r}")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise CatalogError(f"{path}: no [models.*] tables")
    return {name: _parse_entry(name, table, path) for name, table in models.items()}


_COMMON_KEYS = {"kind", "description"}
_DIFFUSERS_KEYS = _COMMON_KEYS | {
    "repo_id",
    "revision",
    "license",
    "folder",
    "required",
    "allow_patterns",
    "dtypes",
    "approx_size_gb",
}
_RANDOM_KEYS = _COMMON_KEYS | {"render_downscale"}


def _parse_entry(name: str, t: Any, path: Path) -> ModelEntry:
    where = f"{path}: [models.{name!r}]"
    if not isinstance(t, dict):
        raise CatalogError(f"{where} must be a table")
    kind = t.get("kind")
    if kind == KIND_RANDOM:
        _no_unknown(t, _RANDOM_KEYS, where)
        downscale = t.get("render_downscale", 1)
        if not isinstance(downscale, int) or downscale < 1:
            raise CatalogError(f"{where}: render_downscale must be an integer >= 1")
        return ModelEntry(
            name=name,
            kind=kind,
            description=str(t.get("description", "")),
            render_downscale=downscale,
        )
    if kind != KIND_DIFFUSERS:
        raise CatalogError(f"{where}: kind must be {KIND_DIFFUSERS!r} or {KIND_RANDOM!r}")
    _no_unknown(t, _DIFFUSERS_KEYS, where)
    for key in ("repo_id", "revision", "license", "folder"):
        if not isinstance(t.get(key), str) or not t[key]:
            raise CatalogError(f"{where}: {key} is required (a non-empty string)")
    folder = Path(t["folder"])
    if folder.is_absolute() or ".." in folder.parts:
        raise CatalogError(f"{where}: folder must be relative to the weights root, without '..'")
    required = _str_list(t, "required", where)
    allow = _str_list(t, "allow_patterns", where)
    dtypes = t.get("dtypes")
    if not isinstance(dtypes, dict) or not dtypes:
        raise CatalogError(f"{where}: a [dtypes] table is required")
    for comp, dt in dtypes.items():
        if dt not in DTYPES:
            raise CatalogError(f"{where}: dtypes.{comp} = {dt!r}; expected one of {DTYPES}")
    size = t.get("approx_size_gb")
    if size is not None and not isinstance(size, int | float):
        raise CatalogError(f"{where}: approx_size_gb must be a number")
    return ModelEntry(
        name=name,
        kind=kind,
        description=str(t.get("description", "")),
        repo_id=t["repo_id"],
        revision=t["revision"],
        license=t["license"],
        folder=t["folder"],
        required=tuple(required),
        allow_patterns=tuple(allow),
        dtypes=dict(dtypes),
        approx_size_gb=float(size) if size is not None else None,
    )


def _no_unknown(t: dict, allowed: set[str], where: str) -> None:
    unknown = set(t) - allowed
    if unknown:
        raise CatalogError(f"{where}: unknown keys {sorted(unknown)} (typo?)")


def _str_list(t: dict, key: str, where: str) -> list[str]:
    v = t.get(key)
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise CatalogError(f"{where}: {key} must be a non-empty list of strings")
    return v


def get_entry(name: str, catalog: Mapping[str, ModelEntry]) -> ModelEntry:
    try:
        return catalog[name]
    except KeyError:
        known = ", ".join(sorted(catalog))
        raise UnknownModel(f"unknown model {name!r}; known models: {known}", name=name) from None


def default_weights_root(environ: Mapping[str, str] | None = None) -> Path:
    """WAN_VACE_WEIGHTS_DIR, else <WAN_VACE_DATA_DIR>/weights, else ./data/weights.

    For the fetch script's default only; the server passes the root from its settings."""
    env = os.environ if environ is None else environ
    if env.get("WAN_VACE_WEIGHTS_DIR"):
        return Path(env["WAN_VACE_WEIGHTS_DIR"]).expanduser()
    return Path(env.get("WAN_VACE_DATA_DIR") or "data").expanduser() / "weights"


def fetch_command(entry: ModelEntry | str, weights_root: str | os.PathLike[str]) -> str:
    """The exact shell command that fetches `entry` into `weights_root`."""
    name = entry if isinstance(entry, str) else entry.name
    return (
        f"python scripts/fetch_weights.py {shlex.quote(name)} "
        f"--weights-dir {shlex.quote(str(Path(weights_root).expanduser()))}"
    )


# --------------------------------------------------------------------------------------------
# Completeness (cheap: stat only, no hashing)


def missing_layout(folder: Path, required: Iterable[str]) -> list[str]:
    """The `required` pieces absent from `folder` ("x/" = a non-empty sub-folder)."""
    missing = []
    for piece in required:
        p = folder / piece.rstrip("/")
        if piece.endswith("/"):
            if not p.is_dir():
                missing.append(f"{piece} (folder missing)")
            elif not any(p.iterdir()):
                missing.append(f"{piece} (folder empty)")
        elif not p.is_file():
            missing.append(f"{piece} (file missing)")
    return missing


def check_folder(
    folder: str | os.PathLike[str],
    required: Iterable[str] = DIFFUSERS_VACE_LAYOUT,
    *,
    require_manifest: bool = True,
    revision: str | None = None,
) -> list[str]:
    """What keeps `folder` from being a complete model folder; [] when it is complete.

    With a manifest, each file it lists must exist with its recorded size. `revision` (a pinned
    commit) must match the commit the manifest records."""
    folder = Path(folder)
    if not folder.is_dir():
        return ["the whole folder (folder missing: nothing has been fetched there)"]
    missing = missing_layout(folder, required)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        if require_manifest:
            missing.append(
                f"{MANIFEST_NAME} (written when a fetch finishes and every checksum matched; "
                "the fetch did not finish or was never run)"
            )
        return missing
    try:
        manifest = read_manifest(folder)
    except ValueError as e:
        return missing + [f"{MANIFEST_NAME} (unreadable: {e})"]
    if revision and _FULL_SHA.fullmatch(revision) and manifest.get("revision") != revision:
        missing.append(
            f"revision {revision} (the folder holds {manifest.get('revision') or 'an unknown'} commit)"
        )
    for rel, meta in sorted(manifest["files"].items()):
        p = folder / rel
        if not p.is_file():
            missing.append(f"{rel} (listed in the manifest, file missing)")
        elif p.stat().st_size != meta["size"]:
            missing.append(f"{rel} (size {p.stat().st_size}, manifest says {meta['size']}: truncated?)")
    return missing


def check_complete(entry: ModelEntry, weights_root: str | os.PathLike[str]) -> list[str]:
    """The missing pieces of `entry`'s local folder ([] = loadable; always [] for random)."""
    if not entry.needs_files:
        return []
    return check_folder(
        entry.local_dir(weights_root),
        entry.required,
        require_manifest=True,
        revision=entry.revision,
    )


def not_available_error(
    entry: ModelEntry, weights_root: str | os.PathLike[str], missing: list[str]
) -> ModelNotAvailable:
    cmd = fetch_command(entry, weights_root)
    folder = entry.local_dir(weights_root)
    return ModelNotAvailable(
        f"Model {entry.name!r} is not available in {folder}: missing "
        + "; ".join(missing)
        + f". Fetch it with: {cmd}",
        name=entry.name,
        missing=missing,
        fetch_command=cmd,
    )


_FILES_KEYS = _COMMON_KEYS | {
    "repo_id", "revision", "license", "folder", "subfolder", "files", "tasks", "approx_size_gb",
}  # fmt: skip
_MANUAL_KEYS = _COMMON_KEYS | {"license", "folder", "subfolder", "files", "tasks", "how_to_get"}


def load_preprocessor_catalog(path: str | os.PathLike[str] | None = None) -> dict[str, ModelEntry]:
    """The `[preprocessors.*]` tables of weights.toml: the weights behind the `task`s and the
    safety checker, fetched by the same script as the models (`--with-preprocessors`)."""
    path = Path(path) if path is not None else DEFAULT_CATALOG
    load_catalog(path)  # the same file-level checks
    with open(path, "rb") as f:
        tables = tomllib.load(f).get("preprocessors", {})
    out = {}
    for name, t in tables.items():
        where = f"{path}: [preprocessors.{name!r}]"
        if not isinstance(t, dict) or t.get("kind") not in (KIND_FILES, KIND_MANUAL):
            raise CatalogError(f"{where}: kind must be {KIND_FILES!r} or {KIND_MANUAL!r}")
        manual = t["kind"] == KIND_MANUAL
        _no_unknown(t, _MANUAL_KEYS if manual else _FILES_KEYS, where)
        needed = ("license", "folder") if manual else ("repo_id", "revision", "license", "folder")
        for key in needed:
            if not isinstance(t.get(key), str) or not t[key]:
                raise CatalogError(f"{where}: {key} is required (a non-empty string)")
        folder = Path(t["folder"])
        if folder.is_absolute() or ".." in folder.parts:
            raise CatalogError(f"{where}: folder must be relative to the weights root, without '..'")
        files = _str_list(t, "files", where)
        out[name] = ModelEntry(
            name=name,
            kind=t["kind"],
            description=str(t.get("description", "")),
            repo_id=t.get("repo_id"),
            revision=t.get("revision"),
            license=t["license"],
            folder=t["folder"],
            required=tuple(files),
            allow_patterns=tuple(files),
            approx_size_gb=t.get("approx_size_gb"),
            tasks=tuple(_str_list(t, "tasks", where)),
            subfolder=t.get("subfolder"),
            how_to_get=str(t.get("how_to_get", "")),
        )
    return out


def check_files(entry: ModelEntry, weights_root: str | os.PathLike[str]) -> list[str]:
    """The missing pieces of a preprocessor entry's folder ([] = usable). A fetched ("files")
    entry also needs the manifest the fetch writes after verifying every file; a "manual" one
    only its files, since the user placed them."""
    folder = entry.local_dir(weights_root)
    if entry.kind == KIND_MANUAL:
        return missing_layout(folder, entry.required)
    return check_folder(folder, entry.required, require_manifest=True, revision=entry.revision)


def weights_resolver(weights_root: str | os.PathLike[str]):
    """`name -> local folder` for the preprocessors' context: the folder (and sub-folder) of a
    `[preprocessors.*]` entry, checked complete, else `ModelNotAvailable` naming the folder and
    the fetch command. Only local folders: nothing here downloads."""
    catalog = load_preprocessor_catalog()

    def resolve(name: str) -> Path:
        entry = catalog.get(name)
        if entry is None:
            raise UnknownModel(f"no weights entry {name!r} in weights.toml", name=name)
        missing = check_files(entry, weights_root)
        if missing:
            if entry.kind == KIND_MANUAL:
                folder = entry.local_dir(weights_root)
                raise ModelNotAvailable(
                    f"weights {name!r} are not in {folder}: missing {'; '.join(missing)}. "
                    f"{entry.how_to_get}",
                    name=name,
                    missing=missing,
                )
            raise not_available_error(entry, weights_root, missing)
        folder = entry.local_dir(weights_root)
        return folder / entry.subfolder if entry.subfolder else folder

    return resolve


# The Python package each model-backed task needs besides torch (installed by default; checked
# so /health can say what a trimmed install lacks).
_TASK_LIBRARIES = {
    "depth": "controlnet_aux",
    "depthv2": "transformers",
    "pose": "onnxruntime",
    "pose_body": "onnxruntime",
    "flow": "torchvision",
    "scribble": "controlnet_aux",
    "face": "skimage",
}


def task_readiness(weights_root: str | os.PathLike[str], *, tiny: bool) -> dict[str, str]:
    """{task: "ready" | why not} for /health, without loading any model. The tiny model's
    preprocessors use random weights, so only their libraries matter there."""
    import importlib.util

    from server.kernel.request import TASKS

    needs: dict[str, list[ModelEntry]] = {}
    for entry in load_preprocessor_catalog().values():
        for task in entry.tasks:
            needs.setdefault(task, []).append(entry)
    out: dict[str, str] = {}
    for task in TASKS:
        lib = _TASK_LIBRARIES.get(task)
        if lib and importlib.util.find_spec(lib) is None:
            out[task] = f"needs the Python package {lib!r}"
            continue
        missing = []
        for entry in [] if tiny else needs.get(task, []):
            if entry.kind == KIND_MANUAL:
                continue  # optional: the task has a fallback (face: the bundled detector)
            if check_files(entry, weights_root):
                missing.append(entry.name)
        if missing:
            out[task] = (
                f"weights {', '.join(missing)} missing: "
                + "; ".join(fetch_command(m, weights_root) for m in missing)
            )
        else:
            out[task] = "ready"
    return out
