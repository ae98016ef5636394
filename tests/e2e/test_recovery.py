"""Nothing accepted is lost: a killed worker, a killed server, a restart; a graceful stop
(Ctrl-C, SIGTERM) costs no attempt."""

import os
import signal
import time

import httpx

from tests.conftest import FAST, ServerProcess, wait_terminal

MODEL = "wavespeed-ai/wan-2.1-14b-vace"
# Long enough on the tiny model to be caught mid-run (40 denoising steps, a few seconds).
SLOW = {"prompt": "slow", "num_inference_steps": 40, "seed": 3}


def _wait_processing(c: httpx.Client, jid: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = c.get(f"/api/v3/predictions/{jid}/result").json()["data"]
        if d["status"] == "processing" and d["progress"] > 0:
            return d
        time.sleep(0.05)
    raise TimeoutError(d)


def _worker_pid(srv: ServerProcess) -> int:
    h = httpx.get(srv.url + "/health").json()
    (w,) = [w for w in h["workers"] if w["alive"]]
    return w["pid"]


def test_worker_killed_mid_job_is_retried(tmp_path):
    srv = ServerProcess(tmp_path).start()
    try:
        with srv.client() as c:
            jid = c.post(f"/api/v3/{MODEL}", json=SLOW).json()["data"]["id"]
            _wait_processing(c, jid)
            os.kill(_worker_pid(srv), signal.SIGKILL)
            d = wait_terminal(c, jid, timeout=180)
            assert d["status"] == "completed", d
            assert d["attempts"] == 2
            # The supervisor started a fresh worker, and health says so.
            srv.wait_health({"ready"}, 60)
    finally:
        srv.stop()


def test_worker_killed_on_last_attempt_fails_clearly(tmp_path):
    srv = ServerProcess(tmp_path, WAN_VACE_MAX_ATTEMPTS="1").start()
    try:
        with srv.client() as c:
            jid = c.post(f"/api/v3/{MODEL}", json=SLOW).json()["data"]["id"]
            _wait_processing(c, jid)
            os.kill(_worker_pid(srv), signal.SIGKILL)
            d = wait_terminal(c, jid, timeout=60)
            assert d["status"] == "failed" and d["code"] == 5000
            assert "worker process exited unexpectedly" in d["error"]
            assert "attempt 1 of 1" in d["error"]
    finally:
        srv.stop()


def test_server_killed_with_jobs_queued_all_finish_after_restart(tmp_path):
    srv = ServerProcess(tmp_path).start()
    with srv.client() as c:
        ids = [c.post(f"/api/v3/{MODEL}", json=SLOW).json()["data"]["id"]]
        ids += [c.post(f"/api/v3/{MODEL}", json={"prompt": f"q{i}", **FAST}).json()["data"]["id"] for i in range(3)]
        _wait_processing(c, ids[0])
    # SIGKILL the API process alone: its worker is orphaned, notices, hands its job back.
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait()
    time.sleep(2)
    srv2 = ServerProcess(tmp_path, port=srv.port).start()
    try:
        with srv2.client() as c:
            results = [wait_terminal(c, j, timeout=180) for j in ids]
        assert [r["status"] for r in results] == ["completed"] * 4, results
        # The parent's exit is no crash of the job: handed back uncounted, one claim counts.
        assert results[0]["attempts"] == 1, results[0]
    finally:
        srv2.stop()


def test_whole_process_group_killed_then_restart(tmp_path):
    srv = ServerProcess(tmp_path).start()
    with srv.client() as c:
        ids = [c.post(f"/api/v3/{MODEL}", json=SLOW).json()["data"]["id"]]
        ids.append(c.post(f"/api/v3/{MODEL}", json={"prompt": "q", **FAST}).json()["data"]["id"])
        _wait_processing(c, ids[0])
    srv.stop(signal.SIGKILL)  # server and worker die together, mid-job
    srv2 = ServerProcess(tmp_path, port=srv.port).start()
    try:
        with srv2.client() as c:
            results = [wait_terminal(c, j, timeout=180) for j in ids]
        assert [r["status"] for r in results] == ["completed"] * 2, results
        assert results[0]["attempts"] == 2
        # The start-up log says what became of the dead worker's job.
        log = srv2.log_path.read_text(errors="replace")
        assert f"from an earlier run: re-queued job {ids[0]} (attempt 1 of 2)" in log, log[-6000:]
    finally:
        srv2.stop()


def test_ctrl_c_twice_mid_job_costs_no_attempt(tmp_path):
    """Ctrl-C reaches the whole process group (the API and its workers) at once. Twice, while a
    job runs, restarting each time: each stop hands the job back uncounted, with no progress
    and no traceback, and the third run completes it. attempts == 1: of the three claims, the
    two handed back gracefully were given back, and only the run that completed counts."""
    from server.store.sqlite import SqliteJobStore

    srv = ServerProcess(tmp_path).start()
    with srv.client() as c:
        jid = c.post(f"/api/v3/{MODEL}", json=SLOW).json()["data"]["id"]
    try:
        for _ in range(2):
            with srv.client() as c:
                _wait_processing(c, jid)
            srv.stop(signal.SIGINT)  # what the terminal does on Ctrl-C
            assert srv.proc.returncode == 0, srv.log()
            job = SqliteJobStore(tmp_path / "jobs.sqlite3").get(jid)
            assert (job.status.value, job.attempts, job.progress, job.code) == ("created", 0, 0.0, 0), job
            assert job.error == "The worker was stopped (server shutdown); the job was queued again."
            srv = ServerProcess(tmp_path, port=srv.port).start()
        with srv.client() as c:
            d = wait_terminal(c, jid, timeout=60)
        assert d["status"] == "completed", d
        assert d["attempts"] == 1, d
    finally:
        srv.stop()
    log = srv.log_path.read_text(errors="replace")  # all three runs (same port, same file)
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-6000:]
    assert "leaked semaphore" not in log, log[-6000:]
    assert log.count("re-queued job " + jid + " (attempt not counted; 0 of 2 used)") == 2, log[-6000:]
    assert "from an earlier run" not in log  # the workers handed back themselves: nothing to recover
