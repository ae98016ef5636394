"""The registry of preprocessors, keyed by the API's `task` value.

It is the single place that lists every task the server knows: the ones it can run now
(`available_tasks()`) and the ones it knows but cannot run yet (`known_tasks()` minus those).
Looking up a known-but-missing task raises `NotSupportedYet` with a message that says what is
missing and what the caller can do instead; an unknown task raises it too, naming the task.

Every preprocessor has one call signature (see `Preprocessor`). Entries are registered as
*factories* that take a `PreprocessorContext` (device, dtype, a weights resolver, whether the
model is the random tiny one). Instances are not cached here: a `PreprocessorSet`, owned by the
runner, builds each task's preprocessor on first use and drops them all on `close`, so model
weights can be freed. Model-backed preprocessors (depth, pose, flow ...) import torch and their
model library only inside the factory, so importing this module stays cheap (numpy only) and
the HTTP process never pays for a model it does not run.

The task names the API accepts live in the kernel (`server.kernel.request.TASKS`); a test ties
that list to this registry, so neither can gain a task the other does not know.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.kernel.errors import CODE_INVALID_PARAMETER, NotSupportedYet, TaskError


class PreprocessorUnavailable(TaskError):
    """A known task whose weights or library this server does not have: the message names the
    task, what is missing (the folder) and the fetch command."""

    code = CODE_INVALID_PARAMETER


class Preprocessor:
    """Base class (and the protocol) of every preprocessor.

    `__call__(frames, mask) -> (frames, mask)`:
    - `frames`: uint8 (F, H, W, 3) RGB, already at the target size.
    - `mask`: uint8 (F, H, W) with values exactly 0 or 255 (255 = generate), or None. The
      builder binarises the request's mask with `mask_threshold` before the call.
    Returns frames of the same shape and dtype (RGB uint8) and the mask, possibly changed
    (or None). Implementations must not modify their inputs in place.
    """

    name: str = ""
    # True when the task cannot run without a mask (the builder then refuses a request that
    # gives none, before any work).
    needs_mask: bool = False
    # Mask values >= this are "generate" (the request's masks arrive as soft luminance). 128 is
    # the official loader's and diffusers' 0.5; a task whose official annotator thresholds
    # differently says so (inpainting: > 0).
    mask_threshold: int = 128

    def __call__(
        self, frames: np.ndarray, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    # Model-backed preprocessors override these two; the model-free ones have nothing to move.
    def to(self, device: str) -> None:
        """Move the model(s) to `device` ("cuda", "cpu"): how the runner's memory policy parks
        a preprocessor off the GPU while the pipeline runs, and brings it back."""

    def close(self) -> None:
        """Drop the model(s) and free their memory (the runner owns the preprocessors)."""


@dataclass(frozen=True)
class PreprocessorContext:
    """What a factory may build its preprocessor for."""

    device: str = "cpu"  # where model-backed preprocessors run ("cuda", "cuda:1", "cpu")
    dtype: str = "float32"  # torch dtype name for their weights
    # Folder of a weights.toml entry by name (raises when it is not fetched); None = no local
    # weights, which only the random-weight tiny model may run with.
    weights: Callable[[str], Path] | None = None
    tiny: bool = False  # the random tiny model: model-backed tasks may use random weights too


Factory = Callable[[PreprocessorContext], Preprocessor]


@dataclass(frozen=True)
class _Entry:
    name: str
    # None: the task is known but its preprocessor is not implemented/installed yet.
    factory: Factory | None
    # What runs for this task, in words (used in messages), e.g. "MiDaS depth".
    description: str


_lock = threading.Lock()
_entries: dict[str, _Entry] = {}


def register(name: str, factory: Factory, *, description: str = "") -> None:
    """Register (or replace) the factory for `task == name`.

    The factory takes a `PreprocessorContext` and returns a `Preprocessor`; a `PreprocessorSet`
    calls it once, on the first use of the task. Model-backed preprocessors import their heavy
    libraries inside the factory and load weights from `context.weights`."""
    if not name:
        raise ValueError("a preprocessor needs a non-empty task name")
    with _lock:
        old = _entries.get(name)
        _entries[name] = _Entry(name, factory, description or (old.description if old else name))


def register_planned(name: str, description: str) -> None:
    """Declare a task the server knows but cannot run yet: looking it up raises NotSupportedYet."""
    with _lock:
        _entries[name] = _Entry(name, None, description)


def _factory_for(task: str) -> Factory:
    with _lock:
        entry = _entries.get(task)
        if entry is None:
            raise NotSupportedYet(
                f"task {task!r} is not supported by this server; "
                f"supported tasks: {', '.join(_available_locked())}"
            )
        if entry.factory is None:
            raise NotSupportedYet(
                f"task {task!r} is not supported yet by this server: its preprocessor "
                f"({entry.description}) is not installed; use task 'none' with an already-made "
                "control video, or omit video"
            )
        return entry.factory


class PreprocessorSet:
    """The preprocessors one runner has built, keyed by task. The runner owns it: `close`
    drops every instance (and with them their model weights), so GPU memory can be freed."""

    def __init__(self, context: PreprocessorContext | None = None):
        self.context = context or PreprocessorContext()
        self._built: dict[str, Preprocessor] = {}
        self._parked: set[str] = set()
        self._lock = threading.Lock()

    def get(self, task: str) -> Preprocessor:
        """The preprocessor for `task`, built on first use and on the context's device;
        NotSupportedYet for unknown tasks, PreprocessorUnavailable when its weights (or its
        library) are missing."""
        factory = _factory_for(task)
        with self._lock:
            inst = self._built.get(task)
            if inst is None:
                try:
                    inst = factory(self.context)
                except TaskError:
                    raise
                except Exception as e:  # missing weights, a library that is not installed
                    raise PreprocessorUnavailable(
                        f"task {task!r} cannot run on this server: {e}"
                    ) from e
                self._built[task] = inst
            elif task in self._parked:
                inst.to(self.context.device)
            self._parked.discard(task)
            return inst

    def park(self) -> None:
        """Move every built preprocessor off the GPU (the `offload` memory policy: the pipeline
        gets the memory back while it denoises; the next `get` brings the model back)."""
        if not str(self.context.device).startswith("cuda"):
            return
        with self._lock:
            for task, inst in self._built.items():
                inst.to("cpu")
                self._parked.add(task)

    def built(self) -> list[str]:
        with self._lock:
            return list(self._built)

    def close(self) -> None:
        with self._lock:
            for inst in self._built.values():
                close = getattr(inst, "close", None)
                if close is not None:
                    close()
            self._built.clear()
            self._parked.clear()


def get_preprocessor(task: str) -> Preprocessor:
    """A freshly built preprocessor for `task` with the default (CPU) context; for callers that
    own no `PreprocessorSet` (tests, scripts). NotSupportedYet for unknown or missing ones."""
    return _factory_for(task)(PreprocessorContext())


def _available_locked() -> list[str]:
    return [n for n, e in _entries.items() if e.factory is not None]


def available_tasks() -> list[str]:
    """Tasks that can run now, in registration order."""
    with _lock:
        return _available_locked()


def known_tasks() -> list[str]:
    """Every task the server knows (runnable or not yet), in registration order."""
    with _lock:
        return list(_entries)


def is_known(task: str) -> bool:
    with _lock:
        return task in _entries


def _lazy(module: str, function: str) -> Factory:
    """A factory that imports its module (torch, a model library) only when first called."""

    def make(context: PreprocessorContext) -> Preprocessor:
        import importlib

        return getattr(importlib.import_module(module), function)(context)

    return make


def _register_builtins() -> None:
    # Factories import lazily so that this module never imports anything heavy.
    register("none", _lazy("preprocessors.basic", "build_none"), description="the video as given")
    register("gray", _lazy("preprocessors.basic", "build_gray"), description="grayscale")
    register("inpainting", _lazy("preprocessors.basic", "build_inpainting"),
             description="masked pixels to gray")  # fmt: skip
    # WaveSpeed's documented values are depth (its default), pose, face, inpainting, none; the
    # others are official VACE tasks (vace.md §5). Weights: the [preprocessors.*] entries of
    # weights.toml; `--model tiny` builds random-weight versions.
    register("depth", _lazy("preprocessors.depth", "build_depth"), description="MiDaS DPT-Hybrid depth")
    register("pose", _lazy("preprocessors.pose", "build_pose"), description="DWPose body and face pose")
    register("face", _lazy("preprocessors.face", "build_face"), description="face crop of the references")
    register("flow", _lazy("preprocessors.flow", "build_flow"), description="RAFT optical flow")
    register("scribble", _lazy("preprocessors.scribble", "build_scribble"),
             description="anime-style scribble network")  # fmt: skip
    register("depthv2", _lazy("preprocessors.depth", "build_depthv2"),
             description="Depth-Anything-V2 depth")  # fmt: skip
    register("pose_body", _lazy("preprocessors.pose", "build_pose_body"), description="DWPose body pose")
    # Geometry, not a signal: the conditioning builder places the frames (basic.py says why).
    register("outpainting", _lazy("preprocessors.basic", "build_outpainting"),
             description="the source on a larger gray canvas")  # fmt: skip
    register("outpainting_inner", _lazy("preprocessors.basic", "build_outpainting_inner"),
             description="the border regenerated")  # fmt: skip


_register_builtins()
