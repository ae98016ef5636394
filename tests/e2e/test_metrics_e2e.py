"""/metrics and JSON logs from a real server (uvicorn, a spawned worker, the tiny model): a job
runs and the scrape shows it and the worker's state; every log line, the API's, uvicorn's
access log and the worker's, is one JSON object."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FAST, ServerProcess, wait_terminal

SUBMIT = "/api/v3/wavespeed-ai/wan-2.1-14b-vace"


# The job the first test ran, for the log tests to look for.
RAN: list[str] = []


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("metrics"), WAN_VACE_LOG_FORMAT="json").start()
    yield srv
    srv.stop()


def scrape(server) -> dict[tuple[str, frozenset], float]:
    r = httpx.get(server.url + "/metrics", timeout=10)  # open by default, like /health
    assert r.status_code == 200, r.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def json_lines(server) -> list[dict]:
    # Only lines that open like a log object: a library may still write to stderr directly.
    lines = server.log_path.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_a_job_shows_in_the_scrape(server, client):
    before = scrape(server)
    assert value(before, "wan_vace_workers", state="ready") == 1
    done_before = value(before, "wan_vace_jobs_finished_total", status="completed")
    runs_before = value(before, "wan_vace_job_duration_seconds_gcount", status="completed")

    r = client.post(SUBMIT, json={"prompt": "a red ball", **FAST})
    assert r.status_code == 200, r.text
    job_id = r.json()["data"]["id"]
    assert wait_terminal(client, job_id)["status"] == "completed"
    RAN.append(job_id)

    after = scrape(server)
    assert value(after, "wan_vace_jobs_finished_total", status="completed") == done_before + 1
    assert value(after, "wan_vace_job_duration_seconds_gcount", status="completed") == runs_before + 1
    assert value(after, "wan_vace_step_duration_seconds_gcount") >= 1
    assert value(after, "wan_vace_step_duration_seconds_gsum") > 0
    assert value(after, "wan_vace_queue_depth") == 0
    (info,) = [k for k in after if k[0] == "wan_vace_worker_info"]
    labels = dict(info[1])
    assert labels["model"] == "tiny" and labels["state"] in ("ready", "busy") and labels["device"] == "cpu"


def test_logs_are_json_lines(server, client):
    client.get("/health")
    recs = json_lines(server)
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in recs)
    access = [r for r in recs if r["logger"] == "uvicorn.access"]
    assert any(r.get("path") == "/metrics" and r.get("status") == 200 for r in access)
    worker = [r for r in recs if "worker" in r]
    assert any("ready" in r["message"] for r in worker)
    # The API's own lines (the supervisor starting its worker) come through the same handler.
    assert any(r["logger"] == "wan_vace.supervisor" for r in recs)


def test_worker_lines_carry_the_job_id(server):
    assert RAN, "the job test did not run"
    assert any(r.get("job_id") == RAN[0] and "worker" in r for r in json_lines(server))
