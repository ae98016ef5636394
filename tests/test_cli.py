"""`wan-vace serve --workers 0` plus a separate `wan-vace worker`: the API and the workers only
share the store, as they would on different machines."""

import subprocess
import sys

from tests.conftest import FAST, ROOT, ServerProcess, wait_terminal


def test_api_only_server_with_external_worker(tmp_path):
    srv = ServerProcess(tmp_path, WAN_VACE_WORKERS="0").start()
    worker = None
    try:
        assert "API only" in srv.wait_health({"ready"})["reason"]
        with srv.client() as c:
            jid = c.post("/api/v3/wavespeed-ai/wan-2.1-14b-vace", json={"prompt": "x", **FAST}).json()["data"]["id"]
            assert c.get(f"/api/v3/predictions/{jid}/result").json()["data"]["status"] == "created"
            worker = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "worker", "--model", "tiny", "--data-dir", str(tmp_path)],
                cwd=ROOT,
                env=srv.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            d = wait_terminal(c, jid, timeout=120)
            assert d["status"] == "completed"
            health = srv.wait_health({"ready"})
            assert [w["alive"] for w in health["workers"]] == [True]
            assert health["workers"][0]["pid"] == worker.pid
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        srv.stop()


def test_missing_weights_fail_health_with_the_fetch_command(tmp_path):
    srv = ServerProcess(tmp_path, model="wan2.1-vace-14b").start(wait_ready=False)
    try:
        h = srv.wait_health({"failed"}, timeout=90)
        assert "wan2.1-vace-14b" in h["reason"] and "fetch_weights.py" in h["reason"]
        # The API still answers and keeps accepting jobs while no worker can run them.
        with srv.client() as c:
            assert c.post("/api/v3/wavespeed-ai/wan-2.1-14b-vace", json={"prompt": "x"}).status_code == 200
    finally:
        srv.stop()
