"""The control plane under a cluster's load: claims per second and poll latency against
PostgreSQL with many idle workers, with the embedded SQLite store as the baseline in the same run.

    python scripts/bench_claims.py [--database-url postgresql://postgres@127.0.0.1:5432/test]
        [--idle-workers 32] [--processes 4] [--jobs 400] [--claimers 4] [--seconds 5] [--json out.json]

Three measurements per backend, each in fresh processes (spawned; every process has its own
connections, as workers on other machines do):

1. idle: `--idle-workers` workers (threads spread over `--processes` processes) each asking the
   store for a job every `--poll-interval` seconds on an empty queue, for `--seconds`; meanwhile
   one poller reads a job (`store.get`, what `GET .../result` costs the store) as fast as it
   can: its p50/p99 latency, and how many empty claims per second the idle workers cost.
2. claims: `--jobs` jobs queued, then `--claimers` processes claim and complete them as fast as
   they can: jobs per second, and a check that every job was claimed exactly once.
3. pick-up: one idle worker; a job is created; the time until the worker holds it. With
   PostgreSQL the worker waits on LISTEN (a NOTIFY at commit wakes it); with SQLite it polls
   every `--poll-interval` (on one host the API nudges its workers over a socket instead).

PostgreSQL runs in a scratch database created on the server and dropped at the end. The load
generator shares this machine's cores with the server, so absolute numbers say little about a
dedicated database host; the ratios and the exactly-once check are the point.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.store import CHANNEL_QUEUED, JobStore, NewJob, open_store  # noqa: E402


def make_store(url: str, pool: int = 4) -> JobStore:
    """The store `url` names, as the server opens it (SQLite for `sqlite:///path`)."""
    return open_store(SimpleNamespace(database_url=url, database_pool_size=pool, sqlite_path=None))


def close_store(store: JobStore) -> None:
    close = getattr(store, "close", None)
    if callable(close):
        close()


def new_job(i: int | str) -> NewJob:
    return NewJob(id=f"job-{i}-{uuid.uuid4().hex[:8]}", model="bench", input={"prompt": str(i)},
                  base_url="http://bench", max_attempts=1)  # fmt: skip


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


# --- processes ---------------------------------------------------------------------------------
def _idle_process(url: str, threads: int, poll: float, until: float, out: Any) -> None:
    store = make_store(url, pool=min(threads, 8))
    counts = [0] * threads

    def idle(k: int) -> None:
        wid = f"idle-{os.getpid()}-{k}"
        while time.time() < until:
            job = store.claim(wid, 30)
            if job is not None:  # none are queued during this phase; hand it back if one is
                store.release_worker(wid, "bench", graceful=True)
            counts[k] += 1
            time.sleep(poll)

    ts = [threading.Thread(target=idle, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    close_store(store)
    out.put(sum(counts))


def _claimer_process(url: str, name: str, out: Any) -> None:
    store = make_store(url, pool=2)
    took = []
    while (job := store.claim(name, 30)) is not None:
        store.complete(job.id, name, outputs=[], has_nsfw=[], inference_ms=0, seed=None, extra={})
        took.append(job.id)
    close_store(store)
    out.put(took)


def _pickup_process(url: str, poll: float, ready: Any, out: Any, rounds: int) -> None:
    store = make_store(url, pool=2)
    events = store.listen(CHANNEL_QUEUED)
    ready.set()
    got = []
    deadline = time.time() + 60
    while len(got) < rounds and time.time() < deadline:
        job = store.claim("pickup", 30)
        if job is None:
            if events is not None:
                events.wait(1.0)  # the fallback poll is slow: a NOTIFY is what wakes it
            else:
                time.sleep(poll)
            continue
        got.append(time.time() - float(job.input["t"]))
        store.complete(job.id, "pickup", outputs=[], has_nsfw=[], inference_ms=0, seed=None, extra={})
    if events is not None:
        events.close()
    close_store(store)
    out.put(got)


# --- measurements ------------------------------------------------------------------------------
def measure_idle(ctx: Any, url: str, a: argparse.Namespace) -> dict[str, float]:
    store = make_store(url)
    target, _ = store.create(new_job("target"))
    out = ctx.Queue()
    per = max(1, a.idle_workers // a.processes)
    until = time.time() + a.seconds + 2.0  # 2 s for the processes to start and connect
    procs = [ctx.Process(target=_idle_process, args=(url, per, a.poll_interval, until, out))
             for _ in range(a.processes)]  # fmt: skip
    for p in procs:
        p.start()
    time.sleep(2.0)
    lat: list[float] = []
    end = time.time() + a.seconds
    while time.time() < end:
        t0 = time.perf_counter()
        store.get(target.id)
        lat.append(time.perf_counter() - t0)
    claims = sum(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join()
    close_store(store)
    return {
        "idle_workers": per * a.processes,
        "empty_claims_per_s": claims / (a.seconds + 2.0),
        "poll_p50_ms": pct(lat, 0.5) * 1000,
        "poll_p99_ms": pct(lat, 0.99) * 1000,
        "polls_per_s": len(lat) / a.seconds,
    }


def measure_claims(ctx: Any, url: str, a: argparse.Namespace) -> dict[str, float]:
    store = make_store(url)
    ids = {store.create(new_job(i))[0].id for i in range(a.jobs)}
    out = ctx.Queue()
    procs = [ctx.Process(target=_claimer_process, args=(url, f"claimer-{k}", out)) for k in range(a.claimers)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    took = [j for _ in procs for j in out.get(timeout=300)]
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    done = sum(1 for i in ids if store.get(i).status.value == "completed")
    close_store(store)
    return {
        "jobs": a.jobs,
        "claimers": a.claimers,
        "claims_per_s": len(took) / elapsed,
        "claimed_twice": len(took) - len(set(took)),
        "never_claimed": len(ids - set(took)),
        "completed": done,
    }


def measure_pickup(ctx: Any, url: str, a: argparse.Namespace, rounds: int = 10) -> dict[str, float]:
    store = make_store(url)
    ready, out = ctx.Event(), ctx.Queue()
    p = ctx.Process(target=_pickup_process, args=(url, a.poll_interval, ready, out, rounds))
    p.start()
    ready.wait(30)
    time.sleep(0.5)
    for i in range(rounds):
        job = new_job(f"pickup{i}")
        job.input["t"] = time.time()
        store.create(job)
        time.sleep(0.3)
    got = out.get(timeout=90)
    p.join()
    close_store(store)
    return {"pickup_p50_ms": pct(got, 0.5) * 1000, "pickup_max_ms": max(got) * 1000, "rounds": len(got)}


def scratch_database(server_url: str) -> tuple[str, Any]:
    """A fresh database on the server of `server_url`; returns its URL and a function dropping it."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    name = f"wan_vace_bench_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {name}")
        c.execute(f"CREATE DATABASE {name}")
    url = urlunsplit(urlsplit(server_url)._replace(path="/" + name))

    def drop() -> None:
        with psycopg.connect(server_url, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    return url, drop


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="a PostgreSQL server to create a scratch database on")  # fmt: skip
    ap.add_argument("--idle-workers", type=int, default=32)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--poll-interval", type=float, default=0.25)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--claimers", type=int, default=4)
    ap.add_argument("--skip-sqlite", action="store_true", help="PostgreSQL only (no baseline)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    results: dict[str, dict[str, Any]] = {}
    tmp = tempfile.TemporaryDirectory()
    # A URL for the whole store, not a connection string: each phase gets a fresh one.
    backends: list[tuple[str, Any]] = []
    if not a.skip_sqlite:
        backends.append(("sqlite", lambda k: (f"sqlite:///{tmp.name}/{k}.sqlite3", lambda: None)))
    backends.append(("postgres", lambda k: scratch_database(a.database_url)))
    for name, fresh in backends:
        r: dict[str, Any] = {}
        for phase, fn in (("idle", measure_idle), ("claims", measure_claims), ("pickup", measure_pickup)):
            url, drop = fresh(phase)
            try:
                r.update(fn(ctx, url, a))
            finally:
                drop()
        results[name] = r
        print(f"{name}: {json.dumps(r)}", file=sys.stderr)
    tmp.cleanup()

    rows = [
        ("poll latency p50 (ms), idle workers polling", "poll_p50_ms"),
        ("poll latency p99 (ms), idle workers polling", "poll_p99_ms"),
        ("empty claims/s served (idle workers)", "empty_claims_per_s"),
        ("claims+completes/s", "claims_per_s"),
        ("job pick-up p50 (ms)", "pickup_p50_ms"),
        ("job pick-up max (ms)", "pickup_max_ms"),
    ]
    names = list(results)
    print(f"\n{a.idle_workers} idle workers in {a.processes} processes polling every {a.poll_interval:g} s; "
          f"{a.jobs} jobs over {a.claimers} claimers; {os.cpu_count()} cores shared with the server(s)\n")  # fmt: skip
    head = "| measure | " + " | ".join(names) + (" | postgres / sqlite |" if len(names) == 2 else " |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for label, key in rows:
        vals = [results[n][key] for n in names]
        ratio = f" {vals[1] / vals[0]:.2f}x |" if len(names) == 2 and vals[0] else (" - |" if len(names) == 2 else "")
        print(f"| {label} | " + " | ".join(f"{v:.2f}" for v in vals) + " |" + ratio)
    for n in names:
        c = results[n]
        ok = c["claimed_twice"] == 0 and c["never_claimed"] == 0 and c["completed"] == c["jobs"]
        print(f"\n{n}: exactly once: {'yes' if ok else 'NO'} (claimed twice {c['claimed_twice']}, "
              f"never claimed {c['never_claimed']}, completed {c['completed']} of {c['jobs']})")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r["claimed_twice"] == 0 and r["never_claimed"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
