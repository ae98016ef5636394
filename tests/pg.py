"""Scratch PostgreSQL for tests, on the server CI and developers have at 127.0.0.1:5432
(`WAN_VACE_TEST_PG`, default postgresql://postgres@127.0.0.1:5432/test).

Each test gets a fresh schema of its own, named in the connection URL (`options=-csearch_path=`,
which libpq sends at every connect: each connection of the store's pool and its LISTEN
connection take it), dropped afterwards with everything in it. That isolates as fully as a
fresh database for what the store does (its tables, functions and, since the store names its
event channels after a schema that is not `public`, its events), at a few milliseconds instead
of the ~0.3 s of CREATE DATABASE.

Without a reachable server the tests skip and say why, except under CI=true, where a silently
skipped backend would be a defect: they fail.

`Cuttable` is a TCP relay in front of the server that a test can cut and restore, for outages
that must not stop the machine's shared server (tests/pgserver.py starts a private one where a
real restart is the point).
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

SERVER = os.environ.get("WAN_VACE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@functools.cache
def unavailable() -> str:
    """'' when the test server answers, else why not (asked once per test session)."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test]')"
    try:
        psycopg.connect(SERVER, connect_timeout=3).close()
    except psycopg.Error as e:
        return f"no PostgreSQL server at {SERVER}: {str(e).strip().splitlines()[0]}"
    return ""


def pg_available() -> bool:
    return not unavailable()


def require() -> None:
    """Skip the test without a server, or fail it under CI=true."""
    import pytest  # here: the process bodies below run in children that need none of it

    why = unavailable()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI has a PostgreSQL server, but: {why}")
        pytest.skip(why)


def with_schema(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


@contextmanager
def scratch_url(server: str = SERVER) -> Iterator[str]:
    """A URL whose connections see only a fresh, empty schema, dropped on exit."""
    import psycopg

    require()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_schema(server, schema)
    finally:
        with psycopg.connect(server, autocommit=True) as c:
            c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


# Bodies of spawned processes (this module is light to import, unlike a test module).
def claim_all(url: str, name: str, start: Any, out: Any) -> None:
    """Claim and complete jobs as worker `name` until none is left; put the ids taken."""
    from server.store.postgres import PostgresJobStore

    store = PostgresJobStore(url, pool_size=1)
    start.wait(30)  # every process connected: they claim at the same time
    took = []
    while (job := store.claim(name, 30)) is not None:
        took.append(job.id)
        assert store.complete(job.id, name, outputs=[], has_nsfw=[], inference_ms=0, seed=None, extra={})
    store.close()
    out.put(took)


def open_store(url: str, start: Any, out: Any) -> None:
    """Open (so migrate) the store at `url` together with the other processes; put "ok" or the error."""
    try:
        from server.store.postgres import PostgresJobStore

        start.wait(30)
        PostgresJobStore(url, pool_size=1).close()
        out.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the test, which shows it
        out.put(repr(e))


def via(url: str, port: int, password: str | None = None) -> str:
    """`url` with its port (and password) replaced: the same server reached through a relay."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    auth = f"{user}:{password}" if password else user
    return urlunsplit(parts._replace(netloc=f"{auth}@127.0.0.1:{port}"))


class Cuttable:
    """A TCP relay on a free port of 127.0.0.1 to `target`. `cut()` closes every relayed
    connection and the listening socket (clients see their connections drop, then refused
    connects, as when the server is down); `restore()` listens on the same port again."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)):
        self.target = target
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.port = 0
        self.restore()

    def restore(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.port = s.getsockname()[1]
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            self._close(s)

    def _close(self, s: socket.socket) -> None:
        with self._lock:
            self._open.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:  # wakes the accept() blocked on it (close alone does not, on Linux)
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            sockets = list(self._open)
        for s in sockets:
            self._close(s)

    def close(self) -> None:
        self.cut()
