"""A request's inputs, ready for the pipeline: each fetched media field decoded at the render
size by its entry in the media-field table, the `face` task's reference crops, then the
conditioning builder (`pipelines.conditioning`). The runner calls `prepare_inputs` once per job;
everything here runs before any denoising, so a bad input fails the job before GPU work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipelines.conditioning import Conditioning, MediaInputs, build_conditioning
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
    decoded = {
        m.name: decode_field(m.name, media[m.name], width=width, height=height, num_frames=num_frames)
        for m in MEDIA_FIELDS
        if media.get(m.name)
    }
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
        preprocessors=preprocessors,
    )  # fmt: skip
    return cond, notes


def decode_field(name: str, data: Any, *, width: int, height: int, num_frames: int) -> Any:
    """Decode one fetched media field for the conditioning builder (`MediaInputs`): videos and
    masks at the render size, images at their own size (the builder fits them)."""
    from pipelines.media import decode_image, decode_mask_image, decode_mask_video, decode_video

    if name == "video":
        return decode_video(data, name, width=width, height=height, max_frames=num_frames, fps=FPS)
    if name == "mask_video":
        return decode_mask_video(data, name, width=width, height=height, max_frames=num_frames, fps=FPS)
    if name == "mask_image":
        return decode_mask_image(data, name, width=width, height=height)
    if name == "images":
        return [decode_image(b, f"{name}[{i}]") for i, b in enumerate(data)]
    return decode_image(data, name)
