"""The conditioning builder: one test per recipe row (vace.md §1) at the array level, then the
same recipes through the real tiny `WanVACEPipeline` with spies on what it actually receives."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from pipelines.conditioning import (
    Conditioning,
    MediaInputs,
    build_conditioning,
    fit_cover,
)
from pipelines.geometry import letterbox
from preprocessors.registry import Preprocessor
from server.kernel.errors import InvalidParameter, NotSupportedYet

H, W = 32, 48
F = 9


def _video(f=F, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (f, H, W, 3), dtype=np.uint8)


def _solid(color, size=(40, 24)):
    return PIL.Image.new("RGB", size, color)


def _build(task="none", **media) -> Conditioning:
    return build_conditioning(task, MediaInputs(**media), width=W, height=H, num_frames=F)


def _gray_ref(frames):
    x = frames.astype(np.int64)
    return ((x[..., 0] * 3735 + x[..., 1] * 19235 + x[..., 2] * 9798 + 16384) >> 15).astype(
        np.uint8
    )


def _fitted(img, w=W, h=H):
    return np.asarray(fit_cover(img, w, h), np.float32) / np.float32(255)


def _canvas(img, w=W, h=H):
    return letterbox(img.convert("RGB"), w, h)


def _arrays(images):
    return [np.asarray(i).tobytes() for i in images]


def _mask_frames(c: Conditioning) -> list[float]:
    """Per-frame mask value when each frame is uniform; None mask = all 1."""
    if c.mask is None:
        return [1.0] * c.num_frames
    out = []
    for m in c.mask:
        assert m.min() == m.max(), "mask frame is not uniform"
        out.append(float(m.min()))
    return out


def _assert_binary(mask):
    assert mask.dtype == np.float32 and mask.shape == (F, H, W, 1)
    assert set(np.unique(mask).tolist()) <= {0.0, 1.0}


# --- array-level: one test per recipe row ---------------------------------------------------


def test_t2v_prompt_only():
    c = _build("depth")  # WaveSpeed's default task with no video: ignored, never rejected
    assert c.video is None and c.mask is None
    assert c.reference_images == [] and c.recipe == "t2v"
    assert c.pipeline_kwargs() == {
        "video": None, "mask": None, "reference_images": None,
        "height": H, "width": W, "num_frames": F,
    }  # fmt: skip


@pytest.mark.parametrize("task", ["depth", "pose", "face", "no-such-task", "inpainting"])
def test_r2v_ignores_task_and_reverses_refs(task):
    a, b = _solid((255, 0, 0)), _solid((0, 0, 255), (16, 64))
    c = _build(task, images=[a, b])
    assert c.video is None and c.mask is None and c.recipe == "r2v"
    assert _arrays(c.reference_images_api_order) == _arrays([_canvas(a), _canvas(b)])
    # diffusers prepends one by one -> official [a, b]
    assert c.reference_images == c.reference_images_api_order[::-1]
    assert c.pipeline_kwargs()["reference_images"] == c.reference_images
    assert all(r.size == (W, H) for r in c.reference_images)  # canvases: diffusers' fit is a no-op
    assert b.size == (16, 64)  # the caller's image is not modified


def test_refs_are_converted_to_rgb_over_white():
    rgba = PIL.Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    c = _build(images=[rgba])
    ref = c.reference_images[0]
    assert ref.mode == "RGB" and ref.size == (W, H)
    # 16x16 on the 48x32 canvas: scale 2, pasted at x 8..40; the opaque pixel (0, 0) becomes
    # the 2x2 block at (8, 0), the transparent rest white.
    assert ref.getpixel((8, 0)) == (255, 0, 0) and ref.getpixel((20, 20)) == (255, 255, 255)
    assert ref.getpixel((2, 2)) == (255, 255, 255)  # canvas


def test_control_gray():
    v = _video()
    c = _build("gray", video=v)
    assert c.recipe == "control(gray)"
    assert c.video.dtype == np.float32 and c.video.shape == (F, H, W, 3)
    expected = _gray_ref(v)[..., None].repeat(3, -1).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(c.video, expected)
    assert c.mask is None  # all generate
    kw = c.pipeline_kwargs()
    assert kw["video"].shape == (1, F, H, W, 3) and np.shares_memory(kw["video"], c.video)


def test_control_task_not_available_is_refused_with_video():
    with pytest.raises(NotSupportedYet, match="task 'layout_track' is not supported by this server"):
        _build("layout_track", video=_video())


def test_none_is_verbatim_and_exact():
    v = _video()
    c = _build("none", video=v)
    np.testing.assert_array_equal(c.video, v.astype(np.float32) / np.float32(255))
    assert c.recipe == "control(none)" and c.mask is None


def test_first_image():
    img = _solid((10, 200, 30), (100, 50))
    c = _build(first_image=img)
    assert c.recipe == "first_image"
    np.testing.assert_array_equal(c.video[0], _fitted(img))
    assert (c.video[1:] == 0.5).all()
    _assert_binary(c.mask)
    assert _mask_frames(c) == [0.0] + [1.0] * (F - 1)


def test_last_image():
    img = _solid((200, 10, 30))
    c = _build(last_image=img)
    assert c.recipe == "last_image"
    np.testing.assert_array_equal(c.video[-1], _fitted(img))
    assert (c.video[:-1] == 0.5).all()
    assert _mask_frames(c) == [1.0] * (F - 1) + [0.0]


def test_first_and_last_image():
    first, last = _solid((10, 200, 30)), _solid((200, 10, 30), (30, 90))
    c = _build("depth", first_image=first, last_image=last)
    assert c.recipe == "first_image+last_image"
    np.testing.assert_array_equal(c.video[0], _fitted(first))
    np.testing.assert_array_equal(c.video[-1], _fitted(last))
    assert (c.video[1:-1] == 0.5).all()
    assert _mask_frames(c) == [0.0] + [1.0] * (F - 2) + [0.0]


def test_extension_of_a_short_clip():
    v = _video(f=3)
    c = _build("none", video=v)
    assert c.recipe == "control(none)+extension(6)"
    np.testing.assert_array_equal(c.video[:3], v / np.float32(255))
    assert (c.video[3:] == 0.5).all()
    assert c.mask is None  # gray frames under a white mask; the clip itself is a control signal


def test_extension_keeping_the_clip_firstclip():
    v = _video(f=3)
    c = _build("none", video=v, mask_image=np.zeros((H, W), np.uint8))
    assert c.recipe == "control(none)+mask_image+extension(6)"
    assert (c.video[3:] == 0.5).all()
    _assert_binary(c.mask)
    assert _mask_frames(c) == [0.0] * 3 + [1.0] * 6  # official firstclip


def test_inpainting_with_mask_video():
    v = _video()
    mv = np.zeros((F, H, W), np.uint8)
    mv[:, 8:20, 10:30] = 255
    c = _build("inpainting", video=v, mask_video=mv)
    assert c.recipe == "control(inpainting)+mask_video"
    sel = mv == 255
    assert (c.video[sel] == np.float32(128) / np.float32(255)).all()  # official MASK_COLOR 128
    np.testing.assert_array_equal(c.video[~sel], v[~sel] / np.float32(255))
    _assert_binary(c.mask)
    np.testing.assert_array_equal(c.mask[..., 0], sel.astype(np.float32))


def test_inpainting_with_static_mask_image():
    v = _video()
    mi = np.zeros((H, W), np.uint8)
    mi[4:12, 4:12] = 255
    c = _build("inpainting", video=v, mask_image=mi)
    assert c.recipe == "control(inpainting)+mask_image"
    for f in range(F):
        np.testing.assert_array_equal(c.mask[f, ..., 0], (mi == 255).astype(np.float32))
        assert (c.video[f][mi == 255] == np.float32(128 / 255)).all()
        np.testing.assert_array_equal(c.video[f][mi == 0], v[f][mi == 0] / np.float32(255))


def _soft_edge_mask() -> np.ndarray:
    """An anti-aliased mask: each column of the 48 holds one level of a 0..255 ramp, hand-picked
    so both thresholds fall between known columns."""
    levels = np.array([0, 0, 1, 2, 10, 64, 127, 128, 129, 200, 254, 255] * 4, np.uint8)
    return np.broadcast_to(levels, (H, W)).copy()


def test_inpainting_masks_every_value_above_zero_like_the_official_annotator():
    v = _video()
    mi = _soft_edge_mask()
    c = _build("inpainting", video=v, mask_image=mi)
    masked = mi > 0  # columns with levels 1, 2, 10, 64, 127 are regenerated too
    assert masked.sum(1)[0] == 40  # 10 of every 12 columns
    for f in range(F):
        np.testing.assert_array_equal(c.mask[f, ..., 0], masked.astype(np.float32))
        assert (c.video[f][masked] == np.float32(128 / 255)).all()  # gray fill where masked
        np.testing.assert_array_equal(c.video[f][~masked], v[f][~masked] / np.float32(255))


def test_inpainting_soft_mask_video_edges_and_other_tasks_at_half():
    v = _video()
    mv = np.broadcast_to(_soft_edge_mask(), (F, H, W)).copy()
    inpaint = _build("inpainting", video=v, mask_video=mv)
    np.testing.assert_array_equal(inpaint.mask[..., 0], (mv > 0).astype(np.float32))
    # The same soft mask with any other task is a ready mask: the loader's 0.5 (>= 128).
    for task in ("none", "gray"):
        c = _build(task, video=v, mask_video=mv)
        np.testing.assert_array_equal(c.mask[..., 0], (mv >= 128).astype(np.float32))
        assert c.mask[0, 0, :12, 0].tolist() == [0.0] * 7 + [1.0] * 5  # 127 keeps, 128 generates


def test_mask_thresholds_are_stated_by_each_preprocessor():
    from preprocessors.registry import get_preprocessor

    assert get_preprocessor("inpainting").mask_threshold == 1  # > 0
    assert get_preprocessor("none").mask_threshold == 128  # >= 0.5
    assert get_preprocessor("gray").mask_threshold == 128


def test_inpainting_needs_a_mask():
    with pytest.raises(InvalidParameter, match="task 'inpainting' needs mask_video or mask_image"):
        _build("inpainting", video=_video())


def test_short_mask_video_is_white_beyond_its_end():
    v = _video()
    mv = np.zeros((4, H, W), np.uint8)
    c = _build("inpainting", video=v, mask_video=mv)
    assert _mask_frames(c) == [0.0] * 4 + [1.0] * 5
    np.testing.assert_array_equal(c.video[:4], v[:4] / np.float32(255))
    assert (c.video[4:] == np.float32(128 / 255)).all()  # whole frames to generate


def test_mask_video_wins_over_mask_image_and_is_binarised():
    mv = np.full((F, H, W), 200, np.uint8)
    mv[0] = 100
    c = _build("none", video=_video(), mask_video=mv, mask_image=np.zeros((H, W), np.uint8))
    assert c.recipe == "control(none)+mask_video"
    assert _mask_frames(c) == [0.0] + [1.0] * (F - 1)


def test_outpainting_like_mask_with_task_none():
    v = _video()
    mv = np.full((F, H, W), 255, np.uint8)
    mv[:, 8:24, 12:36] = 0  # keep the centre, generate a border
    c = _build("none", video=v, mask_video=mv)
    np.testing.assert_array_equal(c.video, v / np.float32(255))  # MV2V: frames as given
    np.testing.assert_array_equal(c.mask[..., 0], (mv == 255).astype(np.float32))


def test_control_with_refs():
    a, b = _solid((255, 0, 0)), _solid((0, 255, 0))
    c = _build("gray", video=_video(), images=[a, b])
    assert c.recipe == "control(gray)+refs"
    assert _arrays(c.reference_images) == _arrays([_canvas(b), _canvas(a)])
    assert c.reference_images == c.reference_images_api_order[::-1]
    assert c.mask is None


def test_first_last_with_refs():
    a, b = _solid((255, 0, 0)), _solid((0, 255, 0))
    c = _build(first_image=_solid((1, 2, 3)), last_image=_solid((4, 5, 6)), images=[a, b])
    assert c.recipe == "first_image+last_image+refs"
    assert _arrays(c.reference_images) == _arrays([_canvas(b), _canvas(a)])
    assert _mask_frames(c) == [0.0] + [1.0] * (F - 2) + [0.0]


def test_video_with_first_image_overrides_frame_and_mask():
    v = _video()
    img = _solid((9, 99, 199))
    c = _build("gray", video=v, first_image=img, mask_video=np.full((F, H, W), 255, np.uint8))
    assert c.recipe == "control(gray)+mask_video+first_image"
    np.testing.assert_array_equal(c.video[0], _fitted(img))
    gray = _gray_ref(v[1:])[..., None].repeat(3, -1) / np.float32(255)
    np.testing.assert_array_equal(c.video[1:], gray)
    assert _mask_frames(c) == [0.0] + [1.0] * (F - 1)


def test_short_video_with_last_image():
    v = _video(f=5)
    img = _solid((9, 99, 199))
    c = _build("none", video=v, last_image=img)
    np.testing.assert_array_equal(c.video[:5], v / np.float32(255))
    assert (c.video[5:-1] == 0.5).all()
    np.testing.assert_array_equal(c.video[-1], _fitted(img))
    assert _mask_frames(c) == [1.0] * (F - 1) + [0.0]


def test_first_image_is_fitted_by_cover_and_centre_crop():
    img = PIL.Image.new("RGB", (100, 50))
    img.paste((255, 0, 0), (0, 0, 18, 50))  # red strips at both ends, cropped away
    img.paste((0, 0, 255), (82, 0, 100, 50))
    img.paste((0, 255, 0), (18, 0, 82, 50))
    c = build_conditioning(
        "none", MediaInputs(first_image=img), width=32, height=32, num_frames=F
    )  # cover: 100x50 -> 64x32, keep x 18..82 of the source
    px = c.video[0]
    assert px.shape == (32, 32, 3)
    assert px[:, 2:-2, 1].min() > 0.8 and px[:, 2:-2, 0].max() < 0.25 and px[:, 2:-2, 2].max() < 0.25


def test_first_image_with_alpha_is_composited_over_white():
    img = PIL.Image.new("RGBA", (W, H), (0, 0, 0, 0))
    c = _build(first_image=img)
    assert (c.video[0] == 1.0).all()


# --- refusals and contract checks -----------------------------------------------------------


@pytest.mark.parametrize("field", ["mask_video", "mask_image"])
def test_mask_without_video_is_refused(field):
    m = np.zeros((F, H, W) if field == "mask_video" else (H, W), np.uint8)
    with pytest.raises(InvalidParameter, match=f"{field} needs a video to edit"):
        _build("inpainting", first_image=_solid((0, 0, 0)), **{field: m})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 40, "height": H, "num_frames": F},  # not a multiple of 16
        {"width": W, "height": H, "num_frames": 8},  # not 4n+1
    ],
)
def test_bad_target_is_refused(kwargs):
    with pytest.raises(ValueError):
        build_conditioning("none", MediaInputs(), **kwargs)


@pytest.mark.parametrize(
    "media",
    [
        {"video": _video().astype(np.float32)},  # not uint8
        {"video": np.zeros((F, H, W + 16, 3), np.uint8)},  # wrong size
        {"video": np.zeros((F + 4, H, W, 3), np.uint8)},  # more frames than the output
        {"video": _video(), "mask_video": np.zeros((F, H, W, 1), np.uint8)},
        {"video": _video(), "mask_image": np.zeros((H + 16, W), np.uint8)},
    ],
)
def test_media_contract_violations_are_value_errors(media):
    with pytest.raises(ValueError):
        _build("none", **media)


def test_too_many_refs_for_the_frames():
    refs = [_solid((i, i, i)) for i in range(4)]
    with pytest.raises(InvalidParameter, match="4 reference images need a video of at least 13"):
        _build(images=refs)  # 9 frames = 3 latent frames
    assert len(_build(images=refs[:3]).reference_images) == 3


def test_tiny_ref_is_refused():
    with pytest.raises(InvalidParameter, match=r"images\[1\] is 4x40 pixels"):
        _build(images=[_solid((0, 0, 0)), _solid((0, 0, 0), (4, 40))])


def test_injected_preprocessor_lookup_and_output_check():
    seen = {}

    class Invert(Preprocessor):
        name = "invert"

        def __call__(self, frames, mask):
            seen["mask"] = mask
            return 255 - frames, mask

    def lookup(task):
        assert task == "invert"
        return Invert()

    v = _video()
    c = build_conditioning(
        "invert", MediaInputs(video=v), width=W, height=H, num_frames=F, preprocessors=lookup
    )
    np.testing.assert_array_equal(c.video, (255 - v) / np.float32(255))
    assert seen["mask"] is None

    class Broken(Preprocessor):
        def __call__(self, frames, mask):
            return frames[..., :1], mask

    with pytest.raises(ValueError, match="returned"):
        build_conditioning(
            "x", MediaInputs(video=v), width=W, height=H, num_frames=F,
            preprocessors=lambda t: Broken(),
        )  # fmt: skip


# --- pipeline level: what the real WanVACEPipeline receives ---------------------------------


@pytest.fixture(scope="module")
def pipe():
    from pipelines.tiny import build_tiny_pipeline

    p = build_tiny_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


class Spy:
    """Records the outputs of the pipeline's conditioning steps during a real `pipe(...)` run."""

    def __init__(self, pipe, monkeypatch):
        self.calls = {}
        for name in ("preprocess_conditions", "prepare_video_latents", "prepare_masks"):
            orig = getattr(pipe, name)

            def wrapper(*args, __orig=orig, __name=name, **kwargs):
                out = __orig(*args, **kwargs)
                self.calls[__name] = (args, kwargs, out)
                return out

            monkeypatch.setattr(pipe, name, wrapper)

    def out(self, name):
        return self.calls[name][2]


def _run(pipe, c: Conditioning, monkeypatch) -> Spy:
    spy = Spy(pipe, monkeypatch)
    pipe(
        prompt="a cat walks",
        num_inference_steps=1,
        guidance_scale=1.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **c.pipeline_kwargs(),
    )
    return spy


def test_pipeline_first_last_gray_is_exactly_zero(pipe, monkeypatch):
    first, last = _solid((10, 200, 30), (100, 50)), _solid((250, 5, 128), (20, 60))
    c = _build("depth", first_image=first, last_image=last)
    video, mask, refs = _run(pipe, c, monkeypatch).out("preprocess_conditions")
    assert video.shape == (1, 3, F, H, W) and mask.shape == (1, 1, F, H, W)
    assert (video[0, :, 1:-1] == 0.0).all()  # gray = exactly 0 in [-1, 1] (official 127.5)
    for idx, img in ((0, first), (-1, last)):
        expected = torch.from_numpy(_fitted(img)).permute(2, 0, 1) * 2.0 - 1.0
        torch.testing.assert_close(video[0, :, idx], expected, rtol=0, atol=1e-6)
    assert mask[0, 0, :, 0, 0].tolist() == [0.0] + [1.0] * (F - 2) + [0.0]
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert refs == [[]]


def test_pipeline_t2v_defaults(pipe, monkeypatch):
    video, mask, refs = _run(pipe, _build("depth"), monkeypatch).out("preprocess_conditions")
    assert (video == 0).all() and (mask == 1).all() and video.shape == (1, 3, F, H, W)


def test_pipeline_inpainting_mask_and_values(pipe, monkeypatch):
    v = _video()
    mv = np.zeros((F, H, W), np.uint8)
    mv[:, 8:24, 16:32] = 255
    c = _build("inpainting", video=v, mask_video=mv)
    video, mask, _ = _run(pipe, c, monkeypatch).out("preprocess_conditions")
    sel = torch.from_numpy(mv == 255)
    torch.testing.assert_close(mask[0, 0], sel.float(), rtol=0, atol=0)
    # masked pixels: 128 -> the official 128/127.5 - 1; kept pixels: v/127.5 - 1
    official = torch.from_numpy(v.astype(np.float32)).permute(3, 0, 1, 2) / 127.5 - 1
    official[:, sel] = 128 / 127.5 - 1
    torch.testing.assert_close(video[0], official, rtol=0, atol=1e-6)


def test_pipeline_reference_order_is_official(pipe, monkeypatch):
    red, blue = _solid((255, 0, 0), (40, 24)), _solid((0, 0, 255), (24, 40))
    v = _video()
    mv = np.zeros((F, H, W), np.uint8)
    mv[:, :, W // 2 :] = 255
    c = _build("none", video=v, mask_video=mv, images=[red, blue])  # API order [A=red, B=blue]
    spy = _run(pipe, c, monkeypatch)

    video, mask, refs = spy.out("preprocess_conditions")
    # diffusers receives [B, A]: fitted inside HxW on a white canvas, centred
    assert len(refs[0]) == 2
    b_canvas, a_canvas = refs[0]
    assert b_canvas[:, H // 2, W // 2].tolist() == [-1.0, -1.0, 1.0]
    assert a_canvas[:, H // 2, W // 2].tolist() == [1.0, -1.0, -1.0]
    assert b_canvas[:, H // 2, 0].tolist() == [1.0, 1.0, 1.0]  # white canvas beside a tall ref

    # ...and the latent comes out in the official order [A, B, video]
    latents = spy.out("prepare_video_latents")
    lat_frames = (F - 1) // 4 + 1
    assert latents.shape[2] == 2 + lat_frames
    with torch.no_grad():
        only_a = pipe.prepare_video_latents(video, mask, [[a_canvas]], None, torch.device("cpu"))
        only_b = pipe.prepare_video_latents(video, mask, [[b_canvas]], None, torch.device("cpu"))
    torch.testing.assert_close(latents[:, :, 0], only_a[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(latents[:, :, 1], only_b[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(latents[:, :, 2:], only_a[:, :, 1:], rtol=0, atol=0)
    assert not torch.equal(latents[:, :, 0], latents[:, :, 1])
    # the mask gets zero frames for both references, before the video's
    masks = spy.out("prepare_masks")
    assert masks.shape[2] == 2 + lat_frames
    assert (masks[:, :, :2] == 0).all() and (masks[:, :, 2:] == 1).any()


def test_pipeline_receives_our_canvas_unchanged_and_it_is_the_official_letterbox(pipe, monkeypatch):
    # Odd sizes: diffusers alone would first floor 37x23 to 32x16 with a Lanczos resize
    # (squashing the aspect) before letterboxing; on our canvas its fitting is a no-op.
    rng = np.random.default_rng(3)
    ref_a = PIL.Image.fromarray(rng.integers(0, 256, (23, 37, 3), np.uint8))
    ref_b = PIL.Image.fromarray(rng.integers(0, 256, (61, 19, 3), np.uint8))
    c = _build(images=[ref_a, ref_b])
    _, _, refs = _run(pipe, c, monkeypatch).out("preprocess_conditions")
    b_seen, a_seen = refs[0]
    for seen, ours, src in ((a_seen, c.reference_images_api_order[0], ref_a),
                            (b_seen, c.reference_images_api_order[1], ref_b)):  # fmt: skip
        ours_t = torch.from_numpy(np.asarray(ours, np.float32)).permute(2, 0, 1) / 127.5 - 1
        torch.testing.assert_close(seen, ours_t, rtol=0, atol=1e-6)  # diffusers changed nothing
        # The official prepare_source letterbox, in float: we differ by the 8-bit rounding only.
        x = torch.from_numpy(np.asarray(src, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
        rh, rw = x.shape[-2:]
        scale = min(H / rh, W / rw)
        nh, nw = int(rh * scale), int(rw * scale)
        official = torch.ones(3, H, W)
        top, left = (H - nh) // 2, (W - nw) // 2
        official[:, top : top + nh, left : left + nw] = torch.nn.functional.interpolate(
            x, size=(nh, nw), mode="bilinear", align_corners=False
        )[0]
        assert (seen - official).abs().max() <= 0.5 / 127.5 + 1e-5


def test_pipeline_one_channel_mask_equals_three_channels(pipe):
    # Our (F,H,W,1) mask gives exactly the latents a 3-channel mask would.
    v = _video(f=5)
    mv = np.zeros((5, H, W), np.uint8)
    mv[:, 4:20, 8:40] = 255
    c = build_conditioning(
        "none", MediaInputs(video=v, mask_video=mv), width=W, height=H, num_frames=5
    )
    kw = c.pipeline_kwargs()
    dev = torch.device("cpu")
    args = (kw["video"], kw["mask"], None, 1, H, W, 5, torch.float32, dev)
    vid1, m1, _ = pipe.preprocess_conditions(*args)
    vid3, m3, _ = pipe.preprocess_conditions(kw["video"], np.repeat(kw["mask"], 3, -1), *args[2:])
    assert m1.shape[1] == 1 and m3.shape[1] == 3
    with torch.no_grad():
        l1 = pipe.prepare_video_latents(vid1, m1, [[]], None, dev)
        l3 = pipe.prepare_video_latents(vid3, m3, [[]], None, dev)
    torch.testing.assert_close(l1, l3, rtol=0, atol=0)
    torch.testing.assert_close(pipe.prepare_masks(m1, [[]]), pipe.prepare_masks(m3, [[]]))


def test_media_inputs_are_exactly_the_media_field_table():
    # The runner fills MediaInputs from the kernel's table by name; neither can gain a field the
    # other lacks.
    import dataclasses

    from server.kernel.request import MEDIA_FIELDS

    assert [f.name for f in dataclasses.fields(MediaInputs)] == [m.name for m in MEDIA_FIELDS]


def test_extend_forward_equals_the_hand_made_firstclip_mask():
    # `extend: forward` is what `task: none` with a black mask_image gave, without the mask.
    from pipelines.conditioning import Extensions

    v = _video(f=3)
    by_hand = _build("none", video=v, mask_image=np.zeros((H, W), np.uint8))
    extended = build_conditioning("depth", MediaInputs(video=v), width=W, height=H, num_frames=F,
                                  extensions=Extensions(extend="forward"))  # fmt: skip
    np.testing.assert_array_equal(extended.video, by_hand.video)
    np.testing.assert_array_equal(extended.mask, by_hand.mask)
    assert extended.recipe == "extend(forward)"
