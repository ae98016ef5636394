"""The rest of the platform contract end to end, driven by the real WaveSpeed Python SDK
(wavespeed==2.0.5) against the real server: uploads used by a job, sync mode (outputs in the
POST; the 5004 timeout form), base64 outputs, cancel seen by the SDK, Idempotency-Key.

Two servers: the session's `live_server` (default settings) for sync mode that completes, and a
module server with a 0.5 s sync-mode budget and a small image limit set through the environment,
which also takes the slow jobs that get cancelled (on the CPU, so that they stay slow)."""

from __future__ import annotations

import base64
import threading
import time

import httpx
import pytest
from wavespeed import Client

from tests.conftest import API_KEY, ServerProcess, wait_terminal
from tests.samples import QUICK, SLOW, write_mp4, write_png
from tests.videoprobe import probe_mp4

MODEL = "wavespeed-ai/wan-2.1-14b-vace"
SUBMIT = f"/api/v3/{MODEL}"
IMAGE_LIMIT = 50_000


class RecordingClient(Client):
    """The SDK's Client, remembering the id of every prediction it submits (the SDK itself does
    not return it from `run`)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.ids: list[str] = []

    def _submit(self, *a, **kw):
        request_id, result = super()._submit(*a, **kw)
        self.ids.append(request_id or ((result or {}).get("data") or {}).get("id"))
        return request_id, result


def sdk_for(server) -> RecordingClient:
    return RecordingClient(api_key=API_KEY, base_url=server.url, max_connection_retries=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(
        tmp_path_factory.mktemp("platform"),
        WAN_VACE_SYNC_TIMEOUT="0.5",
        WAN_VACE_MAX_IMAGE_BYTES=str(IMAGE_LIMIT),
        # The slow jobs must stay slow on a machine with a GPU too.
        WAN_VACE_DEVICE="cpu",
    ).start()
    yield srv
    srv.stop()


def wait_for(server, job_id: str, cond, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    with server.client() as c:
        while True:
            d = c.get(f"/api/v3/predictions/{job_id}/result").json()["data"]
            if cond(d):
                return d
            if time.monotonic() > deadline:
                raise TimeoutError(f"{job_id}: {d}")
            time.sleep(0.2)


def cancel_all(server, ids) -> None:
    with server.client() as c:
        for jid in ids:
            if jid:
                c.post(f"/api/v3/predictions/{jid}/cancel")


# Uploads --------------------------------------------------------------------------------------


def test_sdk_uploads_an_image_and_a_video_and_a_job_uses_them(server, tmp_path):
    sdk = sdk_for(server)
    png = write_png(tmp_path / "ref.png", width=96, height=64)
    mp4 = write_mp4(tmp_path / "control.mp4")
    png_url = sdk.upload(str(png))
    mp4_url = sdk.upload(str(mp4))
    for url, path in ((png_url, png), (mp4_url, mp4)):
        assert url.startswith(server.url + "/media/uploads/")
        assert httpx.get(url, timeout=30).content == path.read_bytes()  # no key needed
    assert png_url.endswith("/ref.png") and mp4_url.endswith("/control.mp4")

    out = sdk.run(
        MODEL,
        {"prompt": "the reference, animated", "images": [png_url], "video": mp4_url, "task": "none",
         "return_conditioning": True, **QUICK},
        timeout=300,
        poll_interval=0.3,
    )
    (url,) = out["outputs"]
    p = probe_mp4(httpx.get(url, timeout=30).content)
    assert p.codec == "h264" and p.frames == 81 and (p.width, p.height) == (832, 480)
    # The uploads were what the pipeline was fed.
    d = wait_for(server, sdk.ids[-1], lambda d: True)
    cond = d["conditioning"]
    assert "video" in cond and len(cond["reference_images"]) == 1


def test_sdk_upload_over_the_configured_image_limit_is_413(server, tmp_path):
    big = write_png(tmp_path / "big.png", width=160, height=160, noise=True)
    assert big.stat().st_size > IMAGE_LIMIT
    with pytest.raises(RuntimeError, match="HTTP 413"):
        sdk_for(server).upload(str(big))
    # The bytes, not the declared name, decide: the same file under a video name.
    renamed = big.rename(tmp_path / "big.mp4")
    with pytest.raises(RuntimeError, match="HTTP 413.*image uploads are limited"):
        sdk_for(server).upload(str(renamed))
    with server.client() as c:
        files = {"file": ("big.png", renamed.read_bytes(), "image/png")}
        r = c.post("/api/v3/media/upload/binary", files=files)
        assert r.status_code == 413 and r.json()["code"] == 413


# Sync mode ------------------------------------------------------------------------------------


def test_sdk_sync_mode_returns_base64_outputs_in_the_post(live_server):
    sdk = sdk_for(live_server)

    def no_polling(*a, **kw):
        raise AssertionError("sync mode must not poll")

    sdk._get_result = no_polling
    out = sdk.run(MODEL, {"prompt": "a paper boat", "enable_base64_output": True, **QUICK},
                  enable_sync_mode=True, timeout=300)
    (b64,) = out["outputs"]
    assert not b64.startswith(("data:", "http"))
    video = base64.b64decode(b64, validate=True)
    p = probe_mp4(video)
    assert p.codec == "h264" and p.frames == 81 and (p.width, p.height) == (832, 480)
    # The poll answers the same bare base64 afterwards.
    (jid,) = sdk.ids
    with live_server.client() as c:
        d = c.get(f"/api/v3/predictions/{jid}/result").json()["data"]
    assert d["status"] == "completed" and d["outputs"] == [b64]


def test_sync_mode_timeout_is_the_5004_form(server):
    sdk = sdk_for(server)
    try:
        with pytest.raises(RuntimeError, match=r"Sync mode timed out \(task_id: [0-9a-f]{32}\)"):
            sdk.run(MODEL, {"prompt": "slow", **SLOW}, enable_sync_mode=True, timeout=120)
        res = sdk.run_no_throw(MODEL, {"prompt": "slow", **SLOW}, enable_sync_mode=True, timeout=120)
        assert res["status"] == "processing" and res["outputs"] is None and res["task_id"] == sdk.ids[-1]
        assert f"{server.url}/api/v3/predictions/{res['task_id']}/result" in res["error"]

        with server.client() as c:
            r = c.post(SUBMIT, json={"prompt": "slow", "enable_sync_mode": True, **SLOW})
            assert r.status_code == 200
            body = r.json()
            assert body["code"] == 200 and body["message"] == "success"
            d = body["data"]
            assert d["code"] == 5004 and d["status"] == "processing" and "Sync mode timed out" in d["error"]
            sdk.ids.append(d["id"])
            # A valid id: the prediction goes on and can be polled.
            r = c.get(f"/api/v3/predictions/{d['id']}/result")
            assert r.status_code == 200 and r.json()["data"]["status"] in ("created", "processing")
        # The first one went on to the worker: the timed-out POST did not drop it.
        wait_for(server, sdk.ids[0], lambda d: d["status"] == "processing", timeout=120)
    finally:
        cancel_all(server, sdk.ids)


# Cancel, and the worker moving on --------------------------------------------------------------


def test_cancel_seen_by_the_sdk_and_the_worker_takes_the_next_job(server):
    """A processing job cancelled mid-denoise ends the SDK's `run()` with its "cancelled" error;
    a queued job cancels at once without ever running; then the single worker, freed, runs the
    next job, which a retrying client submits twice with one Idempotency-Key (one job)."""
    sdk = sdk_for(server)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sdk.run(MODEL, {"prompt": "a very long take", **SLOW}, timeout=600, poll_interval=0.3)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    queued = None
    try:
        deadline = time.monotonic() + 60
        while not sdk.ids and time.monotonic() < deadline:
            time.sleep(0.05)
        (running,) = sdk.ids
        wait_for(server, running, lambda d: d["status"] == "processing" and d["progress"] > 0, timeout=120)

        with server.client() as c:
            queued = c.post(SUBMIT, json={"prompt": "waits in line", **SLOW}).json()["data"]["id"]
            assert c.get(f"/api/v3/predictions/{queued}/result").json()["data"]["status"] == "created"
            r = c.post(f"/api/v3/predictions/{queued}/cancel")
            assert r.status_code == 200
            assert r.json()["data"]["status"] == "cancelled" and r.json()["data"]["cancel"] == "cancelled"
            d = c.get(f"/api/v3/predictions/{queued}/result").json()["data"]
            assert d["status"] == "cancelled" and d["attempts"] == 0  # never ran

            r = c.post(f"/api/v3/predictions/{running}/cancel")
            assert r.status_code == 200 and r.json()["data"]["status"] == "cancelled"
            t.join(timeout=60)
            assert not t.is_alive()
            (err,) = errors
            assert isinstance(err, RuntimeError)
            assert str(err).startswith(f"Prediction cancelled (task_id: {running})")
            r = c.post(f"/api/v3/predictions/{running}/cancel")  # twice: idempotent
            assert r.status_code == 200 and r.json()["data"]["cancel"] == "already cancelled"

            # The worker stopped the cancelled job where it was, wrote no output, and is idle
            # again (health "ready": no worker busy, nothing running)...
            h = server.wait_health({"ready"}, timeout=120)
            assert h["running"] == 0 and h["queue_depth"] == 0
            d = c.get(f"/api/v3/predictions/{running}/result").json()["data"]
            assert d["status"] == "cancelled" and d["outputs"] == [] and d["progress"] < 0.9

            # ...and takes the next job. A client retrying its POST gets the same job back.
            body = {"prompt": f"next in line {time.time()}", **QUICK}
            headers = {"Idempotency-Key": f"retry-{time.time()}"}
            a = c.post(SUBMIT, json=body, headers=headers)
            b = c.post(SUBMIT, json=body, headers=headers)
            assert a.status_code == b.status_code == 200
            nxt = a.json()["data"]["id"]
            assert b.json()["data"]["id"] == nxt
            r = c.post(SUBMIT, json={**body, "seed": 8}, headers=headers)
            assert r.status_code == 409 and r.json()["code"] == 409
            d = wait_terminal(c, nxt, timeout=300)
            assert d["status"] == "completed" and d["attempts"] == 1
            r = c.post(SUBMIT, json=body, headers=headers)
            assert r.json()["data"]["id"] == nxt and r.json()["data"]["status"] == "completed"
            r = c.post("/api/v3/predictions", json={"page_size": 100, "include_inputs": True})
            hist = r.json()["data"]
            assert [it["id"] for it in hist["items"] if it["input"]["prompt"] == body["prompt"]] == [nxt]

            # A finished job cannot be cancelled; an unknown one is not found.
            r = c.post(f"/api/v3/predictions/{nxt}/cancel")
            assert r.status_code == 409 and "already finished with status completed" in r.json()["message"]
            r = c.post("/api/v3/predictions/" + "0" * 32 + "/cancel")
            assert r.status_code == 404 and r.json()["code"] == 404
    finally:
        cancel_all(server, [*sdk.ids, queued])
        t.join(timeout=30)
