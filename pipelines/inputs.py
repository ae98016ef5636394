"""A request's inputs, ready for the pipeline: each fetched media field decoded at the render
size by its entry in the media-field table, the `face` task's reference crops, then the
conditioning builder (`pipelines.conditioning`). The runner calls `prepare_inputs` once per job;
everything here runs before any denoising, so a bad input fails the job before GPU work.

Two things depend on the render size and so are settled here: the `outpainting` task decodes
`video` straight into the box the source occupies (`conditioning.source_box`, one fit, no
second resample), and the extension fields' boxes (`layout_bbox`, `mask_bbox`), given in output
pixels, are scaled to render pixels (the tiny model renders smaller than it delivers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipelines.conditioning import (
    Conditioning,
    Extensions,
    MediaInputs,
    build_conditioning,
    source_box,
)
from preprocessors.registry import Preprocessor
from server.kernel.request import FPS, MEDIA_FIELDS, VaceRequest
from server.kernel.runner import Media


def prepare_inputs(
    req: VaceRequest,
    media: Media,
    *,
    width: int,
    height: int,
    preprocessors: Callable[[str], Preprocessor],
) -> tuple[Conditioning, dict[str, Any]]:
    """(the conditioning at width x height, notes for `data.preprocessing`)."""
    num_frames = req.num_frames
    ext = extensions_of(req, width=width, height=height)
    box = source_box(req.task, ext, width, height)
    decoded = {}
    for m in MEDIA_FIELDS:
        if not media.get(m.name):
            continue
        w, h = (box.width, box.height) if m.name == "video" and req.task == "outpainting" else (width, height)
        decoded[m.name] = decode_field(m.name, media[m.name], width=w, height=h, num_frames=num_frames)
    # The task applies to `video` (contract §6); `face` works on the reference images instead:
    # each is replaced by the crop of its main face (VACE's face annotator), the whole image
    # when none is found.
    notes: dict[str, Any] = {}
    if req.task == "face" and decoded.get("images"):
        face = preprocessors("face")
        decoded["images"], found = face.crop_references(decoded["images"])
        notes["face"] = {"detector": getattr(face, "info", ""), "cropped": found}
    cond = build_conditioning(
        req.task, MediaInputs(**decoded), width=width, height=height, num_frames=num_frames,
        preprocessors=preprocessors, extensions=ext,
    )  # fmt: skip
    return cond, notes


def extensions_of(req: VaceRequest, *, width: int, height: int) -> Extensions:
    """The request's extension fields for the builder, boxes scaled from the output size to
    width x height (exact when they are equal: multiplied before dividing)."""

    def scaled(boxes):
        sx, sy = width, height
        ow, oh = req.width, req.height
        return tuple((x1 * sx / ow, y1 * sy / oh, x2 * sx / ow, y2 * sy / oh) for x1, y1, x2, y2 in boxes)

    return Extensions(
        extend=req.extend,
        keep_frames=req.keep_frames,
        outpaint_direction=req.outpaint_direction,
        outpaint_ratio=req.outpaint_ratio,
        layout_bbox=scaled(req.layout_bbox),
        mask_bbox=scaled(req.mask_bbox),
    )


def decode_field(name: str, data: Any, *, width: int, height: int, num_frames: int) -> Any:
    """Decode one fetched media field for the conditioning builder (`MediaInputs`): videos and
    masks at the render size, images at their own size (the builder fits them)."""
    from pipelines.media import decode_image, decode_mask_image, decode_mask_video, decode_video

    if name in ("video", "last_video"):
        return decode_video(data, name, width=width, height=height, max_frames=num_frames, fps=FPS)
    if name == "mask_video":
        return decode_mask_video(data, name, width=width, height=height, max_frames=num_frames, fps=FPS)
    if name == "mask_image":
        return decode_mask_image(data, name, width=width, height=height)
    if name == "images":
        return [decode_image(b, f"{name}[{i}]") for i, b in enumerate(data)]
    return decode_image(data, name)
