"""The extension recipes at the array level: temporal extension (`extend`), frame references
(`keep_frames`), the outpainting tasks, layout boxes and box masks. Each checks which frames are
kept (exact source pixels), the gray (0.5 exactly), the mask, and where the boxes are, against
values worked out by hand; at the tiny model's render sizes and, where it is cheap, at the API's
own sizes."""

from __future__ import annotations

import itertools

import numpy as np
import PIL.Image
import pytest

from pipelines.conditioning import Extensions, MediaInputs, build_conditioning
from pipelines.geometry import Box, fit_cover, outpaint_box
from pipelines.inputs import extensions_of, prepare_inputs
from pipelines.layout import box_masks, box_track, draw_layout, keyframe_index
from pipelines.tiny import render_size
from preprocessors.registry import get_preprocessor
from server.kernel.errors import InvalidParameter
from server.kernel.request import DIRECTIONS, SIZES, VaceRequest, parse_size
from server.schemas import validate_submit
from tests.vace_media import moving_frames, mp4

API_SIZES = [parse_size(s) for s in SIZES]
RENDER_SIZES = [render_size(w, h, 8) for w, h in API_SIZES]  # the tiny model's
DIRECTION_SETS = [c for n in range(1, 5) for c in itertools.combinations(DIRECTIONS, n)]


def _clip(f, w, h, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (f, h, w, 3), dtype=np.uint8)


def _build(task, w, h, f, ext=None, **media):
    return build_conditioning(task, MediaInputs(**media), width=w, height=h, num_frames=f,
                              extensions=ext)  # fmt: skip


def _kept(c, i, frame):
    """Frame i is `frame`'s pixels exactly, under a black mask."""
    np.testing.assert_array_equal(c.video[i], frame / np.float32(255))
    assert (c.mask[i] == 0).all()


def _generated(c, i):
    assert (c.video[i] == 0.5).all() and (c.mask[i] == 1).all()


# --- temporal extension and frame references -------------------------------------------------


@pytest.mark.parametrize("w,h", [(112, 64), (832, 480), (720, 1280)])
def test_extend_forward_backward_both(w, h):
    F, fv = 9, 3
    clip = _clip(fv, w, h)
    starts = {"forward": 0, "backward": 6, "both": 3}  # both: (9 - 3) // 2 = 3 before
    for mode, start in starts.items():
        c = _build("depth", w, h, F, Extensions(extend=mode), video=clip)  # task ignored
        assert c.recipe == f"extend({mode})"
        assert c.mask.shape == (F, h, w, 1) and c.video.shape == (F, h, w, 3)
        for i in range(F):
            if start <= i < start + fv:
                _kept(c, i, clip[i - start])
            else:
                _generated(c, i)


def test_extend_both_splits_an_odd_gap_with_more_after():
    c = _build("none", 112, 64, 9, Extensions(extend="both"), video=_clip(4, 112, 64))
    assert [float(m.max()) for m in c.mask] == [1, 1, 0, 0, 0, 0, 1, 1, 1]  # 5 // 2 = 2 before


def test_extend_between_keeps_both_clips():
    first, last = _clip(2, 112, 64, 1), _clip(3, 112, 64, 2)
    c = _build("none", 112, 64, 9, Extensions(extend="between"), video=first, last_video=last)
    assert c.recipe == "extend(between)"
    _kept(c, 0, first[0]), _kept(c, 1, first[1])
    for i in range(2, 6):
        _generated(c, i)
    for i in range(3):
        _kept(c, 6 + i, last[i])


@pytest.mark.parametrize(
    "ext,media,needle",
    [
        ("forward", {"video": 9}, "video gives 9 frames (0.5625 s at 16 fps), and the output has 9"),
        ("between", {"video": 5, "last_video": 4}, "and last_video 4 frames (0.25 s at 16 fps)"),
    ],
)
def test_extend_with_no_frame_left_to_generate_names_the_counts(ext, media, needle):
    arrays = {k: _clip(n, 112, 64) for k, n in media.items()}
    with pytest.raises(InvalidParameter) as e:
        _build("none", 112, 64, 9, Extensions(extend=ext), **arrays)
    assert needle in e.value.message


def test_extend_refuses_masks_and_needs_last_video_for_between():
    v = _clip(3, 112, 64)
    with pytest.raises(InvalidParameter, match="no mask"):
        _build("none", 112, 64, 9, Extensions(extend="forward"), video=v,
               mask_image=np.zeros((64, 112), np.uint8))  # fmt: skip
    with pytest.raises(InvalidParameter, match="needs last_video"):
        _build("none", 112, 64, 9, Extensions(extend="between"), video=v)


@pytest.mark.parametrize("w,h", [(64, 112), (480, 832)])
def test_keep_frames_frameref(w, h):
    clip = _clip(9, w, h)
    c = _build("pose", w, h, 9, Extensions(keep_frames=(0, 4, 8)), video=clip)
    assert c.recipe == "keep_frames"
    for i in range(9):
        _kept(c, i, clip[i]) if i in (0, 4, 8) else _generated(c, i)


def test_keep_frames_past_the_clip_names_it():
    with pytest.raises(InvalidParameter, match="frame 7, but video has only 5 frames"):
        _build("none", 112, 64, 9, Extensions(keep_frames=(0, 7)), video=_clip(5, 112, 64))


# --- outpainting -------------------------------------------------------------------------------


def test_outpaint_box_by_hand():
    # 832x480, all sides, 0.25: inner 832/1.5 = 554.67 -> 555 wide, 480/1.5 = 320 high.
    assert outpaint_box(832, 480, DIRECTIONS, 0.25) == Box(138, 80, 555, 320)
    assert outpaint_box(832, 480, ("left",), 0.25) == Box(166, 0, 666, 480)  # 832/1.25 = 665.6
    assert outpaint_box(832, 480, ("right", "down"), 0.5) == Box(0, 0, 555, 320)
    assert outpaint_box(112, 64, ("up",), 1.0) == Box(0, 32, 112, 32)
    # inner: the official int(ratio * side) border.
    assert outpaint_box(832, 480, DIRECTIONS, 0.25, inner=True) == Box(208, 120, 416, 240)
    assert outpaint_box(1280, 720, ("right",), 0.3, inner=True) == Box(0, 0, 896, 720)


@pytest.mark.parametrize("w,h", API_SIZES + RENDER_SIZES)
def test_outpaint_box_over_every_direction_set(w, h):
    for dirs, ratio in itertools.product(DIRECTION_SETS, (0.05, 0.25, 0.5, 1.0)):
        b = outpaint_box(w, h, dirs, ratio)
        for lo, hi, side, start, size in (("left", "right", w, b.left, b.width),
                                          ("up", "down", h, b.top, b.height)):  # fmt: skip
            n = (lo in dirs) + (hi in dirs)
            assert size == round(side / (1 + ratio * n))
            pad = side - size
            want = {(False, False): 0, (True, False): pad, (False, True): 0}.get(
                (lo in dirs, hi in dirs), pad // 2
            )
            assert start == want, (dirs, ratio, w, h)
            if n:  # each padded side is about ratio * the source's side
                assert abs(pad / n - ratio * size) <= 1


@pytest.mark.parametrize("dirs", DIRECTION_SETS)
def test_outpainting_places_the_source_in_its_box(dirs):
    w, h, F = 112, 64, 5
    b = outpaint_box(w, h, dirs, 0.25)
    src = _clip(3, b.width, b.height)  # decoded straight into the box (pipelines/inputs.py)
    c = _build("outpainting", w, h, F, Extensions(outpaint_direction=dirs), video=src)
    assert c.recipe == "outpainting+extension(2)"
    inside = np.zeros((h, w), bool)
    inside[b.top : b.top + b.height, b.left : b.left + b.width] = True
    for i in range(3):
        np.testing.assert_array_equal(c.video[i][inside].reshape(src[i].shape), src[i] / np.float32(255))
        assert (c.video[i][~inside] == 0.5).all()
        np.testing.assert_array_equal(c.mask[i, ..., 0], (~inside).astype(np.float32))
    for i in range(3, F):
        _generated(c, i)


@pytest.mark.parametrize("w,h", API_SIZES)
def test_expand_anything_from_one_image_at_api_sizes(w, h):
    img = PIL.Image.fromarray(moving_frames(1, 200, 150)[0])
    b = outpaint_box(w, h, ("left", "right"), 0.25)
    c = _build("outpainting", w, h, 5, Extensions(outpaint_direction=("left", "right")), first_image=img)
    assert c.recipe == "outpainting+first_image"
    fitted = np.asarray(fit_cover(img, b.width, b.height), np.float32) / np.float32(255)
    np.testing.assert_array_equal(c.video[0, :, b.left : b.left + b.width], fitted)
    assert (c.video[0, :, : b.left] == 0.5).all() and (c.video[0, :, b.left + b.width :] == 0.5).all()
    assert (c.mask[0, :, b.left : b.left + b.width] == 0).all()
    assert (c.mask[0, :, : b.left] == 1).all() and (c.mask[0, :, b.left + b.width :] == 1).all()
    for i in range(1, 5):
        _generated(c, i)


def test_outpainting_inner_regenerates_the_border():
    w, h = 112, 64
    src = _clip(5, w, h)
    c = _build("outpainting_inner", w, h, 5, Extensions(outpaint_direction=("up", "left")), video=src)
    t, l = int(0.25 * h), int(0.25 * w)  # 16, 28
    for i in range(5):
        np.testing.assert_array_equal(c.video[i, t:, l:], src[i, t:, l:] / np.float32(255))
        assert (c.video[i, :t] == 0.5).all() and (c.video[i, :, :l] == 0.5).all()
        assert (c.mask[i, t:, l:] == 0).all() and (c.mask[i, :t] == 1).all() and (c.mask[i, :, :l] == 1).all()


def test_outpainting_without_a_source_is_refused():
    with pytest.raises(InvalidParameter, match="needs video, first_image or last_image"):
        _build("outpainting", 112, 64, 5)


def test_outpainting_decodes_the_video_into_the_box():
    req = VaceRequest.from_input(validate_submit(
        {"prompt": "x", "video": "https://x/v.mp4", "task": "outpainting", "outpaint_direction": ["down"]}
    )[0])  # fmt: skip
    frames = moving_frames(4, 64, 48)
    c, _ = prepare_inputs(req, {"video": mp4(frames)}, width=112, height=64, preprocessors=get_preprocessor)
    b = outpaint_box(112, 64, ("down",), 0.25)
    assert b == Box(0, 0, 112, 51)
    assert (c.video[:4, 51:] == 0.5).all() and (c.mask[:4, 51:] == 1).all() and (c.mask[:4, :51] == 0).all()
    want = np.asarray(fit_cover(PIL.Image.fromarray(frames[0]), 112, 51), np.float32) / 255
    assert np.abs(c.video[0, :51] - want).mean() < 0.02  # one fit (and the codec's few levels)


# --- layout boxes and box masks -------------------------------------------------------------------


def test_keyframes_are_spread_evenly_and_interpolated():
    assert [keyframe_index(k, 3, 81) for k in range(3)] == [0, 40, 80]
    track = box_track([(0, 0, 10, 10), (40, 20, 50, 30), (40, 20, 80, 60)], 81)
    assert track[0].tolist() == [0, 0, 10, 10]  # (x, y, w, h)
    assert track[20].tolist() == [20, 10, 10, 10]  # halfway to the second keyframe
    assert track[40].tolist() == [40, 20, 10, 10]
    assert track[80].tolist() == [40, 20, 40, 40]  # the last keyframe, on the last frame


def test_layout_draws_the_official_outline():
    frames = draw_layout(box_track([(10, 8, 40, 30)], 1), 64, 48)
    black = frames[0, ..., 0] == 0
    assert (frames[0][~black] == 255).all()  # white elsewhere, nothing but black and white
    # cv2 thickness 2: the outline covers x1-1..x1+1 along an edge; the inside stays white.
    assert black[20, 9:12].all() and not black[20, 8] and not black[20, 12]
    assert black[7:10, 25].all() and black[29:32, 25].all() and not black[20, 25]


@pytest.mark.parametrize("w,h", [(112, 64), (832, 480)])
def test_layout_with_first_image_is_move_anything(w, h):
    F = 9
    boxes = [
        (0, 0, w // 4, h // 4),
        (w // 2, h // 2, w // 2 + w // 4, h // 2 + h // 4),
        (w - w // 4, h - h // 4, w, h),
    ]
    img = PIL.Image.fromarray(moving_frames(1, w, h)[0])
    c = _build("depth", w, h, F, Extensions(layout_bbox=tuple(boxes)), first_image=img)
    assert c.recipe == "layout_bbox+first_image"
    np.testing.assert_array_equal(c.video[0], np.asarray(img, np.float32) / np.float32(255))
    assert (c.mask[0] == 0).all() and (c.mask[1:] == 1).all()
    for i, (x1, y1, x2, y2) in ((4, boxes[1]), (8, boxes[2])):  # keyframes at 0, 4, 8
        black = c.video[i, ..., 0] == 0
        assert black[(y1 + y2) // 2, x1] and black[y1, (x1 + x2) // 2] and black[y2 - 1, (x1 + x2) // 2]
        assert not black[(y1 + y2) // 2, (x1 + x2) // 2]  # an outline, not a fill
        ys, xs = np.nonzero(black)
        assert ys.min() >= y1 - 1 and xs.min() >= x1 - 1 and ys.max() <= y2 + 1 and xs.max() <= x2 + 1
    assert set(np.unique(c.video[1:]).tolist()) == {0.0, 1.0}


def test_layout_without_first_image_is_a_control_video():
    c = _build("none", 112, 64, 5, Extensions(layout_bbox=((0, 0, 20, 20), (80, 40, 100, 60))))
    assert c.recipe == "layout_bbox" and c.mask is None
    assert c.video[0, 10, 0, 0] == 0 and c.video[-1, 50, 100, 0] == 0 and c.video[-1, 10, 0, 0] == 1


@pytest.mark.parametrize("w,h", [(112, 64), (1280, 720)])
def test_mask_bbox_static_inpainting(w, h):
    src = _clip(5, w, h)
    x1, y1, x2, y2 = w // 4, h // 3, w // 2, h // 2
    c = _build("inpainting", w, h, 5, Extensions(mask_bbox=((x1, y1, x2, y2),)), video=src)
    assert c.recipe == "control(inpainting)+mask_bbox"
    inside = np.zeros((h, w), bool)
    inside[y1:y2, x1:x2] = True  # the official bbox mode's half-open slice
    for i in range(5):
        np.testing.assert_array_equal(c.mask[i, ..., 0], inside.astype(np.float32))
        assert (c.video[i][inside] == np.float32(128) / 255).all()  # official MASK_COLOR
        np.testing.assert_array_equal(c.video[i][~inside], src[i][~inside] / np.float32(255))


def test_mask_bbox_keyframed_moves_and_works_with_other_tasks():
    src = _clip(9, 112, 64)
    c = _build("none", 112, 64, 9, Extensions(mask_bbox=((0, 0, 16, 16), (96, 48, 112, 64))), video=src)
    assert c.recipe == "control(none)+mask_bbox"
    np.testing.assert_array_equal(c.video[:9], src / np.float32(255))  # `none`: frames as given
    for i, (x, y) in ((0, (0, 0)), (4, (48, 24)), (8, (96, 48))):
        want = np.zeros((64, 112), np.float32)
        want[y : y + 16, x : x + 16] = 1
        np.testing.assert_array_equal(c.mask[i, ..., 0], want)
    np.testing.assert_array_equal(box_masks(box_track([(0, 0, 16, 16)], 1), 112, 64)[0] > 0,
                                  c.mask[0, ..., 0] > 0)  # fmt: skip


def test_boxes_are_scaled_from_output_to_render_pixels():
    inp, _ = validate_submit({"prompt": "x", "layout_bbox": [[104, 60, 416, 240], [0, 0, 832, 480]]})
    ext = extensions_of(VaceRequest.from_input(inp), width=112, height=64)
    assert ext.layout_bbox == ((14.0, 8.0, 56.0, 32.0), (0.0, 0.0, 112.0, 64.0))
    same = extensions_of(VaceRequest.from_input(inp), width=832, height=480)
    assert same.layout_bbox[0] == (104, 60, 416, 240)


def test_the_recipe_book_pictures_come_from_the_conditioning_code():
    # scripts/recipe_images.py builds its pictures with prepare_inputs; two cheap ones here
    # keep it running (and its recipes what docs/recipes.md says).
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "recipe_images.py"
    spec = importlib.util.spec_from_file_location("recipe_images", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    book = mod.recipes()
    doc = (path.parents[1] / "docs" / "recipes.md").read_text()
    for name in book:
        assert f"(recipes/{name}.png)" in doc, name
    sheet = mod.build("move", *book["move"])
    assert sheet.width > 7 * 112 and sheet.getpixel((mod.LABEL_W + 5, 40)) != (40, 40, 40)
