"""Speed of the VACE pipeline on one GPU: diffusers' stock `WanVACEPipeline` against ours (the
speed settings of `pipelines/speed.py`), in one process, on full-size models with random bf16
weights built from the real configs (no weights needed), with achieved TFLOP/s from
`pipelines/flops.py`.

    python scripts/bench.py [--out DIR] [--budget-s 480] [--steps 2] [--warmup 1] [--ours auto|none|MOD:FUNC]
    python scripts/bench.py --tiny          # tiny models on the CPU in well under a minute (CI)

Sections, most important first; each one is skipped, with the reason, when what is left of
`--budget-s` looks too short for it, and the results are written to `--out` (bench.json and
bench.md) as soon as each measurement is done, so a run cut short still leaves a table:
  1. VACE-14B 480p: stock, then "ours" (apply_speed, compile off) and "ours+compile" applied in
     turn to the same pipeline: s/step, and each stage once (text encode, VAE encode of the
     clip, VAE decode, frames to host memory, MP4 encode), so s/job for the API defaults
  2. VACE-1.3B 480p: the same steps (the stages are the same models: taken from section 1)
  3. fast mode (`pipelines/stepcache.py`, when present): exact vs cached on the same seed,
     wall time, and PSNR of the decoded frames
  4. memory modes (`pipelines/speed.py`'s fp8 layerwise casting and group offload): speed and
     peak memory
  5. VACE-14B 720p steps, with the fastest ours variant
At the default budget (480 s) on an H200, expect sections 1-3 to fit; `--sections 4,5` in a
second call measures the rest. GPU run: scripts/gpu_run.sh (the wheels from
scripts/fetch_gpu_wheels.sh).

How a step is timed: the pipeline's own denoising loop (both CFG passes and the scheduler
step), timestamped after each step by `callback_on_step_end` behind a device synchronise; the
first `--warmup` steps are left out. The prompt embeddings are encoded once and passed in, and
the VACE conditioning latents are random tensors of the right shape (the pipeline would
VAE-encode them at every call: that encode is timed once as its own stage instead). Random
weights compute exactly as many FLOPs as real ones, but a content-driven cache (fast mode)
skips differently on them: treat its speedup as a smoke figure, not the real one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import inspect
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_T_START = time.perf_counter()  # the budget counts the heavy imports too: they are part of the run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from pipelines import flops
from server.kernel.request import FIELDS, num_frames_for, parse_size

GIB = 2**30
SPEC_TFLOPS = flops.H100_BF16_DENSE_TFLOPS  # an H200 has the H100's dense bf16 peak
PROMPT = "a cat walks on the beach, slow motion, close up"
SEED = 0

# The API's defaults (server/kernel/request.py): the job every s/job figure stands for.
_DEFAULTS = {f.name: f.default for f in FIELDS}
API_STEPS = int(_DEFAULTS["num_inference_steps"])
API_CFG = float(_DEFAULTS["guidance_scale"]) > 1.0
API_FRAMES = num_frames_for(int(_DEFAULTS["duration"]))
API_SIZE = parse_size(str(_DEFAULTS["size"]))

# The real models (vace.md §2, from diffusers' convert_wan_to_diffusers.py).
_VACE_14B = {
    "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06,
    "ffn_dim": 13824, "freq_dim": 256, "in_channels": 16, "num_attention_heads": 40, "num_layers": 40,
    "out_channels": 16, "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "text_dim": 4096,
    "vace_layers": [0, 5, 10, 15, 20, 25, 30, 35], "vace_in_channels": 96,
}  # fmt: skip
_VACE_1_3B = {**_VACE_14B, "ffn_dim": 8960, "num_attention_heads": 12, "num_layers": 30,
              "vace_layers": list(range(0, 30, 2))}  # fmt: skip
# umT5-XXL (google/umt5-xxl's config): 5.68 B parameters.
_UMT5_XXL = {
    "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "scalable_attention": True,
}  # fmt: skip
_WAN_VAE: dict[str, Any] = {}  # AutoencoderKLWan()'s defaults are the real VAE

# The tiny stand-ins (vace.md §3): the same classes, so the same code path, in milliseconds.
_TINY_TRANSFORMER = {
    "attention_head_dim": 12, "cross_attn_norm": True, "ffn_dim": 32, "freq_dim": 256, "in_channels": 16,
    "num_attention_heads": 2, "out_channels": 16, "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads",
    "text_dim": 32, "rope_max_seq_len": 1024, "vace_in_channels": 96,
}  # fmt: skip
_TINY_14B = {**_TINY_TRANSFORMER, "num_layers": 4, "vace_layers": [0, 2]}
_TINY_1_3B = {**_TINY_TRANSFORMER, "num_layers": 3, "vace_layers": [0, 1, 2]}
_TINY_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4,
            "feed_forward_proj": "gated-gelu"}  # fmt: skip
_TINY_VAE = {"base_dim": 3, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
             "temperal_downsample": [False, True, True]}  # fmt: skip

# Time that no FLOP count predicts, for the budget's estimates (GPU; generous on purpose: a
# section that overruns the budget is worse than one skipped).
COMPILE_ALLOWANCE_S = 120.0
BUILD_S_PER_GPARAM = 1.5


@dataclasses.dataclass(frozen=True)
class Profile:
    """What a run builds and at which sizes: the real models on a GPU, or tiny ones."""

    tiny: bool
    transformers: dict[str, dict[str, Any]]
    t5: dict[str, Any]
    vae: dict[str, Any]
    sizes: dict[str, tuple[int, int]]  # "480p" / "720p" -> (width, height) rendered
    frames: int
    matmul_n: int


REAL = Profile(False, {"14b": _VACE_14B, "1.3b": _VACE_1_3B}, _UMT5_XXL, _WAN_VAE,
               {"480p": API_SIZE, "720p": (1280, 720)}, API_FRAMES, 8192)  # fmt: skip
TINY = Profile(True, {"14b": _TINY_14B, "1.3b": _TINY_1_3B}, _TINY_T5, _TINY_VAE,
               {"480p": (48, 32), "720p": (80, 48)}, API_FRAMES, 256)  # fmt: skip
MODEL_TITLES = {"14b": "VACE-14B", "1.3b": "VACE-1.3B"}


# --- results on disk --------------------------------------------------------------------------


class Report:
    """bench.json and bench.md, rewritten after every measurement (a killed run keeps what it
    measured)."""

    def __init__(self, out: Path, meta: dict[str, Any]):
        self.out = out
        self.meta = meta
        self.sections: list[dict[str, Any]] = []
        out.mkdir(parents=True, exist_ok=True)

    def section(self, sid: str, title: str, **facts: Any) -> dict[str, Any]:
        sec = {"id": sid, "title": title, "status": "running", "reason": None, "variants": [], **facts}
        self.sections.append(sec)
        self.save()
        return sec

    def save(self) -> None:
        self.meta["elapsed_s"] = round(time.perf_counter() - self.meta["_t0"], 2)
        doc = {
            "meta": {k: v for k, v in self.meta.items() if not k.startswith("_")},
            "sections": self.sections,
        }
        _write(self.out / "bench.json", json.dumps(doc, indent=2, default=_jsonable) + "\n")
        _write(self.out / "bench.md", render_markdown(doc))


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    return repr(obj)


def _f(value: Any) -> str:
    """A number for the table: three significant digits or more, no exponent for the sizes
    a GPU run gives (the tiny run's 0.00123 still reads as a number)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    a = abs(value)
    if a >= 100 or isinstance(value, int):
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _flop_str(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x / 1e6:.3g} MFLOP"


_SETTINGS_KEYS = ("attention", "memory", "text_encoder", "vae_tiling", "compile")


def _settings_line(report: Any) -> str:
    """The choices of a speed report, in one line (the whole report is in bench.json)."""
    if isinstance(report, dict) and any(k in report for k in _SETTINGS_KEYS):
        return ", ".join(f"{k} {report[k]}" for k in _SETTINGS_KEYS if k in report)
    return json.dumps(report, default=_jsonable)[:300]


def render_markdown(doc: dict[str, Any]) -> str:
    m = doc["meta"]
    mm = m.get("matmul") or {}
    title = "# VACE pipeline benchmark"
    if m["tiny"]:
        title += " (tiny models on the CPU: a smoke run, not a measurement)"
    job = m["job"]
    lines = [
        title,
        "",
        (f"- device: {m['device_name']}; torch {m['torch']}, diffusers {m['diffusers']}, "
         f"transformers {m['transformers']}; {m['elapsed_s']} s of a {m['budget_s']} s budget"),
        (f"- bf16 matmul {mm.get('n')}^3: {_f(mm.get('tflops'))} TFLOP/s "
         f"({_f(mm.get('pct_spec'))}% of the {SPEC_TFLOPS:.0f} TFLOP/s dense bf16 spec)"),
        (f"- job: {job['width']}x{job['height']}, {job['frames']} frames, {job['steps']} steps, "
         f"CFG {'on' if job['cfg'] else 'off'} (the API defaults); s/job = {job['formula']}"),
        f"- ours: {m['ours']}",
        "",
    ]  # fmt: skip
    head = ("| variant | s/step | s/job | peak GiB | TFLOP/s | % of spec | % of matmul | text enc s "
            "| VAE enc s | VAE dec s | to host s | MP4 s |")  # fmt: skip
    for i, sec in enumerate(doc["sections"], 1):
        facts = []
        if sec.get("tokens"):
            facts.append(f"L = {sec['tokens']}")
        if sec.get("step_flops"):
            facts.append(f"{_flop_str(sec['step_flops'])}/step")
        if sec.get("job_flops"):
            facts.append(f"{_flop_str(sec['job_flops'])}/job")
        lines.append(f"## {i}. {sec['title']}" + (f" ({', '.join(facts)})" if facts else ""))
        lines.append("")
        if sec["status"] != "measured":
            lines.append(f"**{sec['status']}**: {sec.get('reason') or ''}")
            lines.append("")
        if sec.get("note"):
            lines.append(sec["note"])
            lines.append("")
        rows = [v for v in sec["variants"]]
        if rows:
            lines += [head, "|" + "---|" * 12]
            for v in rows:
                if v["status"] != "measured":
                    lines.append(f"| {v['name']} | {v['status']}: {v.get('reason') or ''} |" + " |" * 10)
                    continue
                st = v.get("stages") or {}
                lines.append(
                    f"| {v['name']} | {_f(v.get('s_per_step'))} | {_f(v.get('s_per_job'))} "
                    f"| {_f(v.get('peak_gib'))} | {_f(v.get('tflops'))} | {_f(v.get('pct_spec'))} "
                    f"| {_f(v.get('pct_matmul'))} | {_f(st.get('text_encode_s'))} "
                    f"| {_f(st.get('vae_encode_s'))} | {_f(st.get('vae_decode_s'))} "
                    f"| {_f(st.get('to_host_s'))} | {_f(st.get('mp4_encode_s'))} |"
                )
            lines.append("")
        for v in rows:
            extra = {k: v[k] for k in ("model", "steps", "exact_s", "fast_s", "speedup", "psnr_db", "identical",
                                       "computed_forwards", "forwards", "skipped_forwards", "warmup_s", "apply_s",
                                       "resident_gib", "note") if v.get(k) is not None}  # fmt: skip
            if extra and v["status"] == "measured":
                lines.append(f"- {v['name']}: " + ", ".join(f"{k} {_f(x)}" for k, x in extra.items()))
        for v in rows:
            if v.get("speed_report") is not None:
                lines.append(f"- {v['name']} settings: {_settings_line(v['speed_report'])}")
        for name, r in (sec.get("ratios") or {}).items():
            lines.append(f"- {name} / stock s/step: {r:.3f} ({1 / r:.2f}x as fast)")
        lines.append("")
    return "\n".join(lines)


# --- building the models ----------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_transformer(config: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """A random-weight `WanVACETransformer3DModel`, allocated once, on `device`, in bf16.

    Built under the device and bf16 as defaults, so each weight is created where it lives
    and initialised there by its own module (PyTorch's default init: cheap on a GPU, and
    activations of a sane scale): no fp32 copy, no host copy, no second allocation (17.3 B
    parameters for 14B = 34.7 GB). Then, as diffusers does when it loads the real weights,
    the `_keep_in_fp32_modules` (norms, time embedder, scale/shift tables) go to fp32."""
    from diffusers import WanVACETransformer3DModel

    with torch.device(device), default_dtype(torch.bfloat16):
        model = WanVACETransformer3DModel(**config)
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if any(k in name.split(".") for k in keep):
            param.data = param.data.float()
    return model.eval().requires_grad_(False)


def build_text_encoder(config: dict[str, Any], vocab_size: int, device: torch.device) -> torch.nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(**{"vocab_size": vocab_size, "pad_token_id": 0, "eos_token_id": 1,
                        "decoder_start_token_id": 0, **config})  # fmt: skip
    with torch.device(device), default_dtype(torch.bfloat16):
        model = UMT5EncoderModel(cfg)
    return model.eval().requires_grad_(False)


def build_vae(config: dict[str, Any], device: torch.device) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    with torch.device(device):  # fp32, as diffusers' Wan docs and our loader run it
        return AutoencoderKLWan(**config).eval().requires_grad_(False)


def make_pipeline(transformer: torch.nn.Module, shared: dict[str, Any]) -> Any:
    from diffusers import UniPCMultistepScheduler, WanVACEPipeline

    # The scheduler the Hub checkpoints ship (vace.md §2): diffusers' stock settings.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    pipe = WanVACEPipeline(
        tokenizer=shared["tokenizer"],
        text_encoder=shared["text_encoder"],
        vae=shared["vae"],
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    _fake_conditioning(pipe)
    return pipe


def _fake_conditioning(pipe: Any) -> None:
    """Random VACE conditioning latents of the shape the pipeline's VAE encode would give
    (the inactive and reactive copies: 2 x z channels), instead of two full-clip VAE encodes
    per call: the denoising steps cost the same, and the encode is timed as a stage."""

    def prepare_video_latents(video, mask, reference_images=None, generator=None, device=None):
        z = pipe.vae.config.z_dim
        st, ss = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        refs = 0 if reference_images is None else sum(r is not None for r in reference_images[0])
        t = (video.shape[2] - 1) // st + 1 + refs
        shape = (video.shape[0], 2 * z, t, video.shape[3] // ss, video.shape[4] // ss)
        g = torch.Generator(device="cpu").manual_seed(SEED + 1)
        return torch.randn(shape, generator=g).to(device=device or video.device, dtype=pipe.vae.dtype)

    pipe.prepare_video_latents = prepare_video_latents


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- measuring --------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None


def timed(device: torch.device, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return time.perf_counter() - t0, out


def free(device: torch.device, compiled: bool = True) -> None:
    """Give memory back between sections; `compiled`: drop compiled graphs too (they may hold
    on to what they were compiled for), unless a kept pipeline still uses them."""
    if compiled:
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def matmul_tflops(device: torch.device, n: int) -> dict[str, Any]:
    """What a plain bf16 matrix product achieves here: the practical ceiling to compare with."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    iters = 10
    s, _ = timed(device, _matmuls, a, b, iters)
    tf = 2 * n**3 * iters / s / 1e12
    del a, b
    return {"n": n, "iters": iters, "s": s, "tflops": tf, "pct_spec": 100 * tf / SPEC_TFLOPS}


def _matmuls(a: torch.Tensor, b: torch.Tensor, iters: int) -> None:
    for _ in range(iters):
        a @ b


def run_steps(pipe: Any, device: torch.device, embeds: dict[str, Any], *, width: int, height: int,
              frames: int, steps: int, warmup: int, output_type: str = "latent",
              around: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """One pipeline call of `warmup + steps` steps; the per-step times after the warm-up.
    `around(num_inference_steps)`: a context the call runs in (a step cache's job)."""
    stamps: list[float] = []

    def on_step(_pipe: Any, _i: int, _t: Any, _kw: dict[str, Any]) -> dict[str, Any]:
        sync(device)
        stamps.append(time.perf_counter())
        return {}

    reset_peak(device)
    sync(device)
    context = around(warmup + steps) if around is not None else contextlib.nullcontext()
    t0 = time.perf_counter()
    with context as job_stats:
        out = pipe(
            **embeds,
            height=height,
            width=width,
            num_frames=frames,
            num_inference_steps=warmup + steps,
            guidance_scale=float(_DEFAULTS["guidance_scale"]),
            generator=torch.Generator().manual_seed(SEED),
            output_type=output_type,
            callback_on_step_end=on_step,
        )
    sync(device)
    t_end = time.perf_counter()
    marks = [t0, *stamps]
    per_step = [b - a for a, b in itertools.pairwise(marks)]
    measured = per_step[warmup:]
    return {
        "step_times": measured,
        "s_per_step": statistics.median(measured),
        "warmup_s": sum(per_step[:warmup]),
        "denoise_s": stamps[-1] - t0,
        "call_s": t_end - t0,
        "peak_gib": peak_gib(device),
        "frames": out.frames,
        "job_stats": job_stats,
    }


def synthetic_clip(frames: int, width: int, height: int) -> np.ndarray:
    """uint8 (F, H, W, 3): smooth colour gradients drifting a few pixels a frame with a little
    dither, closer to what x264 sees from a real model than the noise random weights give."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(SEED)
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        r = 128 + 100 * np.sin((x + 3 * i) / 37.0)
        g = 128 + 100 * np.sin((y + 2 * i) / 23.0)
        b = 128 + 100 * np.sin((x + y + 5 * i) / 51.0)
        img = np.stack([r, g, b], -1) + rng.normal(0, 1.5, (height, width, 1))
        out[i] = np.clip(img, 0, 255)
    return out


def measure_stages(
    pipe: Any, device: torch.device, *, width: int, height: int, frames: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each stage once (after a small warm-up of each model, so no first-call set-up is
    counted): the prompt and negative prompt through the text encoder, one VAE encode of the
    clip, one decode of its latent, the frames to uint8 in host memory, the MP4 encode.
    Returns the times and the prompt embeddings (every later pipeline call is passed them)."""
    from pipelines.config import PipelineConfig
    from pipelines.media import encode_mp4
    from pipelines.runner import DEFAULT_NEGATIVE_PROMPT, MAX_SEQUENCE_LENGTH, frames_to_host

    vae = pipe.vae
    st, ss = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    z = vae.config.z_dim
    out: dict[str, Any] = {}

    def encode_prompts() -> Any:
        return pipe.encode_prompt(
            prompt=PROMPT,
            negative_prompt=DEFAULT_NEGATIVE_PROMPT,
            do_classifier_free_guidance=API_CFG,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            device=device,
        )

    with torch.no_grad():
        # Warm-ups: kernel selection and allocator growth belong to start-up, not to a job.
        encode_prompts()
        vae.encode(torch.zeros(1, 3, 1 + st, 2 * ss, 2 * ss, device=device, dtype=vae.dtype))
        vae.decode(torch.zeros(1, z, 2, 2, 2, device=device, dtype=vae.dtype))

        reset_peak(device)
        out["text_encode_s"], embeds = timed(device, encode_prompts)
        out["text_encode_peak_gib"] = peak_gib(device)
        clip = torch.rand(1, 3, frames, height, width, device=device, dtype=vae.dtype) * 2 - 1
        reset_peak(device)
        out["vae_encode_s"], latent = timed(device, _vae_encode, vae, clip)
        out["vae_encode_peak_gib"] = peak_gib(device)
        del clip
        reset_peak(device)
        out["vae_decode_s"], video = timed(device, _vae_decode, vae, latent)
        out["vae_decode_peak_gib"] = peak_gib(device)
        del latent
        frames_01 = (video[0].permute(1, 0, 2, 3) / 2 + 0.5).clamp(0, 1)  # (F, 3, H, W), as diffusers' "pt"
        del video
        out["to_host_s"], host = timed(device, frames_to_host, frames_01)
        del frames_01, host
    clip_u8 = synthetic_clip(frames, width, height)
    preset = PipelineConfig.__dataclass_fields__["encode_preset"].default
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        encode_mp4(clip_u8, str(Path(tmp) / "out.mp4"), fps=16, preset=preset)
        out["mp4_encode_s"] = time.perf_counter() - t0
    out["mp4_preset"] = preset
    out["preprocessor"] = "not measured (optional): the control-signal models need their weights"
    enc_f = flops.vae_encode_flops(frames, height, width, flops.VaeShape.from_config(vae.config))
    lt, lh, lw = (frames - 1) // st + 1, height // ss, width // ss
    dec_f = flops.vae_decode_flops(lt, lh, lw, flops.VaeShape.from_config(vae.config))
    out["vae_encode_tflops"] = enc_f / out["vae_encode_s"] / 1e12
    out["vae_decode_tflops"] = dec_f / out["vae_decode_s"] / 1e12
    prompt_embeds, negative_embeds = embeds
    return out, {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_embeds}


def _vae_encode(vae: Any, clip: torch.Tensor) -> torch.Tensor:
    return vae.encode(clip).latent_dist.mode()


def _vae_decode(vae: Any, latent: torch.Tensor) -> torch.Tensor:
    return vae.decode(latent, return_dict=False)[0]


def job_seconds(s_per_step: float, stages: dict[str, Any]) -> float:
    """The API default job: its steps, both prompts encoded, the VACE pair of encodes, one
    decode, the frames to host memory, the MP4."""
    return (
        API_STEPS * s_per_step
        + stages["text_encode_s"]
        + 2 * stages["vae_encode_s"]
        + stages["vae_decode_s"]
        + stages["to_host_s"]
        + stages["mp4_encode_s"]
    )


JOB_FORMULA = (f"{API_STEPS} x s/step + text encode (prompt and negative) + 2 x VAE encode (VACE inactive "
               "and reactive) + VAE decode + frames to host + MP4 encode")  # fmt: skip


# --- the optional parts: ours, fast mode, memory modes ----------------------------------------


def _optional_module(name: str) -> tuple[Any, str | None]:
    """(module, None), or (None, why not): only the module itself being absent is "not
    available"; an error inside a module that exists is a bug and propagates."""
    try:
        return importlib.import_module(name), None
    except ModuleNotFoundError as e:
        if e.name == name:
            return None, f"{name.replace('.', '/')}.py is not in this tree"
        raise


def speed_config(speed: Any, overrides: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A `SpeedConfig` with those of `overrides` that it has as fields; the rest are returned
    (so a caller can say which setting this version does not offer)."""
    names = {f.name for f in dataclasses.fields(speed.SpeedConfig)}
    usable = {k: v for k, v in overrides.items() if k in names}
    return speed.SpeedConfig(**usable), {k: v for k, v in overrides.items() if k not in names}


def call_apply_speed(speed: Any, pipe: Any, cfg: Any, device: torch.device) -> Any:
    params = inspect.signature(speed.apply_speed).parameters
    if "device" in params or len(params) >= 3:
        return speed.apply_speed(pipe, cfg, str(device))
    return speed.apply_speed(pipe, cfg)


@dataclasses.dataclass(frozen=True)
class Ours:
    """One "ours" variant: `hook(pipe, device) -> report` applies it to a stock pipeline."""

    name: str
    hook: Callable[[Any, torch.device], Any]
    compiles: bool  # its first steps pay for torch.compile (the budget allows for it)
    label: str


def resolve_ours(
    spec: str, tiny: bool, speed: Any, speed_why: str | None, speed_module: str = "pipelines.speed"
) -> tuple[list[Ours], list[tuple[str, str]], str]:
    """The `--ours` variants, those not run (name, why), and a line saying what ours is.

    `auto`: `speed` (the `pipelines.speed` module, or None and why not), as "ours" (its exact path with compile off: what
    the server runs without extra settings) and then "ours+compile" (the same with regional
    compile), each applied on top of the one before on the same pipeline. `MODULE:FUNC`: one
    variant, `FUNC(pipe, device)`."""
    if spec == "none":
        return [], [("ours", "not run (--ours none)")], "not run (--ours none): stock only"
    if spec != "auto":
        mod_name, _, fn_name = spec.partition(":")
        fn = getattr(importlib.import_module(mod_name), fn_name or "apply")
        return (
            [Ours("ours", fn, True, f"{mod_name}:{fn.__name__}")],
            [],
            f"{mod_name}:{fn.__name__}(pipe, device)",
        )
    if speed is None:
        return [], [("ours", f"not available ({speed_why})")], f"not available ({speed_why}): stock only"

    def variant(name: str, overrides: dict[str, Any]) -> Ours:
        def apply(pipe: Any, device: torch.device) -> Any:
            cfg, _ = speed_config(speed, overrides)
            return call_apply_speed(speed, pipe, cfg, device)

        args = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        return Ours(
            name, apply, bool(overrides.get("compile")), f"{speed_module}.apply_speed(SpeedConfig({args}))"
        )

    variants = [variant("ours", {"compile": False})]
    skipped: list[tuple[str, str]] = []
    if tiny:
        # CPU inductor takes longer than the whole smoke run; compile is measured on a GPU.
        skipped.append(
            ("ours+compile", "not run on the CPU smoke run: compiling takes longer than the whole run")
        )
    else:
        variants.append(variant("ours+compile", {"compile": True}))
    return variants, skipped, "; ".join(f"{v.name} = {v.label}" for v in variants)


def _report_of(obj: Any) -> Any:
    if obj is None or isinstance(obj, (str, int, float, bool, dict, list)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json.loads(json.dumps(dataclasses.asdict(obj), default=_jsonable))
    return repr(obj)


# --- the budget -------------------------------------------------------------------------------


class Budget:
    def __init__(self, total_s: float, t0: float):
        self.total_s, self.t0 = total_s, t0

    def left(self) -> float:
        return self.total_s - (time.perf_counter() - self.t0)

    def refuse(self, estimate_s: float) -> str | None:
        """Why a piece estimated at `estimate_s` must be skipped, or None when it fits."""
        left = self.left()
        if estimate_s > left:
            return f"needs about {estimate_s:.0f} s, {max(left, 0):.0f} s of the budget left"
        return None


# --- the sections -----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = _T_START
        self.profile = TINY if args.tiny else REAL
        self.device = torch.device(args.device)
        self.budget = Budget(args.budget_s, self.t0)
        # Looked up once: the same answer for every section.
        self.speed, self.speed_why = _optional_module(args.speed_module)
        self.ours, self.ours_skipped, ours_note = resolve_ours(
            args.ours, args.tiny, self.speed, self.speed_why, args.speed_module
        )
        # A pipeline a later section reuses as it is (compiled and warm): section 2's 1.3B one
        # for fast mode, which would otherwise pay for its build and compile again.
        self.kept: dict[str, Any] = {}
        self.wanted = {int(x) for x in args.sections.split(",") if x.strip()}
        self.shared: dict[str, Any] = {}
        self.embeds: dict[str, Any] = {}
        self.stages: dict[str, dict[str, Any]] = {}  # variant -> stages (section 1)
        self.s_per_step: dict[tuple[str, str, str], float] = {}  # (model, size, variant) -> s
        self.efficiency = 0.35  # of the matmul rate, for estimates until something is measured
        self.build_s_per_gparam = 0.05 if args.tiny else BUILD_S_PER_GPARAM
        import diffusers
        import transformers

        w, h = self.profile.sizes["480p"]
        self.report = Report(
            Path(args.out),
            {
                "_t0": self.t0,
                "tiny": args.tiny,
                "device": str(self.device),
                "device_name": torch.cuda.get_device_name(self.device)
                if self.device.type == "cuda"
                else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
                "budget_s": args.budget_s,
                "spec_tflops": SPEC_TFLOPS,
                "job": {
                    "width": w,
                    "height": h,
                    "frames": self.profile.frames,
                    "steps": API_STEPS,
                    "cfg": API_CFG,
                    "formula": JOB_FORMULA,
                },
                "steps_measured": args.steps,
                "warmup_steps": args.warmup,
                "ours": ours_note,
            },
        )

    # helpers

    @property
    def matmul_rate(self) -> float:
        return self.report.meta["matmul"]["tflops"] * 1e12

    def estimate_steps_s(self, model: str, size: str, n_steps: int, variant: str = "stock") -> float:
        """Seconds for `n_steps` steps: measured when we have it, else the FLOP count at the
        efficiency measured so far."""
        known = self.s_per_step.get((model, size, variant)) or self.s_per_step.get((model, size, "stock"))
        if known:
            return n_steps * known
        shape = flops.TransformerShape.from_config(self.profile.transformers[model])
        w, h = self.profile.sizes[size]
        job = flops.job_flops(shape, width=w, height=h, frames=self.profile.frames, steps=1, cfg=API_CFG,
                              vae=flops.VaeShape.from_config(self.profile.vae))  # fmt: skip
        return n_steps * job["step_flops"] / (self.matmul_rate * self.efficiency)

    def estimate_build_s(self, model: str) -> float:
        c = self.profile.transformers[model]
        shape = flops.TransformerShape.from_config(c)
        gparams = (shape.num_layers + shape.num_vace_layers) * (4 * shape.dim**2 + 2 * shape.dim**2
                                                               + 2 * shape.dim * shape.ffn_dim) / 1e9  # fmt: skip
        return 2.0 + gparams * self.build_s_per_gparam

    def allowance(self, ours: Ours | None) -> float:
        """Time for compiling, which no FLOP count predicts."""
        return COMPILE_ALLOWANCE_S if ours is not None and ours.compiles and not self.args.tiny else 0.0

    def best_ours(self) -> Ours | None:
        """The fastest ours variant measured on VACE-14B 480p (for 720p), else the first."""
        timed_ = [(self.s_per_step[("14b", "480p", o.name)], i) for i, o in enumerate(self.ours)
                  if ("14b", "480p", o.name) in self.s_per_step]  # fmt: skip
        if timed_:
            return self.ours[min(timed_)[1]]
        return self.ours[0] if self.ours else None

    def section_facts(self, model: str, size: str) -> dict[str, Any]:
        w, h = self.profile.sizes[size]
        cfg = self.profile.transformers[model]
        shape = flops.TransformerShape.from_config(cfg)
        job = flops.job_flops(shape, width=w, height=h, frames=self.profile.frames, steps=API_STEPS, cfg=API_CFG,
                              t5=flops.T5Shape.from_config(self.profile.t5),
                              vae=flops.VaeShape.from_config(self.profile.vae))  # fmt: skip
        return {
            "model": model,
            "size": size,
            "width": w,
            "height": h,
            "frames": self.profile.frames,
            "transformer_config": cfg,
            "tokens": int(job["tokens"]),
            "forward_flops": job["forward_flops"],
            "step_flops": job["step_flops"],
            "job_flops": job["total_flops"],
        }

    def add_rates(self, v: dict[str, Any], step_flops: float) -> None:
        tf = step_flops / v["s_per_step"] / 1e12
        v["tflops"] = tf
        v["pct_spec"] = 100 * tf / SPEC_TFLOPS
        v["pct_matmul"] = 100 * tf / self.report.meta["matmul"]["tflops"]

    def build_model(self, model: str) -> tuple[Any, dict[str, Any]]:
        reset_peak(self.device)
        s, tr = timed(self.device, build_transformer, self.profile.transformers[model], self.device)
        n = param_count(tr)
        self.build_s_per_gparam = s / max(n / 1e9, 1e-3)  # measured here beats the guess
        return tr, {"build_s": s, "params": n, "weights_gib": allocated_gib(self.device)}

    def measure_variant(self, sec: dict[str, Any], name: str, pipe: Any, *, steps: int, warmup: int,
                        stages: dict[str, Any] | None, model: str | None = None,
                        **extra: Any) -> dict[str, Any]:  # fmt: skip
        """Times `steps` steps of `pipe` at the section's size; `model` when it is not the
        section's own (a memory mode that fell back to the small model)."""
        model = model or sec["model"]
        step_flops = (
            sec["step_flops"]
            if model == sec["model"]
            else self.section_facts(model, sec["size"])["step_flops"]
        )
        v: dict[str, Any] = {"name": name, "status": "running", "model": model, **extra}
        sec["variants"].append(v)
        w, h = sec["width"], sec["height"]
        r = run_steps(pipe, self.device, self.embeds, width=w, height=h, frames=sec["frames"], steps=steps,
                      warmup=warmup)  # fmt: skip
        r.pop("frames")
        v.update(r)
        v["resident_gib"] = allocated_gib(self.device)
        self.add_rates(v, step_flops)
        if stages is not None:
            v["stages"] = stages
            v["s_per_job"] = job_seconds(v["s_per_step"], stages)
        v["status"] = "measured"
        self.s_per_step[(model, sec["size"], name)] = v["s_per_step"]
        if name == "stock" and self.report.meta.get("matmul"):
            self.efficiency = min(1.0, max(0.05, v["pct_matmul"] / 100))
        self.report.save()
        return v

    def skip_variant(self, sec: dict[str, Any], name: str, reason: str) -> None:
        sec["variants"].append({"name": name, "status": "skipped", "reason": reason})
        self.report.save()

    def finish_section(self, sec: dict[str, Any]) -> None:
        measured = {v["name"]: v for v in sec["variants"] if v["status"] == "measured"}
        if "stock" in measured:
            ratios = {name: v["s_per_step"] / measured["stock"]["s_per_step"] for name, v in measured.items()
                      if name != "stock" and v.get("s_per_step")}  # fmt: skip
            if ratios:
                sec["ratios"] = ratios
        if sec["status"] == "running":
            sec["status"] = "measured" if measured else "skipped"
            if not measured and not sec.get("reason"):
                sec["reason"] = "; ".join(v.get("reason") or "" for v in sec["variants"]) or "nothing ran"
        self.report.save()

    def guarded(self, sec: dict[str, Any], fn: Callable[[dict[str, Any]], None]) -> None:
        """A failure ends its section (recorded with the error), never the run."""
        try:
            fn(sec)
        except Exception as e:  # noqa: BLE001 - the report is the place for it
            sec["status"] = "failed"
            sec["reason"] = f"{type(e).__name__}: {e}"[:800]
            sec["traceback"] = traceback.format_exc()[-4000:]
            for v in sec["variants"]:
                if v["status"] == "running":
                    v["status"], v["reason"] = "failed", sec["reason"]
            print(sec["traceback"], file=sys.stderr)
        finally:
            self.finish_section(sec)
            free(self.device, compiled=not self.kept)

    # the run

    def run(self) -> int:
        p = self.profile
        self.report.meta["matmul"] = matmul_tflops(self.device, p.matmul_n)
        self.report.save()
        from pipelines.tiny import build_tokenizer

        tokenizer = build_tokenizer()  # any ids do: the prompt is padded to 512 tokens either way
        s_shared, _ = timed(self.device, lambda: self.shared.update(
            tokenizer=tokenizer,
            text_encoder=build_text_encoder(p.t5, 256384 if not p.tiny else len(tokenizer), self.device),
            vae=build_vae(p.vae, self.device),
        ))  # fmt: skip
        self.report.meta["shared_build_s"] = s_shared
        self.report.meta["text_encoder_params"] = param_count(self.shared["text_encoder"])
        self.report.meta["vae_params"] = param_count(self.shared["vae"])
        self.report.save()
        wanted = self.wanted
        plan = [
            (1, "14b-480p", "VACE-14B 480p: stock vs ours", self.section_main, ("14b", "480p")),
            (2, "1.3b-480p", "VACE-1.3B 480p: stock vs ours", self.section_main, ("1.3b", "480p")),
            (3, "fast-mode", "Fast mode (step cache): exact vs fast, same seed", self.section_fast, ("1.3b", "480p")),
            (4, "memory-modes", "Memory modes: fp8 layerwise casting, group offload", self.section_memory,
             ("14b", "480p")),
            (5, "14b-720p", "VACE-14B 720p steps", self.section_720p, ("14b", "720p")),
        ]  # fmt: skip
        for num, sid, title, fn, (model, size) in plan:
            sec = self.report.section(sid, title, **self.section_facts(model, size))
            if num not in wanted:
                sec["status"], sec["reason"] = "skipped", f"not asked for (--sections {self.args.sections})"
                self.finish_section(sec)
                continue
            self.guarded(sec, fn)
        print(render_markdown(json.loads((Path(self.args.out) / "bench.json").read_text())))
        failed = [s for s in self.report.sections if s["status"] == "failed"
                  or any(v["status"] == "failed" for v in s["variants"])]  # fmt: skip
        return 1 if failed else 0

    def section_main(self, sec: dict[str, Any]) -> None:
        """Stock, then each ours variant applied on top of the one before, on the same
        pipeline (ours changes it for good)."""
        model = sec["model"]
        first = model == "14b"
        a = self.args
        n = a.warmup + a.steps
        est = self.estimate_build_s(model) + self.estimate_steps_s(model, "480p", n) + (30 if first else 0)
        if self.ours:  # at least the first ours variant must fit too
            est += self.estimate_steps_s(model, "480p", n + 1) + self.allowance(self.ours[0])
        if why := self.budget.refuse(est):
            sec["status"], sec["reason"] = "skipped", why
            return
        tr, built = self.build_model(model)
        sec.update(built)
        pipe = make_pipeline(tr, self.shared)
        if first or "stock" not in self.stages:
            stages, self.embeds = measure_stages(pipe, self.device, width=sec["width"], height=sec["height"],
                                                 frames=sec["frames"])  # fmt: skip
            self.stages["stock"] = stages
        else:
            sec["note"] = "Stages: the same text encoder and VAE as section 1, so its stage times are reused."
        self.measure_variant(sec, "stock", pipe, steps=a.steps, warmup=a.warmup, stages=self.stages["stock"])
        base, base_report = "stock", None
        failed: str | None = None
        for ours in self.ours:
            if failed:
                self.skip_variant(sec, ours.name, f"not run: {failed} failed before it on this pipeline")
                continue
            est = self.estimate_steps_s(model, "480p", n + 1, ours.name) + self.allowance(ours)
            if why := self.budget.refuse(est):
                self.skip_variant(sec, ours.name, why)
                continue
            try:
                s_apply, speed_report = timed(self.device, ours.hook, pipe, self.device)
                if ours.name not in self.stages:
                    # The first ours variant's stages; a later one (compile) changes the transformer only.
                    if first and ours is self.ours[0]:
                        self.stages[ours.name], _ = measure_stages(pipe, self.device, width=sec["width"],
                                                                   height=sec["height"], frames=sec["frames"])  # fmt: skip
                    else:
                        self.stages[ours.name] = self.stages.get(self.ours[0].name, self.stages["stock"])
                # One more warm-up step for ours: a compiled model may specialise again on its 2nd call.
                self.measure_variant(sec, ours.name, pipe, steps=a.steps, warmup=max(a.warmup, 2),
                                     stages=self.stages[ours.name], apply_s=s_apply,
                                     speed_report=_report_of(speed_report))  # fmt: skip
            except Exception as e:  # noqa: BLE001 - recorded; the stock figures stand
                self.fail_variant(sec, ours.name, e)
                failed = ours.name
                continue
            base, base_report = ours.name, speed_report
        for name, why in self.ours_skipped:
            self.skip_variant(sec, name, why)
        if not failed:  # a pipeline a variant broke half way is not one to measure again
            self.keep(model, pipe, base, base_report)

    def fail_variant(self, sec: dict[str, Any], name: str, error: BaseException) -> None:
        """Record a variant's failure (its section goes on with the next one)."""
        tb = traceback.format_exc()[-4000:]
        print(tb, file=sys.stderr)
        v = next((v for v in sec["variants"] if v["name"] == name and v["status"] == "running"), None)
        if v is None:
            v = {"name": name}
            sec["variants"].append(v)
        v.update(status="failed", reason=f"{type(error).__name__}: {error}"[:800], traceback=tb)
        self.report.save()

    def keep(self, model: str, pipe: Any, base: str, speed_report: Any = None) -> None:
        if model == "1.3b" and 3 in self.wanted:
            self.kept[model] = (pipe, base, _report_of(speed_report))

    def section_fast(self, sec: dict[str, Any]) -> None:
        kept = self.kept.pop(sec["model"], None)  # whatever happens here, it is not kept longer
        stepcache, why = _optional_module(self.args.stepcache_module)
        if stepcache is None:
            sec["status"], sec["reason"] = "skipped", f"not available: {why}"
            return
        enable = getattr(stepcache, "enable_step_cache", None)
        if enable is None:
            sec["status"], sec["reason"] = (
                "skipped",
                f"not available: {stepcache.__name__} has no enable_step_cache",
            )
            return
        model = sec["model"]
        per_step = self.estimate_steps_s(model, "480p", 1, self.ours[-1].name if self.ours else "stock")
        fixed = 4 * per_step + 10
        if kept is None:
            fixed += self.estimate_build_s(model) + self.allowance(self.ours[-1] if self.ours else None)
        steps = self.args.fast_steps
        while steps > 8 and self.budget.refuse(fixed + 2 * steps * per_step):
            steps -= 2
        if why := self.budget.refuse(fixed + 2 * steps * per_step):
            sec["status"], sec["reason"] = "skipped", why
            return
        if kept is not None:
            pipe, base, sec["speed_report"] = kept
        else:
            tr, built = self.build_model(model)
            sec.update(built)
            pipe = make_pipeline(tr, self.shared)
            base = "stock"
            for ours in self.ours:
                sec["speed_report"] = _report_of(ours.hook(pipe, self.device))
                base = ours.name
        sec["note"] = (f"{MODEL_TITLES[model]}, {base} settings underneath, {steps} steps (the API's {API_STEPS} "
                       "when the budget allows), PSNR of the decoded frames against the exact run. Random "
                       "weights: the skips, so the speed-up, are not those of the real model.")  # fmt: skip
        w, h, f = sec["width"], sec["height"], sec["frames"]
        if kept is None:
            run_steps(pipe, self.device, self.embeds, width=w, height=h, frames=f, steps=1, warmup=1)
        exact = run_steps(pipe, self.device, self.embeds, width=w, height=h, frames=f, steps=steps, warmup=0,
                          output_type="pt")  # fmt: skip
        # A hook added to a compiled block would make it recompile: count only on an eager model
        # (a compiled one is counted by the cache's own statistics).
        compiled = getattr(pipe.transformer.blocks[-1], "_compiled_call_impl", None) is not None
        counter = None if compiled else _BlockCounter(pipe.transformer)
        cfg = _step_cache_config(stepcache)
        handle = enable(pipe.transformer, cfg) if cfg is not None else enable(pipe.transformer)
        # The cache is on for a call inside `handle.job(steps)` (pipelines/stepcache.py), or for
        # good once enabled (a cache without jobs).
        around = handle.job if callable(getattr(handle, "job", None)) else None
        try:
            # A short cached warm-up: whatever the cache wraps is set up before the timed run.
            run_steps(
                pipe, self.device, self.embeds, width=w, height=h, frames=f, steps=1, warmup=1, around=around
            )
            _reset_cache(handle)
            if counter is not None:
                counter.n = 0
            fast = run_steps(pipe, self.device, self.embeds, width=w, height=h, frames=f, steps=steps, warmup=0,
                             output_type="pt", around=around)  # fmt: skip
            job_stats = fast["job_stats"] if fast["job_stats"] is not None else handle
            stats = _cache_stats(job_stats)
            skipped = getattr(job_stats, "skipped", None)
        finally:
            _disable_cache(stepcache, handle, pipe.transformer)
            if counter is not None:
                counter.remove()
        a, b = exact["frames"].float(), fast["frames"].float()
        mse = float(torch.mean((a - b) ** 2))
        v = {
            "name": "fast",
            "status": "measured",
            "model": model,
            "steps": steps,
            "exact_s": exact["denoise_s"],
            "fast_s": fast["denoise_s"],
            "speedup": exact["denoise_s"] / fast["denoise_s"],
            "psnr_db": None if mse == 0 else 10 * math.log10(1.0 / mse),
            "identical": mse == 0,
            "computed_forwards": counter.n if counter is not None else None,
            "forwards": steps * (2 if API_CFG else 1),
            "skipped_forwards": skipped if isinstance(skipped, int) else None,
            "cache_stats": stats,
            "peak_gib": fast["peak_gib"],
            "s_per_step": fast["denoise_s"] / steps,
        }
        self.add_rates(v, sec["step_flops"])  # FLOP-equivalent: the exact step's FLOPs per fast step
        sec["variants"].append(v)
        self.report.save()

    def section_memory(self, sec: dict[str, Any]) -> None:
        speed = self.speed
        if speed is None:
            sec["status"], sec["reason"] = "skipped", f"not available: {self.speed_why}"
            return
        if "memory" not in {f.name for f in dataclasses.fields(speed.SpeedConfig)}:
            sec["status"], sec["reason"] = "skipped", "not available: SpeedConfig has no `memory` setting"
            return
        a = self.args
        modes = [m.strip() for m in a.memory_modes.split(",") if m.strip()]
        # Compile off: its time is not what these modes are about, and it would not fit.
        sec["note"] = (
            "Each mode on a freshly built model, compile off; peak = torch.cuda.max_memory_allocated."
        )
        for mode in modes:
            model = "14b"
            est = (
                self.estimate_build_s(model)
                + 2.5 * self.estimate_steps_s(model, "480p", a.warmup + a.steps)
                + 20
            )
            if self.budget.refuse(est):
                model = "1.3b"  # the mode still gets measured, on the small model
                est = self.estimate_build_s(model) + 2.5 * self.estimate_steps_s(
                    model, "480p", a.warmup + a.steps
                )
            if why := self.budget.refuse(est):
                self.skip_variant(sec, mode, why)
                continue
            try:
                tr, built = self.build_model(model)
                pipe = make_pipeline(tr, self.shared)
                cfg, missing = speed_config(speed, {"memory": mode, "compile": False})
                s_apply, rep = timed(self.device, call_apply_speed, speed, pipe, cfg, self.device)
                facts = dict(apply_s=s_apply, speed_report=_report_of(rep), unsupported=missing or None,
                             resident_after_apply_gib=allocated_gib(self.device), **built)  # fmt: skip
                if model != sec["model"]:
                    facts["note"] = "on VACE-1.3B: VACE-14B did not fit the budget left"
                self.measure_variant(sec, mode, pipe, steps=a.steps, warmup=a.warmup, stages=None, model=model,
                                     **facts)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - recorded; the next mode gets a fresh model
                self.fail_variant(sec, mode, e)
            pipe = tr = None
            free(self.device)

    def section_720p(self, sec: dict[str, Any]) -> None:
        a = self.args
        ours = self.best_ours()
        variant = ours.name if ours is not None else "stock"
        n = a.warmup + a.steps_720p + (1 if ours else 0)
        est = self.estimate_build_s("14b") + self.estimate_steps_s("14b", "720p", n) + self.allowance(ours)
        if why := self.budget.refuse(est):
            sec["status"], sec["reason"] = "skipped", why
            return
        tr, built = self.build_model("14b")
        sec.update(built)
        pipe = make_pipeline(tr, self.shared)
        report = None
        for o in self.ours[: self.ours.index(ours) + 1] if ours is not None else []:
            report = _report_of(o.hook(pipe, self.device))
        sec["note"] = (
            f"{variant} only (the fastest variant at 480p)" if ours else "stock only (no ours)"
        ) + ", steps only."
        self.measure_variant(sec, variant, pipe, steps=a.steps_720p, warmup=max(a.warmup, 2) if ours else a.warmup,
                             stages=None, speed_report=report)  # fmt: skip


class _BlockCounter:
    """Counts calls of the last main block: a step cache that skips the blocks skips it."""

    def __init__(self, transformer: Any):
        self.n = 0
        self._hook = transformer.blocks[-1].register_forward_pre_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.n += 1

    def remove(self) -> None:
        self._hook.remove()


def _step_cache_config(stepcache: Any) -> Any:
    for name in ("StepCacheConfig", "CacheConfig", "FastModeConfig"):
        cls = getattr(stepcache, name, None)
        if cls is not None:
            return cls()
    return None


def _reset_cache(handle: Any) -> None:
    for name in ("reset", "reset_state", "new_job"):
        if callable(getattr(handle, name, None)):
            getattr(handle, name)()
            return


def _cache_stats(stats: Any) -> Any:
    """A job's statistics (or a handle's) as JSON."""
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return _report_of(stats)
    for name in ("stats", "report"):
        value = getattr(stats, name, None)
        if value is not None:
            return _report_of(value() if callable(value) else value)
    return None


def _disable_cache(stepcache: Any, handle: Any, transformer: Any) -> None:
    for name in ("disable", "remove", "close"):
        if callable(getattr(handle, name, None)):
            getattr(handle, name)()
            return
    for name in ("disable_step_cache", "disable"):
        fn = getattr(stepcache, name, None)
        if callable(fn):
            fn(handle if handle is not None else transformer)
            return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", default=os.environ.get("OUT") or "bench-out", help="folder for bench.json and bench.md"
    )
    ap.add_argument("--budget-s", type=float, default=480.0, help="seconds for the whole run (sections that "
                    "would not fit are skipped)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=2, help="timed denoising steps per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    ap.add_argument("--steps-720p", type=int, default=1)
    ap.add_argument("--fast-steps", type=int, default=None,
                    help=f"steps of each fast-mode run (default: the API's {API_STEPS}; 8 with --tiny)")  # fmt: skip
    ap.add_argument("--memory-modes", default="fp8,offload")
    ap.add_argument("--ours", default="auto", help="auto (pipelines.speed when present), none, or MODULE:FUNC "
                    "called as FUNC(pipe, device)")  # fmt: skip
    ap.add_argument("--sections", default="1,2,3,4,5")
    # Where ours and fast mode come from; the tests point these at stand-ins.
    ap.add_argument("--speed-module", default="pipelines.speed")
    ap.add_argument("--stepcache-module", default="pipelines.stepcache")
    ap.add_argument("--tiny", action="store_true", help="tiny models and sizes on the CPU (CI smoke run)")
    ap.add_argument("--device", default=None, help="default: cpu with --tiny, else cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    args.warmup = max(1, args.warmup)  # the first step's start is not stamped: it is never timed
    if args.fast_steps is None:
        args.fast_steps = 8 if args.tiny else API_STEPS
    if args.device is None:
        args.device = "cpu" if args.tiny else "cuda"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("No CUDA device here: run with --tiny for the CPU smoke run.", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
