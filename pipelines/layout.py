"""Boxes over time: the keyframe interpolation shared by `layout_bbox` (the layout control
video, VACE's LayoutBboxAnnotator) and `mask_bbox` (an inpainting mask from a box, the official
InpaintingVideoAnnotator's `bbox` mode), and the two ways of drawing a box.

Boxes arrive as `(x1, y1, x2, y2)` in render pixels (floats once scaled from the output size).
Keyframe k of K sits at frame `round(k * (F - 1) / (K - 1))`; between keyframes the box moves
linearly. Like the official annotator, the interpolation runs on `(x, y, w, h)` and each is
truncated to an integer for the frame, so a box keeps its size while it moves. Unlike it, the
last keyframe is reached on the last frame (the official code steps by 1/F and stops one step
short of its end box).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["box_masks", "box_track", "draw_layout", "keyframe_index"]

BoxF = tuple[float, float, float, float]

# LayoutBboxAnnotator's defaults: a black box outline on white, OpenCV thickness 2.
_BACKGROUND = 255
_BOX_COLOR = (0, 0, 0)
_THICKNESS = 2
# Scaled coordinates like 480 * 64 / 480 can come out a hair under the integer.
_EPS = 1e-6


def keyframe_index(k: int, keyframes: int, num_frames: int) -> int:
    """The frame keyframe `k` of `keyframes` lands on (a single box is static: frame 0)."""
    if keyframes < 2:
        return 0
    return round(k * (num_frames - 1) / (keyframes - 1))


def box_track(boxes: Sequence[BoxF], num_frames: int) -> np.ndarray:
    """int64 (F, 4) `(x, y, w, h)` per frame: the keyframes interpolated (one box: static)."""
    xywh = np.array([(x1, y1, x2 - x1, y2 - y1) for x1, y1, x2, y2 in boxes], dtype=np.float64)
    if len(xywh) == 1:
        return np.repeat(np.floor(xywh + _EPS).astype(np.int64), num_frames, axis=0)
    keys = np.array([keyframe_index(k, len(xywh), num_frames) for k in range(len(xywh))], float)
    frames = np.arange(num_frames, dtype=np.float64)
    out = np.stack([np.interp(frames, keys, xywh[:, c]) for c in range(4)], axis=1)
    return np.floor(out + _EPS).astype(np.int64)


def draw_layout(track: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (F, H, W, 3): each frame's box outlined as the official annotator draws it
    (`cv2.rectangle` from (x, y) to (x + w, y + h), black, thickness 2, on white)."""
    import cv2

    frames = np.full((len(track), height, width, 3), _BACKGROUND, dtype=np.uint8)
    for frame, (x, y, w, h) in zip(frames, track):
        cv2.rectangle(frame, (int(x), int(y)), (int(x + w), int(y + h)), _BOX_COLOR, _THICKNESS)
    return frames


def box_masks(track: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (F, H, W), 255 inside each frame's box: the official `bbox` mode's
    `mask[y1:y2, x1:x2] = 255` (clipped to the frame)."""
    masks = np.zeros((len(track), height, width), dtype=np.uint8)
    for mask, (x, y, w, h) in zip(masks, track):
        x1, y1 = max(0, int(x)), max(0, int(y))
        mask[y1 : min(height, int(y + h)), x1 : min(width, int(x + w))] = 255
    return masks
