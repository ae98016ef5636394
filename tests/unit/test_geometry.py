"""The frame fit and the reference letterbox (pipelines/geometry.py) at the real API sizes.

The tiny model renders small (832x480 at 112x64), which hid a crash of the old fractional-box fit
on 5% of source sizes (a 720x1280 phone video into the default 832*480 among them), so the fit is
tested here over grids of source sizes at every API size and every tiny render size, and its
pixels against an independent implementation of the official formula written with torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.geometry import cover_geometry, fit_cover, letterbox, letterbox_geometry
from pipelines.tiny import render_size

API_SIZES = [(832, 480), (480, 832), (1280, 720), (720, 1280)]
TINY_SIZES = sorted({render_size(w, h, 8) for w, h in API_SIZES})  # 112x64, 160x96, ...
TARGETS = API_SIZES + TINY_SIZES

# Sizes people's media come in: phones (both orientations), cameras, screens, web images.
COMMON_SOURCES = [
    (720, 1280), (1080, 1920), (1440, 2560), (2160, 3840), (1280, 720), (1920, 1080),
    (2560, 1440), (3840, 2160), (1440, 1080), (1080, 1440), (640, 480), (480, 640), (320, 240),
    (854, 480), (480, 854), (1080, 1080), (720, 720), (1024, 768), (768, 1024), (4032, 3024),
    (3024, 4032), (1366, 768), (2048, 1080), (4096, 2160), (1200, 628), (500, 333), (333, 500),
    (1000, 1), (1, 1000), (16, 16),
]  # fmt: skip


def test_targets_include_the_tiny_render_sizes():
    assert (112, 64) in TARGETS and (160, 96) in TARGETS and len(TARGETS) == 8


# ---------------------------------------------------------------------------------------------
# Geometry: the official formula, never an impossible box


def _official_cover(iw: int, ih: int, ow: int, oh: int) -> tuple[int, int, int, int]:
    """Wan2.1 / VACE `VaceVideoProcessor._resize_crop`, written out again independently."""
    scale = max(ow / iw, oh / ih)
    rh, rw = round(scale * ih), round(scale * iw)
    assert rw >= ow and rh >= oh  # the official code asserts this too
    return rw, rh, (rw - ow) // 2, (rh - oh) // 2


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"{t[0]}x{t[1]}")
def test_cover_geometry_is_the_official_one_over_a_dense_grid(target):
    ow, oh = target
    sides = sorted(set(range(1, 2049, 7)) | set(range(2048, 8193, 61)) | {720, 1080, 1280, 1920})
    for iw in sides:
        for ih in sides[:: max(1, len(sides) // 60)] + [720, 1080, 1280, 1920, 2160, 3840]:
            g = cover_geometry(iw, ih, ow, oh)
            assert tuple(g) == _official_cover(iw, ih, ow, oh), (iw, ih)
            assert 0 <= g.left and g.left + ow <= g.resized_w
            assert 0 <= g.top and g.top + oh <= g.resized_h


# ---------------------------------------------------------------------------------------------
# The fit itself: exact size, no exception, over grids of real source sizes


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"{t[0]}x{t[1]}")
def test_fit_cover_never_raises_and_is_exact_over_a_grid(target):
    # 28 x 28 source sizes from 16 to 1096 px a side (every aspect ratio from 1:68 to 68:1),
    # plus the common ones: the old fit raised "box offset can't be negative" on 276 of these
    # 6,512 cases.
    sides = range(16, 1101, 40)
    sizes = [(w, h) for w in sides for h in sides] + COMMON_SOURCES
    for w, h in sizes:
        out = fit_cover(Image.new("L", (w, h)), *target)
        assert out.size == target, (w, h)


@pytest.mark.parametrize("target", API_SIZES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("source", [(720, 1280), (1440, 1080), (1280, 720), (1080, 1440), (2560, 1440)])
def test_fit_cover_rgb_cases_that_crashed_before(source, target):
    out = fit_cover(Image.new("RGB", source, (10, 20, 30)), *target)
    assert out.size == target and out.mode == "RGB"
    assert np.asarray(out).reshape(-1, 3).min(0).tolist() == [10, 20, 30]


def test_fit_cover_extreme_aspect_ratios_stay_cheap():
    # Resizing the whole 1x4000 line to cover 832x480 would make an 832 x 3.3 million image.
    for size in [(1, 4000), (4000, 1), (1, 1), (2, 3)]:
        out = fit_cover(Image.new("L", size, 200), 832, 480)
        assert out.size == (832, 480) and np.asarray(out).min() == 200


def test_fit_cover_same_size_is_the_image_and_a_pure_crop_is_exact():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 832, 3), np.uint8))
    assert fit_cover(img.resize((832, 480)), 832, 480).size == (832, 480)
    same = img.crop((0, 0, 832, 480))
    assert fit_cover(same, 832, 480) is same
    # 832x600 -> 832x480: scale 1, so the official code only crops rows 60..540.
    np.testing.assert_array_equal(np.asarray(fit_cover(img, 832, 480)), np.asarray(img)[60:540])


def _textured(w: int, h: int, seed: int) -> np.ndarray:
    """A natural-looking test frame: smooth colour fields, hard-edged rectangles, sensor noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)).astype(int)
    for _ in range(20):
        x, y = rng.integers(0, w), rng.integers(0, h)
        base[y : y + rng.integers(5, h // 4), x : x + rng.integers(5, w // 4)] = rng.integers(0, 256, 3)
    base += rng.integers(-6, 7, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def _official_fit(arr: np.ndarray, ow: int, oh: int) -> np.ndarray:
    """The official resize + crop on the uint8 frames decord hands it: torch's antialiased
    bicubic to the rounded size, then the integer centre crop."""
    video = torch.from_numpy(arr).permute(2, 0, 1)[None]
    ih, iw = video.shape[2:]
    scale = max(ow / iw, oh / ih)
    video = F.interpolate(
        video, size=(round(scale * ih), round(scale * iw)), mode="bicubic", antialias=True
    )
    x1, y1 = (video.size(3) - ow) // 2, (video.size(2) - oh) // 2
    return video[0, :, y1 : y1 + oh, x1 : x1 + ow].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("target", API_SIZES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize(
    "source", [(720, 1280), (1920, 1080), (1440, 1080), (1080, 1920), (640, 480), (500, 333)]
)
def test_fit_cover_pixels_match_the_official_formula(source, target):
    arr = _textured(*source, seed=source[0] * 7 + source[1])
    ours = np.asarray(fit_cover(Image.fromarray(arr), *target)).astype(np.int16)
    official = _official_fit(arr, *target).astype(np.int16)
    diff = np.abs(ours - official)
    # The same geometry and kernel; what is left is the two libraries' fixed-point rounding.
    # (The old fractional-box fit: mean 0.1-2.7, max 60-139 levels on these frames.)
    assert diff.mean() <= 0.02 and diff.max() <= 2, (diff.mean(), diff.max())


# ---------------------------------------------------------------------------------------------
# Reference letterbox


def test_letterbox_geometry_by_hand():
    # 40x24 into 48x32: scale min(32/24, 48/40) = 1.2 -> 48x28, centred 2 px from the top.
    assert tuple(letterbox_geometry(40, 24, 48, 32)) == (48, 28, 0, 2)
    # 24x40 into 48x32: scale 0.8 -> 19x32 (int(19.2)), left (48-19)//2 = 14.
    assert tuple(letterbox_geometry(24, 40, 48, 32)) == (19, 32, 14, 0)
    assert tuple(letterbox_geometry(832, 480, 832, 480)) == (832, 480, 0, 0)
    assert tuple(letterbox_geometry(1, 10000, 832, 480)) == (1, 480, 415, 0)  # never empty


def test_letterbox_values_by_hand():
    # A 2x1 image [0, 255] into 4x2 (scale 2): torch's bilinear with align_corners=False samples
    # x at -0.25 (clamped to 0), 0.25, 0.75 and 1.25 (upper neighbour clamped), giving
    # 0, 63.75, 191.25, 255, rounded to 0, 64, 191, 255 on both rows.
    img = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8))
    out = np.asarray(letterbox(img, 4, 2))
    assert out[..., 0].tolist() == [[0, 64, 191, 255], [0, 64, 191, 255]]
    # A red 40x24 on 48x32: white bands of 2 rows above and below, red in between.
    red = np.asarray(letterbox(Image.new("RGB", (40, 24), (255, 0, 0)), 48, 32))
    assert (red[:2] == 255).all() and (red[30:] == 255).all()
    assert (red[2:30] == (255, 0, 0)).all()


def _official_letterbox(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    """The official `prepare_source` reference fit, written with torch, in 0..255 float."""
    ref = torch.from_numpy(arr).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)[None]
    rh, rw = ref.shape[-2:]
    canvas = torch.ones((3, height, width))
    scale = min(height / rh, width / rw)
    nh, nw = int(rh * scale), int(rw * scale)
    resized = F.interpolate(ref, size=(nh, nw), mode="bilinear", align_corners=False)[0]
    top, left = (height - nh) // 2, (width - nw) // 2
    canvas[:, top : top + nh, left : left + nw] = resized
    return ((canvas + 1) * 127.5).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("target", API_SIZES + [(112, 64)], ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("source", [(37, 23), (1024, 1024), (333, 500), (1920, 1080), (801, 97)])
def test_letterbox_matches_the_official_formula_within_half_a_level(source, target):
    arr = _textured(*source, seed=source[0] + source[1]) if min(source) >= 32 else (
        np.random.default_rng(1).integers(0, 256, (source[1], source[0], 3), np.uint8)
    )
    ours = np.asarray(letterbox(Image.fromarray(arr), *target)).astype(np.float64)
    assert ours.shape == (target[1], target[0], 3)
    diff = np.abs(ours - _official_letterbox(arr, *target))
    assert diff.max() <= 0.5 + 1e-3, diff.max()


def test_letterbox_refuses_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        letterbox(Image.new("RGBA", (8, 8)), 16, 16)
