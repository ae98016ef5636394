"""What only the SQLite store does. The interface every backend keeps is checked in
tests/test_store_contract.py, the schema history in tests/test_store_migrations.py."""

import sqlite3
import time

import pytest

from server.store import NewJob, open_store
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


def test_open_store_urls(tmp_path):
    class S:
        database_url = f"sqlite:///{tmp_path}/other.sqlite3"
        sqlite_path = tmp_path / "default.sqlite3"

    assert open_store(S()).path == f"{tmp_path}/other.sqlite3"
    S.database_url = ""
    assert open_store(S()).path == str(tmp_path / "default.sqlite3")
    S.database_url = "postgresql://db/jobs"
    with pytest.raises(NotImplementedError, match="not supported yet"):
        open_store(S())
    S.database_url = "mysql://db"
    with pytest.raises(ValueError):
        open_store(S())
