"""Preprocessors that need no model: `none`, `gray`, `inpainting`, `outpainting`,
`outpainting_inner` (numpy only).

Each reproduces the official VACE annotator's output (ali-vilab/VACE `vace/annotators/`) on
uint8 RGB frames, batched over the whole clip.
"""

from __future__ import annotations

import numpy as np

from preprocessors.registry import Preprocessor

# Official mid-gray for masked pixels (InpaintingVideoAnnotator MASK_COLOR). As uint8 it becomes
# 128/127.5 - 1 = 0.0039 in [-1, 1], exactly what the official pipeline feeds the VAE.
MASK_COLOR = 128

# OpenCV's fixed-point luma weights for 8-bit cvtColor(..., COLOR_BGR2GRAY): 15-bit
# coefficients (0.114, 0.587, 0.299) * 2**15 with round-half-up. Checked bit-exact against
# opencv-python-headless 4.14 and 5.0 on 1 M random pixels (the 14-bit 1868/9617/4899 set
# found in older write-ups differs in ~1% of pixels).
_GRAY_SHIFT = 15
# Applied to channels 0, 1, 2 of an *RGB* frame, as VACE does (it calls BGR2GRAY on RGB
# frames, so R gets the blue weight and B the red one). Kept as float32: every product and
# partial sum is an integer below 2**24, so a float32 matrix product (BLAS, ~4x faster than
# integer arithmetic in numpy) is exact.
_GRAY_WEIGHTS = np.array([3735, 19235, 9798], dtype=np.float32)


class NonePreprocessor(Preprocessor):
    """`none`: the video is used verbatim (an already-made control video, or MV2V with a mask)."""

    name = "none"
    needs_mask = False

    def __call__(self, frames, mask):
        return frames, mask


class GrayPreprocessor(Preprocessor):
    """`gray` (VACE GrayVideoAnnotator): 8-bit luma repeated to 3 channels.

    [compat] VACE applies cv2.COLOR_BGR2GRAY to RGB frames, so the result is
    0.114 R + 0.587 G + 0.299 B (not the usual 0.299 R + ... ); we reproduce that quirk and
    OpenCV's integer rounding exactly, because the model was trained on those frames.
    """

    name = "gray"
    needs_mask = False

    def __call__(self, frames, mask):
        out = np.empty_like(frames)
        half = np.float32(1 << (_GRAY_SHIFT - 1))
        scale = np.float32(1.0 / (1 << _GRAY_SHIFT))  # a power of two: exact
        # Frame by frame keeps the float temporaries to one frame's size.
        for i in range(frames.shape[0]):
            acc = frames[i].astype(np.float32) @ _GRAY_WEIGHTS
            acc += half
            acc *= scale
            np.floor(acc, out=acc)
            out[i] = acc.astype(np.uint8)[..., None]
        return out, mask


class InpaintingPreprocessor(Preprocessor):
    """`inpainting` (VACE InpaintingVideoAnnotator, mode 'mask'): pixels to generate (mask 255)
    are set to mid-gray 128; the mask is returned unchanged."""

    name = "inpainting"
    needs_mask = True
    # The official annotator masks every value > 0 (`mask > 0`), so soft or anti-aliased edges
    # are regenerated, not kept.
    mask_threshold = 1

    def __call__(self, frames, mask):
        if mask is None:
            raise ValueError("the inpainting preprocessor needs a mask")
        out = frames.copy()
        # The mask is already 0/255 (binarised with `mask_threshold`), so the gray region and
        # the region the pipeline generates always coincide.
        out[mask > 127] = MASK_COLOR
        return out, mask


class OutpaintingPreprocessor(NonePreprocessor):
    """`outpainting` / `outpainting_inner` (VACE OutpaintingVideoAnnotator and its inner
    variant): the frames pass through unchanged. What these tasks change is geometry, the
    source placed on a canvas with gray where it is not, and that gray is 0.5 exactly (127.5),
    which uint8 frames cannot hold; so the conditioning builder places the frames
    (`pipelines.geometry.outpaint_box`) and writes the canvas and mask."""

    def __init__(self, name: str):
        self.name = name


def build_outpainting(context) -> OutpaintingPreprocessor:
    return OutpaintingPreprocessor("outpainting")


def build_outpainting_inner(context) -> OutpaintingPreprocessor:
    return OutpaintingPreprocessor("outpainting_inner")


def build_none(context) -> NonePreprocessor:
    return NonePreprocessor()


def build_gray(context) -> GrayPreprocessor:
    return GrayPreprocessor()


def build_inpainting(context) -> InpaintingPreprocessor:
    return InpaintingPreprocessor()
