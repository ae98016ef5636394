"""scripts/loadtest.py keeps working: `--quick` against the current code yields every section
with real numbers, and both load tools count what a real HTTP server answered."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import ROOT

SCRIPTS = ROOT / "scripts"


def _loadgen():
    spec = importlib.util.spec_from_file_location("loadgen", SCRIPTS / "loadgen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


loadgen = _loadgen()


class _Counting(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn answers
    seen = 0
    lock = threading.Lock()

    def do_GET(self):
        with _Counting.lock:
            _Counting.seen += 1
        body = b'{"ok": true}'
        self.send_response(200 if self.path == "/ok" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a load generator resetting its keep-alive connections at the end is expected


@pytest.fixture
def counting():
    srv = _QuietServer(("127.0.0.1", 0), _Counting)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Counting.seen = 0
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_builtin_generator_counts_every_answer(counting):
    r = loadgen.run(counting + "/ok", connections=4, duration=0.7, headers=["X-Test: 1"], tool="builtin")
    assert r["requests"] > 0 and r["errors"] == 0
    # Each connection waits for its answer before the next request, so nothing is in flight at the end.
    assert r["requests"] == _Counting.seen
    assert 0 < r["p50_ms"] <= r["p99_ms"]
    assert r["rps"] == pytest.approx(r["requests"] / r["duration_s"], rel=0.05)

    bad = loadgen.run(counting + "/missing", connections=2, duration=0.3, headers=[], tool="builtin")
    assert bad["requests"] > 0 and bad["errors"] == bad["requests"]


@pytest.mark.skipif(loadgen.wrk_path() is None, reason="wrk is not installed")
def test_wrk_report_is_read(counting):
    r = loadgen.run(counting + "/ok", connections=4, duration=1, headers=["X-Test: 1"], tool="wrk")
    # wrk stops with requests in flight, which it does not count: at most one per connection.
    assert r["requests"] <= _Counting.seen <= r["requests"] + 4
    assert r["errors"] == 0 and 0 < r["p50_ms"] <= r["p99_ms"]


def test_quick_run_measures_every_section(tmp_path):
    out = tmp_path / "loadtest.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAN_VACE_")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "loadtest.py"), "--quick", "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["meta"]["cpu_count"] == os.cpu_count()
    assert list(result["sections"]) == ["polls", "submit", "poll", "history", "worker", "pollers"]
    for name, section in result["sections"].items():
        assert section["rows"], name
        for row in section["rows"]:
            v = row["after"]
            assert math.isfinite(v), (name, row)
            assert row["signed"] or v > 0, (name, row)
            assert "before" not in row  # no baseline asked for
    # The markdown table is printed with one line per row.
    printed = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(printed) == 1 + sum(len(s["rows"]) for s in result["sections"].values())
    keys = {r["key"] for r in result["sections"]["polls"]["rows"]}
    assert {"c4_rps", "c64_p99", "c256_p50"} <= keys
    # The server saw every row the script wrote into its jobs table.
    assert not any(result["sections"]["history"]["notes"].values())
    assert not any(result["sections"]["poll"]["notes"].values())
