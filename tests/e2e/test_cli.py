"""The command line: `wan-vace serve --workers 0` plus a separate `wan-vace worker` (the API and
the workers only share the store, as they would on different machines), and in process the
flags, their settings and which wins (`--version`, `--host`, `--port`, `--log-level`)."""

import subprocess
import sys
import time
from importlib.metadata import version

import httpx
import pytest
import uvicorn

from server import cli
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
        # The API still answers, and refuses jobs no worker can run instead of queueing them
        # forever (an SDK's run() would wait forever): 503 with the reason.
        with srv.client() as c:
            assert c.get("/api/v3/models").status_code == 200
            r = c.post("/api/v3/wavespeed-ai/wan-2.1-14b-vace", json={"prompt": "x"})
            assert r.status_code == 503 and r.headers["retry-after"] == "30"
            msg = r.json()["message"]
            assert msg.startswith("No worker can run jobs on this server: could not load model")
            assert "fetch_weights.py" in msg
    finally:
        srv.stop()


# In process: flags, settings and what `serve` hands uvicorn (uvicorn.run replaced) ----------


def _serve(monkeypatch, tmp_path, *argv):
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert cli.main(["serve", "--data-dir", str(tmp_path), "--workers", "0", *argv]) == 0
    return seen


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["--version"])
    assert ei.value.code == 0
    assert capsys.readouterr().out.strip() == f"wan-vace {version('wan-vace')}"
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == f"wan-vace {version('wan-vace')}"


def test_serve_defaults(monkeypatch, tmp_path):
    for name in ("WAN_VACE_HOST", "WAN_VACE_PORT", "WAN_VACE_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    seen = _serve(monkeypatch, tmp_path)
    assert (seen["host"], seen["port"], seen["log_level"]) == ("127.0.0.1", 8000, "info")
    assert seen["app"].state.wan.settings.data_dir == tmp_path


def test_host_port_and_log_level_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WAN_VACE_HOST", "0.0.0.0")
    monkeypatch.setenv("WAN_VACE_PORT", "9123")
    monkeypatch.setenv("WAN_VACE_LOG_LEVEL", "WARNING")
    seen = _serve(monkeypatch, tmp_path)
    assert (seen["host"], seen["port"], seen["log_level"]) == ("0.0.0.0", 9123, "warning")


def test_flags_win_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WAN_VACE_HOST", "0.0.0.0")
    monkeypatch.setenv("WAN_VACE_PORT", "9123")
    monkeypatch.setenv("WAN_VACE_LOG_LEVEL", "error")
    seen = _serve(monkeypatch, tmp_path, "--host", "127.0.0.2", "--port", "9200", "--log-level", "debug")
    assert (seen["host"], seen["port"], seen["log_level"]) == ("127.0.0.2", 9200, "debug")


def test_worker_takes_log_level_and_bad_values_are_usage_errors(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WAN_VACE_LOG_LEVEL", raising=False)
    args = cli.parser().parse_args(["worker", "--log-level", "error", "--data-dir", str(tmp_path)])
    assert cli._settings(args).log_level == "error"
    with pytest.raises(SystemExit) as ei:
        cli.parser().parse_args(["serve", "--log-level", "loud"])
    assert ei.value.code == 2
    monkeypatch.setenv("WAN_VACE_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit) as ei:
        cli.main(["worker", "--data-dir", str(tmp_path)])
    assert ei.value.code == 2 and "log_level" in capsys.readouterr().err


def test_jobs_queued_before_the_model_failed_are_failed_after_the_grace(tmp_path):
    # Submitted while the worker is still starting (accepted: it may yet load), then the load
    # fails: after WAN_VACE_UNSERVABLE_GRACE the queued job ends failed with the reason, 5003.
    srv = ServerProcess(tmp_path, model="wan2.1-vace-14b", WAN_VACE_UNSERVABLE_GRACE="1").start(
        wait_ready=False
    )
    try:
        with srv.client() as c:
            deadline = time.monotonic() + 60
            while True:  # the API answers before the worker has failed
                try:
                    r = c.post("/api/v3/wavespeed-ai/wan-2.1-14b-vace", json={"prompt": "x"})
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            # The worker imports torch before it can find the weights missing (seconds), so the
            # first answer comes while it is still starting.
            assert r.status_code == 200, r.text
            d = wait_terminal(c, r.json()["data"]["id"], timeout=120)
            assert d["status"] == "failed" and d["code"] == 5003
            assert d["error"].startswith("No worker can run jobs on this server: could not load model")
    finally:
        srv.stop()
