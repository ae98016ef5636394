"""How an input picture is placed on the H x W target: the official VACE geometry (Pillow, numpy).

Two placements, both written from the official Wan2.1 / VACE code's formulas:

- `fit_cover`, for everything that becomes a frame of the source video (video frames, masks,
  `first_image`/`last_image`, outpainting): the official `VaceVideoProcessor._resize_crop`
  resizes to COVER the target, to `round(scale * side)` pixels with bicubic + antialias, then
  crops at the INTEGER offsets `(resized - target) // 2`. Geometry in `cover_geometry`.
- `letterbox`, for reference images: the official `prepare_source` fits the image INSIDE the
  target (`int(side * scale)` pixels, bilinear without antialias, torch's `align_corners=False`
  sampling), centred at `(target - fitted) // 2` on a white canvas. Given a canvas-sized image,
  diffusers' own reference fitting (which first floors each side to a multiple of 8 with a
  Lanczos resize, squashing the aspect) changes nothing.

`outpaint_box` is where the source sits on the canvas of the outpainting tasks (the source is
then fitted into that box with `fit_cover`).

Neither placement can raise for a valid image of any size: sizes are clamped to at least one pixel and the
source box handed to Pillow is clamped into the image (floating-point rounding can otherwise put
it ~1e-13 px outside, which Pillow refuses with "box offset can't be negative").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image

__all__ = [
    "Box",
    "CoverGeometry",
    "LetterboxGeometry",
    "cover_geometry",
    "fit_cover",
    "letterbox",
    "letterbox_geometry",
    "outpaint_box",
]

_BICUBIC = Image.Resampling.BICUBIC


class CoverGeometry(NamedTuple):
    """Resize the source to `resized_w` x `resized_h`, then crop `width` x `height` at
    (`left`, `top`)."""

    resized_w: int
    resized_h: int
    left: int
    top: int


def cover_geometry(src_w: int, src_h: int, width: int, height: int) -> CoverGeometry:
    """The official resize-to-cover size and integer centre-crop offsets.

    `round` is Python's (half to even), as in the official code. The `max` never changes a size
    the official code accepts (it asserts the resized frame covers the target) and keeps an
    extreme aspect ratio from rounding one side below the target."""
    if min(src_w, src_h, width, height) < 1:
        raise ValueError(f"sizes must be positive, got {src_w}x{src_h} -> {width}x{height}")
    scale = max(width / src_w, height / src_h)
    rw = max(width, round(scale * src_w))
    rh = max(height, round(scale * src_h))
    return CoverGeometry(rw, rh, (rw - width) // 2, (rh - height) // 2)


def fit_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` resized to cover `width` x `height` and centre-cropped with the official geometry
    (`cover_geometry`), bicubic with antialias (Pillow's bicubic is the kernel torch's antialiased
    bicubic reproduces), horizontal pass first as torch does.

    Only what survives the crop is resampled, so a 1x4000 mask never becomes an 832x3.3M
    intermediate: the rows the vertical filter reaches are cut out first (an exact copy), resized
    horizontally onto the cropped columns, then vertically onto the cropped rows. Each pass is
    given to Pillow as a `box`, which keeps the sample positions and filter support of resizing
    the whole frame and cropping afterwards. (One Pillow call with both boxes is not the same:
    Pillow then runs the cheaper pass first, and the 8-bit rounding between the passes differs
    from the official result by up to ~20 levels on noise.)"""
    w, h = image.size
    if (w, h) == (width, height):
        return image
    g = cover_geometry(w, h, width, height)
    if (g.resized_w, g.resized_h) == (w, h):  # only a crop
        return image.crop((g.left, g.top, g.left + width, g.top + height))
    sx, sy = w / g.resized_w, h / g.resized_h
    # Source coordinates of the crop, clamped into the image (rounding can put them ~1e-13 px
    # outside, which Pillow refuses).
    x0 = min(max(g.left * sx, 0.0), float(w))
    x1 = min(max((g.left + width) * sx, x0), float(w))
    y0 = min(max(g.top * sy, 0.0), float(h))
    y1 = min(max((g.top + height) * sy, y0), float(h))
    # Rows the vertical pass reads: bicubic support is 2 source px, times the scale when
    # reducing; one more for Pillow's rounding of the window.
    reach = 2.0 * max(sy, 1.0) + 1.0
    r0, r1 = max(0, math.floor(y0 - reach)), min(h, math.ceil(y1 + reach))
    rows = image.crop((0, r0, w, r1))
    rows = rows.resize((width, r1 - r0), _BICUBIC, box=(x0, 0.0, x1, float(r1 - r0)))
    return rows.resize((width, height), _BICUBIC, box=(0.0, y0 - r0, float(width), y1 - r0))


class LetterboxGeometry(NamedTuple):
    """Resize the source to `fitted_w` x `fitted_h` and paste it at (`left`, `top`)."""

    fitted_w: int
    fitted_h: int
    left: int
    top: int


def letterbox_geometry(src_w: int, src_h: int, width: int, height: int) -> LetterboxGeometry:
    """The official reference fit: `int(side * scale)` with `scale = min(H/h, W/w)`, centred with
    floor division. A side is kept at one pixel at least (the official code would crash on an
    empty image; such extreme aspect ratios are refused earlier anyway)."""
    if min(src_w, src_h, width, height) < 1:
        raise ValueError(f"sizes must be positive, got {src_w}x{src_h} -> {width}x{height}")
    scale = min(height / src_h, width / src_w)
    fw = min(width, max(1, int(src_w * scale)))
    fh = min(height, max(1, int(src_h * scale)))
    return LetterboxGeometry(fw, fh, (width - fw) // 2, (height - fh) // 2)


def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's bilinear interpolation with `align_corners=False`
    and no antialias (`area_pixel_compute_source_index`): sample at (i + 0.5) * in/out - 0.5,
    clamped at 0; the upper neighbour is clamped at the last pixel. In float32 as torch computes
    it: at a thousand pixels the positions differ from float64 by ~1e-4 px, up to 0.03 levels."""
    scale = np.float32(n_in / n_out)
    src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0.astype(np.float32)


def letterbox(image: Image.Image, width: int, height: int) -> Image.Image:
    """RGB `image` fitted inside `width` x `height` on a white canvas, exactly as the official
    `prepare_source` places reference images (see `letterbox_geometry`, `_bilinear_taps`).
    The official code does this in floating point; the only difference here is the final
    rounding to 8 bits (at most half a level)."""
    if image.mode != "RGB":
        raise ValueError(f"letterbox expects an RGB image, got mode {image.mode}")
    w, h = image.size
    g = letterbox_geometry(w, h, width, height)
    src = np.asarray(image)
    # Rows first: only the fitted_h rows that are sampled are converted to float.
    r0, r1, ry = _bilinear_taps(h, g.fitted_h)
    top, bottom = src[r0].astype(np.float32), src[r1].astype(np.float32)
    rows = top + (bottom - top) * ry[:, None, None]
    c0, c1, cx = _bilinear_taps(w, g.fitted_w)
    left, right = rows[:, c0], rows[:, c1]
    fitted = left + (right - left) * cx[None, :, None]
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    canvas[g.top : g.top + g.fitted_h, g.left : g.left + g.fitted_w] = np.clip(
        np.rint(fitted), 0, 255
    ).astype(np.uint8)
    return Image.fromarray(canvas, "RGB")


class Box(NamedTuple):
    """`width` x `height` pixels at (`left`, `top`)."""

    left: int
    top: int
    width: int
    height: int


def outpaint_box(
    width: int, height: int, directions: tuple[str, ...] | list[str], ratio: float, *, inner: bool = False
) -> Box:
    """Where the source sits on the `width` x `height` output of the outpainting tasks.

    `outpainting`: the output is the source expanded by `ratio` of its own side on each side in
    `directions` (the official annotator's `int(ratio * side)` padding), so the inner box is
    `round(width / (1 + ratio * (left + right)))` wide, likewise in height, and the padding is
    the rest: all of it on the one side named, split with floor division (the left or upper
    half) when both opposite sides are, as the official code splits its canvas rounding.
    (The official canvas is the source plus padding rounded up to a multiple of 8; ours is the
    requested size, so the source is what gets fitted.)

    `outpainting_inner` (`inner=True`): the frame keeps its size and a border of
    `int(ratio * side)` on each side in `directions` is regenerated (the official
    OutpaintingInnerAnnotator's crop); the box is what remains.
    """
    if not 0 < ratio or min(width, height) < 1:
        raise ValueError(f"need a positive ratio and size, got {ratio} for {width}x{height}")
    d = set(directions)

    def axis(side: int, before: bool, after: bool) -> tuple[int, int]:
        """(padding before, kept length) along one axis."""
        if inner:
            pad = int(ratio * side)
            kept = side - pad * (before + after)
            if kept < 1:
                raise ValueError(f"ratio {ratio} leaves nothing of a {side} px side")
            return (pad if before else 0), kept
        kept = max(1, round(side / (1 + ratio * (before + after))))
        extra = side - kept
        if before and after:
            return extra // 2, kept
        return (extra if before else 0), kept

    left, w = axis(width, "left" in d, "right" in d)
    top, h = axis(height, "up" in d, "down" in d)
    return Box(left, top, w, h)
