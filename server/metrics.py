"""What `GET /metrics` exports (Prometheus), read from the store at scrape time.

Nothing is counted in the API process: every number comes from the store's rows when Prometheus
scrapes, so every API replica in front of one store reports the same, and a replica that just
started knows the whole story. Each scrape costs a few bounded queries:

- `wan_vace_jobs{status}` (gauge): jobs per status now, from the store's kept counts;
  `wan_vace_queue_depth` the queued ones;
- `wan_vace_jobs_finished_total{status}` (counter): jobs that ended completed, failed or
  cancelled; it only grows while their rows are kept (`job_retention_seconds` pruning rows reads
  as a counter reset), so `rate()` of it is the throughput;
- `wan_vace_workers{state}` and one `wan_vace_worker_info{worker,host,model,state,...}` per
  worker, judged alive as /health judges them (server/capacity.py); a worker's heartbeat age,
  and its GPU memory when its row carries `gpu_memory_bytes` (and `gpu_memory_total_bytes`);
- durations as gauge histograms over the jobs that finished in the last `metrics_window`
  seconds (at most the latest `_WINDOW_ROWS` of them), read by the store's index on finished_at:
  `wan_vace_job_duration_seconds{status}` (start of the last attempt to the end),
  `wan_vace_job_queue_wait_seconds` (submit to the last claim) and
  `wan_vace_step_duration_seconds` (a completed job's denoising time over its steps).

A gauge histogram's buckets fall again as jobs leave the window: read a quantile with
`histogram_quantile(0.9, wan_vace_job_duration_seconds_bucket)`, no `rate()`; cumulative
histograms would need counters written with every transition, which the job rows alone cannot
give at a bounded cost.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from server.capacity import capacity
from server.kernel.jobstate import State, WorkerState
from server.kernel.request import FIELDS
from server.state import AppState
from server.store import JobTiming

# A burst of tiny jobs cannot make one scrape read more rows than this.
_WINDOW_ROWS = 10_000
_TERMINAL = (State.COMPLETED.value, State.FAILED.value, State.CANCELLED.value)
_DEFAULT_STEPS = next(f.default for f in FIELDS if f.name == "num_inference_steps")

# Seconds. A job on the tiny model takes seconds; a 14B one at 720p, tens of minutes.
JOB_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
WAIT_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600)
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)


def _histogram(values: Iterable[float], bounds: Sequence[float]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) buckets ending with +Inf, and the sum."""
    vals = list(values)
    buckets = [(repr(float(b)), float(sum(1 for v in vals if v <= b))) for b in bounds]
    buckets.append(("+Inf", float(len(vals))))
    return buckets, float(sum(vals))


def _steps(t: JobTiming) -> int:
    return t.steps if isinstance(t.steps, int) and t.steps > 0 else _DEFAULT_STEPS


class StoreCollector(Collector):
    """A prometheus-client collector over one app's store, built per scrape."""

    def __init__(self, st: AppState):
        self.st = st

    def collect(self) -> Iterator[Metric]:
        yield from self._jobs()
        yield from self._workers()
        yield from self._durations()
        yield from self._storage()

    def _storage(self) -> Iterator[Metric]:
        """Disk use as the last retention pass measured it (never a walk per scrape); absent
        until a pass ran in this process (another API process sharing the store may run them)."""
        retention = self.st.retention
        last = retention.last if retention is not None else None
        if last is None or last.bytes is None:
            return
        yield GaugeMetricFamily(
            "wan_vace_storage_bytes", "Bytes in media storage at the last cleanup pass.", value=last.bytes
        )
        yield GaugeMetricFamily(
            "wan_vace_storage_files", "Files in media storage at the last cleanup pass.", value=last.files
        )
        yield GaugeMetricFamily(
            "wan_vace_storage_measured_timestamp_seconds",
            "When the last cleanup pass measured storage (unix time).",
            value=last.at,
        )

    def _jobs(self) -> Iterator[Metric]:
        counts = self.st.store.count_by_status()
        now = GaugeMetricFamily("wan_vace_jobs", "Jobs in the store by status, now.", labels=["status"])
        for s in State:
            now.add_metric([s.value], counts.get(s.value, 0))
        yield now
        yield GaugeMetricFamily(
            "wan_vace_queue_depth",
            "Jobs queued, waiting for a worker.",
            value=counts.get(State.CREATED.value, 0),
        )
        done = CounterMetricFamily(
            "wan_vace_jobs_finished",
            "Jobs that ended, by final status (rows kept in the store).",
            labels=["status"],
        )
        for s in _TERMINAL:
            done.add_metric([s], counts.get(s, 0))
        yield done

    def _workers(self) -> Iterator[Metric]:
        workers = capacity(self.st).workers
        by_state = GaugeMetricFamily(
            "wan_vace_workers", "Workers by state (dead: no heartbeat).", labels=["state"]
        )
        states: dict[str, int] = {s.value: 0 for s in WorkerState if s is not WorkerState.STOPPED}
        states["dead"] = 0
        for w in workers:
            states[w["state"]] = states.get(w["state"], 0) + 1
        for state, n in states.items():
            by_state.add_metric([state], n)
        yield by_state
        info = InfoMetricFamily(
            "wan_vace_worker",
            "One per worker: where it runs and what it does.",
            labels=["worker", "host", "pid", "model", "state"],
        )
        age = GaugeMetricFamily(
            "wan_vace_worker_heartbeat_age_seconds",
            "Seconds since the worker's last heartbeat.",
            labels=["worker"],
        )
        gpu = GaugeMetricFamily(
            "wan_vace_worker_gpu_memory_bytes", "GPU memory the worker's process holds.", labels=["worker"]
        )
        gpu_total = GaugeMetricFamily(
            "wan_vace_worker_gpu_memory_total_bytes", "GPU memory of the worker's device.", labels=["worker"]
        )
        for w in workers:
            labels = [w["id"], w["host"], str(w["pid"]), w["model"], w["state"]]
            info.add_metric(labels, {"device": str(w.get("device", "")), "kind": str(w.get("kind", ""))})
            age.add_metric([w["id"]], w["heartbeat_age_s"])
            for family, key in ((gpu, "gpu_memory_bytes"), (gpu_total, "gpu_memory_total_bytes")):
                value = _number(w.get(key))
                if value is not None:
                    family.add_metric([w["id"]], value)
        yield from (info, age, gpu, gpu_total)

    def _durations(self) -> Iterator[Metric]:
        window = self.st.settings.metrics_window
        rows = [
            t
            for t in self.st.store.finished_timings(time.time() - window, _WINDOW_ROWS)
            if t.status in _TERMINAL
        ]
        yield GaugeMetricFamily(
            "wan_vace_metrics_window_seconds", "The window the duration histograms cover.", value=window
        )
        started = [t for t in rows if t.started_at is not None]
        job = GaugeHistogramMetricFamily(
            "wan_vace_job_duration_seconds",
            f"Last attempt's start to end, jobs that finished in the last {window:g} s.",
            labels=["status"],
        )
        for status in (State.COMPLETED.value, State.FAILED.value):
            buckets, total = _histogram(
                (t.finished_at - t.started_at for t in started if t.status == status and t.started_at),
                JOB_BUCKETS,
            )
            job.add_metric([status], buckets, total)
        yield job
        buckets, total = _histogram(
            (max(0.0, t.started_at - t.created_at) for t in started if t.started_at), WAIT_BUCKETS
        )
        yield GaugeHistogramMetricFamily(
            "wan_vace_job_queue_wait_seconds",
            f"Submit to the last claim, jobs that finished in the last {window:g} s.",
            buckets=buckets,
            gsum_value=total,
        )
        steps = (
            t.inference_ms / 1000 / _steps(t)
            for t in rows
            if t.status == State.COMPLETED.value and t.inference_ms is not None
        )
        buckets, total = _histogram(steps, STEP_BUCKETS)
        yield GaugeHistogramMetricFamily(
            "wan_vace_step_duration_seconds",
            f"Denoising time per step, jobs completed in the last {window:g} s.",
            buckets=buckets,
            gsum_value=total,
        )


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
