"""The platform endpoints in process (TestClient, `workers=0`: jobs stay queued unless a test
moves them through the store): models, webhook secret, history, Idempotency-Key, queue cap,
cancel, sync-mode timeout and base64 outputs."""

import base64
import time

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import MODEL_ID, Settings

KEY = "k-platform"
SUBMIT = f"/api/v3/{MODEL_ID}"


def make_client(tmp_path, **settings):
    app = create_app(Settings(data_dir=tmp_path, workers=0, api_keys=[KEY], **settings))
    c = TestClient(app, raise_server_exceptions=False)
    c.headers["Authorization"] = f"Bearer {KEY}"
    return c


@pytest.fixture
def app_client(tmp_path):
    with make_client(tmp_path, max_queue=4) as c:
        yield c


def submit(c, body=None, **kw):
    return c.post(SUBMIT, json=body or {"prompt": "a cat"}, **kw)


def finish(c, job_id: str, *, output: bytes | None = b"\0\0\0\x18ftypisom-fake-mp4", fail: str = "") -> None:
    """Drive a queued job to completed (with one stored output) or failed, as a worker would."""
    st = c.app.state.wan
    job = st.store.claim("test-worker", 60)
    assert job is not None and job.id == job_id
    if fail:
        st.store.fail(job_id, "test-worker", code=1403, error=fail)
        return
    key = st.storage.put_bytes(st.storage.new_key(f"outputs/{job_id}", "output.mp4"), output)
    assert st.store.complete(
        job_id, "test-worker", outputs=[key], has_nsfw=[False], inference_ms=12, seed=7, extra={}
    )


# GET /api/v3/models ----------------------------------------------------------------------------


def test_models_shape(app_client):
    r = app_client.get("/api/v3/models")
    assert r.status_code == 200
    body = r.json()
    assert body["code"] == 200 and body["message"] == "success" and "error" not in body
    (m,) = body["data"]
    for k in ("model_id", "name", "description", "type", "base_price", "formula", "api_schema"):
        assert k in m, k
    assert m["model_id"] == MODEL_ID and isinstance(m["base_price"], (int, float))
    (s,) = m["api_schema"]["api_schemas"]
    rs = s["request_schema"]
    assert rs["type"] == "object" and rs["required"] == ["prompt"]
    assert rs["x-order-properties"] == list(rs["properties"])
    p = rs["properties"]
    assert p["prompt"]["type"] == "string"
    assert p["images"]["type"] == "array" and p["images"]["maxItems"] == 5
    assert set(p["size"]["enum"]) == {"832*480", "480*832", "1280*720", "720*1280"}
    assert {"depth", "pose", "face", "inpainting", "none"} <= set(p["task"]["enum"])
    assert p["duration"] == {**p["duration"], "type": "integer", "minimum": 5, "maximum": 10, "default": 5}
    assert p["num_inference_steps"]["maximum"] == 40
    for flag in ("enable_sync_mode", "enable_base64_output", "webhook_url"):
        assert flag in p
    assert app_client.get("/api/v3/models", headers={"Authorization": ""}).status_code == 401


def test_webhook_secret_is_stable(tmp_path):
    with make_client(tmp_path) as c:
        r = c.get("/api/v3/webhook/secret")
        assert r.status_code == 200 and r.json()["code"] == 200
        secret = r.json()["data"]["secret"]
        assert secret.startswith("whsec_") and len(secret) > 20
        assert c.get("/api/v3/webhook/secret").json()["data"]["secret"] == secret
        assert c.get("/api/v3/webhook/secret", headers={"Authorization": ""}).status_code == 401
    with make_client(tmp_path) as c:  # same data dir: same secret
        assert c.get("/api/v3/webhook/secret").json()["data"]["secret"] == secret
    with make_client(tmp_path / "other") as c:
        assert c.get("/api/v3/webhook/secret").json()["data"]["secret"] != secret


# POST /api/v3/predictions (history) ------------------------------------------------------------


def history(c, **body):
    r = c.post("/api/v3/predictions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["code"] == 200
    return r.json()["data"]


def test_history_paging_and_status_filter(tmp_path):
    with make_client(tmp_path) as c:
        ids = []
        for i in range(5):
            ids.append(submit(c, {"prompt": f"job {i}"}).json()["data"]["id"])
            time.sleep(0.01)  # distinct created_at
        for jid in ids[:2]:
            assert c.post(f"/api/v3/predictions/{jid}/cancel").status_code == 200
        newest_first = ids[::-1]

        d = history(c, page=1, page_size=2)
        assert d["page"] == 1 and d["page_size"] == 2 and d["total"] == 5
        assert [it["id"] for it in d["items"]] == newest_first[:2]
        assert [it["id"] for it in history(c, page=2, page_size=2)["items"]] == newest_first[2:4]
        assert [it["id"] for it in history(c, page=3, page_size=2)["items"]] == newest_first[4:]
        assert history(c, page=4, page_size=2)["items"] == []

        item = d["items"][0]
        for k in ("id", "model", "status", "outputs", "created_at", "execution_time", "has_nsfw_contents"):
            assert k in item, k
        assert item["model"] == MODEL_ID and "input" not in item

        d = history(c, status="cancelled")
        assert d["total"] == 2 and {it["id"] for it in d["items"]} == set(ids[:2])
        assert all(it["status"] == "cancelled" for it in d["items"])
        assert history(c, status="created")["total"] == 3
        assert history(c, status="completed") == {"page": 1, "page_size": 20, "total": 0, "items": []}

        # Defaults with an empty body; inputs on request; time window; model filter.
        r = c.post("/api/v3/predictions", content=b"")
        assert r.status_code == 200 and r.json()["data"]["total"] == 5
        d = history(c, include_inputs=True, page_size=1)
        assert d["items"][0]["input"]["prompt"] == "job 4"
        assert history(c, created_after=time.time() + 60)["total"] == 0
        assert history(c, created_before="2001-01-01T00:00:00Z")["total"] == 0
        assert history(c, created_after="2001-01-01T00:00:00Z")["total"] == 5
        assert history(c, model=MODEL_ID)["total"] == 5
        assert history(c, model="wavespeed-ai/flux-dev")["total"] == 0


@pytest.mark.parametrize(
    "body, message",
    [
        ({"status": "queued"}, "status must be one of"),
        ({"status": ["created"]}, "status must be one of"),
        ({"page": 0}, "page must be an integer"),
        ({"page_size": 101}, "page_size must be an integer"),
        ({"page": "2"}, "page must be an integer"),
        ({"created_after": "yesterday"}, "created_after must be"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_history_bad_requests_are_400(app_client, body, message):
    r = app_client.post("/api/v3/predictions", json=body)
    assert r.status_code == 400 and r.json()["code"] == 400 and message in r.json()["message"]


def test_history_invalid_json_is_400(app_client):
    headers = {"Content-Type": "application/json"}
    r = app_client.post("/api/v3/predictions", content=b"{page: 1", headers=headers)
    assert r.status_code == 400 and "not valid JSON" in r.json()["message"]
    assert app_client.post("/api/v3/predictions", json={}, headers={"Authorization": ""}).status_code == 401


# Idempotency-Key and the queue cap ---------------------------------------------------------------


def test_idempotency_key(app_client):
    body = {"prompt": "retry me", "seed": 3}
    a = submit(app_client, body, headers={"Idempotency-Key": "req-1"})
    b = submit(app_client, dict(reversed(list(body.items()))), headers={"Idempotency-Key": "req-1"})
    assert a.status_code == b.status_code == 200
    assert a.json()["data"]["id"] == b.json()["data"]["id"]
    assert history(app_client)["total"] == 1  # one job, not two

    r = submit(app_client, {"prompt": "something else"}, headers={"Idempotency-Key": "req-1"})
    assert r.status_code == 409 and r.json()["code"] == 409 and "Idempotency-Key" in r.json()["message"]
    r = app_client.post(
        SUBMIT + "?webhook=https://example.org/hook", json=body, headers={"Idempotency-Key": "req-1"}
    )
    assert r.status_code == 409  # the query is part of the request

    c = submit(app_client, body, headers={"Idempotency-Key": "req-2"})
    assert c.json()["data"]["id"] != a.json()["data"]["id"]
    # Without a key, every POST is a new job.
    assert submit(app_client, body).json()["data"]["id"] != submit(app_client, body).json()["data"]["id"]


def test_queue_cap_is_429_and_replays_still_answer(app_client):
    first = submit(app_client, {"prompt": "p0"}, headers={"Idempotency-Key": "k0"}).json()["data"]["id"]
    for i in range(1, 4):
        assert submit(app_client, {"prompt": f"p{i}"}).status_code == 200
    r = submit(app_client, {"prompt": "one too many"})
    assert r.status_code == 429 and r.json()["code"] == 429 and "queue is full" in r.json()["message"]
    assert r.headers["retry-after"] == "5"
    # A retried request whose job already exists is not a new job: it answers.
    r = submit(app_client, {"prompt": "p0"}, headers={"Idempotency-Key": "k0"})
    assert r.status_code == 200 and r.json()["data"]["id"] == first
    # A cancelled job frees its place.
    app_client.post(f"/api/v3/predictions/{first}/cancel")
    assert submit(app_client, {"prompt": "now fits"}).status_code == 200


# Cancel ----------------------------------------------------------------------------------------


def test_cancel_semantics(app_client):
    queued = submit(app_client).json()["data"]["id"]
    r = app_client.post(f"/api/v3/predictions/{queued}/cancel")
    assert r.status_code == 200 and r.json()["code"] == 200
    d = r.json()["data"]
    assert d["id"] == queued and d["status"] == "cancelled" and d["cancel"] == "cancelled"
    assert d["outputs"] == [] and d["error"]
    # Twice: idempotent, says so; the DELETE alias too.
    r = app_client.post(f"/api/v3/predictions/{queued}/cancel")
    assert r.status_code == 200 and r.json()["data"]["cancel"] == "already cancelled"
    assert app_client.delete(f"/api/v3/predictions/{queued}").json()["data"]["status"] == "cancelled"
    assert app_client.get(f"/api/v3/predictions/{queued}/result").json()["data"]["status"] == "cancelled"

    done = submit(app_client).json()["data"]["id"]
    finish(app_client, done)
    r = app_client.post(f"/api/v3/predictions/{done}/cancel")
    assert r.status_code == 409 and r.json()["code"] == 409
    assert r.json()["message"] == (
        f"Prediction {done} already finished with status completed; "
        "only created or processing predictions can be cancelled"
    )
    assert app_client.get(f"/api/v3/predictions/{done}/result").json()["data"]["status"] == "completed"

    failed = submit(app_client).json()["data"]["id"]
    finish(app_client, failed, fail="boom")
    r = app_client.post(f"/api/v3/predictions/{failed}/cancel")
    assert r.status_code == 409 and "status failed" in r.json()["message"]

    r = app_client.post("/api/v3/predictions/" + "f" * 32 + "/cancel")
    assert r.status_code == 404 and r.json()["code"] == 404 and "not found" in r.json()["message"]
    r = app_client.post(f"/api/v3/predictions/{queued}/cancel", headers={"Authorization": ""})
    assert r.status_code == 401


# Sync mode and base64 ---------------------------------------------------------------------------


def test_sync_mode_timeout_form(tmp_path):
    with make_client(tmp_path, sync_timeout=0.3) as c:
        t0 = time.monotonic()
        r = submit(c, {"prompt": "never runs (no worker)", "enable_sync_mode": True})
        assert time.monotonic() - t0 >= 0.3
        assert r.status_code == 200
        body = r.json()
        assert body["code"] == 200 and body["message"] == "success"
        d = body["data"]
        assert d["code"] == 5004 and d["status"] == "processing"
        assert "Sync mode timed out" in d["error"] and d["urls"]["get"] in d["error"]
        r = c.get(f"/api/v3/predictions/{d['id']}/result")
        assert r.status_code == 200 and r.json()["data"]["status"] == "created"


def test_base64_output_is_bare_base64(app_client):
    video = b"\0\0\0\x18ftypisom" + bytes(range(256)) * 4
    jid = submit(app_client, {"prompt": "x", "enable_base64_output": True}).json()["data"]["id"]
    finish(app_client, jid, output=video)
    d = app_client.get(f"/api/v3/predictions/{jid}/result").json()["data"]
    (out,) = d["outputs"]
    assert not out.startswith(("data:", "http")) and base64.b64decode(out, validate=True) == video
    # Without the flag: a URL.
    jid = submit(app_client, {"prompt": "x"}).json()["data"]["id"]
    finish(app_client, jid, output=video)
    (url,) = app_client.get(f"/api/v3/predictions/{jid}/result").json()["data"]["outputs"]
    assert url.startswith("http://testserver/media/outputs/")
