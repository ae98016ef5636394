"""The one small protocol between the worker (server/worker/) and what runs a job (pipelines/,
or a fake in the tests): a runner factory builds a `Runner` once per worker process; the worker
hands it one typed request and its fetched media at a time and stores what `RunResult` names.

A job runs in two stages so the GPU never waits for CPU work: `render` is the device stage
(decode inputs, preprocess, denoise, VAE decode, frames to uint8 on the device, the safety check)
and returns a `Rendered`; `finish` is the CPU stage (scale up, encode the MP4, conditioning files)
and returns the `RunResult`. The worker runs the next job's `render` while the previous job's
`finish` and storage put are in progress. A runner with only `run` (a simple fake) is run as one
stage.

Standard library only: the worker imports this at start-up without importing torch, and the
fake runners in the tests implement it in a few lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from server.kernel.request import VaceRequest

# Fetched media, keyed by field name: bytes, or a list of bytes for a list field (`images`).
Media = dict[str, Any]
# Called with the job's progress in 0..1; raises (cancelled, lease lost) to stop the job.
ProgressFn = Callable[[float], None]


@dataclass
class RunResult:
    video_path: Path  # the finished MP4 in the job's work dir
    seed: int
    inference_ms: int
    has_nsfw: bool = False
    safety_checked: bool = False
    # name -> file path (or list of paths) of what the pipeline was fed, when asked for, or a
    # plain value (the recipe).
    conditioning: dict[str, Any] = field(default_factory=dict)
    render_size: tuple[int, int] = (0, 0)
    # What preprocessing decided that the caller should see (e.g. which references had a face
    # cropped); shown as `data.preprocessing`.
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rendered:
    """What the device stage hands to the CPU stage. `payload` is the runner's own (the uint8
    frames in host memory, the conditioning to save); the worker only passes it on."""

    payload: Any
    seed: int
    inference_ms: int
    render_size: tuple[int, int] = (0, 0)
    has_nsfw: bool = False
    safety_checked: bool = False
    notes: dict[str, Any] = field(default_factory=dict)


class Runner(Protocol):
    device: str

    @property
    def info(self) -> dict[str, Any]:
        """What /health shows about the model (kind, device, render note)."""
        ...

    def warm_up(self) -> None: ...

    def render(
        self, request: VaceRequest, media: Media, workdir: Path, progress: ProgressFn
    ) -> Rendered:
        """The device stage; progress up to 0.9. Raises to fail the job (nothing written)."""
        ...

    def finish(self, rendered: Rendered, workdir: Path, progress: ProgressFn) -> RunResult:
        """The CPU stage, in `workdir` (the same one `render` had); progress up to 1.0."""
        ...

    def run(
        self, request: VaceRequest, media: Media, workdir: Path, progress: ProgressFn
    ) -> RunResult:
        """Both stages in one call (scripts, tests): `finish(render(...))`."""
        ...

    def close(self) -> None:
        """Free what the runner holds (GPU memory of models and preprocessors)."""
        ...


# Built once in the worker process, from the worker's settings.
RunnerFactory = Callable[[Any], Runner]
