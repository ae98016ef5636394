"""What submit refuses because no worker could run it, and the messages that lead somewhere:
a key sent without `Bearer`, a wrong method, `GET /`."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from server.store import WorkerInfo

KEY = "k-123"
URL = "/api/v3/wavespeed-ai/wan-2.1-14b-vace"
VIDEO = "https://example.com/clip.mp4"


@pytest.fixture
def app(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, workers=0, api_keys=[KEY]))
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        yield c, app.state.wan


def publish(st, tasks: dict[str, str], state: str = "ready", wid: str = "w1") -> None:
    """A live worker row, as a worker publishes it (its runner's task readiness in `info`)."""
    st.store.upsert_worker(WorkerInfo(id=wid, host="gpu-7", pid=1, model="m", state=state,
                                      info={"tasks": tasks}, heartbeat_at=time.time(),
                                      started_at=time.time()))  # fmt: skip


def test_a_task_no_live_worker_can_run_is_refused_with_the_tasks_that_can(app):
    c, st = app
    missing = "weights midas-dpt-hybrid missing: python scripts/fetch_weights.py midas-dpt-hybrid"
    publish(st, {"depth": missing, "none": "ready", "gray": "ready"})
    r = c.post(URL, json={"prompt": "a cat", "video": VIDEO})  # the default task: depth
    assert r.status_code == 400
    body = r.json()
    assert body["code"] == 400 and body["data"] is None
    assert body["message"] == (
        f"task 'depth' cannot run on this server ({missing}); tasks that can: gray, none"
    )
    assert st.store.count_by_status() == {}  # nothing was queued
    # ...while what the worker can run, and a task with no video (ignored), are accepted.
    assert c.post(URL, json={"prompt": "a cat", "video": VIDEO, "task": "gray"}).status_code == 200
    assert c.post(URL, json={"prompt": "a cat", "task": "depth"}).status_code == 200


def test_one_capable_worker_is_enough(app):
    c, st = app
    publish(st, {"depth": "weights missing"}, wid="w1")
    publish(st, {"depth": "ready"}, wid="w2")
    assert c.post(URL, json={"prompt": "a cat", "video": VIDEO}).status_code == 200


def test_no_worker_seen_with_workers_0_queues_as_before(app):
    c, st = app
    assert c.post(URL, json={"prompt": "a cat", "video": VIDEO}).status_code == 200
    assert c.get("/health").json()["reason"].startswith("API only (--workers 0): no worker is seen")


def test_workers_that_all_failed_to_load_refuse_with_503(app):
    c, st = app
    st.supervisor.failed_reason = "could not load model 'wan2.1-vace-14b': missing weights"
    r = c.post(URL, json={"prompt": "a cat"})
    assert r.status_code == 503 and r.headers["retry-after"] == "30"
    assert r.json()["message"] == (
        "No worker can run jobs on this server: could not load model 'wan2.1-vace-14b': missing weights"
    )
    assert st.store.count_by_status() == {}


def test_a_key_without_bearer_is_told_to_add_it(app):
    c, _ = app
    r = c.post(URL, json={"prompt": "a cat"}, headers={"Authorization": KEY})
    assert r.status_code == 401
    assert r.json()["message"] == (
        "The Authorization header needs the 'Bearer' scheme: send 'Authorization: Bearer <key>'"
    )
    r = c.post(URL, json={"prompt": "a cat"}, headers={"Authorization": ""})
    assert r.json()["message"] == "Missing API key: send 'Authorization: Bearer <key>'"


def test_a_wrong_method_says_which_methods_the_route_takes(app):
    c, _ = app
    r = c.get("/api/v3/predictions")  # history is a POST
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    body = r.json()
    assert body["code"] == 405 and body["data"] is None
    assert body["message"] == "GET is not allowed on /api/v3/predictions; it takes POST"


def test_root_points_to_the_docs_health_and_schema(app):
    c, _ = app
    r = c.get("/", headers={"Authorization": ""})  # public
    assert r.status_code == 200
    d = r.json()
    assert d["links"] == {
        "docs": "http://testserver/docs",
        "health": "http://testserver/health",
        "model_schema": "http://testserver/api/v3/models",
        "openapi": "http://testserver/openapi.json",
    }
    assert d["submit"] == "POST http://testserver/api/v3/wavespeed-ai/wan-2.1-14b-vace"
