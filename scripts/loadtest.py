"""The serving path, measured from the outside: one table, before and after.

    python scripts/loadtest.py                        # the code this script is in
    python scripts/loadtest.py --baseline-ref HEAD~3  # ... and that commit, side by side, with ratios
    python scripts/loadtest.py --compare /src/old --root /src/new --json out.json
    python scripts/loadtest.py --quick                # every section at toy scale (CI)
    python scripts/loadtest.py --only poll,history    # sections: polls submit poll history worker pollers

Each version runs as a user runs it: `python -c "from server.cli import main; main()" serve` with
PYTHONPATH=<its root>, on a free loopback port and a temporary data dir, configured only by
flags and `WAN_VACE_*` variables (yours pass through). Nothing here imports the server: the HTTP
API and the jobs table of `<data_dir>/jobs.sqlite3` (read with PRAGMA table_info, so any schema
version works) are all it relies on, so the same script measures old and new code in one run.
`--baseline-ref` extracts the commit with `git archive | tar -x`; the repository is not touched.

Sections (each runs for every version, the baseline first, so the ratio is same-machine, same-run):
  polls    GET .../result of one completed job at 4, 64, 256 connections: polls/s, p50, p99
  submit   POST submits/s at 4 and 64 connections (--workers 0: nothing runs them)
  poll     a queued job at the back of 100 / 3,000 / 10,000 queued: sequential ms, polls/s at 64
  history  POST /api/v3/predictions page 1 and the last page (100 a page) at 1k / 100k rows; /health
  worker   one tiny-model worker: per-job time, jobs/min, job-to-job gap, idle pick-up latency
  pollers  one job alone vs under 4 pollers polling it as fast as they can

Big tables are filled version-independently: a few jobs by HTTP, then a row copied in SQL with
new ids and earlier created_at (unique columns other than the id left NULL), then the server is
restarted so whatever it keeps in memory starts from the file; /health's queue_depth and the
history total are checked against the rows written.

Honesty: the load generator (wrk, else the built-in one in scripts/loadgen.py) shares the CPU
with the server; the table's header says how many cores, which tool and how long each run was.
Every server is warmed up (sequential requests, and a short run of the tool) before it is measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
from loadserver import KEY, MODEL_PATH, Server, duplicate, job_times

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("polls", "submit", "poll", "history", "worker", "pollers")
WORKER_SECTIONS = {"worker", "pollers"}
# Sections that poll or page completed jobs: they start from a data dir where a worker made one.
NEEDS_DONE = {"polls", "poll", "history"}

# A small job: 5 s of 832x480 video, which the tiny model renders at 1/8 size, then scales up
# and encodes: a few seconds of one core.
SMALL_JOB = {
    "prompt": "a cat walks on the beach",
    "size": "832*480",
    "duration": 5,
    "num_inference_steps": 2,
    "seed": 7,
}

FULL = {
    "duration": 5,
    "conns": (4, 64, 256),
    "submit_conns": (4, 64),
    "queue": (100, 3000, 10000),
    "history": (1000, 100000),
    "seq": 200,
    "jobs": 6,
    "pickups": 7,
    "idle_s": 1.0,
    "runs": 2,
    "pollers_steps": 10,
    "warm_jobs": 1,
}
QUICK = {
    "duration": 1,
    "conns": (4, 64, 256),
    "submit_conns": (4, 64),
    "queue": (10, 100),
    "history": (100, 1000),
    "seq": 30,
    "jobs": 2,
    "pickups": 1,
    "idle_s": 0.5,
    "runs": 1,
    "pollers_steps": 2,
    "warm_jobs": 0,
}


# --- results ------------------------------------------------------------------------------


class Rows:
    """One section's rows for one version: key -> (what, value, tool)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self.notes: list[str] = []

    def add(self, key: str, what: str, value: float, tool: str = "", *, signed: bool = False) -> None:
        self.rows[key] = {"what": what, "value": float(value), "tool": tool, "signed": signed}


def load_rows(out: Rows, key: str, what: str, r: dict) -> None:
    tool = f"{r['tool']} -c{r['connections']} {r['duration_s']:.1f}s"
    out.add(f"{key}_rps", f"{what}: per second", r["rps"], tool)
    out.add(f"{key}_p50", f"{what}: p50 ms", r["p50_ms"], tool)
    out.add(f"{key}_p99", f"{what}: p99 ms", r["p99_ms"], tool)
    if r["errors"]:
        out.notes.append(f"{what}: {r['errors']} of {r['requests']} requests failed or were not 2xx")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --- one version of the code --------------------------------------------------------------


class Bench:
    def __init__(self, root: Path, label: str, work: Path, scale: dict, opts: argparse.Namespace):
        self.root, self.label, self.work, self.scale, self.opts = root, label, work, scale, opts
        self.done_dir: Path | None = None  # a stopped server's data dir with completed jobs
        self.done_id = ""
        self._pickups: list[float] = []  # ms from submit to start, of jobs sent to an idle worker
        self._start_col = ""
        self._n = 0

    def _dir(self, name: str) -> Path:
        self._n += 1
        return self.work / f"{self._n:02d}-{name}"

    def api(self, data_dir: Path, **env: str) -> Server:
        return Server(self.root, data_dir, workers=0, env={"WAN_VACE_MAX_QUEUE": "100000000", **env})

    def load(self, srv: Server, path: str, conns: int, duration: float | None = None, **kw) -> dict:
        return loadgen.run(
            srv.url + path,
            connections=conns,
            duration=duration or self.scale["duration"],
            headers=[f"Authorization: Bearer {KEY}"],
            tool=self.opts.tool,
            **kw,
        )

    def warm(self, srv: Server, path: str, method: str = "GET", body: dict | None = None) -> None:
        srv.timed(method, path, body, 30)
        if not self.opts.quick:
            self.load(srv, path, 16, 1, method=method, body=json.dumps(body) if body is not None else None)

    def copy_done(self, name: str) -> Path:
        if self.done_dir is None or not self.done_id:
            raise RuntimeError("no completed job to start from: the worker sections failed for this version")
        dst = self._dir(name)
        shutil.copytree(self.done_dir, dst, ignore=shutil.ignore_patterns("server.log"))
        return dst

    # worker + pollers: one tiny-model server; it also leaves the completed jobs the rest poll.
    def worker_phase(self, sections: set[str]) -> dict[str, Rows]:
        """worker and pollers on one tiny-model server, which also leaves the completed jobs
        the other sections poll and page (one job is run for them when neither is asked for)."""
        env = {"WAN_VACE_CPU_THREADS": str(self.opts.cpu_threads)}
        if self.opts.quick:  # CI scale: the encoder's fastest preset, unless one is set
            env["WAN_VACE_ENCODE_PRESET"] = os.environ.get("WAN_VACE_ENCODE_PRESET", "ultrafast")
        srv = Server(self.root, self._dir("worker"), workers=1, env=env)
        out = {s: Rows() for s in sections}
        try:
            t = time.monotonic()
            srv.start()
            startup = time.monotonic() - t
            if not sections:
                self.done_id = srv.submit(SMALL_JOB)
                srv.wait_done(self.done_id)
                return out
            for _ in range(self.scale["warm_jobs"]):
                srv.wait_done(srv.submit(SMALL_JOB))
            self._pickups = []
            if "worker" in sections:
                self._batch(srv, out["worker"], startup)
            if "pollers" in sections:
                self._pollers(srv, out["pollers"])
            if "worker" in sections:  # after the pollers: their jobs alone are pick-up samples too
                self._pickup(srv, out["worker"])
        finally:
            srv.stop()
            self.done_dir = srv.data_dir
        return out

    def _idle_job(self, srv: Server, body: dict) -> tuple[dict, str, str]:
        """A job submitted to a worker idle for longer than any poll interval; its pick-up
        latency is kept as a sample."""
        time.sleep(self.scale["idle_s"])
        jid = srv.submit(body)
        srv.wait_done(jid)
        self.done_id = jid
        (tm,), start_col, end_col = job_times(srv.db, [jid])
        self._pickups.append((tm["start"] - tm["created"]) * 1000)
        self._start_col = start_col
        return tm, start_col, end_col

    def _pickup(self, srv: Server, out: Rows) -> None:
        while len(self._pickups) < self.scale["pickups"]:
            self._idle_job(srv, SMALL_JOB)
        samples = self._pickups
        what = f"idle worker picks up a job: {self._start_col} - created_at, ms"
        out.add("pickup_ms", f"{what} (median of {len(samples)})", median(samples), "store timestamps")
        out.add("pickup_max_ms", f"{what} (max of {len(samples)})", max(samples), "store timestamps")

    def _pollers(self, srv: Server, out: Rows) -> None:
        heavy = {**SMALL_JOB, "num_inference_steps": self.scale["pollers_steps"]}
        alone, under, rates = [], [], []
        for _ in range(self.scale["runs"]):  # alternated, so drift in the host hits both alike
            tm, start_col, end_col = self._idle_job(srv, heavy)
            alone.append(tm["end"] - tm["start"])
            jid = srv.submit(heavy)
            # Clients polling their own job, as fast as they can, for exactly as long as it runs.
            poll = loadgen.Load(
                f"{srv.url}/api/v3/predictions/{jid}/result",
                connections=4,
                duration=3600,
                headers=[f"Authorization: Bearer {KEY}"],
                tool=self.opts.tool,
            )
            try:
                srv.wait_done(jid)
            finally:
                r = poll.stop()
            rates.append(r["rps"])
            (tm,), _, _ = job_times(srv.db, [jid])
            under.append(tm["end"] - tm["start"])
        what = f"{heavy['num_inference_steps']}-step job"
        n = len(alone)
        out.add(
            "alone_s",
            f"{what} alone: {end_col} - {start_col}, median of {n}, s",
            median(alone),
            "store timestamps",
        )
        out.add("under_s", f"{what} under 4 pollers, median of {n}, s", median(under), "store timestamps")
        out.add("slowdown", f"{what}: under 4 pollers / alone", median(under) / median(alone))
        out.add("poller_rps", "the 4 pollers' polls/s meanwhile", median(rates), f"{r['tool']} -c4")

    def _batch(self, srv: Server, out: Rows, startup: float) -> None:
        n = self.scale["jobs"]
        t = time.monotonic()
        ids = [srv.submit(SMALL_JOB) for _ in range(n)]
        for jid in ids:
            srv.wait_done(jid)
        wall = time.monotonic() - t
        times, start_col, end_col = job_times(srv.db, ids)
        times.sort(key=lambda x: x["start"])
        gaps = [b["start"] - a["end"] for a, b in itertools.pairwise(times)]
        span = max(x["end"] for x in times) - min(x["start"] for x in times)
        out.add(
            "job_s",
            f"per job ({end_col} - {start_col}, median of {n}), s",
            median([x["end"] - x["start"] for x in times]),
            "store timestamps",
        )
        out.add("jobs_per_min", f"jobs per minute ({n} submitted at once)", n * 60 / span, "store timestamps")
        out.add(
            "gap_ms",
            f"job-to-job gap: next {start_col} - previous {end_col}, median ms (< 0: overlap)",
            median(gaps) * 1000,
            "store timestamps",
            signed=True,
        )
        ends = sorted(x["end"] for x in times)
        out.add(
            "interval_s",
            f"between one completion and the next ({end_col}), median s",
            median([b - a for a, b in itertools.pairwise(ends)]),
            "store timestamps",
        )
        out.add("wall_s", f"{n} jobs, first submit to last seen completed, s", wall, "client clock")
        out.notes.append(
            f"worker: startup to ready {startup:.1f} s; WAN_VACE_CPU_THREADS={self.opts.cpu_threads}"
        )

    def polls(self) -> Rows:
        out = Rows()
        srv = self.api(self.copy_done("polls")).start()
        try:
            path = f"/api/v3/predictions/{self.done_id}/result"
            self.warm(srv, path)
            out.add(
                "seq_ms",
                "poll of a completed job, sequential, median ms",
                median(srv.timed("GET", path, None, self.scale["seq"])),
                "http.client, 1 connection",
            )
            for c in self.scale["conns"]:
                load_rows(
                    out, f"c{c}", f"polls of a completed job at {c} connections", self.load(srv, path, c)
                )
        finally:
            srv.stop()
        return out

    def submit(self) -> Rows:
        out = Rows()
        srv = self.api(self._dir("submit")).start()
        try:
            body = json.dumps(SMALL_JOB)
            self.warm(srv, MODEL_PATH, "POST", SMALL_JOB)
            before = srv.get("/health").get("queue_depth")
            for c in self.scale["submit_conns"]:
                load_rows(
                    out,
                    f"c{c}",
                    f"submits at {c} connections",
                    self.load(srv, MODEL_PATH, c, method="POST", body=body),
                )
            if before is not None:
                out.notes.append(f"submit: {srv.get('/health').get('queue_depth', 0) - before} jobs accepted")
        finally:
            srv.stop()
        return out

    def poll(self) -> Rows:
        out = Rows()
        srv = self.api(self.copy_done("poll")).start()
        try:
            first = srv.submit(SMALL_JOB)
            last = srv.submit(SMALL_JOB)  # created after every copy: the back of the queue
            made = 2
            for n in self.scale["queue"]:
                duplicate(srv.db, first, n - made, skip=made - 2)
                made = n
                srv.restart()
                depth = srv.get("/health").get("queue_depth")
                if depth is not None and depth != n:
                    out.notes.append(f"poll: /health says {depth} queued where {n} were written")
                path = f"/api/v3/predictions/{last}/result"
                self.warm(srv, path)
                pos = srv.get(path)["data"].get("queue_position")
                if pos is not None and pos != n - 1:
                    out.notes.append(f"poll: the last job's queue_position is {pos}, not {n - 1}")
                seq = self.scale["seq"]
                out.add(
                    f"q{n}_seq_ms",
                    f"poll of the last of {n} queued, sequential, median ms",
                    median(srv.timed("GET", path, None, seq)),
                    "http.client, 1 connection",
                )
                out.add(
                    f"q{n}_done_ms",
                    f"poll of a completed job with {n} queued, sequential, median ms",
                    median(srv.timed("GET", f"/api/v3/predictions/{self.done_id}/result", None, seq)),
                    "http.client, 1 connection",
                )
                r = self.load(srv, path, 64)
                load_rows(out, f"q{n}_c64", f"polls of the last of {n} queued at 64 connections", r)
        finally:
            srv.stop()
        return out

    def history(self) -> Rows:
        out = Rows()
        srv = self.api(self.copy_done("history"))
        with sqlite3.connect(srv.db, timeout=60) as c:
            have = c.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        made = 0
        try:
            for n in self.scale["history"]:
                duplicate(srv.db, self.done_id, n - have - made, skip=made)
                made = max(made, n - have)
                srv.start() if srv.proc is None else srv.restart()
                pages = math.ceil(n / 100)
                first, last = {"page": 1, "page_size": 100}, {"page": pages, "page_size": 100}
                self.warm(srv, "/api/v3/predictions", "POST", first)
                total = srv.request("POST", "/api/v3/predictions", first)[1]["data"].get("total")
                if total != n:
                    out.notes.append(f"history: total {total} where {n} rows were written")
                seq = max(10, self.scale["seq"] // 4)
                for key, body, what in (
                    ("first", first, "page 1"),
                    ("last", last, f"the last page ({pages})"),
                ):
                    out.add(
                        f"h{n}_{key}_ms",
                        f"history {what} of 100 at {n} rows, sequential, median ms",
                        median(srv.timed("POST", "/api/v3/predictions", body, seq)),
                        "http.client, 1 connection",
                    )
                out.add(
                    f"h{n}_health_ms",
                    f"/health at {n} rows, sequential, median ms",
                    median(srv.timed("GET", "/health", None, seq)),
                    "http.client, 1 connection",
                )
        finally:
            srv.stop()
        return out


# --- the run ------------------------------------------------------------------------------


def git_commit(root: Path) -> str:
    """The checkout's commit, read only (and whether tracked files differ from it)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return "unknown (not the top of a git checkout)"
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def extract(repo: Path, ref: str, dest: Path) -> str:
    """The commit's tree in dest (git archive: the repository's state is left as it is);
    returns its short hash."""
    sha = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", ref + "^{commit}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(repo), "archive", sha], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {ref} failed")
    return sha


def fmt(v: float | None) -> str:
    if v is None:
        return ""
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def table(result: dict) -> str:
    cmp = "before" in result["meta"]["versions"]
    head = ["section", "what", "tool", *(["before", "after", "after/before"] if cmp else ["value"])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sec, body in result["sections"].items():
        for row in body["rows"]:
            vals = (
                [fmt(row.get("before")), fmt(row["after"]), fmt(row.get("ratio"))]
                if cmp
                else [fmt(row["after"])]
            )
            lines.append("| " + " | ".join([sec, row["what"], row["tool"], *vals]) + " |")
    notes = [
        f"- {v}: {n}" for body in result["sections"].values() for v, ns in body["notes"].items() for n in ns
    ]
    return "\n".join(lines + ([""] + notes if notes else []))


def measure(benches: dict[str, Bench], only: list[str]) -> tuple[dict[str, dict[str, Rows]], bool]:
    """Every section for every version, the baseline first; a section that fails for one
    version is reported (notes, exit status 1) and the rest still run."""
    results: dict[str, dict[str, Rows]] = {s: {} for s in only}
    failed = False

    def attempt(label: str, names: list[str], fn) -> None:
        nonlocal failed
        what = ", ".join(names) or "a completed job for the other sections"
        t = time.monotonic()
        try:
            got = fn()
        except Exception as e:  # noqa: BLE001
            # One broken version or section must not lose the others' numbers.
            failed = True
            traceback.print_exc()
            got = {}
            for s in names:
                got[s] = Rows()
                got[s].notes.append(f"{s} FAILED: {type(e).__name__}: {str(e)[:2000]}")
        print(f"# {label}: {what} ({time.monotonic() - t:.1f} s)", file=sys.stderr)
        for s in names:
            results[s][label] = got[s]

    wanted = set(only)
    # The worker sections run first: they leave the completed jobs the others poll and page.
    if wanted & (WORKER_SECTIONS | NEEDS_DONE):
        for label, b in benches.items():
            ws = [s for s in only if s in WORKER_SECTIONS]
            attempt(label, ws, lambda b=b, ws=ws: b.worker_phase(set(ws)))
    for s in only:
        if s not in WORKER_SECTIONS:
            for label, b in benches.items():
                attempt(label, [s], lambda b=b, s=s: {s: getattr(b, s)()})
    return results, failed


def merge(results: dict[str, dict[str, Rows]], only: list[str]) -> dict[str, dict]:
    """One row per measured quantity with each version's value and the ratio after/before."""
    sections = {}
    for s in only:
        per = results[s]
        keys: dict[str, dict] = {}
        for rows in per.values():
            for key, row in rows.rows.items():
                keys.setdefault(key, row)
        out = []
        for key, row in keys.items():
            r = {"key": key, "what": row["what"], "tool": row["tool"], "signed": row["signed"]}
            for v in ("before", "after"):
                if v in per:
                    r[v] = per[v].rows[key]["value"] if key in per[v].rows else None
            if r.get("before") and r.get("after") is not None:
                r["ratio"] = r["after"] / r["before"]
            out.append(r)
        sections[s] = {"rows": out, "notes": {v: per[v].notes for v in per}}
    return sections


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=REPO, help="the code to measure (default: this repository)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compare", type=Path, metavar="OLD_DIR", help="also measure the code in this folder")
    g.add_argument("--baseline-ref", metavar="GIT_REF", help="also measure this commit of the repository")
    p.add_argument("--quick", action="store_true", help="every section at toy scale (seconds; for CI)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results here")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated, of: {' '.join(SECTIONS)}")
    p.add_argument(
        "--tool",
        choices=("auto", "wrk", "builtin"),
        default="auto",
        help="load generator (auto: wrk when on PATH)",
    )
    p.add_argument(
        "--cpu-threads", type=int, default=1, help="WAN_VACE_CPU_THREADS of the worker (default 1)"
    )
    a = p.parse_args()
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad or not only:
        p.error(f"--only: unknown section(s) {', '.join(bad) or '(none)'}; choose from {', '.join(SECTIONS)}")
    scale = QUICK if a.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="loadtest-"))
    try:
        versions: dict[str, dict] = {}
        benches: dict[str, Bench] = {}
        if a.baseline_ref or a.compare:
            old = a.compare.resolve() if a.compare else work / "baseline-src"
            # The ref is looked up in the checkout being measured, else in this script's.
            repo = a.root if git_commit(a.root.resolve()).split()[0] != "unknown" else REPO
            commit = extract(repo, a.baseline_ref, old) if a.baseline_ref else git_commit(old)
            versions["before"] = {"root": str(old), "commit": commit}
            benches["before"] = Bench(old, "before", work / "before", scale, a)
        versions["after"] = {"root": str(a.root.resolve()), "commit": git_commit(a.root.resolve())}
        benches["after"] = Bench(a.root.resolve(), "after", work / "after", scale, a)
        tool = ("wrk" if loadgen.wrk_path() else "built-in") if a.tool == "auto" else a.tool
        meta = {
            "cpu_count": os.cpu_count(),
            "quick": a.quick,
            "tool": tool,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "scale": scale,
            "versions": versions,
            "small_job": SMALL_JOB,
            "sections": only,
        }
        print(
            f"# loadtest: {os.cpu_count()} CPUs (shared by the load generator and the servers), tool {tool}, "
            f"{'quick' if a.quick else 'full'} scale",
            file=sys.stderr,
        )
        for b in benches.values():
            b.work.mkdir(parents=True)
        results, failed = measure(benches, only)
        result = {"meta": meta, "sections": merge(results, only)}
        print(
            f"\n{os.cpu_count()} CPUs shared by the load generator and the server; load tool: {tool}; "
            f"load runs of {scale['duration']} s after a warm-up; worker: {a.cpu_threads} torch thread(s), "
            f"jobs {SMALL_JOB['size']} x {SMALL_JOB['duration']} s at {SMALL_JOB['num_inference_steps']} steps "
            f"(pollers: {scale['pollers_steps']} steps) on the tiny model"
            f"{', encode preset ultrafast' if a.quick and 'WAN_VACE_ENCODE_PRESET' not in os.environ else ''}; "
            "versions: " + "; ".join(f"{k} = {v['commit']} ({v['root']})" for k, v in versions.items()) + "\n"
        )
        print(table(result))
        if a.json:
            a.json.write_text(json.dumps(result, indent=2, allow_nan=True))
        return 1 if failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
