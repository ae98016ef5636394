"""GET /metrics in process (TestClient, `workers=0`): scraped and parsed with prometheus-client's
own parsers, before and after jobs move through the real SQLite store as a worker moves them."""

from __future__ import annotations

import sqlite3
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.settings import MODEL_ID, Settings
from server.store import WorkerInfo

KEY = "k-metrics"


def make_client(tmp_path, **settings) -> TestClient:
    app = create_app(Settings(data_dir=tmp_path, workers=0, api_keys=[KEY], **settings))
    c = TestClient(app)
    c.headers["Authorization"] = f"Bearer {KEY}"
    return c


@pytest.fixture
def app_client(tmp_path):
    with make_client(tmp_path) as c:
        yield c


def scrape(c: TestClient) -> dict[tuple[str, frozenset], float]:
    """Every sample of one scrape, keyed by (sample name, labels)."""
    r = c.get("/metrics", headers={"Authorization": ""})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def submit(c: TestClient, **body) -> str:
    r = c.post(f"/api/v3/{MODEL_ID}", json={"prompt": "a cat", **body})
    assert r.status_code == 200, r.text
    return r.json()["data"]["id"]


def test_counters_and_histograms_move_as_jobs_run(app_client):
    st = app_client.app.state.wan
    before = scrape(app_client)
    assert value(before, "wan_vace_jobs_finished_total", status="completed") == 0
    assert value(before, "wan_vace_job_duration_seconds_gcount", status="completed") == 0

    done = submit(app_client, num_inference_steps=20)
    broken = submit(app_client)
    waiting = submit(app_client)
    queued = scrape(app_client)
    assert value(queued, "wan_vace_jobs", status="created") == 3
    assert value(queued, "wan_vace_queue_depth") == 3

    job = st.store.claim("w-test", 60)
    assert job is not None and job.id == done
    time.sleep(0.05)  # a measurable run
    assert st.store.complete(done, "w-test", outputs=[], has_nsfw=[], inference_ms=6000, seed=1, extra={})
    assert st.store.claim("w-test", 60).id == broken
    st.store.fail(broken, "w-test", code=1403, error="boom")

    after = scrape(app_client)
    assert value(after, "wan_vace_jobs", status="created") == 1  # `waiting`
    assert value(after, "wan_vace_queue_depth") == 1
    assert value(after, "wan_vace_jobs_finished_total", status="completed") == 1
    assert value(after, "wan_vace_jobs_finished_total", status="failed") == 1
    assert value(after, "wan_vace_jobs_finished_total", status="cancelled") == 0
    # The completed job ran from its claim to its end: at least the 50 ms slept, well under 1 s.
    assert value(after, "wan_vace_job_duration_seconds_gcount", status="completed") == 1
    assert 0.05 <= value(after, "wan_vace_job_duration_seconds_gsum", status="completed") < 1
    assert value(after, "wan_vace_job_duration_seconds_bucket", status="completed", le="1.0") == 1
    assert value(after, "wan_vace_job_duration_seconds_gcount", status="failed") == 1
    # Both ended jobs waited in the queue; the one still queued is not in any duration.
    assert value(after, "wan_vace_job_queue_wait_seconds_gcount") == 2
    # 6000 ms over 20 steps = 0.3 s a step: above the 0.25 bound, within 0.5.
    assert value(after, "wan_vace_step_duration_seconds_gcount") == 1
    assert value(after, "wan_vace_step_duration_seconds_gsum") == pytest.approx(0.3)
    assert value(after, "wan_vace_step_duration_seconds_bucket", le="0.25") == 0
    assert value(after, "wan_vace_step_duration_seconds_bucket", le="0.5") == 1
    assert waiting  # still queued: counted above, in no histogram


def test_durations_cover_the_window_only(tmp_path):
    with make_client(tmp_path, metrics_window=600) as c:
        st = c.app.state.wan
        jid = submit(c)
        st.store.claim("w-test", 60)
        st.store.complete(jid, "w-test", outputs=[], has_nsfw=[], inference_ms=100, seed=1, extra={})
        assert value(scrape(c), "wan_vace_job_duration_seconds_gcount", status="completed") == 1
        # The job ended before the window: out of the histograms, still in the counter.
        with sqlite3.connect(st.settings.sqlite_path) as db:
            db.execute("UPDATE jobs SET finished_at = finished_at - 3600 WHERE id = ?", (jid,))
        later = scrape(c)
        assert value(later, "wan_vace_job_duration_seconds_gcount", status="completed") == 0
        assert value(later, "wan_vace_step_duration_seconds_gcount") == 0
        assert value(later, "wan_vace_jobs_finished_total", status="completed") == 1
        assert value(later, "wan_vace_metrics_window_seconds") == 600


def test_workers_states_and_gpu_memory(app_client):
    st = app_client.app.state.wan
    now = time.time()
    st.store.upsert_worker(
        WorkerInfo(id="w-gpu", host="gpu-host", pid=41, model="tiny", state="busy", heartbeat_at=now,
                   started_at=now, info={"device": "cuda", "kind": "tiny", "gpu_memory_bytes": 3 * 2**30,
                                         "gpu_memory_total_bytes": 80 * 2**30})
    )  # fmt: skip
    st.store.upsert_worker(
        WorkerInfo(id="w-cpu", host="cpu-host", pid=42, model="tiny", state="ready", heartbeat_at=now,
                   started_at=now, info={"device": "cpu"})
    )  # fmt: skip
    # Silent for ten minutes on another machine: dead, whatever its row last said.
    st.store.upsert_worker(
        WorkerInfo(id="w-gone", host="far-host", pid=43, model="tiny", state="ready", heartbeat_at=now - 600,
                   started_at=now - 900)
    )  # fmt: skip
    s = scrape(app_client)
    assert value(s, "wan_vace_workers", state="busy") == 1
    assert value(s, "wan_vace_workers", state="ready") == 1
    assert value(s, "wan_vace_workers", state="dead") == 1
    assert value(s, "wan_vace_workers", state="failed") == 0
    assert value(
        s, "wan_vace_worker_info", worker="w-gpu", host="gpu-host", pid="41", model="tiny", state="busy",
        device="cuda", kind="tiny",
    ) == 1  # fmt: skip
    assert value(s, "wan_vace_worker_gpu_memory_bytes", worker="w-gpu") == 3 * 2**30
    assert value(s, "wan_vace_worker_gpu_memory_total_bytes", worker="w-gpu") == 80 * 2**30
    # A CPU worker carries no GPU memory: no sample rather than a made-up zero.
    assert ("wan_vace_worker_gpu_memory_bytes", frozenset({("worker", "w-cpu")})) not in s
    assert value(s, "wan_vace_worker_heartbeat_age_seconds", worker="w-gone") >= 599


def test_openmetrics_when_asked(app_client):
    r = app_client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    types = {f.name: f.type for f in parse_openmetrics(r.text)}
    # The duration buckets can fall as jobs leave the window: a gauge histogram, said so.
    assert types["wan_vace_job_duration_seconds"] == "gaugehistogram"
    assert types["wan_vace_jobs_finished"] == "counter"


def test_metrics_key_setting(tmp_path):
    with make_client(tmp_path, metrics_require_key=True) as c:
        r = c.get("/metrics", headers={"Authorization": ""})
        assert r.status_code == 401 and r.json()["message"].startswith("Missing API key")
        assert c.get("/metrics").status_code == 200


def test_storage_use_as_the_last_cleanup_pass_measured_it(app_client):
    """Disk use is exported from the retention pass's measurement (never a walk per scrape)."""
    st = app_client.app.state.wan
    st.retention.run_once()  # the lifespan's loop may have run one already: measure again now
    before = scrape(app_client)
    n_before = value(before, "wan_vace_storage_files")
    b_before = value(before, "wan_vace_storage_bytes")
    st.storage.put_bytes(st.storage.new_key("uploads", "a.bin"), b"x" * 1000)
    # Unchanged until the next pass measures: a scrape does not walk storage.
    assert value(scrape(app_client), "wan_vace_storage_files") == n_before
    st.retention.run_once()
    after = scrape(app_client)
    assert value(after, "wan_vace_storage_files") == n_before + 1
    assert value(after, "wan_vace_storage_bytes") == b_before + 1000
    assert value(after, "wan_vace_storage_measured_timestamp_seconds") > time.time() - 60
