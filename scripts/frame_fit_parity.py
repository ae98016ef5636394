"""How far our frame fit is from the official Wan2.1 / VACE one, in 0..255 levels.

    python scripts/frame_fit_parity.py [IMAGE ...]

For each source (synthetic natural-looking frames at common phone/camera sizes, plus any image
files given) and each API size, prints the mean and max absolute difference against the official
`_resize_crop` (torch's antialiased bicubic to `round(scale * side)`, integer centre crop, on
uint8 frames as decord delivers them) for:
- `new`: `pipelines.geometry.fit_cover` as served;
- `old`: the fit this server shipped first (one bicubic resample of the fractional centre box),
  kept here as the baseline; `CRASH` where Pillow refused its box.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.geometry import fit_cover

API_SIZES = [(832, 480), (480, 832), (1280, 720), (720, 1280)]
SOURCES = [(720, 1280), (1080, 1920), (1280, 720), (1920, 1080), (1440, 1080), (3840, 2160),
           (640, 480), (500, 333)]  # fmt: skip


def old_fit(image: Image.Image, width: int, height: int) -> Image.Image:
    w, h = image.size
    scale = max(width / w, height / h)
    cw, ch = width / scale, height / scale
    left, top = (w - cw) / 2, (h - ch) / 2
    box = (left, top, left + cw, top + ch)
    return image.resize((width, height), Image.Resampling.BICUBIC, box=box)


def official(arr: np.ndarray, ow: int, oh: int) -> np.ndarray:
    video = torch.from_numpy(arr).permute(2, 0, 1)[None]
    ih, iw = video.shape[2:]
    scale = max(ow / iw, oh / ih)
    video = F.interpolate(
        video, size=(round(scale * ih), round(scale * iw)), mode="bicubic", antialias=True
    )
    x1, y1 = (video.size(3) - ow) // 2, (video.size(2) - oh) // 2
    return video[0, :, y1 : y1 + oh, x1 : x1 + ow].permute(1, 2, 0).numpy()


def textured(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)).astype(int)
    for _ in range(20):
        x, y = rng.integers(0, w), rng.integers(0, h)
        base[y : y + rng.integers(5, h // 4), x : x + rng.integers(5, w // 4)] = rng.integers(0, 256, 3)
    base += rng.integers(-6, 7, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def stats(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), int(d.max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("images", nargs="*", type=Path)
    args = ap.parse_args()
    cases = [(f"synthetic {w}x{h}", textured(w, h, w * 7 + h)) for w, h in SOURCES]
    cases += [(p.name, np.asarray(Image.open(p).convert("RGB"))) for p in args.images]
    print(f"{'source':>24} {'target':>9} {'old mean/max':>14} {'new mean/max':>14}")
    worst = {"old": [0.0, 0], "new": [0.0, 0]}
    crashes = 0
    for name, arr in cases:
        img = Image.fromarray(arr)
        for ow, oh in API_SIZES:
            ref = official(arr, ow, oh)
            try:
                om, ox = stats(np.asarray(old_fit(img, ow, oh)), ref)
                old = f"{om:.3f}/{ox}"
                worst["old"] = [max(worst["old"][0], om), max(worst["old"][1], ox)]
            except ValueError:
                old, crashes = "CRASH", crashes + 1
            nm, nx = stats(np.asarray(fit_cover(img, ow, oh)), ref)
            worst["new"] = [max(worst["new"][0], nm), max(worst["new"][1], nx)]
            print(f"{name:>24} {ow:>4}x{oh:<4} {old:>14} {nm:>9.4f}/{nx}")
    print(f"worst: old mean {worst['old'][0]:.3f} max {worst['old'][1]} ({crashes} crashes); "
          f"new mean {worst['new'][0]:.4f} max {worst['new'][1]}")


if __name__ == "__main__":
    main()
