"""Webhooks (contract §3.5) against a real local receiver (stdlib http.server in a thread) that
checks every signature independently, fails the first deliveries with HTTP 500, and counts
accepted deliveries per event: exactly one, also across a server restart."""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import MODEL_ID, Settings
from server.store import NewJob
from tests.conftest import ServerProcess, wait_terminal
from tests.samples import QUICK

SUBMIT = f"/api/v3/{MODEL_ID}"
BASE64_WEBHOOK = (
    "webhook callback does not support base64 output, please use the normal API to use base64 output"
)


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int
    at: float


class Receiver:
    """Paths: /hook/flaky/... answers 500 to the first two deliveries of each webhook-id, then 200;
    /hook/hold/... answers 500 while `holding` is set. GET /missing.png is a 404 (an input URL that
    makes a job fail)."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.holding = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hid = self.headers.get("webhook-id", "")
                with receiver.lock:
                    seen = sum(1 for d in receiver.deliveries if d.headers.get("webhook-id") == hid)
                    if self.path.startswith("/hook/flaky/"):
                        status = 500 if seen < 2 else 200
                    elif self.path.startswith("/hook/hold/"):
                        status = 500 if receiver.holding.is_set() else 200
                    else:
                        status = 404
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    receiver.deliveries.append(Delivery(self.path, headers, body, status, time.time()))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def for_event(self, webhook_id: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.headers.get("webhook-id") == webhook_id]

    def for_path(self, path: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.path == path]

    def wait(self, cond, timeout: float = 180, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"receiver: {what} never happened; got {self.deliveries}")
            time.sleep(0.1)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def verify(secret: str, d: Delivery) -> None:
    """The receiver's check, written from the contract, not from server code."""
    wid, ts, sig = d.headers["webhook-id"], d.headers["webhook-timestamp"], d.headers["webhook-signature"]
    key = secret[len("whsec_") :].encode() if secret.startswith("whsec_") else secret.encode()
    expected = hmac.new(key, f"{wid}.{ts}.".encode() + d.body, hashlib.sha256).hexdigest()
    assert sig == f"v3,{expected}", "bad signature"
    assert abs(time.time() - int(ts)) < 300
    assert d.headers["content-type"] == "application/json"


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(
        tmp_path_factory.mktemp("webhooks"),
        WAN_VACE_WEBHOOK_BACKOFF="0.2",
        # Attempts keep failing while the server is being stopped in the restart test: leave room.
        WAN_VACE_WEBHOOK_MAX_ATTEMPTS="12",
    ).start()
    yield srv
    srv.stop()


def secret_of(server) -> str:
    with server.client() as c:
        return c.get("/api/v3/webhook/secret").json()["data"]["secret"]


def accepted_once(receiver: Receiver, webhook_id: str, settle: float = 1.5) -> list[Delivery]:
    receiver.wait(lambda: any(d.answered == 200 for d in receiver.for_event(webhook_id)), what=webhook_id)
    time.sleep(settle)  # nothing may follow an accepted delivery
    got = receiver.for_event(webhook_id)
    assert [d.answered for d in got].count(200) == 1, [d.answered for d in got]
    assert got[-1].answered == 200
    return got


# Live ----------------------------------------------------------------------------------------


def test_completed_event_via_query_webhook(server, receiver):
    hook = f"{receiver.url}/hook/flaky/query"
    with server.client() as c:
        r = c.post(SUBMIT, params={"webhook": hook}, json={"prompt": "a lighthouse at dusk", **QUICK})
        assert r.status_code == 200
        jid = r.json()["data"]["id"]
        data = wait_terminal(c, jid, timeout=240)
    assert data["status"] == "completed"

    got = accepted_once(receiver, f"{jid}-completed")
    assert [d.answered for d in got] == [500, 500, 200]
    assert all(d.path == "/hook/flaky/query" for d in got)
    secret = secret_of(server)
    for d in got:
        verify(secret, d)
    assert len({d.body for d in got}) == 1  # the same event body on every attempt
    body = json.loads(got[-1].body)
    # The bare prediction object, not the code/data envelope.
    assert "data" not in body and "message" not in body
    assert body["id"] == jid and body["model"] == MODEL_ID and body["status"] == "completed"
    assert body["outputs"] == data["outputs"] and body["outputs"][0].startswith(server.url + "/media/")
    assert body["urls"]["get"] == f"{server.url}/api/v3/predictions/{jid}/result"
    assert body["error"] == "" and body["has_nsfw_contents"] == [False]
    assert body["timings"]["inference"] > 0 and body["executionTime"] == body["timings"]["inference"]
    assert body["input"]["prompt"] == "a lighthouse at dusk"


def test_failed_event_via_body_webhook_url(server, receiver):
    hook = f"{receiver.url}/hook/flaky/body"
    with server.client() as c:
        r = c.post(
            SUBMIT,
            json={"prompt": "x", "images": [f"{receiver.url}/missing.png"], "webhook_url": hook, **QUICK},
        )
        assert r.status_code == 200
        jid = r.json()["data"]["id"]
        data = wait_terminal(c, jid)
    assert data["status"] == "failed" and data["code"] == 1402

    got = accepted_once(receiver, f"{jid}-failed")
    assert [d.answered for d in got] == [500, 500, 200]
    secret = secret_of(server)
    for d in got:
        verify(secret, d)
    body = json.loads(got[-1].body)
    assert body["id"] == jid and body["status"] == "failed" and body["code"] == 1402
    assert body["outputs"] == [] and "images[0]" in body["error"] and body["error"] == data["error"]
    # No webhook for the events of other jobs reached this path.
    assert {d.headers["webhook-id"] for d in receiver.for_path("/hook/flaky/body")} == {f"{jid}-failed"}


def test_delivery_survives_a_restart_exactly_once(server, receiver):
    secret = secret_of(server)
    receiver.holding.set()
    hook = f"{receiver.url}/hook/hold/restart"
    with server.client() as c:
        body = {"prompt": "x", "images": [f"{receiver.url}/missing.png"], "webhook_url": hook, **QUICK}
        r = c.post(SUBMIT, json=body)
        jid = r.json()["data"]["id"]
        assert wait_terminal(c, jid)["status"] == "failed"
    wid = f"{jid}-failed"
    receiver.wait(lambda: len(receiver.for_event(wid)) >= 2, what="two failed attempts")

    server.stop()  # while the receiver is still failing
    failed_before = receiver.for_event(wid)
    assert failed_before and all(d.answered == 500 for d in failed_before)
    receiver.holding.clear()
    restarted_at = time.time()
    server.start()

    got = accepted_once(receiver, wid)
    assert got[-1].at >= restarted_at  # delivered by the restarted server, from its outbox
    assert secret_of(server) == secret  # the secret survives too
    for d in got:
        verify(secret, d)
    assert json.loads(got[-1].body)["id"] == jid
    # Every event ever sent to this receiver was accepted exactly once: the restart replayed
    # nothing that had been delivered before it.
    with receiver.lock:
        ids = {d.headers["webhook-id"] for d in receiver.deliveries}
        accepted = [d.headers["webhook-id"] for d in receiver.deliveries if d.answered == 200]
    assert sorted(accepted) == sorted(ids)


# In process ------------------------------------------------------------------------------------


@pytest.fixture
def app_client(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, workers=0, api_keys=["k"]))
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = "Bearer k"
        yield c


def test_webhook_with_base64_output_is_the_documented_400(app_client):
    expected = {"code": 400, "message": BASE64_WEBHOOK, "error": BASE64_WEBHOOK, "data": None}
    body = {"prompt": "x", "enable_base64_output": True}
    r = app_client.post(SUBMIT, params={"webhook": "https://example.org/hook"}, json=body)
    assert r.status_code == 400 and r.json() == expected
    r = app_client.post(
        SUBMIT, json={"prompt": "x", "enable_base64_output": True, "webhook_url": "https://example.org/hook"}
    )
    assert r.status_code == 400 and r.json() == expected
    # Either alone is fine.
    assert app_client.post(SUBMIT, json={"prompt": "x", "enable_base64_output": True}).status_code == 200
    r = app_client.post(SUBMIT, json={"prompt": "x", "webhook_url": "https://example.org/h"})
    assert r.status_code == 200


@pytest.mark.parametrize("url", ["ftp://example.org/hook", "http://", "http://[::1", "example.org/hook"])
def test_webhook_must_be_a_deliverable_url(app_client, url):
    r = app_client.post(SUBMIT, params={"webhook": url}, json={"prompt": "x"})
    assert r.status_code == 400 and "webhook" in r.json()["message"]
    r = app_client.post(SUBMIT, json={"prompt": "x", "webhook_url": url})
    assert r.status_code == 400 and "webhook" in r.json()["message"]


def test_dispatcher_gives_up_on_an_undeliverable_row_and_goes_on(tmp_path, receiver):
    """A row whose URL can never work (e.g. stored before URLs were validated) is given up at
    once instead of being re-claimed forever, and does not hold up the rows claimed with it."""
    app = create_app(
        Settings(data_dir=tmp_path, workers=0, api_keys=["k"], allow_private_urls=True, webhook_backoff=0.2)
    )
    store = app.state.wan.store
    hook = f"{receiver.url}/hook/flaky/inprocess"
    for jid, url in (("a" * 32, "http://[::1"), ("b" * 32, hook)):
        store.create(NewJob(id=jid, model=MODEL_ID, input={"prompt": "x"}, base_url="http://testserver",
                            max_attempts=1, webhook_url=url))
        assert store.claim("w", 60).id == jid
        store.fail(jid, "w", code=1403, error="boom")
    with TestClient(app):
        receiver.wait(lambda: any(d.answered == 200 for d in receiver.for_event("b" * 32 + "-failed")),
                      timeout=60, what="in-process delivery")
        deadline = time.monotonic() + 30
        while True:
            with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
                row = db.execute(
                    "SELECT attempts, gave_up_at, last_error FROM webhook_outbox WHERE event_id = ?",
                    ("a" * 32 + "-failed",),
                ).fetchone()
            if row[1] is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert row[0] == 1 and row[1] is not None and "invalid URL" in row[2]
    assert [d.answered for d in receiver.for_event("b" * 32 + "-failed")] == [500, 500, 200]


def test_bodies_are_built_when_delivered_and_old_rows_keep_theirs(tmp_path, receiver):
    """New outbox rows hold the event only: the dispatcher builds the body from the job row. A
    row left undelivered by a release that stored bodies is delivered with the stored bytes, and
    a row whose job is gone is given up instead of posting something made up."""
    from server.webhooks import webhook_payload_builder
    from tests.unit.test_store_migrations import DDL_UNVERSIONED

    legacy_id, new_id = "c" * 32, "d" * 32
    legacy_body = '{"id":"' + legacy_id + '","status":"failed","note":"stored by the old release"}'
    hook = f"{receiver.url}/hook/flaky/at-delivery"
    db = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None)
    db.executescript(DDL_UNVERSIONED)
    db.execute(
        "INSERT INTO jobs (id, model, status, input, base_url, created_at, max_attempts, webhook_url,"
        " error, code, finished_at) VALUES (?, ?, 'failed', '{}', 'http://testserver', 1.0, 1, ?,"
        " 'old', 1403, 2.0)",
        (legacy_id, MODEL_ID, hook),
    )
    db.execute(
        "INSERT INTO webhook_outbox (event_id, job_id, url, body, next_attempt_at)"
        " VALUES (?, ?, ?, ?, 2.0), ('vanished-failed', 'vanished', ?, '{}', 2.0)",
        (f"{legacy_id}-failed", legacy_id, hook, legacy_body, hook),
    )
    db.close()

    settings = Settings(data_dir=tmp_path, workers=0, api_keys=["k"], allow_private_urls=True,
                        webhook_backoff=0.2)
    app = create_app(settings)  # migrates the old file
    store = app.state.wan.store
    store.create(NewJob(id=new_id, model=MODEL_ID, input={"prompt": "x"}, base_url="http://testserver",
                        max_attempts=1, webhook_url=hook))
    assert store.claim("w", 60).id == new_id
    store.fail(new_id, "w", code=1403, error="boom")
    # The vanished job's row is rewritten as a new-style one (no body) to exercise the give-up path.
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.execute("UPDATE webhook_outbox SET body = NULL WHERE event_id = 'vanished-failed'")
    with TestClient(app):
        for jid in (legacy_id, new_id):
            receiver.wait(lambda jid=jid: any(d.answered == 200 for d in receiver.for_event(f"{jid}-failed")),
                          timeout=60, what=f"{jid} delivery")
        secret = app.state.wan.dispatcher.secret
    for d in receiver.for_event(f"{legacy_id}-failed"):
        verify(secret, d)
        assert d.body == legacy_body.encode()
    got = receiver.for_event(f"{new_id}-failed")
    assert [d.answered for d in got] == [500, 500, 200]
    for d in got:
        verify(secret, d)
    built = json.dumps(webhook_payload_builder(settings)(store.get(new_id)), separators=(",", ":"))
    assert {d.body for d in got} == {built.encode()}
    body = json.loads(built)
    assert body["id"] == new_id and body["status"] == "failed" and body["error"] == "boom"
    assert body["code"] == 1403 and body["input"] == {"prompt": "x"}
    assert receiver.for_event("vanished-failed") == []
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        gave_up, error = db.execute(
            "SELECT gave_up_at, last_error FROM webhook_outbox WHERE event_id = 'vanished-failed'"
        ).fetchone()
    assert gave_up is not None and error == "job vanished does not exist: nothing to deliver"
