"""The extension fields over HTTP, in process (no worker): bad values and impossible
combinations are a 400 in the WaveSpeed envelope naming the field, good ones are accepted and
stored, and `/api/v3/models` lists them with their ranges and defaults, marked `x-extension`."""

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings

KEY = "k-ext"
MODEL = "/api/v3/wavespeed-ai/wan-2.1-14b-vace"
V = "https://example.com/clip.mp4"
IMG = "https://example.com/first.png"


@pytest.fixture
def client(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, workers=0, api_keys=[KEY]))
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        yield c


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"mask_bbox": [0, 0, 900, 100], "video": V}, "mask_bbox[0]"),  # outside 832x480
        ({"layout_bbox": [[0, 0, 100, 100], [0, 0, 100, 721]], "size": "1280*720"}, "layout_bbox[1]"),
        ({"layout_bbox": [[0, 0, 100, 100]], "first_image": IMG}, "layout_bbox"),  # one keyframe
        ({"task": "outpainting", "video": V, "outpaint_direction": ["left", "top"]}, "outpaint_direction"),
        ({"task": "outpainting", "video": V, "outpaint_ratio": 0.01}, "outpaint_ratio"),
        ({"extend": "backward"}, "extend"),  # no video
        ({"keep_frames": [0, 40]}, "keep_frames"),
        ({"extend": "forward", "video": V, "mask_image": IMG}, "extend"),
        ({"layout_bbox": [[0, 0, 10, 10], [5, 5, 20, 20]], "video": V}, "layout_bbox"),
        ({"mask_bbox": [0, 0, 10, 10], "video": V, "mask_video": V}, "mask_bbox"),
        ({"last_video": V, "video": V, "extend": "forward"}, "last_video"),
        ({"task": "outpainting", "video": V, "mask_bbox": [0, 0, 8, 8]}, "task outpainting"),
    ],
)
def test_bad_extension_values_are_400_naming_the_field(client, fields, field):
    r = client.post(MODEL, json={"prompt": "a cat", **fields})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == 400 and body["data"] is None and body["message"] == body["error"]
    assert body["message"].startswith(field) or f" {field}" in body["message"], body["message"]


def test_unknown_direction_lists_the_allowed_ones(client):
    r = client.post(MODEL, json={"prompt": "a", "task": "outpainting", "first_image": IMG,
                                 "outpaint_direction": ["diagonal"]})  # fmt: skip
    assert r.status_code == 400
    assert "left, right, up, down" in r.json()["message"]


@pytest.mark.parametrize(
    "fields",
    [
        {"extend": "between", "video": V, "last_video": V},
        {"keep_frames": [0, 80], "video": V, "task": "depth"},
        {
            "task": "outpainting",
            "first_image": IMG,
            "outpaint_direction": ["left", "right"],
            "outpaint_ratio": 0.5,
        },
        {"layout_bbox": [[0, 0, 100, 100], [732, 380, 832, 480]], "first_image": IMG, "images": [IMG]},
        {"mask_bbox": [[0, 0, 100, 100], [100, 100, 200, 200]], "video": V, "task": "inpainting"},
    ],
)
def test_good_extension_requests_are_accepted(client, fields):
    r = client.post(MODEL, json={"prompt": "a cat", **fields})
    assert r.status_code == 200, r.text


def test_models_lists_the_extension_fields_with_ranges_and_defaults(client):
    (m,) = client.get("/api/v3/models").json()["data"]
    (s,) = m["api_schema"]["api_schemas"]
    p = s["request_schema"]["properties"]
    assert "x-extension" not in p["prompt"] and "x-extension" not in p["task"]  # WaveSpeed's own
    for name in ("extend", "last_video", "keep_frames", "outpaint_direction", "outpaint_ratio",
                 "layout_bbox", "mask_bbox", "return_conditioning"):  # fmt: skip
        assert p[name]["x-extension"] is True, name
        assert p[name]["description"]
    assert p["extend"]["enum"] == ["forward", "backward", "both", "between"] and "default" not in p["extend"]
    assert p["outpaint_ratio"] == {**p["outpaint_ratio"], "type": "number", "default": 0.25,
                                   "minimum": 0.05, "maximum": 1.0}  # fmt: skip
    assert p["outpaint_direction"]["items"]["enum"] == ["left", "right", "up", "down"]
    assert p["outpaint_direction"]["default"] == ["left", "right", "up", "down"]
    assert p["layout_bbox"]["type"] == "array" and p["layout_bbox"]["minItems"] == 2
    assert p["layout_bbox"]["items"]["minItems"] == 4 == p["layout_bbox"]["items"]["maxItems"]
    assert p["keep_frames"]["items"] == {"type": "integer", "minimum": 0}
    assert "outpainting" in p["task"]["enum"] and "outpainting_inner" in p["task"]["enum"]
