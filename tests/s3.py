"""A real S3 endpoint for tests: moto's standalone server (an emulator of S3), run as a separate
process on a free port, so boto3 talks HTTP to it exactly as it would to MinIO or AWS.

`start_moto_server()` starts one and returns a `MotoServer` (its `endpoint` URL and a `stop()`
callable), for tests that start their own processes (the cluster e2e test hands the endpoint to
every API and worker through WAN_VACE_S3_ENDPOINT_URL). The `moto_server` fixture sits on top:
a test module declares `pytest_plugins = ["tests.s3"]`, which registers this module once for the
run, so its session scope means one server for every module that uses it; `s3_bucket` makes a
fresh bucket per test, so tests isolate by bucket rather than by server.

Credentials: `S3_ENV` holds dummy ones; `use_dummy_credentials()` sets them (and clears any
profile, session token or config file) so no real AWS configuration is read. Every client made
here names the moto endpoint, so no request can reach AWS.
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Nothing from the developer's machine: no profile, no config or credentials file, no
    # instance metadata lookups (slow, and off the machine).
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
_RUNNING = re.compile(r"Running on (http://127\.0\.0\.1:\d+)")


def use_dummy_credentials(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set the dummy credentials in `env` (default: this process's environment); returns it."""
    env = os.environ if env is None else env
    env.update(S3_ENV)
    for name in _UNSET:
        env.pop(name, None)
    return env


@dataclass
class MotoServer:
    endpoint: str  # http://127.0.0.1:PORT
    stop: Callable[[], None]
    log_path: Path  # the server's output (one line per request) while it runs, for debugging
    _client: Any = field(default=None, repr=False)

    def client(self) -> Any:
        """A boto3 S3 client on this server (path-style, as S3Storage uses with an endpoint);
        one, made on first use (a client takes ~0.1 s to make, and is thread-safe)."""
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=S3_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str | None = None) -> str:
        """A new empty bucket (a random name unless given); returns its name."""
        name = name or f"test-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name


def start_moto_server(timeout: float = 30.0) -> MotoServer:
    """Start `python -m moto.server` on a free port of 127.0.0.1 and wait until it answers.

    Port 0 lets the OS pick the port (no race with other processes for a "free" one); the port
    is read from the server's own "Running on" line. Its output goes to a file, never a pipe
    that nobody reads (a pipe would fill up and stall the server)."""
    log_dir = Path(tempfile.mkdtemp(prefix="moto-"))
    log_path = log_dir / "moto.log"
    env = use_dummy_credentials(dict(os.environ))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(log_dir, ignore_errors=True)

    deadline = time.monotonic() + timeout
    endpoint = None
    try:
        while endpoint is None:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited ({proc.returncode}): {log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"moto server did not start in {timeout} s: {log_path.read_text()[-2000:]}"
                )
            m = _RUNNING.search(log_path.read_text(errors="replace"))
            if m:
                endpoint = m[1]
            else:
                time.sleep(0.05)
        _wait_until_answers(endpoint, deadline)
    except BaseException:
        stop()
        raise
    return MotoServer(endpoint, stop, log_path)


def _wait_until_answers(endpoint: str, deadline: float) -> None:
    import httpx

    while True:
        try:
            httpx.get(endpoint + "/moto-api/", timeout=2, trust_env=False)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def unavailable() -> str:
    """'' when boto3 and moto's server can be used, else why not."""
    for name in ("boto3", "moto", "flask"):  # flask: what moto's server runs on ("moto[server]")
        if importlib.util.find_spec(name) is None:
            return (
                f"{name} is not installed (boto3 and moto[server] are test extras): pip install -e '.[test]'"
            )
    return ""


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One moto server for the run; dummy credentials in the environment meanwhile. Skips without moto, except under CI=true, where a silently
    skipped backend would be a defect: it fails."""
    why = unavailable()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs the test extras, but: {why}")
        pytest.skip(why)
    saved = dict(os.environ)
    use_dummy_credentials()
    server = start_moto_server()
    try:
        yield server
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def s3_bucket(moto_server: MotoServer) -> str:
    """A fresh, empty bucket on the session's moto server."""
    return moto_server.create_bucket()
