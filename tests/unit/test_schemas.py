import pytest

from server.kernel.errors import ApiError
from server.kernel.request import VaceRequest
from server.schemas import FIELDS, validate_submit


def ok(**kw):
    inp, _ = validate_submit({"prompt": "a cat", **kw})
    return inp


def bad(**kw) -> str:
    with pytest.raises(ApiError) as e:
        validate_submit({"prompt": "a cat", **kw})
    assert e.value.status == 400
    return e.value.message


def test_defaults():
    inp = ok()
    assert inp["duration"] == 5 and inp["size"] == "832*480" and inp["num_inference_steps"] == 30
    assert inp["guidance_scale"] == 5.0 and inp["flow_shift"] == 16.0 and inp["context_scale"] == 1.0
    assert inp["seed"] == -1 and inp["task"] == "depth" and inp["images"] == []
    assert inp["enable_safety_checker"] is True and inp["enable_sync_mode"] is False
    assert inp["video"] is None and inp["negative_prompt"] == ""
    req = VaceRequest.from_input(inp)
    assert (req.width, req.height) == (832, 480) and req.num_frames == 81


@pytest.mark.parametrize("size,duration,expected", [("480*832", 10, (480, 832, 161)),
                                                      ("1280*720", 7, (1280, 720, 113))])
def test_typed_request_reads_size_and_frames_once(size, duration, expected):
    req = VaceRequest.from_input(ok(size=size, duration=duration, images=["http://x/a.png"]))
    assert (req.width, req.height, req.num_frames) == expected
    assert req.images == ("http://x/a.png",) and req.task == "depth" and req.seed == -1
    assert [label for label, _, _ in req.media()] == ["images[0]"]
    with pytest.raises(AttributeError):
        req.size = "832*480"  # frozen


def test_typed_request_reads_rows_of_an_older_release():
    # A stored input missing fields added later (and carrying one since dropped) still parses.
    req = VaceRequest.from_input({"prompt": "p", "size": "832*480", "duration": 5, "retired": 1})
    assert req.num_inference_steps == 30 and req.return_conditioning is False


def test_prompt_required():
    for body in ({}, {"prompt": ""}, {"prompt": None}, {"prompt": "   "}):
        with pytest.raises(ApiError, match="prompt is required"):
            validate_submit(body)


@pytest.mark.parametrize(
    "field,lo,hi,below,above",
    [
        ("duration", 5, 10, 4, 11),
        ("num_inference_steps", 1, 40, 0, 41),
        ("guidance_scale", 0.0, 20.0, -0.01, 20.01),
        ("flow_shift", 0.0, 30.0, -0.5, 30.5),
        ("context_scale", 0.0, 2.0, -0.1, 2.1),
    ],
)
def test_range_edges(field, lo, hi, below, above):
    assert ok(**{field: lo})[field] == lo
    assert ok(**{field: hi})[field] == hi
    assert field in bad(**{field: below})
    assert field in bad(**{field: above})


def test_integers_accepted_for_numbers_and_integral_floats_for_integers():
    inp = ok(guidance_scale=7, duration=10.0)
    assert inp["guidance_scale"] == 7.0 and isinstance(inp["guidance_scale"], float)
    assert inp["duration"] == 10 and isinstance(inp["duration"], int)
    assert "integer" in bad(duration=5.5)
    assert "number" in bad(guidance_scale="5")
    assert "number" in bad(guidance_scale=True)
    assert "finite" in bad(guidance_scale=float("nan"))


def test_seed_rules():
    assert ok(seed=-1)["seed"] == -1
    assert ok(seed=0)["seed"] == 0
    assert ok(seed=2147483647)["seed"] == 2147483647
    assert ok(seed=2147483648)["seed"] == 0  # reduced modulo 2^31 (contract §6)
    assert ok(seed=9999999999)["seed"] == 9999999999 % 2**31
    assert "seed" in bad(seed=-2)


def test_enums():
    for s in ("832*480", "480*832", "1280*720", "720*1280"):
        assert ok(size=s)["size"] == s
    assert ok(size="832x480")["size"] == "832*480"
    assert "size must be one of" in bad(size="1024*1024")
    for t in ("depth", "pose", "face", "inpainting", "none", "gray"):
        assert ok(task=t)["task"] == t
    assert "task must be one of" in bad(task="teleport")


def test_nulls_and_empty_strings_mean_absent():
    # What ComfyUI nodes send (contract §6).
    inp = ok(mask_image=None, first_image=None, last_image=None, video="", images=[], seed=None,
             negative_prompt=None, webhook_url="", enable_base64_output=False)
    assert inp["video"] is None and inp["mask_image"] is None and inp["seed"] == -1
    assert inp["negative_prompt"] == "" and inp["webhook_url"] is None


def test_unknown_keys_ignored_and_reported():
    inp, ignored = validate_submit({"prompt": "x", "loras": [], "foo": 1})
    assert sorted(ignored) == ["foo", "loras"]
    assert "loras" not in inp


def test_media_fields():
    inp = ok(video="https://example.com/a.mp4", images=["http://x/1.png", "data:image/png;base64,AAAA"])
    assert inp["images"][1].startswith("data:")
    assert "images[0]" in bad(images=["ftp://x/1.png"])
    assert "video" in bad(video="not a url")
    assert "at most 5" in bad(images=[f"https://x/{i}.png" for i in range(6)])
    assert ok(images="https://x/1.png")["images"] == ["https://x/1.png"]
    assert ok(images=["", None, "https://x/1.png"])["images"] == ["https://x/1.png"]


def test_image_alias_for_first_image():
    assert ok(image="https://x/f.png")["first_image"] == "https://x/f.png"
    assert ok(image="https://x/a.png", first_image="https://x/b.png")["first_image"] == "https://x/b.png"


def test_booleans():
    assert ok(enable_sync_mode="true")["enable_sync_mode"] is True
    assert "true or false" in bad(enable_sync_mode="yes")


def test_body_must_be_object():
    with pytest.raises(ApiError):
        validate_submit(["prompt"])


def test_every_field_has_a_default_or_is_required():
    inp = ok()
    assert set(inp) == {f.name for f in FIELDS}


# --- extension fields ----------------------------------------------------------------------

V = "https://example.com/v.mp4"


def test_extension_fields_default_to_todays_behaviour():
    inp = ok()
    assert inp["extend"] is None and inp["last_video"] is None and inp["keep_frames"] == []
    assert inp["outpaint_direction"] == ["left", "right", "up", "down"] and inp["outpaint_ratio"] == 0.25
    assert inp["layout_bbox"] == [] and inp["mask_bbox"] == []
    req = VaceRequest.from_input(inp)
    assert req.extend is None and req.keep_frames == () and req.mask_bbox == ()


def test_rows_written_before_the_extension_fields_stay_readable():
    old = ok()
    for k in ("extend", "last_video", "keep_frames", "outpaint_direction", "outpaint_ratio",
              "layout_bbox", "mask_bbox"):  # fmt: skip
        old.pop(k)
    req = VaceRequest.from_input(old)
    assert req.outpaint_direction == ("left", "right", "up", "down") and req.layout_bbox == ()


def test_extension_fields_are_typed():
    inp = ok(video=V, task="inpainting", mask_bbox=[10, 20.0, 30, 40], size="1280*720")
    assert inp["mask_bbox"] == [[10, 20, 30, 40]]  # one box = a static mask
    req = VaceRequest.from_input(inp)
    assert req.mask_bbox == ((10, 20, 30, 40),)
    req = VaceRequest.from_input(ok(video=V, extend="Backward", keep_frames=None))
    assert req.extend == "backward"
    req = VaceRequest.from_input(ok(video=V, keep_frames=[0, 80.0]))
    assert req.keep_frames == (0, 80)
    req = VaceRequest.from_input(ok(video=V, task="outpainting", outpaint_direction="left", outpaint_ratio=1))
    assert req.outpaint_direction == ("left",) and req.outpaint_ratio == 1.0
    req = VaceRequest.from_input(ok(layout_bbox=[[0, 0, 10, 10], [822, 470, 832, 480]]))
    assert req.layout_bbox == ((0, 0, 10, 10), (822, 470, 832, 480))


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"extend": "sideways", "video": V}, "extend must be one of forward, backward, both, between"),
        ({"extend": "forward"}, "extend needs a video"),
        ({"extend": "between", "video": V}, "needs last_video"),
        ({"last_video": V, "video": V}, "last_video is the clip kept at the end"),
        ({"extend": "forward", "video": V, "mask_bbox": [0, 0, 8, 8]}, "extend cannot be combined with mask_bbox"),
        ({"keep_frames": [0, 81], "video": V}, "keep_frames[1] is 81; a 5 s video has frames 0..80"),
        ({"keep_frames": [3, 3], "video": V}, "keep_frames lists a frame twice"),
        ({"keep_frames": [], "video": V}, "keep_frames needs at least 1 item"),
        ({"keep_frames": [1.5], "video": V}, "keep_frames[0] must be an integer"),
        ({"keep_frames": [0]}, "keep_frames needs a video"),
        ({"task": "outpainting", "video": V, "outpaint_direction": ["north"]},
         "outpaint_direction items must be among left, right, up, down, got 'north'"),
        ({"task": "outpainting", "video": V, "outpaint_direction": ["up", "up"]}, "lists a value twice"),
        ({"task": "outpainting", "video": V, "outpaint_ratio": 1.5}, "outpaint_ratio must be between 0.05 and 1"),
        ({"task": "outpainting"}, "task outpainting needs video, first_image or last_image"),
        ({"task": "outpainting_inner", "video": V, "outpaint_ratio": 0.5}, "use less than 0.5"),
        ({"video": V, "outpaint_ratio": 0.3}, "outpaint_ratio applies to task outpainting"),
        ({"layout_bbox": [[0, 0, 10, 10]]}, "layout_bbox needs at least 2 items, got 1"),
        ({"layout_bbox": [0, 0, 10, 10]}, "layout_bbox[0] must be a box"),
        ({"layout_bbox": [[0, 0, 10, 10], [0, 0, 833, 10]]}, "layout_bbox[1] [0, 0, 833, 10] is outside the 832x480"),
        ({"layout_bbox": [[0, 0, 10, 10], [5, 0, 5, 10]]}, "layout_bbox[1] must have x1 < x2"),
        ({"layout_bbox": [[0, 0, 10, 10], [0, 0, 9.5, 10]]}, "layout_bbox[1][2] must be an integer"),
        ({"layout_bbox": [[0, 0, 10, 10], [0, 0, 9, 10]], "video": V}, "layout_bbox cannot be combined with video"),
        ({"mask_bbox": [0, 0, 10, 10]}, "mask_bbox needs a video"),
        ({"mask_bbox": [0, 0, 10, 10], "video": V, "mask_image": V}, "mask_bbox cannot be combined with mask_image"),
        ({"mask_bbox": [0, -1, 10, 10], "video": V}, "mask_bbox[0] [0, -1, 10, 10] is outside"),
        ({"mask_bbox": [0, 0, 10, 481], "video": V, "size": "832*480"}, "0 <= y1 < y2 <= 480"),
    ],
)
def test_bad_extension_values_name_the_field(fields, needle):
    assert needle in bad(**fields)


def test_boxes_are_checked_against_the_requested_size():
    ok(video=V, mask_bbox=[0, 0, 720, 1280], size="720*1280")
    assert "outside the 1280x720 frame" in bad(video=V, mask_bbox=[0, 0, 720, 1280], size="1280*720")
