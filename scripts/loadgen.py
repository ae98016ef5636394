"""HTTP load for scripts/loadtest.py: wrk when it is installed, else a built-in generator.

    python scripts/loadgen.py http://127.0.0.1:8000/health -c 64 -d 5 [-H "Name: value"]
        [--method POST --body '{"prompt": "x"}']           # prints one JSON result

Both tools answer the same dict (`tool`, `requests`, `errors`, `rps`, `p50_ms`, `p99_ms`,
`duration_s`, `connections`). The built-in generator is one asyncio process per "thread" (wrk's
-t), each holding keep-alive HTTP/1.1 connections on raw sockets that send the next request as
soon as the previous answer is read: the same closed loop as wrk, at a higher cost per request
(Python), so its ceiling is lower and the table names the tool that measured.

A load runs for a duration, or until `stop()` (SIGINT, which wrk also answers with its report):
loadtest.py polls a running job that way for exactly as long as the job runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

WRK = "wrk"


def wrk_path() -> str | None:
    return shutil.which(WRK)


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted samples; nan when there are none."""
    if not samples:
        return float("nan")
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


# --- the built-in generator ---------------------------------------------------------------


def _request_bytes(url: str, method: str, headers: list[str], body: str | None) -> tuple[str, int, bytes]:
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", *headers]
    payload = body.encode() if body is not None else b""
    if body is not None:
        lines.append(f"Content-Length: {len(payload)}")
        if not any(h.lower().startswith("content-type:") for h in headers):
            lines.append("Content-Type: application/json")
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Reads one whole response; returns (status, server keeps the connection open)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip().lower()
    if "chunked" in fields.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(fields.get("content-length", "0")))
    if lines[0].startswith("HTTP/1.0"):
        return status, fields.get("connection") == "keep-alive"
    return status, fields.get("connection") != "close"


class _Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.non2xx = 0
        self.errors = 0


async def _connection(host: str, port: int, request: bytes, until: float, stop: asyncio.Event, t: _Tally):
    writer = None
    while not stop.is_set() and time.monotonic() < until:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            start = time.perf_counter()
            writer.write(request)
            status, keep = await _read_response(reader)
            t.latencies.append(time.perf_counter() - start)
            if not 200 <= status < 400:
                t.non2xx += 1
            if not keep:
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
            t.errors += 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.01)  # a refused connection must not become a busy loop
    if writer is not None:
        writer.close()


async def _generate(
    url: str, connections: int, duration: float, method: str, headers: list[str], body: str | None
) -> dict:
    host, port, request = _request_bytes(url, method, headers, body)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tally = _Tally()
    start = time.monotonic()
    await asyncio.gather(
        *(_connection(host, port, request, start + duration, stop, tally) for _ in range(connections))
    )
    return {
        "elapsed_s": time.monotonic() - start,
        "latencies": tally.latencies,
        "non2xx": tally.non2xx,
        "errors": tally.errors,
    }


def _merge(parts: list[dict], connections: int, threads: int) -> dict:
    lat = [x for p in parts for x in p["latencies"]]
    elapsed = max((p["elapsed_s"] for p in parts), default=0.0) or float("nan")
    return {
        "tool": f"built-in asyncio -t{threads}",
        "connections": connections,
        "duration_s": round(elapsed, 3),
        "requests": len(lat),
        "errors": sum(p["errors"] for p in parts) + sum(p["non2xx"] for p in parts),
        "rps": len(lat) / elapsed,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
    }


# --- wrk ----------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"not a wrk latency: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str, connections: int, threads: int = 2) -> dict:
    """The numbers of wrk's report (run with --latency)."""

    def grab(pattern: str, default: str | None = None) -> str:
        m = re.search(pattern, out)
        if m is None:
            if default is None:
                raise ValueError(f"wrk's report has no {pattern!r}:\n{out}")
            return default
        return m.group(1)

    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(grab(r"Non-2xx or 3xx responses: (\d+)", "0"))
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    return {
        "tool": f"wrk -t{threads}",
        "connections": connections,
        "duration_s": float(grab(r"requests in ([\d.]+)s")),
        "requests": int(grab(r"(\d+) requests in")),
        "errors": errors,
        "rps": float(grab(r"Requests/sec:\s*([\d.]+)")),
        "p50_ms": _ms(grab(r"50%\s+([\d.]+\w+)")),
        "p99_ms": _ms(grab(r"99%\s+([\d.]+\w+)")),
    }


_LUA = """wrk.method = {method}
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
"""


def _lua_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# --- one interface for both ---------------------------------------------------------------


class Load:
    """A load in progress: `wait()` for its result, or `stop()` it early and get the result."""

    def __init__(
        self,
        url: str,
        *,
        connections: int,
        duration: float,
        headers: list[str],
        method: str = "GET",
        body: str | None = None,
        tool: str = "auto",
        threads: int = 2,
    ):
        self.connections = connections
        self.threads = max(1, min(threads, connections))
        self._tmp = tempfile.TemporaryDirectory(prefix="loadgen-")
        self.use_wrk = tool == "wrk" or (tool == "auto" and wrk_path() is not None)
        if self.use_wrk:
            if wrk_path() is None:
                raise RuntimeError("wrk was asked for but is not on PATH")
            cmd = [
                wrk_path(),
                f"-t{self.threads}",
                f"-c{connections}",
                f"-d{max(1, round(duration))}s",
                "--latency",
                "--timeout",
                "10s",
            ]
            for h in headers:
                cmd += ["-H", h]
            if method != "GET" or body is not None:
                script = Path(self._tmp.name) / "request.lua"
                script.write_text(_LUA.format(method=_lua_string(method), body=_lua_string(body or "")))
                cmd += ["-s", str(script)]
            self._procs = [subprocess.Popen(cmd + [url], stdout=subprocess.PIPE, text=True)]
        else:
            self._procs = []
            for i in range(self.threads):
                share = connections // self.threads + (1 if i < connections % self.threads else 0)
                out = Path(self._tmp.name) / f"part{i}.json"
                cmd = [
                    sys.executable,
                    __file__,
                    url,
                    "-c",
                    str(share),
                    "-d",
                    str(duration),
                    "--method",
                    method,
                    "--raw-out",
                    str(out),
                ]
                for h in headers:
                    cmd += ["-H", h]
                if body is not None:
                    cmd += ["--body", body]
                self._procs.append(subprocess.Popen(cmd))

    def stop(self) -> dict:
        for p in self._procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        return self.wait()

    def wait(self, timeout: float | None = None) -> dict:
        try:
            if self.use_wrk:
                out, _ = self._procs[0].communicate(timeout=timeout)
                if self._procs[0].returncode != 0:
                    raise RuntimeError(f"wrk exited with {self._procs[0].returncode}:\n{out}")
                return parse_wrk(out, self.connections, self.threads)
            for p in self._procs:
                if p.wait(timeout=timeout) != 0:
                    raise RuntimeError(f"the built-in generator exited with {p.returncode}")
            parts = [json.loads(f.read_text()) for f in sorted(Path(self._tmp.name).glob("part*.json"))]
            return _merge(parts, self.connections, self.threads)
        finally:
            for p in self._procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            self._tmp.cleanup()


def run(url: str, **kw) -> dict:
    """One load to its end (see Load)."""
    return Load(url, **kw).wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("-c", "--connections", type=int, default=4)
    p.add_argument("-d", "--duration", type=float, default=5.0, help="seconds")
    p.add_argument("-H", "--header", action="append", default=[])
    p.add_argument("--method", default="GET")
    p.add_argument("--body")
    p.add_argument("-t", "--threads", type=int, default=2, help="processes (wrk: threads)")
    p.add_argument("--tool", choices=("auto", "wrk", "builtin"), default="builtin")
    p.add_argument("--raw-out", type=Path, help=argparse.SUPPRESS)  # one process's samples, for Load
    a = p.parse_args()
    if a.raw_out is not None:
        try:
            part = asyncio.run(_generate(a.url, a.connections, a.duration, a.method, a.header, a.body))
        except KeyboardInterrupt:  # stopped before the event loop took over SIGINT: nothing sent
            part = {"elapsed_s": 0.0, "latencies": [], "non2xx": 0, "errors": 0}
        a.raw_out.write_text(json.dumps(part))
        return 0
    load = Load(
        a.url,
        connections=a.connections,
        duration=a.duration,
        headers=a.header,
        method=a.method,
        body=a.body,
        tool=a.tool,
        threads=a.threads,
    )
    print(json.dumps(load.wait(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
