"""Draw the recipe book's pictures (docs/recipes/*.png): for each recipe of docs/recipes.md, the
control frames and the mask exactly as the tiny model's pipeline would receive them.

    python scripts/recipe_images.py            # writes docs/recipes/<name>.png

Each request below is validated by the API's own `validate_submit` and run through
`pipelines.inputs.prepare_inputs` (decoding, outpainting placement, box scaling, the
conditioning builder) at the tiny model's render size for 832*480 (112x64), on synthetic media
made here (a ball rolling over a gradient, a stick figure, flat-colour references), so the
pictures cannot drift from the code. Nothing is downloaded. Every picture shows the same seven
frames (0, 15, 16, 40, 64, 65, 80: the edges of a 1 s clip at either end and the middle), the
video row over the mask row (white = generate), then the reference canvases if any.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipelines.inputs import prepare_inputs
from pipelines.media import encode_mp4
from pipelines.tiny import render_size
from preprocessors.registry import get_preprocessor
from server.kernel.request import VaceRequest
from server.schemas import validate_submit

SIZE = "832*480"
FRAMES = (0, 15, 16, 40, 64, 65, 80)
SCALE = 2  # each 112x64 tile drawn at 224x128
LABEL_W = 60


def _scene(n: int, w: int = 160, h: int = 96, hue: int = 0) -> np.ndarray:
    """A ball rolling left to right over a gradient: any frame shows where in time it is."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 120 + hue)], -1).astype(np.uint8)
    out = np.repeat(base[None], n, 0)
    for i in range(n):
        cx, cy = int(10 + (w - 20) * i / max(1, n - 1)), h // 2
        out[i][(x - cx) ** 2 + (y - cy) ** 2 < (h // 6) ** 2] = (250, 240, 40)
    return out


def _stick_figure(n: int, w: int = 160, h: int = 96) -> np.ndarray:
    """A pose-like control video (coloured limbs on black), standing in for DWPose's output."""
    out = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        img = Image.new("RGB", (w, h))
        d = ImageDraw.Draw(img)
        cx, swing = w // 2, int(14 * np.sin(i / 5))
        d.line([(cx, 20), (cx, 55)], fill=(255, 0, 85), width=3)  # body
        d.line([(cx, 55), (cx - swing, 85)], fill=(0, 255, 0), width=3)  # legs
        d.line([(cx, 55), (cx + swing, 85)], fill=(0, 170, 255), width=3)
        d.line([(cx - 20, 35 + swing // 2), (cx + 20, 35 - swing // 2)], fill=(255, 170, 0), width=3)
        d.ellipse([cx - 7, 6, cx + 7, 20], outline=(255, 255, 255), width=2)
        out[i] = np.asarray(img)
    return out


def _mp4(frames: np.ndarray) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        encode_mp4(frames, str(path), fps=16)
        return path.read_bytes()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _ref(color, w=60, h=80) -> bytes:
    img = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(img).ellipse([8, 8, w - 8, h - 8], fill=color)
    return _png(np.asarray(img))


def recipes() -> dict[str, tuple[dict, dict]]:
    """name -> (request fields, media bytes by field). URLs are placeholders: the media are
    handed to `prepare_inputs` directly, as the worker's fetch would."""
    clip, long = _mp4(_scene(16)), _mp4(_scene(81))
    late = _mp4(_scene(16, hue=100))
    first = _png(_scene(1, 832, 480)[0])
    refs = [_ref((220, 40, 40)), _ref((40, 90, 220))]
    u = "https://media.example/"
    return {
        "reference": ({"images": [u, u]}, {"images": refs}),
        "animate": ({"video": u, "task": "none", "images": [u]},
                    {"video": _mp4(_stick_figure(81)), "images": refs[:1]}),
        "control": ({"video": u, "task": "gray"}, {"video": long}),
        "swap": ({"video": u, "task": "inpainting", "mask_bbox": [300, 140, 560, 380], "images": [u]},
                 {"video": long, "images": refs[:1]}),
        "expand": ({"task": "outpainting", "first_image": u, "images": [u]},
                   {"first_image": first, "images": refs[1:]}),
        "move": ({"first_image": u, "layout_bbox": [[40, 160, 240, 320], [600, 120, 800, 280]]},
                 {"first_image": first}),
        "extend_forward": ({"video": u, "extend": "forward"}, {"video": clip}),
        "extend_backward": ({"video": u, "extend": "backward"}, {"video": clip}),
        "extend_both": ({"video": u, "extend": "both"}, {"video": clip}),
        "extend_between": ({"video": u, "extend": "between", "last_video": u},
                           {"video": clip, "last_video": late}),
        "keep_frames": ({"video": u, "keep_frames": [0, 40, 80]}, {"video": long}),
        "outpainting": ({"video": u, "task": "outpainting", "outpaint_direction": ["left", "right"]},
                        {"video": long}),
        "outpainting_inner": ({"video": u, "task": "outpainting_inner", "outpaint_ratio": 0.2},
                              {"video": long}),
        "mask_bbox_keyframes": ({"video": u, "task": "inpainting",
                                 "mask_bbox": [[0, 0, 200, 200], [632, 280, 832, 480]]}, {"video": long}),
    }  # fmt: skip


def _tile(arr: np.ndarray) -> Image.Image:
    img = Image.fromarray(arr)
    return img.resize((img.width * SCALE, img.height * SCALE), Image.Resampling.NEAREST)


def sheet(cond, title: str) -> Image.Image:
    """The video row, the mask row, then the references, each frame labelled."""
    w, h = cond.width * SCALE, cond.height * SCALE
    gap = 18
    rows: list[tuple[str, list[tuple[str, np.ndarray]]]] = []
    f = cond.num_frames
    gray = np.full((cond.height, cond.width, 3), 128, np.uint8)
    white = np.full_like(gray, 255)
    video = [(f"{i}", gray if cond.video is None else np.round(cond.video[i] * 255).astype(np.uint8))
             for i in FRAMES]  # fmt: skip
    mask = [(f"{i}", white if cond.mask is None else np.repeat(
        (cond.mask[i] * 255).astype(np.uint8), 3, -1)) for i in FRAMES]  # fmt: skip
    rows.append(("video" + (" (none)" if cond.video is None else ""), video))
    rows.append(("mask" + (" (all 1)" if cond.mask is None else ""), mask))
    if cond.reference_images_api_order:
        rows.append(("refs", [(f"ref {i}", np.asarray(r)) for i, r in
                              enumerate(cond.reference_images_api_order)]))  # fmt: skip
    out = Image.new("RGB", (LABEL_W + len(FRAMES) * (w + 4), 22 + len(rows) * (h + gap)), (40, 40, 40))
    d = ImageDraw.Draw(out)
    d.text((4, 4), f"{title}   recipe: {cond.recipe}   ({cond.width}x{cond.height}, {f} frames)",
           fill="white")  # fmt: skip
    for r, (name, tiles) in enumerate(rows):
        top = 22 + r * (h + gap)
        d.text((4, top + h // 2), name.split(" ")[0], fill="white")
        for c, (label, arr) in enumerate(tiles):
            left = LABEL_W + c * (w + 4)
            out.paste(_tile(arr), (left, top + 12))
            d.text((left, top), label, fill=(200, 200, 200))
    return out


def build(name: str, fields: dict, media: dict) -> Image.Image:
    inp, _ = validate_submit({"prompt": name, "size": SIZE, **fields})
    req = VaceRequest.from_input(inp)
    rw, rh = render_size(req.width, req.height, 8)
    cond, _ = prepare_inputs(req, media, width=rw, height=rh, preprocessors=get_preprocessor)
    return sheet(cond, name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "recipes")
    p.add_argument("names", nargs="*", help="only these recipes (default: all)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (fields, media) in recipes().items():
        if args.names and name not in args.names:
            continue
        build(name, fields, media).save(args.out / f"{name}.png", optimize=True)
        print(args.out / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
