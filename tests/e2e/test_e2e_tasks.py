"""Every `task` end to end on the tiny model: one real server (uvicorn, a spawned worker, the
tiny pipeline and the tiny random-weight preprocessors), one job per task with
`return_conditioning`, checking that the control video the pipeline got is the task's output,
not the input, with the right frame count; and WaveSpeed's default request (`task` omitted, so
`depth`) with a video."""

from __future__ import annotations

import functools

import httpx
import numpy as np
import pytest

from tests.conftest import FAST, ServerProcess, wait_terminal
from tests.vace_media import data_uri, frames_of, moving_frames, mp4, png, solid

MODEL = "wavespeed-ai/wan-2.1-14b-vace"
F = 81
RENDER = (112, 64)  # the tiny model's render size for 832*480


@functools.cache
def source() -> bytes:
    return mp4(moving_frames(F, 64, 48))


def _face_ref() -> bytes:
    from skimage import data  # the scikit-image test picture with one face

    return png(data.astronaut())


SPECS = {
    "default_depth": {},  # no task: WaveSpeed's default, depth
    "depth": {"task": "depth"},
    "depthv2": {"task": "depthv2"},
    "pose": {"task": "pose"},
    "pose_body": {"task": "pose_body"},
    "flow": {"task": "flow"},
    "scribble": {"task": "scribble"},
    "gray": {"task": "gray"},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("tasks-e2e")).start()
    yield srv
    srv.stop()


def submit(client, fields) -> str:
    body = {"prompt": "a dancer", **FAST, "return_conditioning": True, **fields}
    r = client.post(f"/api/v3/{MODEL}", json=body)
    assert r.status_code == 200, r.text
    return r.json()["data"]["id"]


@pytest.fixture(scope="module")
def jobs(client, media):
    url = media.add("/source.mp4", source(), "video/mp4")
    ids = {name: submit(client, {"video": url, **spec}) for name, spec in SPECS.items()}
    ids["face"] = submit(client, {
        "task": "face",
        "images": [data_uri(_face_ref(), "image/png"), data_uri(png(solid(64, 64, (200, 30, 30))), "image/png")],
    })  # fmt: skip
    return ids


def completed(client, job_id) -> dict:
    d = wait_terminal(client, job_id, 600)
    assert d["status"] == "completed", (d["code"], d["error"])
    assert d["has_nsfw_contents"] == [False] and d["safety_checked"] is True  # tiny checker ran
    return d


def control(d) -> np.ndarray:
    r = httpx.get(d["conditioning"]["video"], timeout=30)
    assert r.status_code == 200
    return frames_of(r.content).astype(np.int16)


def the_input() -> np.ndarray:
    from pipelines.geometry import fit_cover
    from PIL import Image

    return np.stack([np.asarray(fit_cover(Image.fromarray(f), *RENDER)) for f in frames_of(source())]).astype(np.int16)


def assert_not_the_input(frames):
    assert frames.shape == (F, RENDER[1], RENDER[0], 3)
    assert np.abs(frames - the_input()).mean() > 10  # the task's output, not the source


@pytest.mark.parametrize("name", ["default_depth", "depth", "depthv2", "scribble"])
def test_gray_map_tasks(client, jobs, name):
    d = completed(client, jobs[name])
    assert d["conditioning"]["recipe"] == f"control({'depth' if name == 'default_depth' else name})"
    frames = control(d)
    assert_not_the_input(frames)
    spread = frames.max(-1) - frames.min(-1)
    assert spread.max() <= 3  # a 3-channel gray map (up to the YUV round trip)
    if "depth" in name:  # min-max normalised per frame (at the model's size, then resized back)
        per_frame = frames.reshape(F, -1)
        assert (per_frame.max(1) >= 235).all() and (per_frame.min(1) <= 20).all()


@pytest.mark.parametrize("name", ["pose", "pose_body"])
def test_pose_tasks_draw_on_black(client, jobs, name):
    d = completed(client, jobs[name])
    assert d["conditioning"]["recipe"] == f"control({name})"
    frames = control(d)
    assert frames.shape == (F, RENDER[1], RENDER[0], 3)
    assert np.median(frames) <= 3  # mostly black: a skeleton, not the source


def test_flow_task(client, jobs):
    d = completed(client, jobs["flow"])
    frames = control(d)
    assert_not_the_input(frames)
    assert np.abs(frames[0] - frames[1]).max() <= 3  # the first flow frame is duplicated


def test_gray_task_is_still_exact(client, jobs):
    frames = control(completed(client, jobs["gray"]))
    assert (frames.max(-1) - frames.min(-1)).max() <= 3


def test_face_task_crops_the_references(client, jobs):
    d = completed(client, jobs["face"])
    assert d["conditioning"]["recipe"] == "r2v"
    face = d["preprocessing"]["face"]
    assert face["cropped"] == [True, False]  # a face in the astronaut, none in a red square
    assert "cascade" in face["detector"]
    assert len(d["conditioning"]["reference_images"]) == 2


def test_health_lists_every_task_ready_and_the_checker(server, jobs):
    from server.kernel.request import TASKS

    h = httpx.get(server.url + "/health", timeout=10).json()
    assert h["tasks"] == {task: "ready" for task in TASKS}
    assert h["safety_checker"] == "tiny random checker (never flags)"
