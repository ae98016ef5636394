"""A finished job after retention, through the real app: its poll still answers 200
`completed` with the same output URLs and `outputs_expired`, and those URLs answer 410 Gone in
the error envelope, saying why. Jobs are finished through the real store the way a worker does
(no worker runs here); each cleanup pass is run with an explicit `now`."""

from __future__ import annotations

import base64
import time

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.samples import png_bytes, write_mp4

KEY = "k-123"
DAY = 86400.0
SUBMIT = "/api/v3/wavespeed-ai/wan-2.1-14b-vace"
PNG_URI = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()


def make_client(tmp_path, **kw):
    app = create_app(Settings(data_dir=tmp_path, workers=0, api_keys=[KEY], **kw))
    c = TestClient(app)
    c.headers["Authorization"] = f"Bearer {KEY}"
    return c


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as c:
        yield c


def finish(c: TestClient, tmp_path, **inp) -> dict:
    """Submit over HTTP (an inline image), then claim and complete it as a worker would: a real
    MP4 output and a conditioning file in storage."""
    r = c.post(SUBMIT, json={"prompt": "a cat", "images": [PNG_URI], **inp})
    assert r.status_code == 200, r.text
    jid = r.json()["data"]["id"]
    st = c.app.state.wan
    assert st.store.claim("w1", 30).id == jid
    mp4 = write_mp4(tmp_path / f"{jid}.mp4")
    out = st.storage.put_file(st.storage.new_key(f"outputs/{jid}", "output.mp4"), mp4)
    cond = st.storage.put_file(st.storage.new_key(f"conditioning/{jid}", "conditioning_video.mp4"), mp4)
    assert st.store.complete(
        jid,
        "w1",
        outputs=[out],
        has_nsfw=[False],
        inference_ms=5,
        seed=1,
        extra={"conditioning": {"video": cond}},
    )
    return c.get(f"/api/v3/predictions/{jid}/result").json()["data"]


def expire(c: TestClient, data: dict, after: float = 1) -> dict:
    """Run a cleanup pass `after` seconds past the job's retention cutoff."""
    st = c.app.state.wan
    finished = st.store.get(data["id"]).finished_at
    return vars(st.retention.run_once(now=finished + st.settings.retention_seconds + after))


def test_an_expired_outputs_poll_and_media_answer_as_documented(client, tmp_path):
    data = finish(client, tmp_path)
    job = client.app.state.wan.store.get(data["id"])
    urls = [*data["outputs"], data["conditioning"]["video"], *job.input["images"]]
    assert len(urls) == 3 and all(client.get(u).status_code == 200 for u in urls)
    assert "outputs_expired" not in data

    rep = expire(client, data, after=-1)  # one second before the cutoff: all kept
    assert rep["expired_jobs"] == 0 and all(client.get(u).status_code == 200 for u in urls)

    rep = expire(client, data, after=1)
    assert rep["expired_jobs"] == 1 and rep["deleted_files"] == 3
    poll = client.get(f"/api/v3/predictions/{data['id']}/result")
    assert poll.status_code == 200
    after = poll.json()["data"]
    assert after["status"] == "completed" and after["outputs"] == data["outputs"]
    assert after["outputs_expired"] is True and after["outputs_expired_at"].endswith("Z")
    for u, what in zip(urls, ("output", "conditioning file", "input")):
        r = client.get(u)
        assert r.status_code == 410, (u, r.text)
        msg = f"this {what} expired after 7 days (WAN_VACE_RETENTION_SECONDS=604800) and was deleted"
        assert r.json() == {
            "code": 410,
            "message": msg + "; the job's record remains",
            "error": r.json()["error"],
            "data": None,
        }
        assert r.json()["error"] == r.json()["message"]
        assert client.head(u).status_code == 410
    # History lists it the same way.
    hist = client.post("/api/v3/predictions", json={}).json()["data"]["items"]
    assert [i["outputs_expired"] for i in hist if i["id"] == data["id"]] == [True]
    # A key of no job is still a plain 404.
    assert client.get(data["outputs"][0].replace(data["id"], "f" * 32)).status_code == 404


def test_a_base64_job_answers_its_urls_once_expired(client, tmp_path):
    data = finish(client, tmp_path, enable_base64_output=True)
    assert not data["outputs"][0].startswith("http")  # base64 while the bytes are kept
    expire(client, data)
    after = client.get(f"/api/v3/predictions/{data['id']}/result").json()["data"]
    assert after["outputs_expired"] is True and after["outputs"][0].startswith(
        "http://testserver/media/outputs/"
    )
    assert client.get(after["outputs"][0]).status_code == 410


def test_health_reports_storage_from_the_last_pass(client, tmp_path):
    health = client.get("/health").json()["storage"]
    assert health["retention_seconds"] == 7 * DAY and health["job_retention_seconds"] == 0
    data = finish(client, tmp_path)
    st = client.app.state.wan
    rep = st.retention.run_once(now=time.time())
    health = client.get("/health").json()["storage"]
    assert (health["bytes"], health["files"]) == tuple(st.storage.usage()) == (rep.bytes, rep.files)
    assert health["files"] == 3 and health["measured_at"].endswith("Z")
    expire(client, data)
    health = client.get("/health").json()["storage"]
    assert (health["bytes"], health["files"]) == (0, 0) and health["last_cleanup"]["expired_jobs"] == 1


def test_an_expired_upload_is_a_404_that_says_uploads_expire(client):
    r = client.post("/api/v3/media/upload/binary", files={"file": ("ref.png", png_bytes(), "image/png")})
    url = r.json()["data"]["download_url"]
    assert client.get(url).status_code == 200
    client.app.state.wan.retention.run_once(now=time.time() + 7 * DAY + 1)
    r = client.get(url)
    assert r.status_code == 404
    assert "uploads are deleted 7 days after they were uploaded" in r.json()["message"]


def test_pruned_rows_are_gone_from_polls(tmp_path):
    with make_client(tmp_path, retention_seconds=DAY, job_retention_seconds=2 * DAY) as c:
        data = finish(c, tmp_path)
        expire(c, data, after=DAY - 1)  # files gone, row kept
        assert c.get(f"/api/v3/predictions/{data['id']}/result").json()["data"]["outputs_expired"] is True
        rep = expire(c, data, after=DAY + 1)
        assert rep["pruned_jobs"] == 1
        r = c.get(f"/api/v3/predictions/{data['id']}/result")
        assert r.status_code == 404 and r.json()["code"] == 404
        assert c.get(data["outputs"][0]).status_code == 404  # no record says it expired
