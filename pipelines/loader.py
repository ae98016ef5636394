"""Load a WanVACEPipeline by catalog name (`weights.toml`) or from a folder, from local files only.

A model whose folder is missing or incomplete raises `ModelNotAvailable` naming what is missing
and the fetch command; nothing here ever downloads. The `tiny` model is built in memory.

dtypes (vace.md §2, diffusers' Wan docs): transformer and text encoder in bf16, VAE in fp32.
The VAE is loaded on its own in fp32 and handed to the pipeline: diffusers 0.42.1 uses a passed
component as is (no dtype cast), and applies `dtype` only to the components it loads itself.
The transformer keeps a few small modules in fp32 by design (`_keep_in_fp32_modules`: norms,
time embedder, scale/shift tables); its reported dtype is still bf16.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipelines.manifest import read_manifest
from pipelines.weights import (
    DIFFUSERS_VACE_LAYOUT,
    KIND_RANDOM,
    ModelEntry,
    ModelNotAvailable,
    UnknownModel,
    check_complete,
    check_folder,
    get_entry,
    load_catalog,
    not_available_error,
)

if TYPE_CHECKING:
    from diffusers import WanVACEPipeline

__all__ = [
    "LoadedModelInfo",
    "ModelNotAvailable",
    "UnknownModel",
    "load_pipeline",
    "load_pipeline_from_dir",
]

DEFAULT_DTYPES: Mapping[str, str] = {
    "transformer": "bfloat16",
    "text_encoder": "bfloat16",
    "vae": "float32",
}
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_COMPONENTS = ("transformer", "text_encoder", "vae")


@dataclass(frozen=True)
class LoadedModelInfo:
    """What was loaded, for /health, logs and the worker."""

    name: str
    kind: str  # "random" (built in memory) | "pretrained" (loaded from a folder)
    dtypes: Mapping[str, str]  # component -> dtype name, as actually loaded
    device: str
    source: str  # the folder it came from, or "built in memory"
    repo_id: str | None = None
    revision: str | None = None  # the commit recorded by the fetch, when known
    render_downscale: int = 1  # >1: renders each side / N (multiple of 16) and upscales
    notes: tuple[str, ...] = field(default_factory=tuple)


def load_pipeline(
    name: str,
    *,
    weights_root: str | os.PathLike[str],
    device: str = "cpu",
    catalog: Mapping[str, ModelEntry] | None = None,
) -> tuple[WanVACEPipeline, LoadedModelInfo]:
    """Load the catalog model `name`: `tiny` is built in memory; real models come from
    `<weights_root>/<folder>`, which must be complete (fetched and verified)."""
    catalog = load_catalog() if catalog is None else catalog
    entry = get_entry(name, catalog)
    if entry.kind == KIND_RANDOM:
        return _build_random(entry, device)
    missing = check_complete(entry, weights_root)
    if missing:
        raise not_available_error(entry, weights_root, missing)
    folder = entry.local_dir(weights_root)
    pipe, dtypes = _load_folder(folder, entry.dtypes, device)
    revision = read_manifest(folder).get("revision") or entry.revision
    return pipe, LoadedModelInfo(
        name=entry.name,
        kind="pretrained",
        dtypes=dtypes,
        device=device,
        source=str(folder),
        repo_id=entry.repo_id,
        revision=revision,
    )


def load_pipeline_from_dir(
    path: str | os.PathLike[str],
    *,
    device: str = "cpu",
    dtypes: Mapping[str, str] | None = None,
    name: str | None = None,
) -> tuple[WanVACEPipeline, LoadedModelInfo]:
    """Load a diffusers-format WanVACEPipeline folder given by path (for example one written by
    `save_pretrained`). No manifest is required; when there is one, its files must be present
    with their recorded sizes."""
    folder = Path(path).expanduser().resolve()
    missing = check_folder(folder, DIFFUSERS_VACE_LAYOUT, require_manifest=False)
    if missing:
        raise ModelNotAvailable(
            f"{folder} is not a complete WanVACEPipeline folder: missing " + "; ".join(missing),
            name=name,
            missing=missing,
        )
    pipe, loaded = _load_folder(folder, dtypes or DEFAULT_DTYPES, device)
    return pipe, LoadedModelInfo(
        name=name or folder.name,
        kind="pretrained",
        dtypes=loaded,
        device=device,
        source=str(folder),
    )


def _load_folder(
    folder: Path, dtypes: Mapping[str, str], device: str
) -> tuple[WanVACEPipeline, dict[str, str]]:
    from diffusers import AutoencoderKLWan, WanVACEPipeline

    want = {c: _TORCH_DTYPES[dtypes.get(c, DEFAULT_DTYPES[c])] for c in _COMPONENTS}
    # An absolute path that exists is never taken for a Hub repo id, and local_files_only keeps
    # every sub-loader (transformers included) off the network even without HF_HUB_OFFLINE.
    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", dtype=want["vae"], local_files_only=True)
    pipe = WanVACEPipeline.from_pretrained(
        folder,
        vae=vae,
        dtype={
            "default": want["transformer"],
            "transformer": want["transformer"],
            "text_encoder": want["text_encoder"],
        },
        local_files_only=True,
    )
    pipe.to(device)
    got = _component_dtypes(pipe)
    wrong = {c: got[c] for c in _COMPONENTS if got[c] != str(want[c]).removeprefix("torch.")}
    if wrong:  # a diffusers change in how dtypes are applied must not go unnoticed
        raise RuntimeError(f"loaded with unexpected dtypes {wrong}; wanted {dtypes}")
    return pipe, got


def _component_dtypes(pipe) -> dict[str, str]:
    return {c: str(getattr(pipe, c).dtype).removeprefix("torch.") for c in _COMPONENTS}


def _build_random(entry: ModelEntry, device: str) -> tuple[WanVACEPipeline, LoadedModelInfo]:
    from pipelines.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.to(device)
    notes = ["random weights: the output is noise-like video that proves the plumbing"]
    if entry.render_downscale > 1:
        notes.append(
            f"renders each side / {entry.render_downscale} (rounded to a multiple of 16) and "
            "scales the frames back up to the requested size"
        )
    return pipe, LoadedModelInfo(
        name=entry.name,
        kind="random",
        dtypes=_component_dtypes(pipe),
        device=device,
        source="built in memory",
        render_downscale=entry.render_downscale,
        notes=tuple(notes),
    )
