"""The pytest plugin as a user meets it: a throwaway folder holding one user-style test file that
uses only the `wan_vace_server` fixture, the real WaveSpeed SDK and httpx, run by
`python -m pytest` in a subprocess (the plugin is found through its entry point, as after
`pip install wan-vace[testing]`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

USER_TEST = '''
import hashlib, json, os, time
import httpx
from wavespeed import Client

MODEL = "wavespeed-ai/wan-2.1-14b-vace"


def test_my_app_gets_a_video(wan_vace_server):
    client = Client(api_key=wan_vace_server.api_key, base_url=wan_vace_server.base_url)
    job = {"prompt": "a cat on a beach", "seed": 42, "num_inference_steps": 4}
    digests, seconds = [], []
    for _ in range(2):
        start = time.monotonic()
        out = client.run(MODEL, job, timeout=120, poll_interval=0.1)
        seconds.append(time.monotonic() - start)
        video = httpx.get(out["outputs"][0]).content
        assert video[4:8] == b"ftyp"
        digests.append(hashlib.sha256(video).hexdigest())
    assert digests[0] == digests[1]  # a fixed seed: the same MP4, byte for byte
    with open(os.environ["REPORT"], "w") as f:
        json.dump({"seconds": seconds, "sha256": digests[0]}, f)


def test_another_seed_another_video(wan_vace_server):
    client = Client(api_key=wan_vace_server.api_key, base_url=wan_vace_server.base_url)
    out = client.run(MODEL, {"prompt": "a cat on a beach", "seed": 43, "num_inference_steps": 4}, timeout=120)
    video = httpx.get(out["outputs"][0]).content
    with open(os.environ["REPORT"]) as f:
        assert json.load(f)["sha256"] != hashlib.sha256(video).hexdigest()
'''


def test_a_users_suite_gets_a_running_server_from_the_plugin(tmp_path):
    (tmp_path / "test_user.py").write_text(USER_TEST)
    report = tmp_path / "report.json"
    # Nothing of this repository on the path or in the folder: only the installed package.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WAN_VACE_", "PYTEST_", "PYTHONPATH"))}
    env["REPORT"] = str(report)
    r = subprocess.run(
        # --basetemp under tmp_path: the server's data dir too, so its processes can be found.
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'tmp'}",
         "test_user.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    # "fixture 'wan_vace_server' not found": the entry point is not installed (pip install -e .).
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "2 passed" in r.stdout
    seconds = json.loads(report.read_text())["seconds"]
    # About a second on a laptop; generous here, where helpers share two cores.
    assert max(seconds) < 15, seconds
    # The fixture stopped its server: no process of it outlives the session.
    assert list((tmp_path / "tmp").glob("wan-vace*/jobs.sqlite3"))  # the server did run there
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "tmp")], capture_output=True, text=True, check=False)
    assert leftover.stdout.strip() == ""
