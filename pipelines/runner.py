"""One job through `WanVACEPipeline`, top to bottom (diffusers' single-file habit):

1. decode the fetched media at the render size (`pipelines.media`)
2. build the conditioning: video, mask, reference images (`pipelines.conditioning`)
3. set the per-job scheduler (UniPC flow, the request's `flow_shift`), seed and negative prompt
4. denoise, reporting progress and honouring cancellation from the step callback
5. scale up (tiny model only) and encode the MP4; optionally the conditioning too

The worker (server/worker.py) owns everything around it: leases, fetching, storage, the store.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler, WanVACEPipeline
from PIL import Image

from server.kernel.errors import NotSupportedYet

log = logging.getLogger("wan_vace.runner")

# The official Wan negative prompt (Wan2.1 `wan/configs/shared_config.py`, `sample_neg_prompt`),
# used when the request gives none, as the official and VACE inference code do (vace.md §1).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
FPS = 16


@dataclass
class FetchedMedia:
    """Raw bytes of each media field the request named (fetched by the worker)."""

    video: bytes | None = None
    mask_video: bytes | None = None
    mask_image: bytes | None = None
    first_image: bytes | None = None
    last_image: bytes | None = None
    images: list[bytes] = field(default_factory=list)


@dataclass
class RunResult:
    video_path: Path
    seed: int
    inference_ms: int
    has_nsfw: bool = False
    safety_checked: bool = False
    # name -> file path (or list of paths) of what the pipeline was fed, when asked for.
    conditioning: dict[str, Any] = field(default_factory=dict)
    render_size: tuple[int, int] = (0, 0)


ProgressFn = Callable[[float], None]


class VaceRunner:
    def __init__(
        self,
        pipe: WanVACEPipeline,
        *,
        name: str,
        kind: str,
        device: str,
        downscale: int = 1,
        encode_preset: str = "fast",
    ):
        self.pipe = pipe
        self.encode_preset = encode_preset
        self.name = name
        self.kind = kind
        self.device = device
        self.downscale = downscale if kind == "random" else 1

    @property
    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": self.kind, "device": self.device}
        if self.downscale > 1:
            info["render"] = (
                f"random-weight tiny model: renders each side at 1/{self.downscale} (rounded to 16 px) "
                "and scales frames up to the requested size; output is noise-like, for testing the server"
            )
        return info

    def render_size(self, width: int, height: int) -> tuple[int, int]:
        from pipelines.tiny import render_size

        return render_size(width, height, self.downscale)

    def warm_up(self) -> None:
        """One minimal run so the first job does not pay for lazy initialisation."""
        self.pipe(
            prompt="warm up",
            negative_prompt="",
            height=16,
            width=16,
            num_frames=5,
            num_inference_steps=1,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )

    def run(self, inp: dict[str, Any], media: FetchedMedia, workdir: Path, progress: ProgressFn) -> RunResult:
        from pipelines.conditioning import MediaInputs, build_conditioning
        from pipelines.media import (
            decode_image,
            decode_mask_image,
            decode_mask_video,
            decode_video,
            encode_mp4,
        )

        if inp.get("enable_fast_mode"):
            raise NotSupportedYet(
                "enable_fast_mode is not supported yet by this server; send it as false or omit it"
            )
        width, height = (int(v) for v in inp["size"].split("*"))
        num_frames = 16 * int(inp["duration"]) + 1
        rw, rh = self.render_size(width, height)

        # 1. Media at the render size.
        m = MediaInputs()
        if media.video is not None:
            m.video = decode_video(media.video, "video", width=rw, height=rh, max_frames=num_frames, fps=FPS)
        if media.mask_video is not None:
            m.mask_video = decode_mask_video(
                media.mask_video, "mask_video", width=rw, height=rh, max_frames=num_frames, fps=FPS
            )
        if media.mask_image is not None:
            m.mask_image = decode_mask_image(media.mask_image, "mask_image", width=rw, height=rh)
        if media.first_image is not None:
            m.first_image = decode_image(media.first_image, "first_image")
        if media.last_image is not None:
            m.last_image = decode_image(media.last_image, "last_image")
        m.images = [decode_image(b, f"images[{i}]") for i, b in enumerate(media.images)]

        # 2. Conditioning. The task applies to `video` only (contract §6).
        cond = build_conditioning(inp["task"], m, width=rw, height=rh, num_frames=num_frames)

        # 3. Per-job sampling settings.
        seed = int(inp["seed"]) if int(inp["seed"]) >= 0 else random.randrange(2**31)
        self.pipe.scheduler = UniPCMultistepScheduler.from_config(
            self.pipe.scheduler.config, flow_shift=float(inp["flow_shift"])
        )
        steps = int(inp["num_inference_steps"])

        def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            # Raising here (cancel, lost lease) stops the job before the next step and skips the
            # VAE decode; diffusers' `interrupt` flag would still decode (architecture rule 6).
            progress(0.9 * (step + 1) / steps)
            return {}

        # 4. Denoise.
        t0 = time.monotonic()
        out = self.pipe(
            prompt=inp["prompt"],
            negative_prompt=inp.get("negative_prompt") or DEFAULT_NEGATIVE_PROMPT,
            **cond.pipeline_kwargs(),
            num_inference_steps=steps,
            guidance_scale=float(inp["guidance_scale"]),
            conditioning_scale=float(inp["context_scale"]),
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
            callback_on_step_end=on_step,
        )
        inference_ms = int((time.monotonic() - t0) * 1000)
        frames = to_uint8(out.frames[0])

        # 5. Encode at the requested size.
        if (rw, rh) != (width, height):
            frames = upscale(frames, width, height)
        video_path = workdir / "output.mp4"
        encode_mp4(frames, str(video_path), fps=FPS, preset=self.encode_preset)
        progress(1.0)
        result = RunResult(
            video_path=video_path, seed=seed, inference_ms=inference_ms, render_size=(rw, rh)
        )
        if inp.get("return_conditioning"):
            result.conditioning = save_conditioning(cond, workdir, encode_mp4)
        return result


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def upscale(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of uint8 (F, h, w, 3) frames to (F, height, width, 3), frame by frame
    with Pillow: ~4x faster on a CPU than one float32 torch interpolate of the whole clip
    (81 x 832x480: ~0.6 s vs ~2.3 s), within one level of it, and no float copy of the clip."""
    out = np.empty((frames.shape[0], height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BILINEAR))
    return out


def save_conditioning(cond: Any, workdir: Path, encode_mp4: Callable[..., None]) -> dict[str, Any]:
    """Files of exactly what the pipeline was fed: the source/control video and mask (lossless
    H.264, at the render size) and the reference images in API order (PNG)."""
    saved: dict[str, Any] = {"recipe": cond.recipe}
    if cond.video is not None:
        p = workdir / "conditioning_video.mp4"
        encode_mp4(to_uint8(cond.video), str(p), fps=FPS, lossless=True)
        saved["video"] = p
    if cond.mask is not None:
        mask = cond.mask
        if mask.ndim == 4 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.ndim == 3:
            mask = np.repeat(mask[..., None], 3, axis=-1)
        p = workdir / "conditioning_mask.mp4"
        encode_mp4(to_uint8(mask), str(p), fps=FPS, lossless=True)
        saved["mask"] = p
    refs = []
    for i, img in enumerate(cond.reference_images_api_order):
        p = workdir / f"reference_{i}.png"
        Image.Image.save(img, p)
        refs.append(p)
    if refs:
        saved["reference_images"] = refs
    return saved


def load_runner(
    model: str,
    *,
    weights_root: Path,
    device: str,
    tiny_downscale: int | None,
    encode_preset: str = "fast",
    cpu_threads: int | None = None,
) -> VaceRunner:
    from pipelines.loader import load_pipeline

    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe, info = load_pipeline(model, weights_root=weights_root, device=device)
    pipe.set_progress_bar_config(disable=True)
    return VaceRunner(
        pipe,
        name=model,
        kind=info.kind,
        device=device,
        downscale=info.render_downscale if tiny_downscale is None else tiny_downscale,
        encode_preset=encode_preset,
    )
