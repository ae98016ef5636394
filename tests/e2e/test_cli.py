"""The command line: `wan-vace serve --workers 0` (an API replica) plus a separate `wan-vace
worker` (the API and the workers only share the store, as they would on different machines), one
worker in process or, on a host with two GPUs (a fake nvidia-smi), two supervised ones, stopped
by SIGTERM; and in process the flags, their settings and which wins (`--version`, `--host`,
`--port`, `--log-level`, `--workers`, `--gpus`, `--gpus-per-job`, `--shutdown-grace`)."""

import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version

import httpx
import pytest
import uvicorn

from server import cli
from tests.conftest import FAST, ROOT, ServerProcess, wait_terminal
from tests.unit.test_gpus import fake_nvidia_smi


def _worker(srv: ServerProcess, data_dir, *flags: str, env: dict | None = None) -> subprocess.Popen:
    """`wan-vace worker` on the server's data dir, its output in worker.log there."""
    with open(data_dir / "worker.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "server.cli", "worker", "--model", "tiny", "--data-dir", str(data_dir), *flags],
            cwd=ROOT, env={**srv.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def test_api_only_server_with_external_worker(tmp_path):
    srv = ServerProcess(tmp_path, WAN_VACE_WORKERS="0").start()
    worker = None
    try:
        assert "API only" in srv.wait_health({"ready"})["reason"]
        with srv.client() as c:
            jid = c.post("/api/v3/wavespeed-ai/wan-2.1-14b-vace", json={"prompt": "x", **FAST}).json()[
                "data"
            ]["id"]
            assert c.get(f"/api/v3/predictions/{jid}/result").json()["data"]["status"] == "created"
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "server.cli",
                    "worker",
                    "--model",
                    "tiny",
                    "--data-dir",
                    str(tmp_path),
                ],
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
            # SIGTERM: an idle worker stops at once, exits 0 and leaves the API alone again.
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0
            health = srv.wait_health({"ready"})
            assert health["workers"] == [] and "API only" in health["reason"]
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        srv.stop()


def test_a_worker_host_with_two_gpus_runs_two_supervised_workers(tmp_path):
    """`wan-vace worker` on a host showing two GPUs: one child worker per GPU, each with its
    CUDA_VISIBLE_DEVICES; SIGTERM drains them both and the command exits 0."""
    srv = ServerProcess(tmp_path, WAN_VACE_WORKERS="0").start()
    for k in [k for k in srv.env if k.startswith("CUDA_")]:
        del srv.env[k]
    path = f"{fake_nvidia_smi(tmp_path, 2)}{os.pathsep}{os.environ['PATH']}"
    workers = None
    try:
        srv.wait_health({"ready"})
        srv.env.pop("WAN_VACE_WORKERS")
        workers = _worker(srv, tmp_path, "--shutdown-grace", "20", env={"PATH": path})
        deadline = time.monotonic() + 90
        while len([w for w in srv.wait_health({"ready", "busy"})["workers"] if w["state"] == "ready"]) < 2:
            assert workers.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        rows = srv.wait_health({"ready"})["workers"]
        assert sorted(w["gpus"] for w in rows) == ["0", "1"]
        assert all(w["pid"] != workers.pid for w in rows)  # children of the command, not itself
        with srv.client() as c:
            jid = c.post("/api/v3/wavespeed-ai/wan-2.1-14b-vace", json={"prompt": "x", **FAST}).json()[
                "data"
            ]["id"]
            assert wait_terminal(c, jid, timeout=120)["status"] == "completed"
        workers.send_signal(signal.SIGTERM)
        assert workers.wait(timeout=60) == 0
        assert srv.wait_health({"ready"})["workers"] == []  # both stopped
    finally:
        if workers is not None and workers.poll() is None:
            workers.kill()
            workers.wait(timeout=30)
        srv.stop()
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "worker plan: 2 workers: worker 1 on GPU 0 (NVIDIA H200); worker 2 on GPU 1" in log
    assert "SIGTERM: stopping 2 workers (grace 20 s)" in log
    assert "Traceback" not in log


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
        [sys.executable, "-m", "server.cli", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
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


def test_worker_plan_flags_win_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WAN_VACE_SHUTDOWN_GRACE", "99")
    monkeypatch.setenv("WAN_VACE_WORKERS", "3")
    seen = _serve(monkeypatch, tmp_path, "--shutdown-grace", "7.5", "--gpus-per-job", "1")
    s = seen["app"].state.wan.settings
    assert (s.workers, s.shutdown_grace, s.gpus_per_job, s.gpus) == (0, 7.5, 1, None)
    args = cli.parser().parse_args(["worker", "--gpus", "1,0", "--gpus-per-job", "2", "--workers", "1"])
    s = cli._settings(args)
    assert (s.gpus, s.gpus_per_job, s.workers, s.shutdown_grace) == ([1, 0], 2, 1, 99.0)


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
