"""The request, typed: WaveSpeed's field table and one frozen dataclass parsed once from a job's
stored input. Standard library only, so the API (validation, the `/api/v3/models` schema, inline
media), the worker (fetching) and `pipelines/` (decoding, conditioning) all read the same table.

`FIELDS` lists every submit field with WaveSpeed's exact names, ranges and defaults (contract §6),
then our extension fields (`extension=True`: temporal extension, frame references, outpainting,
layout and mask boxes; documented, validated and listed by `/api/v3/models` like the others);
`MEDIA_FIELDS` is the subset that carries media, with what each holds and which size limit
applies. `server/schemas.py` validates a body against `FIELDS` and stores the normalised dict;
`VaceRequest.from_input` turns that dict into the typed request everything after submit uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FPS = 16  # Wan 2.1 is trained and sampled at 16 fps; a duration of d s is 16*d+1 frames
SIZES = ("832*480", "480*832", "1280*720", "720*1280")  # W*H, as Wan writes sizes
MAX_IMAGES = 5
SEED_MAX = 2**31 - 1

# WaveSpeed's documented `task` values, then the official VACE control signals we add. Which of
# them this server can run is the preprocessor registry's answer (`preprocessors.registry`);
# a test ties the two lists together.
WAVESPEED_TASKS = ("depth", "pose", "face", "inpainting", "none")
EXTRA_TASKS = ("gray", "flow", "scribble", "depthv2", "pose_body", "outpainting", "outpainting_inner")
TASKS = WAVESPEED_TASKS + EXTRA_TASKS
OUTPAINTING_TASKS = ("outpainting", "outpainting_inner")

# Extension field values (the conditioning builder's docstring says what each does).
EXTENDS = ("forward", "backward", "both", "between")
DIRECTIONS = ("left", "right", "up", "down")
OUTPAINT_RATIO = 0.25  # the official OutpaintingVideoAnnotator's default expand ratio

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in output pixels, x1 < x2 and y1 < y2


@dataclass(frozen=True)
class Field:
    name: str
    # string | media | media_list | integer | number | boolean | enum, and for extension fields
    # enum_list (a list of `choices`, no duplicates), int_list (frame indices), box_list
    # (boxes [x1, y1, x2, y2] in output pixels; `min_items` of them, a single box accepted
    # where one is allowed)
    kind: str
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    required: bool = False
    description: str = ""
    extension: bool = False  # not a WaveSpeed field: ours, marked `x-extension` in the schema
    min_items: int = 0


FIELDS: tuple[Field, ...] = (
    Field("prompt", "string", required=True, description="The text prompt."),
    Field("negative_prompt", "string", "", description="Empty: the official Wan negative prompt."),
    Field("images", "media_list", [], description=f"Up to {MAX_IMAGES} reference image URLs."),
    Field("video", "media", description="Source or control video URL."),
    Field("task", "enum", "depth", choices=TASKS, description="Control signal extracted from `video`."),
    Field("mask_video", "media", description="Mask video: white = generate, black = keep."),
    Field("mask_image", "media", description="Static mask applied to every frame."),
    Field("first_image", "media", description="First frame of the output."),
    Field("last_image", "media", description="Last frame of the output."),
    Field("duration", "integer", 5, 5, 10, description="Seconds; the video has 16*duration+1 frames."),
    Field("size", "enum", "832*480", choices=SIZES, description="width*height."),
    Field("num_inference_steps", "integer", 30, 1, 40),
    Field("guidance_scale", "number", 5.0, 0.0, 20.0),
    Field("flow_shift", "number", 16.0, 0.0, 30.0),
    Field("context_scale", "number", 1.0, 0.0, 2.0),
    Field("seed", "integer", -1, -1, None, description="-1 = random; the used seed is reported."),
    Field("enable_safety_checker", "boolean", True),
    Field("enable_fast_mode", "boolean", False),
    Field("enable_sync_mode", "boolean", False),
    Field("enable_base64_output", "boolean", False),
    Field("webhook_url", "string", None),
    Field("return_conditioning", "boolean", False, description="Extension: URLs of the inputs fed to the pipeline.",
          extension=True),
    Field("extend", "enum", None, choices=EXTENDS, extension=True, description=(
        "Keep `video` as decoded and generate around it: forward (the clip first), backward (the "
        "clip last), both (the clip in the middle), between (`video` first, `last_video` last). "
        "`task` does not apply to the kept clip; no masks with it.")),
    Field("last_video", "media", extension=True,
          description="The clip kept at the end with extend: between."),
    Field("keep_frames", "int_list", [], 0, None, extension=True, min_items=1, description=(
        "Output frame indices (0..16*duration) whose pixels are kept from `video`; every "
        "other frame is generated.")),
    Field("outpaint_direction", "enum_list", list(DIRECTIONS), choices=DIRECTIONS, extension=True,
          min_items=1, description="Sides the outpainting tasks extend (or regenerate, inner)."),
    Field("outpaint_ratio", "number", OUTPAINT_RATIO, 0.05, 1.0, extension=True, description=(
        "outpainting: each new side is this fraction of the source's side; outpainting_inner: "
        "the border regenerated, as a fraction of the frame's side.")),
    Field("layout_bbox", "box_list", [], extension=True, min_items=2, description=(
        "Keyframe boxes [x1, y1, x2, y2] in output pixels, spread evenly over the video and "
        "interpolated: the layout control video (Move-Anything, with first_image). Not with video.")),
    Field("mask_bbox", "box_list", [], extension=True, min_items=1, description=(
        "The mask as a box [x1, y1, x2, y2] in output pixels (white inside), or keyframe boxes "
        "interpolated like layout_bbox. Instead of mask_video / mask_image.")),
)
FIELDS_BY_NAME = {f.name: f for f in FIELDS}
# [compat] WaveSpeed's newest llms.txt lists `image` where older pages list `first_image`.
ALIASES = {"image": "first_image"}


@dataclass(frozen=True)
class MediaField:
    """A request field that carries media."""

    name: str
    holds: str  # "video" or "image": what the bytes must decode as, and which size limit applies
    many: bool = False  # a list of URLs (`images`)


MEDIA_FIELDS: tuple[MediaField, ...] = (
    MediaField("video", "video"),
    MediaField("last_video", "video"),
    MediaField("mask_video", "video"),
    MediaField("mask_image", "image"),
    MediaField("first_image", "image"),
    MediaField("last_image", "image"),
    MediaField("images", "image", many=True),
)
MEDIA_BY_NAME = {m.name: m for m in MEDIA_FIELDS}


def num_frames_for(duration: int) -> int:
    return FPS * int(duration) + 1


def parse_size(size: str) -> tuple[int, int]:
    """(width, height) of a Wan size string `W*H`."""
    w, _, h = size.partition("*")
    return int(w), int(h)


@dataclass(frozen=True)
class VaceRequest:
    """A validated request, as the worker and the pipelines read it. Built with `from_input`
    from the normalised dict the API stored (every field present, defaults filled in)."""

    prompt: str
    negative_prompt: str
    task: str
    duration: int
    size: str
    num_inference_steps: int
    guidance_scale: float
    flow_shift: float
    context_scale: float
    seed: int  # -1 = draw one
    images: tuple[str, ...] = ()
    video: str | None = None
    mask_video: str | None = None
    mask_image: str | None = None
    first_image: str | None = None
    last_image: str | None = None
    enable_safety_checker: bool = True
    enable_fast_mode: bool = False
    enable_sync_mode: bool = False
    enable_base64_output: bool = False
    webhook_url: str | None = None
    return_conditioning: bool = False
    extend: str | None = None
    last_video: str | None = None
    keep_frames: tuple[int, ...] = ()
    outpaint_direction: tuple[str, ...] = DIRECTIONS
    outpaint_ratio: float = OUTPAINT_RATIO
    layout_bbox: tuple[Box, ...] = ()
    mask_bbox: tuple[Box, ...] = ()

    @classmethod
    def from_input(cls, inp: dict[str, Any]) -> VaceRequest:
        """Read the stored input dict; absent keys take the field table's defaults, unknown keys
        are ignored (rows written by an older release stay readable)."""
        values: dict[str, Any] = {}
        for f in FIELDS:
            v = inp.get(f.name, f.default)
            if v is None and f.default is not None:
                v = f.default
            values[f.name] = v
        values["images"] = tuple(values["images"] or ())
        values["negative_prompt"] = values["negative_prompt"] or ""
        for name in ("duration", "num_inference_steps", "seed"):
            values[name] = int(values[name])
        for name in ("guidance_scale", "flow_shift", "context_scale", "outpaint_ratio"):
            values[name] = float(values[name])
        values["keep_frames"] = tuple(int(i) for i in values["keep_frames"] or ())
        values["outpaint_direction"] = tuple(values["outpaint_direction"] or DIRECTIONS)
        for name in ("layout_bbox", "mask_bbox"):
            values[name] = tuple(
                (int(b[0]), int(b[1]), int(b[2]), int(b[3])) for b in values[name] or ()
            )
        return cls(**values)

    @property
    def width(self) -> int:
        return parse_size(self.size)[0]

    @property
    def height(self) -> int:
        return parse_size(self.size)[1]

    @property
    def num_frames(self) -> int:
        return num_frames_for(self.duration)

    def media(self) -> list[tuple[str, MediaField, str]]:
        """(field label, field, URL) of every media input given, in table order; list items are
        labelled `images[i]`, the label error messages use."""
        out: list[tuple[str, MediaField, str]] = []
        for m in MEDIA_FIELDS:
            value = getattr(self, m.name)
            if m.many:
                out += [(f"{m.name}[{i}]", m, url) for i, url in enumerate(value)]
            elif value:
                out.append((m.name, m, value))
        return out
