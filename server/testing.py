"""A pytest plugin for your own test suite (`pip install wan-vace[testing]`): the fixture
`wan_vace_server` starts a real server with the tiny model on a free loopback port and a
temporary data dir, once per test session, and yields a `ServerProcess` with `base_url` and
`api_key` (plus `client()`, an httpx client with the key, and `wavespeed_client()`).

The tiny model has random weights: outputs are noise, but they are MP4s of the requested size,
frame count and frame rate. The fixture renders at
1/`TEST_DOWNSCALE` of each side, so a 5 s 832*480 job takes about a second on a laptop CPU at a
few steps (two at the default 30), and the same seed gives byte-identical MP4s. Override the
`wan_vace_server_env` fixture to pass other `WAN_VACE_*` settings.

This repository's own end-to-end fixtures (tests/conftest.py) use `ServerProcess` too. No torch
here: the server runs in its own process, and pytest loads this module in every session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

API_KEY = "wan-vace-test-key"
# 832*480 renders at 32x16: a 5 s job took 1.1 s at 4 steps and about 2 s at the default 30 on
# one thread of a loaded 2-core host, where the model's own default of 8 (112x64) took 6-14 s.
TEST_DOWNSCALE = 32
MODEL_ID = "wavespeed-ai/wan-2.1-14b-vace"
TERMINAL = ("completed", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(api_key: str = API_KEY) -> dict[str, str]:
    """The settings every test server runs with (each a `WAN_VACE_*` variable)."""
    return {
        "WAN_VACE_API_KEYS": api_key,
        # Tests serve their input media from loopback servers.
        "WAN_VACE_ALLOW_PRIVATE_URLS": "true",
        # Noise from the tiny model is x264's worst case; tests need speed, not small files.
        "WAN_VACE_ENCODE_PRESET": "ultrafast",
        # pytest, the server and its worker share the CPU: OpenMP threads spinning against each
        # other made jobs 5x slower on two cores.
        "WAN_VACE_CPU_THREADS": "1",
        # The suite owns the process: no telemetry, no Hub access, no buffered logs.
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


class ServerProcess:
    """`wan-vace serve` in a subprocess (its own session, so a stop reaches its workers);
    restartable on the same data dir and port. `env` entries override `server_env()`."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        model: str = "tiny",
        *,
        cwd: Path | None = None,
        api_key: str = API_KEY,
        **env: str,
    ):
        self.data_dir = Path(data_dir)
        self.model = model
        self.port = port or free_port()
        self.api_key = api_key
        self.cwd = cwd
        self.env = {**os.environ, **server_env(api_key), **env}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    base_url = url

    def start(self, *, wait_ready: bool = True, timeout: float = 90) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port), "--model", self.model,
                 "--data-dir", str(self.data_dir)],
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        if wait_ready:
            self.wait_health({"ready", "busy"}, timeout)
        return self

    def wait_health(self, states: set[str], timeout: float = 90) -> dict[str, Any]:
        """Poll /health until its status is one of `states`; a server that exits, or never
        gets there, raises with the end of its log."""
        deadline = time.monotonic() + timeout
        last: Any = "no answer"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                last = httpx.get(self.url + "/health", timeout=2).json()
                if last.get("status") in states:
                    return last
            except (httpx.HTTPError, ValueError):
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
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=30
        )

    def wavespeed_client(self, **kwargs: Any) -> Any:
        """A `wavespeed.Client` pointed at this server (needs the `wavespeed` SDK installed)."""
        from wavespeed import Client

        return Client(api_key=self.api_key, base_url=self.url, **kwargs)

    def wait(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        """Poll a job until it ends; returns its `data` (a failed job's too)."""
        with self.client() as c:
            deadline = time.monotonic() + timeout
            while True:
                r = c.get(f"/api/v3/predictions/{job_id}/result")
                r.raise_for_status()
                data = r.json()["data"]
                if data["status"] in TERMINAL:
                    return data
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} did not finish: {data}")
                time.sleep(0.1)


@pytest.fixture(scope="session")
def wan_vace_server_env() -> Mapping[str, str]:
    """Extra `WAN_VACE_*` settings for `wan_vace_server`; override it in your conftest.py."""
    return {}


@pytest.fixture(scope="session")
def wan_vace_server(
    tmp_path_factory: pytest.TempPathFactory, wan_vace_server_env: Mapping[str, str]
) -> Iterator[ServerProcess]:
    """A running tiny-model server for the whole session: `.base_url`, `.api_key`."""
    env = {"WAN_VACE_TINY_DOWNSCALE": str(TEST_DOWNSCALE), **wan_vace_server_env}
    srv = ServerProcess(tmp_path_factory.mktemp("wan-vace"), **env)
    srv.start(timeout=180)
    try:
        yield srv
    finally:
        srv.stop()
