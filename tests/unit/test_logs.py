"""server/logs.py: JSON lines that parse and carry the job id where one is bound, the text
format unchanged, and a process configured by `configure` as its settings say."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import threading

import pytest

from server.logs import JOB_ID, bind_job, handler, job_context
from server.settings import Settings
from tests.conftest import ROOT


@pytest.fixture
def capture(tmp_path):
    """A logger writing through the JSON handler into a buffer; returns (logger, lines())."""
    buf = io.StringIO()
    log = logging.getLogger(f"wan_vace.test_logs.{tmp_path.name}")
    h = handler(Settings(data_dir=tmp_path, log_format="json"), stream=buf)
    log.addHandler(h)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log, lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    log.removeHandler(h)


def test_json_line_fields(capture):
    log, lines = capture
    log.info("job %s done in %d ms", "abc", 12)
    (rec,) = lines()
    assert rec["message"] == "job abc done in 12 ms"
    assert rec["level"] == "INFO" and rec["logger"] == log.name
    assert rec["time"].endswith("+00:00")  # RFC 3339, UTC
    assert "job_id" not in rec  # none bound


def test_job_id_carried_inside_the_context_only(capture):
    log, lines = capture
    with job_context("job-1"):
        log.warning("fetching")
        with job_context("job-2"):  # nested: the inner id, then the outer one again
            log.warning("inner")
        log.error("failed", exc_info=ValueError("bad frame"))
    log.info("idle")
    recs = lines()
    assert [r.get("job_id") for r in recs] == ["job-1", "job-2", "job-1", None]
    assert "ValueError: bad frame" in recs[2]["exc_info"]


def test_bound_ids_stay_in_their_own_task(capture):
    log, lines = capture

    async def request(job_id: str, started: asyncio.Event, other: asyncio.Event) -> None:
        bind_job(job_id)
        started.set()
        await other.wait()  # the other request binds its own id meanwhile
        log.info("answered %s", job_id)

    async def both() -> None:
        a, b = asyncio.Event(), asyncio.Event()
        await asyncio.gather(request("job-a", a, b), request("job-b", b, a))

    asyncio.run(both())
    recs = lines()
    assert {r["message"]: r["job_id"] for r in recs} == {"answered job-a": "job-a", "answered job-b": "job-b"}
    assert JOB_ID.get() is None  # nothing leaked into the caller


def test_thread_outside_the_job_carries_no_id(capture):
    log, lines = capture
    with job_context("job-1"):
        t = threading.Thread(target=log.info, args=("heartbeat",))
        t.start()
        t.join()
    assert "job_id" not in lines()[0]


def test_uvicorn_access_fields(capture):
    log, lines = capture
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/metrics", "1.1", 200), None,
    )  # fmt: skip
    record.color_message = "\x1b[1mcoloured\x1b[0m"
    log.handle(record)
    (rec,) = lines()
    assert rec["message"] == '127.0.0.1:5000 - "GET /metrics HTTP/1.1" 200'
    assert (rec["method"], rec["path"], rec["status"], rec["client"]) == (
        "GET",
        "/metrics",
        200,
        "127.0.0.1:5000",
    )
    assert "color_message" not in rec


def test_worker_field_and_text_format(tmp_path):
    buf = io.StringIO()
    rec = logging.LogRecord("wan_vace.worker", logging.INFO, __file__, 1, "ready", None, None)
    handler(Settings(data_dir=tmp_path, log_format="json"), worker="w1", stream=buf).handle(rec)
    assert json.loads(buf.getvalue())["worker"] == "w1"
    text = io.StringIO()
    handler(Settings(data_dir=tmp_path), worker="w1", stream=text).handle(rec)
    assert text.getvalue().rstrip().endswith("worker[w1] wan_vace.worker INFO ready")


def test_configure_sets_level_and_format_for_the_process(tmp_path):
    code = (
        "import logging, warnings\n"
        "from server.logs import configure\n"
        "from server.settings import Settings\n"
        f"configure(Settings(data_dir={str(tmp_path)!r}, log_format='json', log_level='warning'))\n"
        "logging.getLogger('wan_vace.x').info('hidden')\n"
        "logging.getLogger('wan_vace.x').warning('shown')\n"
        "warnings.warn('a library warns')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    recs = [json.loads(line) for line in out.stderr.splitlines()]  # every line parses
    assert len(recs) == 2
    assert recs[0]["message"] == "shown" and recs[0]["level"] == "WARNING"
    assert recs[1]["logger"] == "py.warnings" and "a library warns" in recs[1]["message"]


def test_log_format_setting_is_checked(tmp_path):
    assert Settings(data_dir=tmp_path, log_format="JSON").log_format == "json"
    with pytest.raises(ValueError, match="log_format"):
        Settings(data_dir=tmp_path, log_format="xml")
