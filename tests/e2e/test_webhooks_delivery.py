"""Webhook delivery under contention and failure: `WebhookDispatcher`s in this process, sharing one
SQLite file the way two servers on one data dir do, post to real receivers (stdlib HTTP servers
in threads, one port each) that record when every request arrived and was answered.

- two dispatchers: every event is accepted exactly once, also while sends outlast a claim;
- a hanging receiver delays no other receiver;
- retry gaps follow `webhook_backoff` x 2^(n-1) from the end of the failed attempt;
- final answers (410 and the other 4xx but 408/425/429) end a delivery after one attempt.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from server.settings import MODEL_ID, Settings
from server.store import JobStore, NewJob
from server.store.sqlite import SqliteJobStore
from server.webhooks import WebhookDispatcher, is_final
from tests.conftest import free_port


@dataclass
class Request:
    webhook_id: str
    path: str
    arrived: float
    answered: float | None = None
    status: int | None = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a held request must not hold up the test's teardown


class Hook:
    """A receiver: `answer(path, webhook_id, n)` -> (status, seconds to hold the request first),
    n counting this event's earlier requests."""

    def __init__(self, answer: Callable[[str, str, int], tuple[int, float]]):
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                wid = self.headers.get("webhook-id", "")
                with hook.lock:
                    n = sum(1 for r in hook.requests if r.webhook_id == wid)
                    req = Request(wid, self.path, time.time())
                    hook.requests.append(req)
                    hook.in_flight += 1
                    hook.max_in_flight = max(hook.max_in_flight, hook.in_flight)
                status, hold = answer(self.path, wid, n)
                try:
                    time.sleep(hold)
                    req.answered, req.status = time.time(), status
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the sender gave up waiting (its timeout)
                    pass
                finally:
                    with hook.lock:
                        hook.in_flight -= 1

            def log_message(self, *args) -> None:
                pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def of(self, webhook_id: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.webhook_id == webhook_id]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hooks():
    made: list[Hook] = []

    def make(answer: Callable[[str, str, int], tuple[int, float]]) -> Hook:
        made.append(Hook(answer))
        return made[-1]

    yield make
    for h in made:
        h.close()


@pytest.fixture
def dispatchers():
    made: list[WebhookDispatcher] = []

    def make(settings: Settings, store: JobStore, **kw) -> WebhookDispatcher:
        made.append(WebhookDispatcher(settings, store, **kw))
        return made[-1]

    yield make
    for d in made:
        d.stop()


def settings(tmp_path: Path, **kw) -> Settings:
    kw.setdefault("webhook_backoff", 0.3)
    return Settings(data_dir=tmp_path, workers=0, api_keys=["k"], allow_private_urls=True, **kw)


def failed_event(store: JobStore, url: str) -> str:
    """A job that failed with a webhook: its event is due now. Returns the event id."""
    jid = uuid.uuid4().hex
    store.create(NewJob(id=jid, model=MODEL_ID, input={"prompt": "x"}, base_url="http://testserver",
                        max_attempts=1, webhook_url=url))  # fmt: skip
    assert store.claim("w", 60).id == jid
    store.fail(jid, "w", code=1403, error="boom")
    return f"{jid}-failed"


def outbox(tmp_path: Path, event_id: str) -> dict:
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.row_factory = sqlite3.Row
    return dict(db.execute("SELECT * FROM webhook_outbox WHERE event_id = ?", (event_id,)).fetchone())


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_two_dispatchers_deliver_each_event_exactly_once(tmp_path, hooks, dispatchers):
    # Every third event fails its first attempt (503); every accepted request is held 1.5 s,
    # longer than a claim (1 s): only renewing the claim while sending keeps it.
    retried: set[str] = set()
    receivers = [hooks(lambda _p, wid, n: (503, 0.0) if wid in retried and n == 0 else (200, 1.5))
                 for _ in range(3)]  # fmt: skip
    s = settings(tmp_path)
    path = tmp_path / "jobs.sqlite3"
    store_a, store_b = SqliteJobStore(path), SqliteJobStore(path)  # as two servers' stores
    events = {failed_event(store_a, receivers[i % 3].url + "/hook"): receivers[i % 3] for i in range(24)}
    retried.update(list(events)[::3])
    sent: Counter[str] = Counter()  # attempts made by each dispatcher
    pair = [dispatchers(s, store, claim_seconds=1.0) for store in (store_a, store_b)]
    for name, d in zip("ab", pair):
        deliver = d._deliver
        d._deliver = lambda client, delivery, name=name, deliver=deliver: (
            sent.update(name),
            deliver(client, delivery),
        )
    for d in pair:
        d.start()

    def accepted(wid: str) -> int:
        return sum(1 for r in events[wid].of(wid) if r.status == 200)

    wait_for(lambda: all(accepted(w) for w in events), 25, "every event accepted")
    time.sleep(1.5)  # longer than a claim: a lost one would have been sent again by now
    for wid, hook in events.items():
        assert [r.status for r in hook.of(wid)] == ([503, 200] if wid in retried else [200]), wid
        row = outbox(tmp_path, wid)
        assert row["delivered_at"] is not None and row["attempts"] == (2 if wid in retried else 1)
        assert (row["claim_token"], row["last_status"]) == (None, 200)
    assert sent["a"] > 0 and sent["b"] > 0 and sum(sent.values()) == 24 + len(retried)


def test_a_hanging_receiver_delays_no_other(tmp_path, hooks, dispatchers):
    slow = hooks(lambda *_: (200, 4.0))  # holds each request 4 s, longer than fast's whole delivery
    fast = hooks(lambda *_: (200, 0.0))
    s = settings(tmp_path)
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    slow_events = [failed_event(store, slow.url + "/hook") for _ in range(5)]
    first = failed_event(store, fast.url + "/hook")  # due after all of slow's
    d = dispatchers(s, store)
    started = time.time()
    d.start()
    wait_for(lambda: fast.of(first), 5, "the fast receiver's event")
    assert fast.of(first)[0].arrived - started < 1.0
    time.sleep(1.0)
    later = failed_event(store, fast.url + "/hook")  # while slow still holds two requests
    created = time.time()
    wait_for(lambda: fast.of(later), 5, "the fast receiver's second event")
    assert fast.of(later)[0].arrived - created < 1.0
    assert slow.in_flight == 2  # still hanging meanwhile
    # The slow receiver gets its events too, each once, never more than two at a time.
    wait_for(lambda: all(slow.of(w) and slow.of(w)[0].status == 200 for w in slow_events), 20, "slow events")
    assert [len(slow.of(w)) for w in slow_events] == [1] * 5 and slow.max_in_flight == 2
    for w in [*slow_events, first, later]:
        assert outbox(tmp_path, w)["delivered_at"] is not None


def test_retry_gaps_follow_the_backoff(tmp_path, hooks, dispatchers):
    # Each attempt is answered 500 after 0.2 s. A poll interval of 1 s would stretch every gap
    # to the next poll: the dispatcher must wake for the retry time itself.
    hook = hooks(lambda *_: (500, 0.2))
    s = settings(tmp_path, webhook_backoff=0.3, webhook_max_attempts=5)
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    wid = failed_event(store, hook.url + "/hook")
    dispatchers(s, store, poll_interval=1.0).start()
    wait_for(lambda: outbox(tmp_path, wid)["gave_up_at"] is not None, 15, "giving up")
    got = hook.of(wid)
    assert len(got) == 5 and all(r.status == 500 for r in got)
    # From the end of attempt n to the start of attempt n+1: 0.3 x 2^(n-1) s.
    gaps = [round(b.arrived - a.answered, 3) for a, b in itertools.pairwise(got)]
    for n, gap in enumerate(gaps, start=1):
        expected = 0.3 * 2 ** (n - 1)
        assert expected - 0.02 <= gap <= expected + 0.15, (n, gaps)
    row = outbox(tmp_path, wid)
    assert (row["attempts"], row["last_status"], row["last_error"]) == (5, 500, "receiver answered 500")


FINAL = [400, 401, 403, 404, 405, 409, 410, 413, 422]
RETRIED = [408, 425, 429, 500, 502, 503, 504]


def test_is_final():
    assert [c for c in range(100, 600) if is_final(c)] == [
        c for c in range(400, 500) if c not in (408, 425, 429)
    ]


def test_final_answers_end_a_delivery_at_once_others_are_retried(tmp_path, hooks, dispatchers):
    def answer(path: str, _wid: str, n: int) -> tuple[int, float]:
        if path == "/timeout-once":
            return (200, 2.0 if n == 0 else 0.0)  # the first attempt outlasts webhook_timeout
        return (int(path.rsplit("/", 1)[1]) if n == 0 else 200, 0.0)

    hook = hooks(answer)
    s = settings(tmp_path, webhook_timeout=0.5, webhook_max_attempts=2)
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    by_code = {c: failed_event(store, f"{hook.url}/s/{c}") for c in FINAL + RETRIED}
    timeout = failed_event(store, hook.url + "/timeout-once")
    refused = failed_event(store, f"http://127.0.0.1:{free_port()}/nobody-listens")
    dispatchers(s, store).start()
    every = [*by_code.values(), timeout, refused]

    def done(wid: str) -> bool:
        row = outbox(tmp_path, wid)
        return row["delivered_at"] is not None or row["gave_up_at"] is not None

    wait_for(lambda: all(done(w) for w in every), 20, "every delivery ended")
    time.sleep(0.8)  # past the backoff: nothing more may come
    gone = outbox(tmp_path, by_code[410])
    assert [r.status for r in hook.of(by_code[410])] == [410]
    assert gone["gave_up_at"] is not None and gone["delivered_at"] is None
    assert (gone["attempts"], gone["last_status"]) == (1, 410) and "410" in gone["last_error"]
    for code in FINAL:
        row = outbox(tmp_path, by_code[code])
        assert [r.status for r in hook.of(by_code[code])] == [code], code
        assert (row["attempts"], row["last_status"], row["delivered_at"]) == (1, code, None), code
    for code in RETRIED:
        row = outbox(tmp_path, by_code[code])
        assert [r.status for r in hook.of(by_code[code])] == [code, 200], code
        assert (row["attempts"], row["last_status"], row["gave_up_at"]) == (2, 200, None), code
    assert len(hook.of(timeout)) == 2 and outbox(tmp_path, timeout)["delivered_at"] is not None
    row = outbox(tmp_path, refused)
    assert (row["attempts"], row["last_status"], row["delivered_at"]) == (2, None, None)
    assert row["gave_up_at"] is not None and "ConnectError" in row["last_error"]
