"""Runner factories named after the failure they simulate, for the worker's failure tests.

Each is a `server.kernel.runner.RunnerFactory` (it takes the worker's settings). A runner made
by one misbehaves only on jobs whose prompt starts with "boom" and completes every other job at
once, so a test can show that the worker goes on after the failure. They live in an importable
module because a spawned worker process receives its factory by reference.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from server.kernel.runner import Media, ProgressFn, RunResult

# hangs_in_step blocks until this is set (in-process tests only).
RELEASE_HANG = threading.Event()


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which the worker maps without importing torch."""


class FakeRunner:
    device = "cpu"

    def __init__(self, misbehave=None):
        self.misbehave = misbehave
        self.runs: list[str] = []

    @property
    def info(self) -> dict[str, Any]:
        return {"kind": "fake", "device": self.device}

    def warm_up(self) -> None:
        pass

    def close(self) -> None:
        pass

    def run(self, request, media: Media, workdir: Path, progress: ProgressFn) -> RunResult:
        self.runs.append(request.prompt)
        progress(0.1)
        if request.prompt.startswith("boom") and self.misbehave is not None:
            self.misbehave(progress)
        progress(0.9)
        path = workdir / "output.mp4"
        path.write_bytes(b"not really an mp4")
        return RunResult(video_path=path, seed=max(request.seed, 0), inference_ms=1,
                         render_size=(request.width, request.height))


def succeeds(settings) -> FakeRunner:
    return FakeRunner()


def crash_in_setup(settings) -> FakeRunner:
    raise RuntimeError("CUDA driver initialization failed (simulated)")


def _kill_self(progress: ProgressFn) -> None:
    progress(0.3)
    os.kill(os.getpid(), signal.SIGKILL)


def killed_mid_run(settings) -> FakeRunner:
    return FakeRunner(_kill_self)


def _oom(progress: ProgressFn) -> None:
    progress(0.4)
    raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")


def oom_in_run(settings) -> FakeRunner:
    return FakeRunner(_oom)


def _hang(progress: ProgressFn) -> None:
    # A denoising step that does not return (a stuck kernel, a deadlock): no progress call, so
    # nothing inside the job can notice a cancel until the step returns.
    RELEASE_HANG.wait(timeout=30)
    progress(0.5)


def hangs_in_step(settings) -> FakeRunner:
    return FakeRunner(_hang)


def _slow(progress: ProgressFn) -> None:
    # Longer than the lease the tests give (1 s), in short steps that each report progress.
    for i in range(12):
        time.sleep(0.25)
        progress(0.1 + 0.07 * i)


def slow(settings) -> FakeRunner:
    return FakeRunner(_slow)
