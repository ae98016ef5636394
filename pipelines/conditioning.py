"""The conditioning builder: request + decoded media -> the exact `WanVACEPipeline` inputs.

One function, `build_conditioning`, turns the API's `task`, `video`, `mask_video`, `mask_image`,
`first_image`, `last_image` and `images` into the pipeline's `video`, `mask` and
`reference_images`, following VACE's recipes (design/vace.md §1 and §5). Everything is validated
here, before any GPU work.

Recipes (F = num_frames; "gray" = 0.5 in [0, 1] = official 127.5 = 0 in [-1, 1];
mask 1 = generate, 0 = keep; `video`/`mask` None = the pipeline's own default, i.e. an all-gray
video under an all-ones mask):

| request                               | video                                   | mask                                  | reference_images |
|---------------------------------------|-----------------------------------------|---------------------------------------|------------------|
| prompt only (T2V)                     | None                                    | None                                  | None             |
| `images` only (R2V)                   | None                                    | None                                  | refs reversed    |
| `video` + task (control)              | preprocessor(task)(frames)              | None (all generate)                   | optional         |
| `video` shorter than F (extension)    | frames + [gray] * (F - Fv)              | given mask (else 1), 1 after the clip | optional         |
| `video` + `mask_video` (MV2V)         | preprocessor(task)(frames, mask)        | mask_video >= 128 (1 past its end)    | optional         |
| `video` + `mask_image`                | preprocessor(task)(frames, mask)        | mask_image >= 128, repeated           | optional         |
| task `inpainting` (+ a mask)          | frames, masked pixels -> 128            | the mask > 0 (official annotator)     | optional         |
| `first_image`                         | [first] + [gray] * (F-1)                | [0] + [1] * (F-1)                     | optional         |
| `last_image`                          | [gray] * (F-1) + [last]                 | [1] * (F-1) + [0]                     | optional         |
| `first_image` + `last_image`          | [first] + [gray] * (F-2) + [last]       | 0, 1, ..., 1, 0                       | optional         |
| `video` + `first_image`/`last_image`  | the video's frame 0 / F-1 replaced      | 0 on those frames                     | optional         |

Extension fields (ours; official task names in brackets; Fv = decoded frames of `video`, Fl of
`last_video`; "kept" = the clip's pixels as decoded, mask 0):

| request                               | video                                   | mask                                  |
|---------------------------------------|-----------------------------------------|---------------------------------------|
| `extend: forward` [firstclip]         | clip + [gray] * (F - Fv)                | 0 on the clip, 1 after                |
| `extend: backward` [lastclip]         | [gray] * (F - Fv) + clip                | 1, then 0 on the clip                 |
| `extend: both`                        | [gray] * b + clip + [gray] * rest       | 0 on the clip; b = (F - Fv) // 2      |
| `extend: between` [firstlastclip]     | video + [gray] * (F-Fv-Fl) + last_video | 0 on both clips, 1 between            |
| `keep_frames` [frameref]              | video's frame i where i is listed, gray | 0 on the listed frames, 1 elsewhere   |
| task `outpainting`                    | each frame in the `outpaint_box`, gray around | 0 on the box, 1 around          |
| task `outpainting_inner`              | each frame, its border gray             | 0 inside the border, 1 on it          |
| `layout_bbox` [layout_bbox]           | the boxes drawn, black outline on white | None (control); + `first_image` kept  |
| `mask_bbox` [inpainting, bbox mode]   | as with a given mask                    | 1 inside the (interpolated) box       |

Rules and decisions:
- `task` applies to `video` only and is IGNORED when there is no video: WaveSpeed's default task
  is `depth` and clients send it with no video (contract §6); never reject that.
- A mask without a video is refused (InvalidParameter): there is nothing to edit.
- `mask_video` wins over `mask_image` when both are given. A `mask_video` shorter than the video
  is extended with white (generate) frames; mask frames past the end of the video are ignored
  (the frames there are gray and always generated).
- Mask thresholds (masks arrive as fitted luminance, soft edges included): the `inpainting` task
  masks every value > 0, as the official InpaintingVideoAnnotator does, so anti-aliased edges
  and soft brushes are regenerated, not kept (lossy video masks: H.264 noise in black counts as
  masked, so send a PNG `mask_image`, a lossless video, or pure black); a mask given with any
  other task is binarised at 0.5 (>= 128), as the official loader and diffusers do. Each
  preprocessor states its threshold (`Preprocessor.mask_threshold`).
- Extension: a source shorter than F is extended forward with gray frames under a white mask.
  The clip's own frames get the given mask, else white: with no mask the clip is a control
  signal; to *keep* its pixels send `extend` (or, as before, `task: none` with a black
  `mask_image`).
- `extend` and `keep_frames` keep the clip's pixels as decoded: `task` does not apply to them
  (WaveSpeed clients send `depth` by default; a depth map is not what anyone extends), and they
  take no mask (refused at submit). A clip (or two, `between`) that leaves no frame to generate,
  or a kept frame past the clip's end, is InvalidParameter naming the frame counts.
- Outpainting: the source is decoded straight into its box (`pipelines.inputs`, at the box's
  size with `fit_cover`); `first_image`/`last_image` are fitted into the same box, so one image
  and no video is Expand-Anything. The canvas is 0.5 gray (the official canvas is PIL 'gray',
  128; every other missing pixel here is 0.5) and the mask is black exactly on the source: the
  official MASK_BLUR is 0 by default, and its inner variant's rectangle reaches one pixel past
  the kept area, keeping a gray row and column, which we do not reproduce.
- `layout_bbox` is the control video (no `video`); `first_image` replaces its frame 0
  (official move_anything). Boxes arrive scaled to render pixels (`pipelines.layout`).
- `first_image`/`last_image` are fitted like the source video (`pipelines.geometry.fit_cover`:
  the official resize-to-cover and integer centre crop) and overwrite frame 0 / F-1 of the
  (control) video or of an all-gray video; the mask is 0 there whatever a given mask said.
- Reference images are RGB (transparency composited over white: a deliberate deviation, the
  official loader drops alpha) and letterboxed by us onto the white H x W canvas with the
  official formula (`pipelines.geometry.letterbox`). diffusers would otherwise first floor each
  side to a multiple of 8 with a Lanczos resize, squashing the aspect; on a canvas-sized image
  its own fitting is a no-op. `reference_images_api_order` holds those canvases, which is what
  `return_conditioning` shows. They are passed REVERSED: diffusers prepends them to the latent
  one by one, so passing [B, A] gives the official latent order [A, B, video]
  (vace.md §1 step 2).

Representation (checked against diffusers 0.42.1, see tests/test_conditioning.py):
- `video` is float32 (F, H, W, 3) in [0, 1]; diffusers maps x -> 2x - 1, so 0.5 becomes exactly
  0.0 and a uint8 value v becomes the official v / 127.5 - 1 (to float32 rounding). PIL or
  uint8 frames cannot express 127.5: 128 would give 0.0039 instead of 0.
- `mask` is float32 (F, H, W, 1) with values exactly 0 or 1 (diffusers: 2m - 1, then
  (x + 1) / 2 -> m, then binarised > 0.5). One channel like the official `src_mask`; the
  pipeline broadcasts it over RGB (identical output to a 3-channel mask, a third of the memory).
- `pipeline_kwargs()` passes both with a leading batch axis, (1, F, H, W, C): diffusers sizes a
  video from `video[0]` and reads a 3-D (H, W, C) frame as (batch, H, W), so a 4-D array or a
  list of frames is mis-sized (a crash or a silently wrong size); a 5-D array is read correctly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image

from pipelines.geometry import Box, fit_cover, letterbox, outpaint_box
from pipelines.layout import box_masks, box_track, draw_layout
from preprocessors.registry import Preprocessor, get_preprocessor
from server.kernel.errors import InvalidParameter
from server.kernel.request import DIRECTIONS, FPS, OUTPAINT_RATIO, OUTPAINTING_TASKS

__all__ = [
    "Conditioning",
    "Extensions",
    "MediaInputs",
    "build_conditioning",
    "fit_cover",
    "source_box",
    "to_rgb",
]

# A reference smaller than this carries no usable detail once fitted (and the API's image decoder
# already refuses sides under 16); refused rather than letterboxed into a smear.
_MIN_REF_SIDE = 8

GRAY = 0.5


@dataclass
class MediaInputs:
    """Decoded media, already at the target size (pipelines/media.py)."""

    video: np.ndarray | None = None  # uint8 (Fv, H, W, 3), Fv <= num_frames (outpainting: box size)
    last_video: np.ndarray | None = None  # uint8 (Fl, H, W, 3): the clip kept last (extend between)
    # Masks: uint8 luminance, 255 = generate, soft values kept (thresholded here, per task).
    mask_video: np.ndarray | None = None  # (Fm, H, W), Fm <= num_frames
    mask_image: np.ndarray | None = None  # (H, W)
    first_image: PIL.Image.Image | None = None  # any size; fitted here
    last_image: PIL.Image.Image | None = None
    images: list[PIL.Image.Image] = field(default_factory=list)  # references, API order


@dataclass(frozen=True)
class Extensions:
    """Our extension fields, as the builder reads them (boxes already in render pixels)."""

    extend: str | None = None  # forward | backward | both | between
    keep_frames: tuple[int, ...] = ()
    outpaint_direction: tuple[str, ...] = DIRECTIONS
    outpaint_ratio: float = OUTPAINT_RATIO
    layout_bbox: tuple[tuple[float, float, float, float], ...] = ()
    mask_bbox: tuple[tuple[float, float, float, float], ...] = ()


def source_box(task: str, ext: Extensions, width: int, height: int) -> Box:
    """Where `video`'s frames go on the W x H frame: the outpainting box, else all of it."""
    if task in OUTPAINTING_TASKS:
        return outpaint_box(width, height, ext.outpaint_direction, ext.outpaint_ratio,
                            inner=task == "outpainting_inner")  # fmt: skip
    return Box(0, 0, width, height)


@dataclass
class Conditioning:
    """Exactly what the pipeline receives (see the module docstring for the representation)."""

    video: np.ndarray | None  # float32 (F, H, W, 3) in [0, 1]; None = no source (T2V / R2V)
    mask: np.ndarray | None  # float32 (F, H, W, 1), exactly 0/1 (1 = generate); None = all 1
    reference_images: list[PIL.Image.Image]  # order passed to diffusers (API order reversed)
    reference_images_api_order: list[PIL.Image.Image]  # W x H canvases, API order
    width: int
    height: int
    num_frames: int
    recipe: str  # e.g. "control(gray)+first_image+refs"

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `pipe(...)`: video, mask, reference_images, height, width,
        num_frames. Arrays get a batch axis (views, no copy): see the module docstring."""
        return {
            "video": None if self.video is None else self.video[None],
            "mask": None if self.mask is None else self.mask[None],
            "reference_images": list(self.reference_images) or None,
            "height": self.height,
            "width": self.width,
            "num_frames": self.num_frames,
        }


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB; transparency composited over white, as the media decoder does for every input image
    (the official loader drops alpha instead; a transparent background should read as the white
    VACE references are expected on)."""
    from pipelines.media import composite_on_white

    return composite_on_white(image)


def _check_array(name: str, arr: np.ndarray, ndim: int, tail: tuple[int, ...], max_frames: int):
    """Contract checks on decoded media: a violation is a bug upstream, hence ValueError."""
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != ndim:
        raise ValueError(
            f"{name} must be a uint8 array with {ndim} dimensions, got "
            f"{getattr(arr, 'dtype', type(arr))} {getattr(arr, 'shape', '')}"
        )
    if arr.shape[arr.ndim - len(tail) :] != tail:
        raise ValueError(f"{name} has shape {arr.shape}; expected (..., {tail}) for the target size")
    if ndim == len(tail) + 1 and not 1 <= arr.shape[0] <= max_frames:
        raise ValueError(f"{name} has {arr.shape[0]} frames; expected 1..{max_frames}")


def _binary(mask: np.ndarray, threshold: int) -> np.ndarray:
    """uint8 0/255 (255 = generate): values >= `threshold` are generated."""
    return np.where(mask >= threshold, np.uint8(255), np.uint8(0))


def build_conditioning(
    task: str,
    media: MediaInputs,
    *,
    width: int,
    height: int,
    num_frames: int,
    preprocessors: Callable[[str], Preprocessor] = get_preprocessor,
    extensions: Extensions | None = None,
) -> Conditioning:
    """Build the pipeline inputs for one request; see the module docstring for the recipes.

    Raises InvalidParameter (a request that cannot be honoured), NotSupportedYet (a task whose
    preprocessor is missing; only when a video is given) or ValueError (media that break the
    MediaInputs contract, i.e. a bug upstream).
    """
    # 1. The target itself (the pipeline silently rounds or misaligns otherwise).
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise ValueError(f"width and height must be positive multiples of 16, got {width}x{height}")
    if num_frames < 1 or num_frames % 4 != 1:
        raise ValueError(f"num_frames must be 4n+1, got {num_frames}")
    F, H, W = num_frames, height, width
    ext = extensions or Extensions()
    outpaint = task in OUTPAINTING_TASKS
    box = source_box(task, ext, W, H)

    # 2. Media contract.
    if media.video is not None:
        decoded_size = (box.height, box.width) if task == "outpainting" else (H, W)
        _check_array("video", media.video, 4, (*decoded_size, 3), F)
    if media.last_video is not None:
        _check_array("last_video", media.last_video, 4, (H, W, 3), F)
    if media.mask_video is not None:
        _check_array("mask_video", media.mask_video, 3, (H, W), F)
    if media.mask_image is not None:
        _check_array("mask_image", media.mask_image, 2, (H, W), F)
    for name in ("first_image", "last_image"):
        img = getattr(media, name)
        if img is not None and not isinstance(img, PIL.Image.Image):
            raise ValueError(f"{name} must be a PIL image, got {type(img).__name__}")

    # 3. Request-level checks.
    has_mask = media.mask_video is not None or media.mask_image is not None
    if has_mask and media.video is None:
        field_name = "mask_video" if media.mask_video is not None else "mask_image"
        raise InvalidParameter(f"{field_name} needs a video to edit: give video as well")
    if media.first_image is not None and media.last_image is not None and F < 2:
        raise InvalidParameter("first_image and last_image need at least 2 frames")
    _check_extensions(task, ext, media, has_mask)
    refs_api = _check_refs(media.images, F, W, H)

    parts: list[str] = []
    video: np.ndarray | None = None
    mask: np.ndarray | None = None  # float32 (F, H, W, 1) once built

    # 4. The source video: kept as decoded (extend, keep_frames), placed (outpainting), or
    # through its preprocessor; extended to F frames. Or the layout boxes as the control video.
    if media.video is not None and (ext.extend or ext.keep_frames):
        video, mask = _kept_frames(media, ext, F, H, W)
        parts.append(f"extend({ext.extend})" if ext.extend else "keep_frames")
    elif media.video is not None and outpaint:
        pre = preprocessors(task)  # registered; passes the frames through
        frames, _ = pre(media.video, None)
        fv = frames.shape[0]
        video = np.full((F, H, W, 3), GRAY, dtype=np.float32)
        mask = np.ones((F, H, W, 1), dtype=np.float32)
        for i in range(fv):
            _place(video[i], mask[i], frames[i], task, box)
        parts.append(task)
        if fv < F:
            parts.append(f"extension({F - fv})")
    elif ext.layout_bbox:
        track = box_track(ext.layout_bbox, F)
        video = draw_layout(track, W, H).astype(np.float32) / np.float32(255)
        parts.append("layout_bbox")
    elif media.video is not None:
        pre = preprocessors(task)  # NotSupportedYet for a known-but-missing task
        if pre.needs_mask and not (has_mask or ext.mask_bbox):
            raise InvalidParameter(f"task {task!r} needs mask_video or mask_image")
        fv = media.video.shape[0]
        src_mask: np.ndarray | None = None  # uint8 (Fv, H, W) 0/255
        if ext.mask_bbox:
            src_mask = box_masks(box_track(ext.mask_bbox, F)[:fv], W, H)
        elif media.mask_video is not None:
            src_mask = np.full((fv, H, W), 255, dtype=np.uint8)
            n = min(fv, media.mask_video.shape[0])
            src_mask[:n] = _binary(media.mask_video[:n], pre.mask_threshold)
        elif media.mask_image is not None:
            src_mask = np.broadcast_to(
                _binary(media.mask_image, pre.mask_threshold), (fv, H, W)
            ).copy()

        frames, out_mask = pre(media.video, src_mask)
        if not (
            isinstance(frames, np.ndarray)
            and frames.dtype == np.uint8
            and frames.shape == media.video.shape
        ):
            raise ValueError(
                f"preprocessor {task!r} returned {getattr(frames, 'dtype', type(frames))} "
                f"{getattr(frames, 'shape', '')}; expected uint8 {media.video.shape}"
            )
        if out_mask is not None and (
            out_mask.dtype != np.uint8 or out_mask.shape != (fv, H, W)
        ):
            raise ValueError(f"preprocessor {task!r} returned a mask of shape {out_mask.shape}")

        video = np.full((F, H, W, 3), GRAY, dtype=np.float32)
        np.divide(frames, np.float32(255), out=video[:fv])
        parts.append(f"control({task})")
        if out_mask is not None:
            mask = np.ones((F, H, W, 1), dtype=np.float32)
            mask[:fv, ..., 0] = out_mask > 127
            given = "mask_video" if media.mask_video is not None else "mask_image"
            parts.append("mask_bbox" if ext.mask_bbox else given)
        if fv < F:
            parts.append(f"extension({F - fv})")

    # 5. First / last frame.
    if outpaint and media.video is None:
        parts.append(task)  # Expand-Anything from an image
    for name, index in (("first_image", 0), ("last_image", F - 1)):
        img = getattr(media, name)
        if img is None:
            continue
        if video is None:
            video = np.full((F, H, W, 3), GRAY, dtype=np.float32)
        if mask is None:
            mask = np.ones((F, H, W, 1), dtype=np.float32)
        if outpaint:
            # Expand-Anything: the image goes where the video's frames go (official
            # expand_anything: the outpainted image is the first frame, its mask the border).
            size = (box.width, box.height) if task == "outpainting" else (W, H)
            video[index], mask[index] = GRAY, 1.0
            _place(video[index], mask[index], np.asarray(fit_cover(to_rgb(img), *size)), task, box)
        else:
            fitted = fit_cover(to_rgb(img), W, H)
            video[index] = np.asarray(fitted, dtype=np.float32) / np.float32(255)
            mask[index] = 0.0
        parts.append(name)

    # 6. References.
    if not parts:
        parts.append("r2v" if refs_api else "t2v")
    elif refs_api:
        parts.append("refs")

    # An all-ones mask is the pipeline's default: say None (cheaper, and clearer to read).
    if mask is not None and bool(mask.all()):
        mask = None

    return Conditioning(
        video=video,
        mask=mask,
        reference_images=list(reversed(refs_api)),
        reference_images_api_order=refs_api,
        width=W,
        height=H,
        num_frames=F,
        recipe="+".join(parts),
    )


def _place(video: np.ndarray, mask: np.ndarray, frame: np.ndarray, task: str, box: Box) -> None:
    """One outpainting frame: `frame` (uint8, the box's size for `outpainting`, the frame's for
    `outpainting_inner`) into `video` (float32 H x W x 3, gray) at `box`, mask 0 there."""
    l, t, w, h = box
    src = frame if task == "outpainting" else frame[t : t + h, l : l + w]
    np.divide(src, np.float32(255), out=video[t : t + h, l : l + w])
    mask[t : t + h, l : l + w] = 0.0


def _frames_at_16fps(n: int) -> str:
    return f"{n} frame{'s' * (n != 1)} ({n / FPS:g} s at {FPS} fps)"


def _kept_frames(
    media: MediaInputs, ext: Extensions, F: int, H: int, W: int
) -> tuple[np.ndarray, np.ndarray]:
    """`extend` and `keep_frames`: the clip's pixels kept (mask 0), gray under white elsewhere
    (official FrameRefExpandAnnotator / FrameRefExtractAnnotator)."""
    clip = media.video
    fv = clip.shape[0]
    video = np.full((F, H, W, 3), GRAY, dtype=np.float32)
    mask = np.ones((F, H, W, 1), dtype=np.float32)

    def keep(at: int, frames: np.ndarray) -> None:
        np.divide(frames, np.float32(255), out=video[at : at + len(frames)])
        mask[at : at + len(frames)] = 0.0

    if ext.keep_frames:
        for i in ext.keep_frames:
            if not 0 <= i < fv:
                raise InvalidParameter(
                    f"keep_frames lists frame {i}, but video has only {_frames_at_16fps(fv)}"
                )
            keep(i, clip[i : i + 1])
        return video, mask
    last = media.last_video if ext.extend == "between" else None
    fl = 0 if last is None else last.shape[0]
    if fv + fl >= F:
        what = f"video gives {_frames_at_16fps(fv)}" + (
            f" and last_video {_frames_at_16fps(fl)}" if last is not None else ""
        )
        raise InvalidParameter(
            f"extend {ext.extend}: {what}, and the output has {F} frames: no frame is left to "
            "generate; send a shorter clip or a longer duration"
        )
    at = {"forward": 0, "backward": F - fv, "both": (F - fv) // 2, "between": 0}[ext.extend]
    keep(at, clip)
    if last is not None:
        keep(F - fl, last)
    return video, mask


def _check_extensions(task: str, ext: Extensions, media: MediaInputs, has_mask: bool) -> None:
    """The submit-time rules (server/schemas.py) again, for callers that skip the API."""
    has_video = media.video is not None
    if ext.extend is not None and ext.extend not in ("forward", "backward", "both", "between"):
        raise InvalidParameter(f"extend must be forward, backward, both or between, got {ext.extend!r}")
    if (ext.extend or ext.keep_frames or ext.mask_bbox) and not has_video:
        raise InvalidParameter("extend, keep_frames and mask_bbox need a video: give video as well")
    if (ext.extend or ext.keep_frames) and (has_mask or ext.mask_bbox):
        raise InvalidParameter("extend and keep_frames keep the clip's pixels: they take no mask")
    if ext.extend and ext.keep_frames:
        raise InvalidParameter("extend cannot be combined with keep_frames")
    if ext.extend == "between" and media.last_video is None:
        raise InvalidParameter('extend "between" needs last_video, the clip kept at the end')
    if media.last_video is not None and ext.extend != "between":
        raise InvalidParameter('last_video is the clip kept at the end with extend "between"')
    if ext.mask_bbox and has_mask:
        raise InvalidParameter("mask_bbox cannot be combined with mask_video or mask_image")
    if ext.layout_bbox and (has_video or has_mask):
        raise InvalidParameter("layout_bbox is the control video: it cannot be combined with video")
    own_mask = has_mask or ext.mask_bbox or ext.extend or ext.keep_frames
    if task in OUTPAINTING_TASKS and has_video and own_mask:
        raise InvalidParameter(f"task {task} makes its own mask: no mask, extend or keep_frames")
    if task in OUTPAINTING_TASKS and not (has_video or media.first_image or media.last_image):
        raise InvalidParameter(f"task {task} needs video, first_image or last_image to expand")
    if task in OUTPAINTING_TASKS and ext.layout_bbox:
        raise InvalidParameter(f"task {task} cannot be combined with layout_bbox")


def _check_refs(
    images: list[PIL.Image.Image], num_frames: int, width: int, height: int
) -> list[PIL.Image.Image]:
    """The references letterboxed onto the W x H canvas, API order."""
    refs: list[PIL.Image.Image] = []
    for i, img in enumerate(images or []):
        if not isinstance(img, PIL.Image.Image):
            raise ValueError(f"images[{i}] must be a PIL image, got {type(img).__name__}")
        if min(img.size) < _MIN_REF_SIDE:
            raise InvalidParameter(
                f"images[{i}] is {img.width}x{img.height} pixels; reference images need at "
                f"least {_MIN_REF_SIDE}x{_MIN_REF_SIDE}"
            )
        refs.append(letterbox(to_rgb(img), width, height))
    # diffusers zero-pads the mask for each reference by slicing the video's latent frames, so
    # there can be no more references than latent frames (vace.md §1 step 3).
    latent_frames = (num_frames - 1) // 4 + 1
    if len(refs) > latent_frames:
        raise InvalidParameter(
            f"{len(refs)} reference images need a video of at least {(len(refs) - 1) * 4 + 1} "
            f"frames; this one has {num_frames}"
        )
    return refs
