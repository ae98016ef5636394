"""A cluster on one machine: two API replicas (`serve --workers 0`) and three `wan-vace worker`
processes, each with its own data dir as if on its own machine, sharing only a PostgreSQL server
and an S3 bucket. Thirty jobs submitted across both APIs all complete exactly once, also when a
worker is killed with SIGKILL in the middle of a job and when PostgreSQL is restarted during the
run (the APIs answer 503 in the envelope meanwhile and recover by themselves), and each output is
downloadable from the other API.

The database is a private server this test starts with initdb/pg_ctl (tests/pgserver.py), so the
machine's shared one is never stopped; the bucket is on moto's standalone server, an S3
emulator (tests/s3.py). The workers run the real tiny model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests import pgserver
from tests.conftest import API_KEY, FAST, ROOT, ServerProcess

MODEL = "/api/v3/wavespeed-ai/wan-2.1-14b-vace"


def _require_private_postgres() -> None:
    why = pgserver.available()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI can start a private PostgreSQL, but: {why}")
        pytest.skip(why)


def _get(c: httpx.Client, url: str) -> httpx.Response | None:
    try:
        return c.get(url)
    except httpx.TransportError:
        return None


def _wait_all(apis: list[httpx.Client], ids: list[str], timeout: float) -> dict[str, dict]:
    """Every job's last answer once all are terminal, polling both APIs in turn."""
    done: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    k = 0
    while len(done) < len(ids) and time.monotonic() < deadline:
        for jid in ids:
            if jid in done:
                continue
            k += 1
            r = _get(apis[k % 2], f"/api/v3/predictions/{jid}/result")
            if r is not None and r.status_code == 200:
                d = r.json()["data"]
                if d["status"] in ("completed", "failed"):
                    done[jid] = d
        time.sleep(0.5)
    return done


def test_two_apis_three_workers_thirty_jobs_exactly_once(tmp_path):
    _require_private_postgres()
    from server.store.postgres import PostgresJobStore
    from tests.s3 import S3_ENV, start_moto_server, unavailable

    if unavailable():
        pytest.skip(unavailable())
    s3 = start_moto_server()
    with pgserver.PrivatePostgres() as pg:
        bucket = s3.create_bucket("cluster")
        env = {
            "WAN_VACE_DATABASE_URL": pg.url,
            "WAN_VACE_STORAGE_URL": f"s3://{bucket}/run",
            "WAN_VACE_S3_ENDPOINT_URL": s3.endpoint,
            "WAN_VACE_S3_REGION": "us-east-1",
            **S3_ENV,
            "WAN_VACE_LEASE_SECONDS": "6",
            "WAN_VACE_MAX_ATTEMPTS": "3",
            # Polls stay the fallback; LISTEN/NOTIFY wakes the idle workers.
            "WAN_VACE_POLL_INTERVAL": "1.0",
        }
        apis = [ServerProcess(tmp_path / f"api{i}", WAN_VACE_WORKERS="0", **env).start() for i in range(2)]
        workers: list[subprocess.Popen] = []
        store = None
        try:
            for i in range(3):
                d = tmp_path / f"worker{i}"
                d.mkdir()
                log = open(d / "worker.log", "wb")  # noqa: SIM115 - the child keeps it
                workers.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "server.cli", "worker", "--model", "tiny", "--data-dir", str(d)],
                        cwd=ROOT, env=apis[0].env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    )  # fmt: skip
                )
            store = PostgresJobStore(pg.url, pool_size=2)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                ready = [w for w in store.workers() if w.state in ("ready", "busy")]
                if len(ready) == 3:
                    break
                time.sleep(0.5)
            assert len(ready) == 3, [(w.id, w.state, w.reason) for w in store.workers()]
            pid_of = {w.id: w.pid for w in store.workers()}

            h = {"Authorization": f"Bearer {API_KEY}"}
            clients = [httpx.Client(base_url=a.url, headers=h, timeout=30) for a in apis]
            ids = []
            for i in range(30):
                # Every fifth job renders longer, so the kill below finds one mid-job.
                steps = 12 if i % 5 == 0 else FAST["num_inference_steps"]
                body = {"prompt": f"job {i}", "seed": i, "num_inference_steps": steps, "duration": 5}
                r = clients[i % 2].post(MODEL, json=body)
                assert r.status_code == 200, r.text
                ids.append(r.json()["data"]["id"])

            # SIGKILL a worker in the middle of a job.
            killed_job = None
            deadline = time.monotonic() + 60
            while killed_job is None and time.monotonic() < deadline:
                for jid in ids:
                    j = store.get(jid)
                    if j.status.value == "processing" and j.progress > 0 and j.lease_owner in pid_of:
                        os.kill(pid_of[j.lease_owner], signal.SIGKILL)
                        killed_job, killed_pid = jid, pid_of[j.lease_owner]
                        break
                time.sleep(0.05)
            assert killed_job is not None, "no job was seen running"

            # Restart PostgreSQL under the running cluster.
            time.sleep(1.0)
            pg.stop()
            r = _get(clients[0], f"/api/v3/predictions/{ids[-1]}/result")
            assert r is not None and r.status_code == 503, r and r.text
            assert r.json()["code"] == 503 and r.headers["retry-after"]
            time.sleep(3.0)
            pg.start()

            done = _wait_all(clients, ids, timeout=300)
            assert len(done) == 30, f"{30 - len(done)} jobs did not finish: " + "; ".join(
                apis[0].log()[-2000:].splitlines()[-5:]
            )
            assert {d["status"] for d in done.values()} == {"completed"}, {
                jid: d["error"] for jid, d in done.items() if d["status"] != "completed"
            }
            # The killed worker's job ran again elsewhere: attempts counted, no other job re-run.
            assert store.get(killed_job).attempts == 2
            assert workers[[w.pid for w in workers].index(killed_pid)].wait(5) == -signal.SIGKILL

            # Exactly once: one stored output per job (a second run to completion would store a
            # second one under a new token), and each downloads from the other API too.
            s3c = s3.client()
            for jid in ids:
                keys = [
                    o["Key"]
                    for page in s3c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"run/outputs/{jid}/")
                    for o in page.get("Contents", [])
                    if o["Key"].endswith(".mp4")
                ]
                assert len(keys) == 1, (jid, keys)
                (url,) = done[jid]["outputs"]
                path = urlsplit(url).path
                assert path.startswith("/media/"), url
                bodies = {httpx.get(a.url + path, timeout=30).content for a in apis}
                (video,) = bodies  # the same bytes from both replicas
                assert video[4:8] == b"ftyp", (jid, video[:16])
            for c in clients:
                c.close()
        finally:
            if store is not None:
                store.close()
            for w in workers:
                if w.poll() is None:
                    w.send_signal(signal.SIGTERM)
            for w in workers:
                try:
                    w.wait(30)
                except subprocess.TimeoutExpired:
                    w.kill()
            for a in apis:
                a.stop()
            s3.stop()
