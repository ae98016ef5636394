"""Small real media files for upload tests: PNGs made with PIL, MP4s with the server's own
H.264 encoder (`pipelines.media.encode_mp4`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(width: int = 48, height: int = 32, *, noise: bool = False, seed: int = 0) -> bytes:
    """A real PNG: a colour gradient, or random noise (incompressible, so size ~ 3*w*h)."""
    if noise:
        arr = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    else:
        y, x = np.mgrid[0:height, 0:width]
        r, g = x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1)
        arr = np.stack([r, g, np.full_like(x, 128)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def write_png(path: Path, **kw) -> Path:
    path.write_bytes(png_bytes(**kw))
    return path


def write_mp4(path: Path, frames: int = 16, width: int = 64, height: int = 48) -> Path:
    from pipelines.media import encode_mp4

    t = np.arange(frames)[:, None, None]
    y, x = np.mgrid[0:height, 0:width]
    r = (x[None] * 4 + t * 8) % 256
    g = (y[None] * 5 + t * 3) % 256
    b = np.broadcast_to((t * 16) % 256, r.shape)
    encode_mp4(np.stack([r, g, b], -1).astype(np.uint8), str(path), fps=16)
    return path


# The cheapest job that still runs the whole pipeline: one denoising step without classifier-free
# guidance (one transformer pass instead of four for conftest.FAST), then decode and encode.
QUICK = {"num_inference_steps": 1, "guidance_scale": 1.0, "seed": 7}
# A job that stays in denoising for many steps (40 transformer passes over 161 frames, on a CPU):
# still running long after a test has acted on it, yet each step is short, so a cancel (checked
# between steps) takes effect quickly.
SLOW = {"duration": 10, "num_inference_steps": 40, "guidance_scale": 1.0, "seed": 1}
