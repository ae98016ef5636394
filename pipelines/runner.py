"""One job through `WanVACEPipeline`, top to bottom (diffusers' single-file habit), in the two
stages of the runner protocol (server/kernel/runner.py).

`render`, the device stage:
1. decode the fetched media at the render size and build the conditioning (`pipelines.inputs`)
2. set the per-job scheduler (UniPC flow, the request's `flow_shift`), seed and negative prompt
3. denoise, reporting progress and honouring cancellation from the step callback; VAE decode;
   frames to uint8 on the device, then to host memory
4. the NSFW safety checker on sampled output frames (`pipelines.safety`)

`finish`, the CPU stage: scale up (tiny model only) and encode the MP4; optionally the
conditioning too.

`load_runner` installs the exact caches of `pipelines.caches` (the no-video gray clip's latent,
the default negative prompt's embeddings): outputs are bit for bit those without them.

The worker (server/worker/) owns everything around it: leases, fetching, storage, the store.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler, WanVACEPipeline
from PIL import Image

from pipelines.caches import GrayClipCache, PromptCache
from pipelines.config import PipelineConfig
from preprocessors.registry import PreprocessorContext, PreprocessorSet
from server.kernel.errors import TaskError
from server.kernel.request import FPS, VaceRequest
from server.kernel.runner import Media, ProgressFn, Rendered, RunResult

log = logging.getLogger("wan_vace.runner")


class ContentWithheld(TaskError):
    """The safety checker flagged the output and the policy is to withhold it (code 1405)."""

# The official Wan negative prompt (Wan2.1 `wan/configs/shared_config.py`, `sample_neg_prompt`),
# used when the request gives none, as the official and VACE inference code do (vace.md §1).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# The text encoder's padded length: `WanVACEPipeline.__call__`'s default (its `encode_prompt`'s
# is 226), passed explicitly so the cached negative embeddings and the prompt's agree on it.
MAX_SEQUENCE_LENGTH = 512


class VaceRunner:
    def __init__(
        self,
        pipe: WanVACEPipeline,
        *,
        name: str,
        kind: str,
        device: str,
        downscale: int = 1,
        encode_preset: str = "veryfast",
        encode_threads: int = 0,
        caches: bool = False,
        preprocessors: PreprocessorSet | None = None,
        safety: Any = None,
        safety_note: str = "off",
        nsfw_policy: str = "flag",
        preprocessor_memory: str = "resident",
        tasks: dict[str, str] | None = None,
        speed: Any = None,
        step_cache: Any = None,
    ):
        self.pipe = pipe
        # What pipelines/speed.py chose (SpeedReport), or None for a pipeline left as loaded.
        self.speed = speed
        # The VACE step cache behind enable_fast_mode (pipelines/stepcache.py), or None: fast
        # mode requests then run exact, and the answer says so.
        self.step_cache = None
        if step_cache is not None:
            from pipelines.stepcache import enable_step_cache

            self.step_cache = enable_step_cache(pipe.transformer, step_cache)
        self.encode_preset = encode_preset
        self.encode_threads = encode_threads
        # The exact caches (pipelines/caches.py), off for a pipeline stand-in in the tests.
        self.gray_cache: GrayClipCache | None = None
        self.prompt_cache: PromptCache | None = None
        if caches:
            self.gray_cache = GrayClipCache(pipe)
            self.prompt_cache = PromptCache(pipe, DEFAULT_NEGATIVE_PROMPT, MAX_SEQUENCE_LENGTH)
        self.name = name
        self.kind = kind
        self.device = device
        self.downscale = downscale if kind == "random" else 1
        # The runner owns the preprocessors it builds, so `close` can free their weights.
        self.preprocessors = preprocessors or PreprocessorSet(
            PreprocessorContext(device=device, tiny=kind == "random")
        )
        self.preprocessor_memory = preprocessor_memory
        # The NSFW checker (pipelines/safety.py) or None, what /health says about it, and what a
        # flagged output does ("flag" or "withhold").
        self.safety = safety
        self.safety_note = safety_note
        self.nsfw_policy = nsfw_policy
        self.tasks = tasks or {}

    def gpu_memory(self) -> dict[str, int]:
        """GPU memory this worker holds, for its worker row and /metrics; empty off CUDA."""
        if not str(self.device).startswith("cuda") or not torch.cuda.is_available():
            return {}
        dev = torch.device(self.device)
        return {
            "gpu_memory_bytes": int(torch.cuda.memory_reserved(dev)),
            "gpu_memory_total_bytes": int(torch.cuda.get_device_properties(dev).total_memory),
        }

    def close(self) -> None:
        self.preprocessors.close()

    @property
    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "kind": self.kind,
            "device": self.device,
            "tasks": self.tasks,
            "safety_checker": self.safety_note,
        }
        if self.gray_cache is not None:
            info["caches"] = (
                f"exact: the no-video gray clip's latent (last {self.gray_cache.entries} sizes), "
                "the default negative prompt's embeddings"
            )
        if self.speed is not None:
            info["speed"] = self.speed.as_info()
        if self.step_cache is not None:
            c = self.step_cache.config
            info["fast_mode"] = (
                f"step cache (VACE-correct first-block residual: hints recomputed every step), "
                f"threshold {c.threshold:g}, first {c.warmup} steps always computed"
            )
        else:
            info["fast_mode"] = "off: enable_fast_mode requests run exact"
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
        """One minimal run so the first job does not pay for lazy initialisation; with compile
        on, one transformer forward per served size first, so no job waits for a compile."""
        if self.speed is not None and str(self.speed.compile).startswith("pending"):
            from pipelines import speed

            speed.warm_up(self.pipe, speed.served_sizes(self.render_size), self.speed)
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
        if self.prompt_cache is not None:
            self.prompt_cache.embeds()

    def render(self, req: VaceRequest, media: Media, workdir: Path, progress: ProgressFn) -> Rendered:
        """The device stage: inputs, preprocessing, denoise, VAE decode, frames to uint8 on the
        device and one copy to host memory, the safety checker. Progress up to 0.9. Writes
        nothing to `workdir`: a failure here leaves no file behind."""
        from pipelines.inputs import prepare_inputs

        width, height = req.width, req.height
        rw, rh = self.render_size(width, height)
        if self.speed is not None:
            from pipelines.speed import set_vae_tiling

            set_vae_tiling(self.pipe, self.speed, rw, rh)

        # 1. Media decoded at the render size, then the conditioning (pipelines/inputs.py).
        cond, notes = prepare_inputs(
            req, media, width=rw, height=rh, preprocessors=self.preprocessors.get
        )
        if self.preprocessor_memory == "offload":
            self.preprocessors.park()  # the pipeline gets the GPU memory back

        # 2. Per-job sampling settings.
        seed = req.seed if req.seed >= 0 else random.randrange(2**31)
        self.pipe.scheduler = UniPCMultistepScheduler.from_config(
            self.pipe.scheduler.config, flow_shift=req.flow_shift
        )
        steps = req.num_inference_steps

        def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            # Raising here (cancel, lost lease) stops the job before the next step and skips the
            # VAE decode; diffusers' `interrupt` flag would still decode (architecture rule 6).
            progress(0.9 * (step + 1) / steps)
            return {}

        # 3. Denoise, then the VAE decode; the frames come back as a tensor on the device.
        t0 = time.monotonic()
        fast = None
        if req.enable_fast_mode and self.step_cache is not None:
            fast = self.step_cache.job(steps)
        with fast if fast is not None else contextlib.nullcontext() as stats:
            out = self._call_pipe(
                prompt=req.prompt,
                **self._negative(req.negative_prompt or DEFAULT_NEGATIVE_PROMPT),
                **cond.pipeline_kwargs(),
                num_inference_steps=steps,
                guidance_scale=req.guidance_scale,
                conditioning_scale=req.context_scale,
                generator=torch.Generator().manual_seed(seed),
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                output_type="pt",
                callback_on_step_end=on_step,
            )
        inference_ms = int((time.monotonic() - t0) * 1000)
        if req.enable_fast_mode:
            notes = dict(notes or {})
            if stats is not None:
                notes["fast_mode"] = (
                    f"step cache: {stats.skipped} of {stats.forwards} transformer passes reused"
                )
            else:
                notes["fast_mode"] = "off on this server (WAN_VACE_FAST_MODE=off): rendered exact"
        frames = frames_to_host(out.frames[0])

        # 4. The safety checker, on the frames as rendered (before any scaling up).
        checked = bool(req.enable_safety_checker and self.safety is not None)
        flagged = bool(checked and self.safety.check(frames))
        if flagged and self.nsfw_policy == "withhold":
            raise ContentWithheld(
                "The output was flagged by the safety checker and withheld (this server's "
                "policy); has_nsfw_contents would be [true]. Change the prompt or inputs."
            )
        payload = Frames(frames, width, height, cond if req.return_conditioning else None)
        return Rendered(
            payload=payload, seed=seed, inference_ms=inference_ms, render_size=(rw, rh),
            has_nsfw=flagged, safety_checked=checked, notes=notes,
        )  # fmt: skip

    def _call_pipe(self, **kwargs: Any) -> Any:
        """The pipeline call of `render`: a group runner (pipelines/group.py) overrides it to
        run the same call on every rank of its group."""
        return self.pipe(**kwargs)

    def _negative(self, text: str) -> dict[str, Any]:
        """The pipeline's negative-prompt argument: the cached embeddings for the default one
        (bitwise what diffusers would encode), the text itself for a user's own."""
        if self.prompt_cache is not None and text == self.prompt_cache.prompt:
            return {"negative_prompt_embeds": self.prompt_cache.embeds()}
        return {"negative_prompt": text}

    def finish(self, rendered: Rendered, workdir: Path, progress: ProgressFn) -> RunResult:
        """The CPU stage: scale up (tiny model only), encode the MP4, the conditioning files.
        Progress 1.0 once the output exists.

        Safe to run in another thread while `render` runs the next job: it reads only the
        payload (host arrays and the job's own conditioning, which nothing else holds) and the
        encoder settings fixed at construction, never the pipeline, its scheduler, the caches or
        the preprocessors."""
        from pipelines.media import encode_mp4

        payload: Frames = rendered.payload
        frames = payload.frames
        if frames.shape[1:3] != (payload.height, payload.width):
            frames = upscale(frames, payload.width, payload.height)
        video_path = workdir / "output.mp4"
        encode_mp4(frames, str(video_path), fps=FPS, preset=self.encode_preset,
                   threads=self.encode_threads)  # fmt: skip
        progress(1.0)
        result = RunResult(
            video_path=video_path, seed=rendered.seed, inference_ms=rendered.inference_ms,
            render_size=rendered.render_size, has_nsfw=rendered.has_nsfw,
            safety_checked=rendered.safety_checked, notes=rendered.notes,
        )  # fmt: skip
        if payload.conditioning is not None:
            result.conditioning = save_conditioning(payload.conditioning, workdir, encode_mp4)
        return result

    def run(self, req: VaceRequest, media: Media, workdir: Path, progress: ProgressFn) -> RunResult:
        return self.finish(self.render(req, media, workdir, progress), workdir, progress)


@dataclass
class Frames:
    """`Rendered.payload`: the rendered uint8 (F, h, w, 3) frames in host memory, the size the
    client asked for, and the conditioning when the request wants it saved."""

    frames: np.ndarray
    width: int
    height: int
    conditioning: Any = None


def frames_to_host(video: torch.Tensor | np.ndarray, chunk: int = 16) -> np.ndarray:
    """Decoded (F, 3, H, W) frames in [0, 1] (diffusers' "pt" output, on the pipeline's device)
    to uint8 (F, H, W, 3) in host memory: converted on the device, then one copy of a quarter
    of the float bytes. Equal to `to_uint8` of diffusers' "np" output bit for bit (the same
    float32 product and round-half-to-even), without the host spending 1.4 s (81 x 832x480) to
    5 s (161 x 1280x720) and a float32 copy of the clip on it. Chunks of frames bound the
    device's float temporaries. An array is taken as diffusers' "np" layout (F, H, W, 3), what a
    stand-in pipeline that ignores `output_type` returns."""
    if isinstance(video, np.ndarray):
        return to_uint8(video)
    out = torch.empty((video.shape[0], video.shape[2], video.shape[3], video.shape[1]),
                      dtype=torch.uint8, device=video.device)  # fmt: skip
    for i in range(0, video.shape[0], chunk):
        part = video[i : i + chunk].float().clamp(0.0, 1.0).mul(255.0).round()
        out[i : i + chunk] = part.to(torch.uint8).permute(0, 2, 3, 1)
    return out.cpu().numpy()


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


def load_runner(config: PipelineConfig) -> VaceRunner:
    """The served runner: the pipeline of `config.model` loaded from local weights; over a
    group of processes when `config.gpus_per_job` > 1 (pipelines/group.py)."""
    from pipelines.loader import load_pipeline

    if config.gpus_per_job > 1:
        from pipelines.group import load_group_runner

        return load_group_runner(config)

    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # Loaded in host memory when a GPU is the target: the speed step places each component
    # (resident, fp8, offloaded), so a model larger than the card never has to fit there first.
    load_device = "cpu" if str(device).startswith("cuda") else device
    pipe, info = load_pipeline(config.model, weights_root=config.weights_root, device=load_device)
    pipe.set_progress_bar_config(disable=True)
    from pipelines.speed import apply_speed

    report = apply_speed(pipe, config.speed, device)
    return VaceRunner(pipe, **runner_options(config, info, device), speed=report,
                      step_cache=_step_cache_config(config))  # fmt: skip


def _step_cache_config(config: PipelineConfig) -> Any:
    if config.fast_mode == "off":
        return None
    from pipelines.stepcache import StepCacheConfig

    return StepCacheConfig(threshold=config.fast_mode_threshold, warmup=config.fast_mode_warmup)


def runner_options(config: PipelineConfig, info: Any, device: str) -> dict[str, Any]:
    """`VaceRunner`'s keyword arguments (all but the pipeline) for a loaded model: its
    preprocessors, safety checker, caches and encoder settings."""
    from pipelines.weights import task_readiness, weights_resolver

    tiny = info.kind == "random"
    resolve = weights_resolver(config.weights_root)
    context = PreprocessorContext(device=device, weights=resolve, tiny=tiny)
    safety, safety_note = _safety_checker(config, device, tiny, resolve)
    return {
        "name": config.model,
        "kind": info.kind,
        "device": device,
        "downscale": info.render_downscale if config.tiny_downscale is None else config.tiny_downscale,
        "encode_preset": config.encode_preset,
        "encode_threads": config.encode_threads,
        "caches": True,
        "preprocessors": PreprocessorSet(context),
        "safety": safety,
        "safety_note": safety_note,
        "nsfw_policy": config.nsfw_policy,
        "preprocessor_memory": config.preprocessor_memory,
        "tasks": task_readiness(config.weights_root, tiny=tiny),
    }


def _safety_checker(config: PipelineConfig, device: str, tiny: bool, resolve: Any) -> tuple[Any, str]:
    """(checker or None, what /health says). Missing weights are not a start-up failure: jobs
    then run with `safety_checked: false`, and /health says why (decided in the README)."""
    if config.safety_checker == "off":
        return None, "off (WAN_VACE_SAFETY_CHECKER=off): outputs carry safety_checked=false"
    from pipelines import safety

    if tiny:
        return safety.build_tiny_safety_checker(flag=False), "tiny random checker (never flags)"
    try:
        folder = resolve("safety-checker")
    except Exception as e:
        log.warning("safety checker unavailable: %s", e)
        return None, f"unavailable: {e}; outputs carry safety_checked=false"
    return safety.load_safety_checker(folder, device), "stable-diffusion-safety-checker"
