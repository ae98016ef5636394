"""A server under test for scripts/loadtest.py: `serve` of one code tree, started the way a
user starts it, and its jobs table read and filled in SQL.

Nothing here imports the server. The SQL side reads the columns with PRAGMA table_info and
copies rows with INSERT ... SELECT, so it works on any schema version that keeps a `jobs` table
with `id` and `created_at` (and the start/finish timestamps it finds, named in the results).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

KEY = "loadtest-key-0123456789"
MODEL_PATH = "/api/v3/wavespeed-ai/wan-2.1-14b-vace"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`serve` of one code tree, restartable on its data dir (a new free port each start)."""

    def __init__(self, root: Path, data_dir: Path, *, workers: int, env: dict[str, str]):
        self.root, self.data_dir, self.workers = root, data_dir, workers
        self.env = {
            **os.environ,
            "PYTHONPATH": str(root),
            "WAN_VACE_API_KEYS": KEY,
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._conn: http.client.HTTPConnection | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    def start(self, timeout: float = 180) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        with open(self.data_dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from server.cli import main; main()",
                    "serve",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data_dir),
                    "--workers",
                    str(self.workers),
                    "--model",
                    "tiny",
                ],
                cwd=self.root,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        health: dict | str = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server in {self.root} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                health = self.get("/health")
                # With a worker, "ready" means its model is loaded: measuring starts from there.
                if health.get("status") in ({"ready"} if self.workers else {"ready", "busy"}):
                    return self
            except (OSError, http.client.HTTPException, ValueError):
                pass
            time.sleep(0.2)
        if isinstance(health, dict):
            health = {k: health.get(k) for k in ("status", "reason", "workers")}
        self.stop()
        raise TimeoutError(
            f"server in {self.root} not ready after {timeout:g} s; /health: {health}\n{self.log()}"
        )

    def log(self) -> str:
        """The end of the server's log, without the access lines of our own /health polls."""
        try:
            text = (self.data_dir / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(x for x in text.splitlines() if "GET /health" not in x)[-4000:]

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> Server:
        self.stop()
        return self.start()

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """One request on a kept-alive connection (reopened when the server closed it)."""
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            try:
                self._conn.request(method, path, payload, headers)
                r = self._conn.getresponse()
                return r.status, json.loads(r.read() or b"{}")
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def get(self, path: str) -> dict:
        return self.request("GET", path)[1]

    def submit(self, body: dict) -> str:
        status, answer = self.request("POST", MODEL_PATH, body)
        if status != 200:
            raise RuntimeError(f"submit answered {status}: {answer}")
        return answer["data"]["id"]

    def timed(self, method: str, path: str, body: dict | None, n: int) -> list[float]:
        """Milliseconds of n sequential requests on one connection, each checked for a 200."""
        out = []
        for _ in range(n):
            start = time.perf_counter()
            status, answer = self.request(method, path, body)
            out.append((time.perf_counter() - start) * 1000)
            if status != 200:
                raise RuntimeError(f"{method} {path} answered {status}: {answer}")
        return out

    def wait_done(self, job_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.get(f"/api/v3/predictions/{job_id}/result")["data"]
            if data["status"] in ("completed", "failed", "cancelled"):
                if data["status"] != "completed":
                    raise RuntimeError(f"job {job_id} ended {data['status']}: {data.get('error')}")
                return data
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} did not finish in {timeout} s")


# --- the jobs table, read and filled in SQL -----------------------------------------------


def columns(db: Path) -> list[str]:
    with sqlite3.connect(db, timeout=60) as c:
        return [r[1] for r in c.execute("PRAGMA table_info(jobs)")]


def duplicate(db: Path, template_id: str, n: int, *, skip: int = 0, spacing: float = 1e-4) -> None:
    """Copies the template row n times with new ids, each created before it (the k-th copy of
    all ever made, k counted from skip+1, at template - k*spacing), in one transaction."""
    if n <= 0:
        return
    c = sqlite3.connect(db, timeout=60)
    try:
        info = {r[1]: r for r in c.execute("PRAGMA table_info(jobs)")}
        unique = set()
        for idx in c.execute("PRAGMA index_list(jobs)").fetchall():
            if idx[2]:  # unique
                unique |= {r[2] for r in c.execute(f"PRAGMA index_info('{idx[1]}')")}
        exprs = []
        for name, row in info.items():
            if name in ("id", "created_at"):
                exprs.append("?")
            elif name in unique and not row[5]:  # a unique column that is not the key
                if row[3]:
                    raise RuntimeError(f"jobs.{name} is unique and NOT NULL: cannot copy rows")
                exprs.append("NULL")
            else:
                exprs.append(f'"{name}"')
        (t0,) = c.execute("SELECT created_at FROM jobs WHERE id = ?", (template_id,)).fetchone()
        cols = ", ".join(f'"{n}"' for n in info)
        sql = f"INSERT INTO jobs ({cols}) SELECT {', '.join(exprs)} FROM jobs WHERE id = ?"
        order = list(info)
        values = []
        for k in range(skip + 1, skip + n + 1):
            params = {"id": uuid.uuid4().hex, "created_at": t0 - k * spacing}
            values.append((*[params[x] for x in order if x in params], template_id))
        with c:
            c.executemany(sql, values)
    finally:
        c.close()


def job_times(db: Path, ids: list[str]) -> tuple[list[dict], str, str]:
    """created/start/end of each job as the store recorded them, and which columns those are."""
    cols = columns(db)
    start = next((x for x in ("started_at", "claimed_at", "updated_at") if x in cols), None)
    end = next((x for x in ("finished_at", "completed_at", "updated_at") if x in cols), None)
    if start is None or end is None:
        raise RuntimeError(f"the jobs table has no start/finish timestamps: {cols}")
    with sqlite3.connect(db, timeout=60) as c:
        rows = [
            c.execute(f'SELECT created_at, "{start}", "{end}" FROM jobs WHERE id = ?', (i,)).fetchone()
            for i in ids
        ]
    return [{"created": r[0], "start": r[1], "end": r[2]} for r in rows], start, end
