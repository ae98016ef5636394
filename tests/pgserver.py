"""A private PostgreSQL server for tests that stop and restart the database mid-run.

The machine's shared server (127.0.0.1:5432) must never be stopped by a test, so a test that
restarts PostgreSQL gets its own: `initdb` into a temporary folder, `pg_ctl start` on a free
port of 127.0.0.1, trust authentication, fsync off (a test's data need not survive a power cut,
and it makes initdb and start-up seconds faster). PostgreSQL refuses to run as root; as root
(CI here), the server runs as the `postgres` system user, which owns the folder.

    with PrivatePostgres() as pg:
        url = pg.url          # postgresql://postgres@127.0.0.1:PORT/postgres
        pg.stop(); pg.start() # a restart that keeps the data and the port
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps the server's programs out of PATH.
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def available() -> str:
    """'' when a private server can be started here, else why not."""
    for name in ("initdb", "pg_ctl"):
        if _binary(name) is None:
            return f"PostgreSQL's {name} is not installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run the server as"
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePostgres:
    def __init__(self, port: int | None = None):
        why = available()
        if why:
            raise RuntimeError(why)
        self.port = port or _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="wan-vace-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._user = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self._run(_binary("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--no-instructions")  # fmt: skip
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\nfsync = off\nsynchronous_commit = off\n"
                "full_page_writes = off\nmax_connections = 200\n"
            )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str | None, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in argv if a is not None]
        if self._user is not None:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def start(self, timeout: float = 30.0) -> None:
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(int(timeout)),
                  "start")  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # -w waits for the socket; make sure TCP answers too
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"private PostgreSQL did not listen on port {self.port}: {self.log.read_text()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` (roll back open transactions, drop the connections) or
        `immediate` (like a crash; recovery runs at the next start)."""
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def running(self) -> bool:
        return self._run(_binary("pg_ctl"), "-D", str(self.data), "status", check=False).returncode == 0

    def close(self) -> None:
        if self.data.exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
