"""End to end through the real WaveSpeed Python SDK (wavespeed==2.0.5) against the real server
(uvicorn, spawned worker, tiny model) on a loopback port."""

import httpx
import pytest
from wavespeed import Client

from tests.conftest import API_KEY, FAST
from tests.videoprobe import probe_mp4

MODEL = "wavespeed-ai/wan-2.1-14b-vace"


@pytest.fixture
def sdk(live_server):
    return Client(api_key=API_KEY, base_url=live_server.url, max_connection_retries=1)


def test_sdk_run_downloads_a_real_mp4(sdk, live_server):
    out = sdk.run(MODEL, {"prompt": "a cat walks on the beach", **FAST}, timeout=180, poll_interval=0.3)
    (url,) = out["outputs"]
    assert url.startswith(live_server.url + "/media/outputs/") and url.endswith(".mp4")
    data = httpx.get(url, timeout=30).content  # no key needed for media
    p = probe_mp4(data)
    assert p.codec == "h264"
    assert p.frames == 16 * 5 + 1 and p.fps == 16
    assert (p.width, p.height) == (832, 480)


def test_sdk_run_ten_seconds_portrait(sdk):
    out = sdk.run(
        MODEL,
        {"prompt": "a dog", "duration": 10, "size": "480*832", "num_inference_steps": 1, "seed": 1},
        timeout=180,
        poll_interval=0.3,
    )
    p = probe_mp4(httpx.get(out["outputs"][0], timeout=30).content)
    assert p.frames == 161 and p.fps == 16 and (p.width, p.height) == (480, 832)


def test_same_seed_same_video(live_server):
    with live_server.client() as c:
        outs = []
        for _ in range(2):
            jid = c.post(f"/api/v3/{MODEL}", json={"prompt": "a red car", **FAST}).json()["data"]["id"]
            from tests.conftest import wait_terminal

            d = wait_terminal(c, jid)
            assert d["status"] == "completed" and d["seed"] == FAST["seed"]
            outs.append(probe_mp4(httpx.get(d["outputs"][0]).content).first)
        assert (outs[0] == outs[1]).all()


def test_sdk_sees_validation_error(sdk):
    with pytest.raises(Exception, match="size must be one of"):
        sdk.run(MODEL, {"prompt": "x", "size": "1*1"}, timeout=30)


def test_random_seed_is_reported(live_server):
    from tests.conftest import wait_terminal

    with live_server.client() as c:
        jid = c.post(f"/api/v3/{MODEL}", json={"prompt": "x", "num_inference_steps": 1}).json()["data"]["id"]
        d = wait_terminal(c, jid)
        assert d["status"] == "completed" and 0 <= d["seed"] < 2**31
        assert d["progress"] == 1.0 and d["timings"]["inference"] > 0
        # The tiny model's random safety checker ran (and never flags).
        assert d["has_nsfw_contents"] == [False] and d["safety_checked"] is True


def test_render_size_is_reported(live_server):
    from tests.conftest import wait_terminal

    with live_server.client() as c:
        jid = c.post(f"/api/v3/{MODEL}", json={"prompt": "x", **FAST}).json()["data"]["id"]
        d = wait_terminal(c, jid)
    # The tiny model renders each side / 8, rounded half up to 16 px (README, /health).
    assert d["render_size"] == [112, 64]
    assert "1/8" in httpx.get(live_server.url + "/health").json()["model"]["render"]
