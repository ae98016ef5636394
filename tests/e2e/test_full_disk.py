"""A real full disk under the real server: the data dir on a 20 MB tmpfs, filled to the last
byte while a job runs. Submits answer 507, /health and polls go on answering, the job waits for
room instead of failing, and once space is freed it completes, with no restart of the server or
its worker. Needs root (mount); skipped where mounting a tmpfs is refused."""

from __future__ import annotations

import base64
import errno
import io
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, wait_terminal

MODEL = "wavespeed-ai/wan-2.1-14b-vace"


def _png() -> str:
    """A small image the tiny model accepts, inline (the submit stores it: a write)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


PNG = _png()
# Longer than filling the disk takes, so the job's output meets a full disk.
JOB = {"prompt": "a", "num_inference_steps": 8, "seed": 7}


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], check=False, capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def fill(mnt: Path) -> Path:
    """Write a file until the disk refuses one more byte."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


def _worker_pids(srv: ServerProcess) -> set[int]:
    return {w["pid"] for w in httpx.get(srv.url + "/health").json()["workers"] if w["alive"]}


def test_a_full_disk_refuses_new_work_and_the_running_job_completes_once_space_is_freed(small_disk, tmp_path):
    srv = ServerProcess(small_disk / "data", WAN_VACE_MIN_FREE_BYTES="0")  # the real limit, no floor
    srv.log_path = tmp_path / "server.log"  # not on the disk that fills up
    srv.start()
    try:
        workers = _worker_pids(srv)
        with srv.client() as c:
            r = c.post(f"/api/v3/{MODEL}", json=JOB)
            assert r.status_code == 200, r.text
            jid = r.json()["data"]["id"]
            deadline = time.monotonic() + 60
            while (d := c.get(f"/api/v3/predictions/{jid}/result").json()["data"])["progress"] <= 0:
                assert time.monotonic() < deadline, d
                time.sleep(0.05)
            filler = fill(small_disk)  # while it renders: its output meets a full disk

            r = c.post(f"/api/v3/{MODEL}", json={**JOB, "image": PNG})
            assert r.status_code == 507, r.text
            body = r.json()
            assert body["code"] == 507 and body["data"] is None
            assert body["message"].startswith("Insufficient storage on the server: ")
            assert r.headers["retry-after"] == "30"

            health = c.get("/health")
            assert health.status_code == 200
            disk = health.json()["disk"]
            assert disk["ok"] is False and disk["free_bytes"] < 1 << 16
            assert "full" in disk["reason"]

            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:  # the job cannot store its output meanwhile
                poll = c.get(f"/api/v3/predictions/{jid}/result")
                assert poll.status_code == 200
                assert poll.json()["data"]["status"] == "processing"
                time.sleep(0.5)

            filler.unlink()
            d = wait_terminal(c, jid, timeout=120)
            assert d["status"] == "completed", d
            assert d["attempts"] == 1 and len(d["outputs"]) == 1
            assert c.get(d["outputs"][0]).status_code == 200

            # New work is taken again, by the same server and worker.
            r = c.post(f"/api/v3/{MODEL}", json={**JOB, "image": PNG})
            assert r.status_code == 200, r.text
            d2 = wait_terminal(c, r.json()["data"]["id"], timeout=120)
            assert d2["status"] == "completed", (d2["code"], d2["error"])
            assert c.get("/health").json()["disk"]["ok"] is True
        assert srv.proc.poll() is None and _worker_pids(srv) == workers
        log = srv.log()
        assert log.count("the store or storage is unavailable") <= 2  # once per outage, per process
    finally:
        srv.stop()
