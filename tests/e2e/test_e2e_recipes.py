"""The extension recipes end to end: jobs through the HTTP API on the real server (the tiny
model, a spawned worker) with `return_conditioning`, and the conditioning files a client
downloads (lossless MP4s at the render size) checked for the same facts as the unit tests:
which frames are kept, where the gray and the mask are, where the boxes are drawn. Boxes are
sent in output pixels (832x480) and must arrive scaled to the render size (112x64)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines.geometry import fit_cover, outpaint_box
from tests.conftest import FAST, ServerProcess, wait_terminal
from tests.vace_media import data_uri, frames_of, gradient, moving_frames, mp4, png

MODEL = "wavespeed-ai/wan-2.1-14b-vace"
RW, RH, F = 112, 64, 81  # the tiny model renders 832*480 at 112x64; 5 s = 81 frames
SHORT = moving_frames(16, 64, 48)  # 1 s
LONG = moving_frames(81, 64, 48)  # 5 s: nothing left to extend into
FIRST = gradient(160, 96)


def _clip(frames: np.ndarray) -> str:
    return data_uri(mp4(frames), "video/mp4")


SHORT_MP4 = mp4(SHORT)
# What the server decodes: the clip after the (lossy) encode the test sends, not SHORT itself.
SHORT_SENT = frames_of(SHORT_MP4)


def job_specs() -> dict[str, dict]:
    short = data_uri(SHORT_MP4, "video/mp4")
    return {
        "backward": {"video": short, "extend": "backward"},
        "outpaint": {"video": short, "task": "outpainting", "outpaint_direction": ["left", "right"]},
        "move": {
            "first_image": data_uri(png(FIRST), "image/png"),
            "layout_bbox": [[0, 0, 208, 120], [624, 360, 832, 480]],
        },
        "swap": {"video": short, "task": "inpainting", "mask_bbox": [208, 120, 624, 360]},
        "too_long": {"video": _clip(LONG), "extend": "forward"},
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("recipes-e2e")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def jobs(client) -> dict[str, str]:
    """Every job submitted up front, so the worker never waits on a test's downloads."""
    ids = {}
    for name, fields in job_specs().items():
        body = {"prompt": "a cat walks", **FAST, "return_conditioning": True, **fields}
        r = client.post(f"/api/v3/{MODEL}", json=body)
        assert r.status_code == 200, r.text
        ids[name] = r.json()["data"]["id"]
    return ids


def conditioning(client, job_id: str, recipe: str) -> tuple[np.ndarray, np.ndarray | None]:
    d = wait_terminal(client, job_id, 600)
    assert d["status"] == "completed", (d["code"], d["error"])
    assert d["conditioning"]["recipe"] == recipe
    video = frames_of(httpx.get(d["conditioning"]["video"], timeout=30).content).astype(np.int16)
    mask = d["conditioning"].get("mask")
    mask = None if mask is None else frames_of(httpx.get(mask, timeout=30).content)[..., 0] > 127
    assert video.shape == (F, RH, RW, 3)
    return video, mask


def near(a, b, tol=3) -> bool:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) <= tol


def fitted(frame: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(fit_cover(Image.fromarray(frame), w, h))


def test_extend_backward_keeps_the_clip_at_the_end(client, jobs):
    video, mask = conditioning(client, jobs["backward"], "extend(backward)")
    assert mask[:65].all() and not mask[65:].any()
    assert near(video[:65], 128, 1)  # gray 0.5, as 8 bits
    assert near(video[65], fitted(SHORT_SENT[0], RW, RH), 12) and near(
        video[80], fitted(SHORT_SENT[15], RW, RH), 12
    )


def test_outpainting_left_and_right(client, jobs):
    video, mask = conditioning(client, jobs["outpaint"], "outpainting+extension(65)")
    b = outpaint_box(RW, RH, ("left", "right"), 0.25)
    assert (b.left, b.width) == (18, 75)
    x0, x1 = b.left, b.left + b.width
    assert mask[:16, :, :x0].all() and mask[:16, :, x1:].all() and not mask[:16, :, x0:x1].any()
    assert mask[16:].all()
    assert near(video[:16, :, :x0], 128, 1) and near(video[:16, :, x1:], 128, 1)
    assert near(video[3, :, x0:x1], fitted(SHORT_SENT[3], b.width, RH), 12)


def test_layout_with_first_image_moves_a_box(client, jobs):
    video, mask = conditioning(client, jobs["move"], "layout_bbox+first_image")
    assert not mask[0].any() and mask[1:].all()
    assert near(video[0], fitted(FIRST, RW, RH), 12)
    dark = video[..., 0] < 64
    # [624, 360, 832, 480] of 832x480 is [84, 48, 112, 64] at 112x64: the last frame's outline.
    assert dark[80, 56, 84] and dark[80, 48, 98] and not dark[80, 56, 98] and not dark[80, 10, 10]
    assert dark[40, 32, 42] and dark[40, 24, 56]  # halfway: [42, 24, 70, 40]
    assert near(video[1:][~dark[1:]], 255, 2)  # white elsewhere


def test_mask_bbox_inpainting(client, jobs):
    video, mask = conditioning(client, jobs["swap"], "control(inpainting)+mask_bbox+extension(65)")
    inside = np.zeros((RH, RW), bool)
    inside[16:48, 28:84] = True  # [208, 120, 624, 360] scaled by 1/7.43 and 2/15
    assert (mask[:16] == inside).all() and mask[16:].all()
    assert near(video[:16][:, inside], 128, 1)
    assert near(video[5][~inside], fitted(SHORT_SENT[5], RW, RH)[~inside], 12)


def test_extend_with_no_room_fails_naming_the_frame_counts(client, jobs):
    d = wait_terminal(client, jobs["too_long"], 600)
    assert d["status"] == "failed" and d["code"] == 1401, d
    assert "extend forward: video gives 81 frames (5.0625 s at 16 fps)" in d["error"]
    assert "the output has 81 frames" in d["error"]
