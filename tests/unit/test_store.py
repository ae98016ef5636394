"""What only the SQLite store does. The interface every backend keeps is checked in
tests/test_store_contract.py, the schema history in tests/test_store_migrations.py."""

import sqlite3
import time

import pytest

from server.store import NewJob, StoreUnreachable, open_store
from server.store.sqlite import SqliteJobStore


@pytest.fixture
def store(tmp_path):
    return SqliteJobStore(tmp_path / "jobs.sqlite3")


def new(i: str, **kw) -> NewJob:
    return NewJob(id=i, model="m", input={"prompt": i}, base_url="http://h", max_attempts=2, **kw)


def test_wal_mode(store):
    assert sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_outbox_row_holds_the_event_not_its_body(store):
    store.create(new("a", webhook_url="http://hook"))
    store.claim("w1", 30)
    before = time.time()
    store.complete("a", "w1", outputs=["k"], has_nsfw=[False], inference_ms=5, seed=None, extra={})
    db = sqlite3.connect(store.path)
    db.row_factory = sqlite3.Row
    row = dict(db.execute("SELECT * FROM webhook_outbox").fetchone())
    assert row.pop("next_attempt_at") >= before
    assert row == {
        "event_id": "a-completed",
        "job_id": "a",
        "url": "http://hook",
        "status": "completed",
        "body": None,
        "attempts": 0,
        "delivered_at": None,
        "gave_up_at": None,
        "last_error": "",
        "claim_token": None,  # not claimed yet
        "claim_expires": None,
        "last_status": None,
    }


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_open_store_urls(tmp_path):
    class S:
        database_url = f"sqlite:///{tmp_path}/other.sqlite3"
        sqlite_path = tmp_path / "default.sqlite3"

    assert open_store(S()).path == f"{tmp_path}/other.sqlite3"
    S.database_url = ""
    assert open_store(S()).path == str(tmp_path / "default.sqlite3")
    # PostgreSQL is opened (tests/unit/test_store_postgres.py); a server that is not there is
    # a clear StoreUnreachable naming it, not a traceback from the driver.
    S.database_url = f"postgresql://u:pw@127.0.0.1:{_closed_port()}/jobs"
    with pytest.raises(StoreUnreachable, match="127.0.0.1"):
        open_store(S())
    S.database_url = "mysql://db"
    with pytest.raises(ValueError):
        open_store(S())
