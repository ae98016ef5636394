"""Shared fixtures. `live_server` starts the real server (uvicorn, spawned workers, the tiny
model) as a separate process on a free loopback port, the way a user runs it, with the same
`ServerProcess` the pytest plugin for users' suites starts (server/testing.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from server import testing
from server.testing import free_port  # noqa: F401 - tests import it from here

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-0123456789"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ServerProcess(testing.ServerProcess):
    """The plugin's server (server/testing.py) with this suite's key, run from the checkout, and
    short leases so recovery tests see a dead worker's job re-queued within seconds."""

    def __init__(self, data_dir: Path, port: int | None = None, model: str = "tiny", **env: str):
        super().__init__(
            data_dir, port, model, cwd=ROOT, api_key=API_KEY,
            # A stop hands running jobs back at once unless a test asks for a drain
            # (tests/e2e/test_shutdown.py), so stopping a server mid-job stays quick.
            **{"WAN_VACE_LEASE_SECONDS": "6", "WAN_VACE_SHUTDOWN_GRACE": "0", **env},
        )


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
