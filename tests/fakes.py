"""Runner factories named after the failure they simulate, for the worker's failure tests, and
a two-stage runner (render, then finish) whose stages a test holds, releases or fails.

Each is a `server.kernel.runner.RunnerFactory` (it takes the worker's settings). A runner made
by one misbehaves only on jobs whose prompt starts with "boom" and completes every other job at
once, so a test can show that the worker goes on after the failure. They live in an importable
module because a spawned worker process receives its factory by reference.
"""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from server.kernel.runner import Media, ProgressFn, Rendered, RunResult

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


# Disk faults -------------------------------------------------------------------------------------
# In-process only (a spawned worker does not see a monkeypatch): the store's writes, or storage's,
# fail as on a full disk while the event is set. A runner made by `fills_the_disk` or
# `fills_the_storage` sets it once a "boom" job has rendered, so the outcome cannot be recorded
# (or the output cannot be stored) until the test clears it.
DISK_FULL = threading.Event()
STORAGE_FULL = threading.Event()
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


class _FullDiskConnection:
    """An SQLite connection whose writes fail with SQLITE_FULL's message while DISK_FULL is set."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, sql: str, *args):
        if DISK_FULL.is_set() and sql.lstrip().upper().startswith(_WRITES):
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


def fill_the_store(monkeypatch, *, new_connections_fail: bool = False) -> threading.Event:
    """Make every SqliteJobStore of this process fail its writes while the returned event is set
    (and, with `new_connections_fail`, fail to open a connection, as SQLite does when it cannot
    create its -wal/-shm files)."""
    from server.store.sqlite import SqliteJobStore

    DISK_FULL.clear()
    conn, connect = SqliteJobStore._conn, SqliteJobStore._connect

    def faulty_conn(self):
        return _FullDiskConnection(conn(self))

    def faulty_connect(self, *args, **kw):
        if new_connections_fail and DISK_FULL.is_set():
            raise sqlite3.OperationalError("unable to open database file")
        return connect(self, *args, **kw)

    monkeypatch.setattr(SqliteJobStore, "_conn", faulty_conn)
    monkeypatch.setattr(SqliteJobStore, "_connect", faulty_connect)
    return DISK_FULL


class _FullDiskFile:
    """A file being written whose disk fills up after its first few bytes."""

    def __init__(self, f):
        self._f = f

    def write(self, data) -> int:
        self._f.write(bytes(data[:4]))
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def fill_the_storage(monkeypatch) -> threading.Event:
    """Make storage writes fail with ENOSPC while the returned event is set: a temporary `.part`
    file takes its first bytes, then the disk is full."""
    STORAGE_FULL.clear()
    real = os.fdopen

    def fdopen(fd, *args, **kw):
        f = real(fd, *args, **kw)
        if STORAGE_FULL.is_set() and isinstance(fd, int):
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = ""
            if path.endswith(".part"):
                return _FullDiskFile(f)
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    return STORAGE_FULL


def _fill(event: threading.Event):
    def misbehave(progress: ProgressFn) -> None:
        progress(0.5)
        event.set()

    return misbehave


def fills_the_disk(settings) -> FakeRunner:
    return FakeRunner(_fill(DISK_FULL))


def fills_the_storage(settings) -> FakeRunner:
    return FakeRunner(_fill(STORAGE_FULL))


def _fill_then_oom(progress: ProgressFn) -> None:
    progress(0.4)
    DISK_FULL.set()
    raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")


def fills_the_disk_then_oom(settings) -> FakeRunner:
    return FakeRunner(_fill_then_oom)


def store_unavailable_at_start(settings) -> FakeRunner:
    """Exits the worker process as one that could not open the store does."""
    from server.worker.loop import EXIT_STORE_UNAVAILABLE

    raise SystemExit(EXIT_STORE_UNAVAILABLE)


# Two stages ---------------------------------------------------------------------------------------
class Stages:
    """What `TwoStageRunner`s of this process do, by stage and prompt ("render:a", "finish:a"):
    each stage records when it starts and ends, waits while it is held, and raises when told to.
    In-process tests only; `held_once_on_disk` is the cross-process kind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self.held: dict[str, bool] = {}  # name -> whether progress is reported while held
        self.failures: dict[str, BaseException] = {}
        self.log: list[str] = []

    def reset(self) -> None:
        with self._lock:
            for e in self._events.values():  # a stage still held by an earlier test lets go
                e.set()
            self._events.clear()
            self.held.clear()
            self.failures.clear()
            self.log.clear()

    def event(self, name: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(name, threading.Event())

    def hold(self, name: str, *, report: bool = True) -> None:
        """Hold the stage `name` once it starts, until `release`; calling progress every 20 ms
        while held when `report` (so a cancel or a lost lease stops it there), else not at all
        (a step that does not return)."""
        self.held[name] = report
        self.event(name + ":released").clear()

    def release(self, name: str) -> None:
        self.held.pop(name, None)
        self.event(name + ":released").set()

    def fail(self, name: str, exc: BaseException) -> None:
        self.failures[name] = exc

    def wait(self, name: str, timeout: float = 20) -> None:
        """Until the stage event `name` ("render:a:started", "finish:a:ended", ...) happened."""
        if not self.event(name).wait(timeout):
            raise AssertionError(f"{name} did not happen within {timeout} s; seen: {self.log}")

    def happened(self, name: str) -> bool:
        return self.event(name).is_set()

    def run(self, name: str, progress: ProgressFn) -> None:
        with self._lock:
            self.log.append(name + ":started")
        self.event(name + ":started").set()
        if name in self.held:
            report = self.held[name]
            released = self.event(name + ":released")
            try:
                while not released.wait(0.02):
                    if report:
                        progress(None)
            finally:
                self.held.pop(name, None)  # once: a job run again is not held again
        exc = self.failures.pop(name, None)
        with self._lock:
            self.log.append(name + ":ended")
        self.event(name + ":ended").set()
        if exc is not None:
            raise exc


STAGES = Stages()


class TwoStageRunner(FakeRunner):
    """A runner with a device stage (`render`) and a CPU stage (`finish`), as the real one has.
    `hook(stage, prompt, progress)` runs inside each stage (STAGES.run by default)."""

    def __init__(self, hook=None):
        super().__init__()
        self.hook = hook or (lambda stage, prompt, progress: STAGES.run(f"{stage}:{prompt}", progress))

    def render(self, request, media: Media, workdir: Path, progress: ProgressFn) -> Rendered:
        self.runs.append(request.prompt)
        progress(0.1)
        self.hook("render", request.prompt, progress)
        (workdir / "frames.raw").write_bytes(b"rendered frames")  # what finish reads
        progress(0.9)
        return Rendered(payload=request.prompt, seed=max(request.seed, 0), inference_ms=1,
                        render_size=(request.width, request.height))  # fmt: skip

    def finish(self, rendered: Rendered, workdir: Path, progress: ProgressFn) -> RunResult:
        progress(0.95)
        self.hook("finish", rendered.payload, progress)
        frames = (workdir / "frames.raw").read_bytes()  # the work dir outlived the hand-off
        path = workdir / "output.mp4"
        path.write_bytes(b"not really an mp4: " + frames)
        return RunResult(video_path=path, seed=rendered.seed, inference_ms=rendered.inference_ms,
                         render_size=rendered.render_size)  # fmt: skip

    def run(self, request, media: Media, workdir: Path, progress: ProgressFn) -> RunResult:
        return self.finish(self.render(request, media, workdir, progress), workdir, progress)


def two_stage(settings) -> TwoStageRunner:
    return TwoStageRunner()


def _held_once_on_disk(settings):
    """In a spawned worker: the finish of a "boom" job hangs (reporting progress) the first time
    it runs on this data dir, until the process is killed; every other stage returns at once."""
    marker = Path(settings.data_dir) / "boom-finish-held"

    def hook(stage: str, prompt: str, progress: ProgressFn) -> None:
        if stage != "finish" or not prompt.startswith("boom"):
            return
        try:
            marker.touch(exist_ok=False)
        except FileExistsError:
            return  # the run after the kill
        for _ in range(1200):  # 60 s, far longer than any test waits
            time.sleep(0.05)
            progress(None)

    return hook


def held_once_on_disk(settings) -> TwoStageRunner:
    return TwoStageRunner(_held_once_on_disk(settings))


# Timed jobs, and what a spawned worker's environment is ------------------------------------------
# The CUDA variables a worker's slot sets (server/gpus.py), as the runner's process sees them.
CUDA_VARIABLES = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")


def _sleeps(stage: str, prompt: str, progress: ProgressFn) -> None:
    """A job whose prompt is "sleep S" renders for S seconds, reporting progress every 50 ms (so
    a cancel, a lost lease or a hand-back stops it there); any other job returns at once."""
    if stage != "render" or not prompt.startswith("sleep "):
        return
    end = time.monotonic() + float(prompt.split()[1])
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(0.05, left))
        progress(None)


class EnvironmentRunner(TwoStageRunner):
    """A two-stage runner whose `info` (published in the worker row, shown by /health) reports
    the CUDA variables of the process it runs in."""

    @property
    def info(self) -> dict[str, Any]:
        return {**super().info, "environment": {k: os.environ.get(k) for k in CUDA_VARIABLES}}


def sleeps(settings) -> EnvironmentRunner:
    return EnvironmentRunner(_sleeps)


def ignores_sigterm(settings) -> EnvironmentRunner:
    """A worker that does not stop when asked (its runner's setup, on the worker's main thread,
    ignores SIGTERM and SIGINT): only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return EnvironmentRunner(_sleeps)


class GroupBroke(RuntimeError):
    """Like pipelines.group.GroupFailed: the job may run again elsewhere, this runner may not."""

    retryable = True
    fatal = True


def _group_broke(progress: ProgressFn) -> None:
    progress(0.2)
    raise GroupBroke("rank 1 of the GPU group died (simulated)")


def breaks_its_group(settings) -> FakeRunner:
    return FakeRunner(_group_broke)
