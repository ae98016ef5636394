"""The client commands (`wan-vace submit / status / cancel`) run as a user runs them, in their own
processes, against a real tiny-model server: a local image uploaded for them, the output
downloaded and decoded, and the server's refusals printed with a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from server.testing import TEST_DOWNSCALE
from tests.conftest import API_KEY, ROOT, ServerProcess, wait_terminal
from tests.vace_media import gradient, png
from tests.videoprobe import probe_mp4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("cli-client"), WAN_VACE_TINY_DOWNSCALE=str(TEST_DOWNSCALE)).start()
    yield srv
    srv.stop()


def wan_vace(server, *args: str, cwd=None, key: str | None = API_KEY, stdin: str | None = None):
    """`wan-vace ARGS` in a subprocess, pointed at the server by the client's variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANVACE_URL", "WANVACE_API_KEY", "WAN_VACE_DATA_DIR")}
    env["WANVACE_URL"] = server.url
    if key is not None:
        env["WANVACE_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=cwd or ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_submit_uploads_a_local_image_waits_and_downloads_the_video(server, tmp_path):
    image = tmp_path / "reference.png"
    image.write_bytes(png(gradient(64, 48)))
    out = tmp_path / "video.mp4"
    r = wan_vace(server, "submit", "--prompt", "a cat", "--images", str(image), "--seed", "3",
                 "--num-inference-steps", "2", "--size", "480*832", "--output", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(out)  # stdout: the path alone, for scripts
    assert "submitted" in r.stderr and "completed" in r.stderr  # the progress, on stderr
    p = probe_mp4(out.read_bytes())
    assert (p.width, p.height) == (480, 832) and p.frames == 81 and p.codec == "h264"
    # The image reached the server through the upload, byte for byte.
    uploads = [f.read_bytes() for f in (server.data_dir / "media" / "uploads").rglob("*.png")]
    assert image.read_bytes() in uploads


def test_json_file_fields_with_flags_winning_and_no_wait_then_status(server, tmp_path):
    body = tmp_path / "job.json"
    body.write_text(json.dumps({"prompt": "from the file", "seed": 11, "num_inference_steps": 30}))
    r = wan_vace(server, "submit", "--json", str(body), "--num-inference-steps", "1", "--no-wait")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    with server.client() as c:
        d = wait_terminal(c, job_id)
        assert d["status"] == "completed" and d["seed"] == 11
        job = c.post("/api/v3/predictions", json={"include_inputs": True}).json()["data"]["items"]
    inputs = next(j["input"] for j in job if j["id"] == job_id)
    assert inputs["prompt"] == "from the file" and inputs["num_inference_steps"] == 1
    r = wan_vace(server, "status", job_id)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"{job_id}: completed" and lines[1] == d["outputs"][0]
    r = wan_vace(server, "status", job_id, "--json")
    assert json.loads(r.stdout)["outputs"] == d["outputs"]


def test_cancel_a_queued_job_and_status_says_so(server):
    # The first job holds the one worker, so the second is still queued when cancelled.
    slow = ["--prompt", "x", "--duration", "10", "--num-inference-steps", "40", "--no-wait"]
    first = wan_vace(server, "submit", *slow).stdout.strip()
    second = wan_vace(server, "submit", *slow).stdout.strip()
    r = wan_vace(server, "cancel", second)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{second}: cancelled"
    assert wan_vace(server, "status", second).stdout.splitlines()[0] == f"{second}: cancelled"
    assert wan_vace(server, "cancel", first).returncode == 0
    with server.client() as c:
        assert wait_terminal(c, first)["status"] == "cancelled"
    # Cancelling again is no error; a finished job cannot be cancelled: the server's 409 message.
    assert wan_vace(server, "cancel", second).stdout.strip() == f"{second}: already cancelled"


def test_refusals_print_the_envelope_message_and_exit_1(server, tmp_path):
    r = wan_vace(server, "submit", "--prompt", "x", "--size", "1*1")
    assert r.returncode == 1
    assert r.stderr.startswith("error: size must be one of") and "(HTTP 400)" in r.stderr
    r = wan_vace(server, "status", "no-such-job")
    assert r.returncode == 1 and "Prediction no-such-job not found (HTTP 404)" in r.stderr
    r = wan_vace(server, "submit", "--prompt", "x", key="wrong-key")
    assert r.returncode == 1 and "(HTTP 401)" in r.stderr
    r = wan_vace(server, "submit", "--prompt", "x", "--first-image", str(tmp_path / "missing.png"))
    assert r.returncode == 1 and "first_image:" in r.stderr and "neither a file here" in r.stderr
    not_media = tmp_path / "notes.txt"
    not_media.write_text("hello")
    r = wan_vace(server, "submit", "--prompt", "x", "--first-image", str(not_media))
    assert r.returncode == 1 and "unsupported file type" in r.stderr
    r = wan_vace(server, "submit", "--prompt", "x", "--seed", "many")
    assert r.returncode == 2 and "--seed" in r.stderr  # bad usage: argparse's own message


def test_a_failed_job_exits_1_with_its_error(server, tmp_path):
    # A URL nobody serves: accepted (the worker fetches it), then the job fails with 1402.
    r = wan_vace(server, "submit", "--prompt", "x", "--num-inference-steps", "1",
                 "--first-image", f"{server.url}/media/uploads/missing.png", "-o", str(tmp_path / "x.mp4"))  # fmt: skip
    assert r.returncode == 1
    assert "failed (code 1402)" in r.stderr and "first_image" in r.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_the_key_of_a_local_server_is_found_without_flags(server, tmp_path):
    # `wan-vace serve` in this folder would have written data/api_key; the client reads it.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "api_key").write_text(API_KEY + "\n")
    r = wan_vace(server, "submit", "--prompt", "x", "--num-inference-steps", "1", "--no-wait", key=None, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
