"""Shared fixtures. `live_server` starts the real server (uvicorn, spawned workers, the tiny
model) as a separate process on a free loopback port, the way a user runs it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-0123456789"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`wan-vace serve` in a subprocess; restartable on the same data dir and port."""

    def __init__(self, data_dir: Path, port: int | None = None, model: str = "tiny", **env: str):
        self.data_dir = data_dir
        self.model = model
        self.port = port or free_port()
        self.env = {
            **os.environ,
            "WAN_VACE_API_KEYS": API_KEY,
            "WAN_VACE_ALLOW_PRIVATE_URLS": "true",
            "WAN_VACE_LEASE_SECONDS": "6",
            # Noise from the tiny model is x264's worst case; tests need speed, not small files.
            "WAN_VACE_ENCODE_PRESET": "ultrafast",
            # Two cores shared by pytest, servers and workers: spinning OpenMP threads would
            # oversubscribe them (5x slower jobs measured).
            "WAN_VACE_CPU_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_ready: bool = True, timeout: float = 90) -> "ServerProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port), "--model", self.model,
             "--data-dir", str(self.data_dir)],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait_ready:
            self.wait_health({"ready", "busy"}, timeout)
        return self

    def wait_health(self, states: set[str], timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        last: dict | str = "no answer"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                last = r.json()
                if last.get("status") in states:
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server health never reached {states}: {last}\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory):
    srv = ServerProcess(tmp_path_factory.mktemp("live")).start()
    yield srv
    srv.stop()


def wait_terminal(client: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    """Poll like a client until the job ends; every poll, a failed job's too, is an HTTP 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/api/v3/predictions/{job_id}/result")
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        if data["status"] in ("completed", "failed", "cancelled"):
            return data
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not finish: {data}")


# A request small and fast on the tiny model: 5 s of video at 832x480 renders at 112x64 and takes
# a few seconds on a CPU.
FAST = {"num_inference_steps": 2, "seed": 7}
