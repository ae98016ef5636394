"""The pipelined worker and the wake-up signal with real processes: `wan-vace serve --workers 0`
and worker processes on its data dir (as `wan-vace worker` runs them) with the two-stage fake
runner (tests/fakes.py `held_once_on_disk`: a "boom" job's finish hangs the first time), so a
worker can be killed with one job in its CPU stage and one in the hand-off. Real HTTP, SQLite,
Unix sockets and signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.kernel.jobstate import State
from server.settings import Settings
from server.store import open_store
from server.wakeup import wake_dir
from tests.conftest import ROOT, ServerProcess, wait_terminal

URL = "/api/v3/wavespeed-ai/wan-2.1-14b-vace"
# What `wan-vace worker` runs, with the fake runner instead of the model.
WORKER = (
    "import sys; from server.settings import Settings; from server.worker.loop import worker_main; "
    "from tests import fakes; worker_main(Settings().model_dump_json(), sys.argv[1], None, "
    "fakes.held_once_on_disk)"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A poll far longer than any wait below: a job claimed at once was claimed on a nudge.
    srv = ServerProcess(tmp_path_factory.mktemp("pipelined"), WAN_VACE_WORKERS="0",
                        WAN_VACE_LEASE_SECONDS="1", WAN_VACE_POLL_INTERVAL="5").start()  # fmt: skip
    yield srv
    srv.stop()


def start_worker(server: ServerProcess, worker_id: str) -> subprocess.Popen:
    with open(server.data_dir / f"worker-{worker_id}.log", "ab") as log:  # the child has its own
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, worker_id],
            cwd=ROOT,
            env={**server.env, "WAN_VACE_DATA_DIR": str(server.data_dir)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while not (wake_dir(server.data_dir) / f"{worker_id}.sock").exists():  # bound: it claims
        assert proc.poll() is None, (server.data_dir / f"worker-{worker_id}.log").read_text()
        assert time.monotonic() < deadline, "the worker never got ready"
        time.sleep(0.05)
    return proc


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    proc.wait(timeout=30)


def submit(client: httpx.Client, prompt: str) -> str:
    r = client.post(URL, json={"prompt": prompt, "seed": 1})
    assert r.status_code == 200, r.text
    return r.json()["data"]["id"]


def wait_progress(client: httpx.Client, job_id: str, at_least: float, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = client.get(f"/api/v3/predictions/{job_id}/result").json()["data"]
        if d["status"] == "processing" and d["progress"] >= at_least:
            return d
        time.sleep(0.02)
    raise TimeoutError(d)


def output_files(data_dir: Path, job_id: str) -> list[Path]:
    return [p for p in (data_dir / "media" / "outputs" / job_id).rglob("*") if p.is_file()]


def test_a_worker_on_the_same_data_dir_claims_each_submit_at_once(server, client):
    store = open_store(Settings(data_dir=server.data_dir))
    worker = start_worker(server, "wakeup000001")
    try:
        for i in range(3):
            # Each submit comes right after the worker found the queue empty: its next poll
            # is 5 s away, so only the nudge can explain a claim within a second.
            job_id = submit(client, f"q{i}")
            d = wait_terminal(client, job_id, timeout=30)
            assert d["status"] == "completed", d
            job = store.get(job_id)
            assert job.started_at - job.created_at < 1.0, job.started_at - job.created_at
    finally:
        stop_worker(worker)
    assert worker.returncode == 0
    assert not (wake_dir(server.data_dir) / "wakeup000001.sock").exists()  # removed on exit


def test_a_worker_killed_between_the_stages_loses_nothing(server, client):
    data = server.data_dir
    store = open_store(Settings(data_dir=data))
    first = start_worker(server, "killed000001")
    second = None
    try:
        boom, ok = submit(client, "boom"), submit(client, "ok")
        wait_progress(client, boom, 0.95)  # in its CPU stage (the finish hangs)
        wait_progress(client, ok, 0.9)  # rendered, waiting in the hand-off
        assert client.get(f"/api/v3/predictions/{ok}/result").json()["data"]["progress"] < 0.95
        health = httpx.get(server.url + "/health").json()
        (w,) = [w for w in health["workers"] if w["pid"] == first.pid]
        assert w["state"] == "busy" and set(w["jobs"]) == {boom, ok}
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        # Both are still leased to the dead worker; the server re-queues them once the leases
        # run out (1 s, plus the supervisor's grace).
        for j in (boom, ok):
            deadline = time.monotonic() + 30
            while (job := store.get(j)).status is State.PROCESSING:
                assert time.monotonic() < deadline, job
                time.sleep(0.1)
            assert job.status is State.CREATED and job.attempts == 1, job
        # The dead worker's socket is stale now: the supervisor's nudge when it re-queued the
        # jobs, or this submit's, clears it, and the submit still answers.
        stale = wake_dir(data) / "killed000001.sock"
        later = submit(client, "after the kill")
        assert not stale.exists()
        second = start_worker(server, "second000001")
        for j in (boom, ok, later):
            d = wait_terminal(client, j, timeout=60)
            assert d["status"] == "completed", d
        assert [store.get(j).attempts for j in (boom, ok)] == [2, 2]
        for j in (boom, ok, later):
            (out,) = output_files(data, j)  # stored exactly once: the killed run stored nothing
            url = client.get(f"/api/v3/predictions/{j}/result").json()["data"]["outputs"][0]
            assert httpx.get(url).content == out.read_bytes()
    finally:
        if first.poll() is None:
            first.kill()
        if second is not None:
            stop_worker(second)
