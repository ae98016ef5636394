"""Retention in the background of a real server (uvicorn, a spawned worker, the tiny model),
with a retention of a few seconds and a cleanup every 0.3 s: a finished job's output is served,
then expires (the poll says so, the URL answers 410), and requests keep answering promptly
while passes walk and delete a storage of thousands of files."""

from __future__ import annotations

import base64
import os
import secrets
import time

import httpx
import pytest

from tests.conftest import FAST, ServerProcess, wait_terminal
from tests.samples import png_bytes

RETENTION = 4
SUBMIT = "/api/v3/wavespeed-ai/wan-2.1-14b-vace"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("retention")
    # Old uploads for the passes to walk and delete: the server starts on them.
    old = time.time() - 3600
    for _ in range(1500):
        d = data / "media" / "uploads" / secrets.token_hex(16)
        d.mkdir(parents=True)
        (d / "old.png").write_bytes(b"x" * 64)
        os.utime(d / "old.png", (old, old))
    srv = ServerProcess(
        data, WAN_VACE_RETENTION_SECONDS=str(RETENTION), WAN_VACE_RETENTION_INTERVAL="0.3"
    ).start()
    yield srv
    srv.stop()


def test_outputs_expire_in_the_background_while_requests_answer(server, client):
    image = "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)).decode()
    r = client.post(SUBMIT, json={"prompt": "a cat", "images": [image], **FAST})
    assert r.status_code == 200, r.text
    jid = r.json()["data"]["id"]
    data = wait_terminal(client, jid)
    assert data["status"] == "completed", data
    out = data["outputs"][0]
    got = httpx.get(out, timeout=10)  # served while within retention
    assert got.status_code == 200 and got.content[4:8] == b"ftyp"

    slowest, expired = 0.0, None
    deadline = time.monotonic() + RETENTION + 20
    while time.monotonic() < deadline:
        t = time.monotonic()
        health = client.get("/health")
        poll = client.get(f"/api/v3/predictions/{jid}/result")
        slowest = max(slowest, time.monotonic() - t)
        assert health.status_code == 200 and poll.status_code == 200
        if poll.json()["data"].get("outputs_expired"):
            expired = poll.json()["data"]
            break
        time.sleep(0.1)
    assert expired is not None, f"the output never expired: {health.json().get('storage')}\n{server.log()}"
    assert expired["status"] == "completed" and expired["outputs"] == [out]
    # Passes run in a thread: a poll and /health together never wait on one.
    assert slowest < 2.0, slowest

    gone = httpx.get(out, timeout=10)
    assert gone.status_code == 410
    assert gone.json()["message"].startswith(
        "this output expired after 4 seconds (WAN_VACE_RETENTION_SECONDS=4)"
    )

    storage = client.get("/health").json()["storage"]
    assert storage["retention_seconds"] == RETENTION and storage["cleanup_interval"] == 0.3
    # The 1500 old uploads went on the first pass; the job's files went when it expired.
    assert storage["files"] == 0 and storage["bytes"] == 0, storage
    assert not any((server.data_dir / "media" / "uploads").iterdir())
