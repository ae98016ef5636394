"""Speed and memory modes for the exact path: the attention backend, regional `torch.compile`,
where the weights live (resident, fp8 storage, group offloading), the text encoder's place and
VAE tiling. `apply_speed(pipe, config, device)` sets them up once at start-up and returns a
`SpeedReport` (what was chosen and why, for /health); `warm_up(pipe, sizes, report)` compiles
before the worker says it is ready.

What each mode costs (diffusers 0.42.1, torch 2.14):
- attention: any backend kept here first matched native SDPA on the device (a probe), so the
  output changes only at kernel rounding. Hub kernels (`*_hub`) are never used: they download at
  start-up.
- compile: `compile_repeated_blocks` (regional: the 40 + 8 blocks share four compiled graphs,
  two per block class). Exact to float rounding. With `dynamic=True` and duck shapes off the blocks compile
  once for every served size: a block only sees (batch, tokens, dim), and the tokens vary with
  size (1560 or 3600 per latent frame), length (21 or 41 latent frames) and reference images
  (+0..5 frames), 24 sequence lengths in all. Per-size static graphs would mean 24 x 4 graphs
  (minutes each on a GPU at warm-up) for kernels that are mostly cuBLAS GEMMs and the attention
  backend either way; the dynamic graphs cost the pointwise fusions little.
- memory "resident": everything on the GPU (fastest, exact). "offload": the transformer's blocks
  live in pinned host memory and stream onto the GPU one block ahead of use (diffusers group
  offloading, CUDA streams): exact, needs host memory for the weights (~35 GB for 14B);
  diffusers measured +7% per forward for Wan 14B at 480p on an H100 (PR #11605), less on slower
  GPUs where a block's compute hides its transfer. "fp8": weights stored as float8_e4m3fn and
  cast up to bf16 layer by layer (halves weight memory, no speed-up, not exact: max error 0.065
  on the tiny model). "fp8+offload": both.
  "auto" prefers exact modes: resident, then offload, then fp8+offload; fp8 alone only when asked.
- text encoder "cpu-after-encode": UMT5 streams onto the GPU layer by layer for each encode and
  leaves nothing behind (group offloading), freeing ~11.4 GB for about 0.3-1 s per prompt
  encoded (11.4 GB over PCIe; an estimate). The default negative prompt is cached, so a job
  normally encodes one prompt.
- VAE tiling: lower VAE memory at 720p, not bit-exact at tile seams, so only where memory is
  tight; `vae_tiling_for` says per job.
- CFG batching is not offered: `WanVACEPipeline.__call__` (0.42.1) runs the conditional and the
  unconditional forward one after the other (under `cache_context("cond")`/`("uncond")`) and
  has no option to batch them; it would need a forked pipeline, and at batch 1 a 14B forward is
  already compute-bound.

Compatibility found on the tiny model: layerwise casting cannot be compiled (its hooks build
`nn.Parameter`s inside the traced region; fullgraph fails and graph breaks at every layer would
leave nothing to gain), so fp8 modes skip compile; group offloading's hooks are
`torch.compiler.disable`d, so offload compiles without fullgraph (exact on CPU).

torch is imported inside the functions: `SpeedConfig` is imported by the config dataclass,
which must stay cheap to import.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.kernel.request import SIZES, num_frames_for, parse_size

if TYPE_CHECKING:
    import torch
    from diffusers import WanVACEPipeline

log = logging.getLogger("wan_vace.speed")

__all__ = [
    "ATTENTION_PREFERENCE",
    "MEMORY_TABLE_GIB",
    "ModelFootprint",
    "SpeedConfig",
    "SpeedConfigError",
    "SpeedReport",
    "apply_speed",
    "choose_attention",
    "choose_memory",
    "memory_need",
    "pick_attention",
    "probe_attention",
    "set_vae_tiling",
    "vae_tiling_for",
    "warm_up",
]

MEMORY_MODES = ("auto", "resident", "fp8", "offload", "fp8+offload")
TEXT_ENCODER_MODES = ("auto", "gpu", "cpu-after-encode")
# The order "auto" tries on CUDA: FlashAttention-3 (the `flash_attn_interface` package),
# SageAttention (int8 QK / fp8 PV, `sageattention`), then PyTorch's own SDPA kernels.
ATTENTION_PREFERENCE = ("_flash_3", "sage", "_native_cudnn", "_native_flash", "native")
# The Python package each non-native backend needs; without it the backend is never tried.
_ATTENTION_PACKAGES = {"_flash_3": "flash_attn_interface", "sage": "sageattention"}
# A probe passes when its output is within this relative L2 error of float32 SDPA: bf16
# rounding is ~0.4%, SageAttention's quantised QK ~1-2%; a layout or scaling bug is ~100%.
ATTENTION_TOLERANCE = 0.03
# The text encoder's padded length (the runner's MAX_SEQUENCE_LENGTH): every job's
# cross-attention sees exactly this many text tokens.
TEXT_TOKENS = 512

GIB = 1024**3


class SpeedConfigError(ValueError):
    """A speed setting that is unknown or cannot be honoured on this machine."""


@dataclass(frozen=True)
class SpeedConfig:
    """The operator's speed settings (strings from the environment are accepted: "on"/"off"
    for the booleans); `apply_speed` turns each "auto" into a choice."""

    attention: str = "auto"  # "auto" or a diffusers AttentionBackendName value
    compile: bool = False  # regional torch.compile of the transformer blocks
    memory: str = "auto"  # one of MEMORY_MODES
    vae_tiling: str | bool = "auto"  # "auto", True (always), False (never)
    text_encoder: str = "auto"  # one of TEXT_ENCODER_MODES

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention", str(self.attention).strip().lower())
        object.__setattr__(self, "vae_tiling", _parse_tiling(self.vae_tiling))
        compile_ = _parse_tiling(self.compile)
        if compile_ == "auto":
            raise SpeedConfigError("compile takes on or off.")
        object.__setattr__(self, "compile", compile_)
        if self.memory not in MEMORY_MODES:
            raise SpeedConfigError(
                f"Unknown memory mode {self.memory!r}; use one of {', '.join(MEMORY_MODES)}."
            )
        if self.text_encoder not in TEXT_ENCODER_MODES:
            raise SpeedConfigError(
                f"Unknown text encoder placement {self.text_encoder!r}; use one of "
                f"{', '.join(TEXT_ENCODER_MODES)}."
            )
        if self.attention.endswith("_hub"):
            raise SpeedConfigError(
                f"Attention backend {self.attention!r} downloads its kernel from the Hugging Face Hub "
                "at start-up, which this server never does; install the package and use "
                "'_flash_3' (flash_attn_interface) or 'sage' (sageattention), or use 'auto'."
            )
        if self.attention != "auto" and self.attention not in _backend_names():
            raise SpeedConfigError(
                f"Unknown attention backend {self.attention!r}; use 'auto' or one of "
                f"{', '.join(sorted(n for n in _backend_names() if not n.endswith('_hub')))}."
            )


def _parse_tiling(value: str | bool) -> str | bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("1", "true", "on", "yes"):
        return True
    if text in ("0", "false", "off", "no"):
        return False
    raise SpeedConfigError(f"Unknown setting {value!r}; use auto, on or off.")


def _backend_names() -> set[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return {b.value for b in AttentionBackendName}


@dataclass
class SpeedReport:
    """What `apply_speed` (and `warm_up`) chose and why; `as_info()` is what /health shows."""

    device: str
    attention: str
    attention_note: str
    memory: str
    memory_note: str
    text_encoder: str
    text_encoder_note: str
    vae_tiling: str  # "off", "on" (every size) or "720p" (the 1280x720 sizes only)
    compile: str  # "off", "pending warm-up", "regional ...", "skipped: ...", "failed ..."
    attention_rejected: dict[str, str] = field(default_factory=dict)
    estimates_gib: dict[str, float] = field(default_factory=dict)  # memory need per mode
    budget_gib: float | None = None  # the GPU memory the decision had
    cfg: str = "two transformer forwards per step: diffusers' WanVACEPipeline has no batched-CFG option"
    warm_up_s: float | None = None
    compiled_graphs: int | None = None

    def as_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "attention": self.attention,
            "attention_note": self.attention_note,
            "compile": self.compile,
            "memory": self.memory,
            "memory_note": self.memory_note,
            "text_encoder": self.text_encoder,
            "text_encoder_note": self.text_encoder_note,
            "vae_tiling": self.vae_tiling,
            "cfg": self.cfg,
        }
        if self.attention_rejected:
            info["attention_rejected"] = dict(self.attention_rejected)
        if self.estimates_gib:
            info["memory_estimates_gib"] = dict(self.estimates_gib)
        if self.warm_up_s is not None:
            info["warm_up_s"] = self.warm_up_s
        return info


# ---------------------------------------------------------------------------------------------
# Attention


def probe_attention(
    name: str,
    device: str | torch.device,
    *,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    run: Callable[..., torch.Tensor] | None = None,
    tolerance: float = ATTENTION_TOLERANCE,
) -> str | None:
    """Why backend `name` cannot be used on `device`, or None when it can: it must run a small
    self-attention and a text cross-attention (the two shapes Wan calls it with: no mask, no
    dropout, (batch, tokens, heads, head_dim)) and match float32 SDPA within `tolerance`
    (relative L2 error). `run(name, q, k, v)` replaces diffusers' dispatcher, for tests."""
    import torch

    run = run or _dispatch
    gen = torch.Generator(device="cpu").manual_seed(0)
    # 333 tokens: not a multiple of any tile size, as 32760 and 75600 are not multiples of 128.
    for q_len, kv_len in ((333, 333), (333, TEXT_TOKENS)):
        q, k, v = (
            torch.randn(1, n, heads, head_dim, generator=gen).to(device=device, dtype=dtype)
            for n in (q_len, kv_len, kv_len)
        )
        try:
            with torch.no_grad():
                got = run(name, q, k, v)
        except Exception as e:  # noqa: BLE001 - any failure means "not this one": no kernel, arch...
            return _first_line(e)
        with torch.no_grad():
            want = torch.nn.functional.scaled_dot_product_attention(
                q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2)
            ).transpose(1, 2)
        if got.shape != want.shape:
            return f"returned shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        err = float((got.float() - want).norm() / want.norm().clamp_min(1e-12))
        if not err <= tolerance:  # also catches NaN
            return f"differs from native attention: relative error {err:.3g} > {tolerance}"
    return None


def _dispatch(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One call through diffusers' dispatcher, as WanAttnProcessor makes it."""
    from diffusers.models import attention_dispatch as ad

    backend = ad.AttentionBackendName(name)
    # The requirement check is what set_attention_backend runs; it names the missing package
    # where the bare kernel call would only fail on a None function. Private in 0.42.1.
    check = getattr(ad, "_check_attention_backend_requirements", None)
    if check is not None:
        check(backend)
    return ad.dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=backend)


def choose_attention(
    transformer: Any,
    device: str | torch.device,
    requested: str = "auto",
    *,
    candidates: Iterable[str] = ATTENTION_PREFERENCE,
    run: Callable[..., torch.Tensor] | None = None,
    installed: Callable[[str], bool] | None = None,
) -> tuple[str, str, dict[str, str]]:
    """Pick and set the transformer's attention backend: (name, why, {rejected: reason}).

    "auto" on a CPU is `native`. On CUDA the first of `candidates` whose package is installed,
    whose probe passes and that the model accepts (`set_attention_backend` refuses backends a
    context-parallel model cannot use) wins; `native` always remains. A named backend must pass
    the same checks or start-up fails with the reason."""
    import torch

    dev = torch.device(device)
    cfg = transformer.config
    heads, head_dim = int(cfg.num_attention_heads), int(cfg.attention_head_dim)
    dtype = _compute_dtype(transformer)
    installed = installed or _package_installed
    if requested != "auto":
        why = _why_not(requested, dev, heads, head_dim, dtype, run, installed)
        if why is None:
            why = _set_backend(transformer, requested)
        if why is not None:
            raise SpeedConfigError(f"Attention backend {requested!r} cannot be used on {dev}: {why}.")
        return requested, "requested", {}
    if dev.type != "cuda":
        _set_backend(transformer, "native")
        return "native", f"auto on {dev.type}: PyTorch SDPA (the other backends are CUDA kernels)", {}
    return pick_attention(transformer, dev, candidates, run=run, installed=installed)


def pick_attention(
    transformer: Any,
    device: str | torch.device,
    candidates: Iterable[str] = ATTENTION_PREFERENCE,
    *,
    run: Callable[..., torch.Tensor] | None = None,
    installed: Callable[[str], bool] | None = None,
) -> tuple[str, str, dict[str, str]]:
    """The first of `candidates` that is installed, passes its probe on `device` and that the
    model accepts, set on the transformer; `native` when none does."""
    import torch

    dev = torch.device(device)
    cfg = transformer.config
    heads, head_dim = int(cfg.num_attention_heads), int(cfg.attention_head_dim)
    dtype = _compute_dtype(transformer)
    installed = installed or _package_installed
    candidates = tuple(candidates)
    rejected: dict[str, str] = {}
    for name in candidates:
        why = _why_not(name, dev, heads, head_dim, dtype, run, installed)
        if why is None:
            why = _set_backend(transformer, name)
        if why is None:
            order = " > ".join(candidates)
            return name, f"auto: the first of {order} that ran and matched native SDPA", rejected
        rejected[name] = why
    _set_backend(transformer, "native")
    return "native", "auto: no faster backend passed its probe", rejected


def _why_not(name, dev, heads, head_dim, dtype, run, installed) -> str | None:
    package = _ATTENTION_PACKAGES.get(name)
    if package is not None and not installed(package):
        return f"the {package} package is not installed"
    return probe_attention(name, dev, heads=heads, head_dim=head_dim, dtype=dtype, run=run)


def _set_backend(transformer: Any, name: str) -> str | None:
    try:
        transformer.set_attention_backend(name)
    except Exception as e:  # noqa: BLE001 - the model refusing it (context parallel) is one more reason
        return _first_line(e)
    return None


def _first_line(e: BaseException) -> str:
    """One line for /health: the message's first line, and what it ends pointing to (dynamo's
    "backend='inductor' raised:" is followed by the real error on the next line)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return f"{type(e).__name__}: {text}"


def _package_installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


# ---------------------------------------------------------------------------------------------
# Memory: what each mode needs, estimated from parameter counts


@dataclass(frozen=True)
class ModelFootprint:
    """What the memory estimate needs to know about a pipeline: parameter counts and the
    transformer's widths. bf16 transformer and text encoder, fp32 VAE (pipelines/loader.py)."""

    transformer_params: int
    text_encoder_params: int
    vae_params: int
    hidden: int  # heads x head_dim
    ffn: int
    blocks: int
    vace_blocks: int
    transformer_bytes: int = 2  # per parameter, as loaded
    text_encoder_bytes: int = 2

    @classmethod
    def of(cls, pipe: Any) -> ModelFootprint:
        tr, te, vae = pipe.transformer, pipe.text_encoder, pipe.vae
        cfg = tr.config
        return cls(
            transformer_params=_params(tr),
            text_encoder_params=_params(te),
            vae_params=_params(vae),
            hidden=int(cfg.num_attention_heads) * int(cfg.attention_head_dim),
            ffn=int(cfg.ffn_dim),
            blocks=int(cfg.num_layers),
            vace_blocks=len(cfg.vace_layers),
            transformer_bytes=_compute_dtype(tr).itemsize,
            text_encoder_bytes=next(te.parameters()).dtype.itemsize,
        )


def _params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


# Parameter counts measured by meta-device init of the diffusers configs (vace.md §2); the VAE
# is AutoencoderKLWan's defaults, the text encoder UMT5-XXL's encoder.
VACE_14B = ModelFootprint(17_340_000_000, 5_680_000_000, 126_900_000, 5120, 13824, 40, 8)
VACE_1_3B = ModelFootprint(2_150_000_000, 5_680_000_000, 126_900_000, 1536, 8960, 30, 15)

# Activation units held at a block's peak, each a (tokens, hidden) bf16 tensor: the hidden and
# control states, the residual input, the fp32 norm output (two units), q, k, v. The VACE hints
# (one per VACE block, all computed before the main blocks) come on top, and two FFN-wide ones.
_LIVE_HIDDEN_UNITS = 8
# The VAE works one latent frame (four output frames) at a time; at full resolution its last
# stage has 96 channels and about six fp32 tensors of that size live (activations and the
# causal convolutions' two-frame caches): bytes per output pixel.
_VAE_BYTES_PER_PIXEL = 96 * 4 * 4 * 6
_VAE_TILE_PIXELS = 4 * 256 * 256  # diffusers' 256 px tiles, a row of them held for blending
_CLIP_COPIES = 4  # fp32 clips of the job's length alive around the VAE: video, mask, output...
_RESERVE_FRACTION, _RESERVE_BYTES = 0.10, 1 * GIB  # allocator fragmentation, CUDA workspaces

# The job "auto" sizes for: the largest served size at the default 5 s with one reference
# image. Longer 720p jobs with many references may need more (SpeedReport.estimates_gib).
REFERENCE_JOB = (1280, 720, num_frames_for(5), 1)


def job_tokens(width: int, height: int, frames: int, refs: int = 0) -> int:
    """The transformer's sequence length: latent frames (4x in time, plus one per reference
    image) times latent pixels after the 2x2 patch (16 px per side)."""
    return ((frames - 1) // 4 + 1 + refs) * (height // 16) * (width // 16)


def transformer_weight_bytes(fp: ModelFootprint, memory: str) -> int:
    """Transformer weights on the GPU in each mode. fp8 keeps the few skipped layers (patch and
    condition embedders, norms) in their dtype: ~1% of 14B. Offload holds the non-block
    modules (~2%) and two blocks: the one computing and the one arriving."""
    bf = fp.transformer_params * fp.transformer_bytes
    if memory == "resident":
        return bf
    if memory == "fp8":
        return int(fp.transformer_params * 1.01)
    per_block = 2 / (fp.blocks + fp.vace_blocks)
    share = 0.02 + per_block
    if memory == "offload":
        return int(bf * share)
    if memory == "fp8+offload":
        return int(fp.transformer_params * share)
    raise SpeedConfigError(f"Unknown memory mode {memory!r}.")


def transformer_activation_bytes(fp: ModelFootprint, tokens: int) -> int:
    unit = tokens * fp.hidden * 2
    return (fp.vace_blocks + _LIVE_HIDDEN_UNITS) * unit + 2 * tokens * fp.ffn * 2


def vae_activation_bytes(width: int, height: int, frames: int, tiled: bool) -> int:
    pixels = width * height
    working = min(pixels, _VAE_TILE_PIXELS) if tiled else pixels
    return working * _VAE_BYTES_PER_PIXEL + pixels * frames * 3 * 4 * _CLIP_COPIES


def memory_need(
    fp: ModelFootprint,
    memory: str,
    *,
    text_encoder_on_gpu: bool,
    job: tuple[int, int, int, int] = REFERENCE_JOB,
    vae_tiled: bool = False,
) -> int:
    """Estimated peak GPU bytes for one job (width, height, frames, refs) in a memory mode: the
    weights that stay on the GPU plus the larger of the transformer's and the VAE's working set
    (they run one after the other), plus a reserve. Estimates from parameter counts and
    activation shapes, not measurements."""
    width, height, frames, refs = job
    weights = transformer_weight_bytes(fp, memory) + fp.vae_params * 4
    if text_encoder_on_gpu:
        weights += fp.text_encoder_params * fp.text_encoder_bytes
    work = max(
        transformer_activation_bytes(fp, job_tokens(width, height, frames, refs)),
        vae_activation_bytes(width, height, frames, vae_tiled),
    )
    need = weights + work
    return int(need * (1 + _RESERVE_FRACTION) + _RESERVE_BYTES)


# Exact modes first (see the module docstring); fp8 alone is never an automatic choice.
AUTO_ORDER = ("resident", "offload", "fp8+offload")


def choose_memory(
    fp: ModelFootprint,
    budget: int | None,
    *,
    memory: str = "auto",
    text_encoder: str = "auto",
    vae_tiling: str | bool = "auto",
) -> tuple[str, str, str, str, dict[str, float]]:
    """(memory mode, text encoder placement, VAE tiling, why, estimates in GiB) for a GPU with
    `budget` free bytes (None: no GPU, everything stays where it is). Pure: the decision table
    of the module docstring, testable without a GPU."""
    te_modes = ("gpu", "cpu-after-encode") if text_encoder == "auto" else (text_encoder,)
    estimates = {m: round(memory_need(fp, m, text_encoder_on_gpu=False) / GIB, 1) for m in MEMORY_MODES[1:]}
    estimates["text_encoder_on_gpu"] = round(fp.text_encoder_params * fp.text_encoder_bytes / GIB, 1)
    if budget is None:
        mode = "resident" if memory == "auto" else memory
        te = "gpu" if text_encoder == "auto" else text_encoder
        tiling = "on" if vae_tiling is True else "off"
        return mode, te, tiling, "no GPU: the weights stay in host memory", estimates

    def need(m: str, te: str, tiled: bool, job: tuple[int, int, int, int] = REFERENCE_JOB) -> int:
        return memory_need(fp, m, text_encoder_on_gpu=te == "gpu", job=job, vae_tiled=tiled)

    modes = AUTO_ORDER if memory == "auto" else (memory,)
    tiled_options = (False, True) if vae_tiling == "auto" else (bool(vae_tiling),)
    # The fastest combination that fits, in order of what it gives up: the mode first, then
    # exactness (VAE tiling), then ~0.5 s per prompt (the text encoder off the GPU).
    options = [(m, te, t) for m in modes for t in tiled_options for te in te_modes]
    choice = next((o for o in options if need(*o) <= budget), None)
    budget_gib = budget / GIB
    if choice is None:
        choice = (modes[-1], te_modes[-1], tiled_options[-1])
        why = (
            f"{budget_gib:.1f} GiB free is below the estimated {need(*choice) / GIB:.1f} GiB that "
            f"{choice[0]}{_tiled(choice)} needs for 1280*720 5 s; large jobs may run out of memory"
        )
    else:
        why = (
            f"{budget_gib:.1f} GiB free; {choice[0]}{_tiled(choice)} with the text encoder "
            f"{'on the GPU' if choice[1] == 'gpu' else 'off it'} needs an estimated "
            f"{need(*choice) / GIB:.1f} GiB for 1280*720 5 s with one reference image"
        )
    if memory != "auto":
        why = f"requested; {why}"
    mode, te, tiled = choice
    if vae_tiling == "auto":
        # Tiling only where the untiled VAE pass of a 720p 10 s job would not fit.
        long_720p = (1280, 720, num_frames_for(10), 0)
        tiling = "720p" if tiled or need(mode, te, False, long_720p) > budget else "off"
    else:
        tiling = "on" if vae_tiling else "off"
    return mode, te, tiling, why, estimates


def _tiled(choice: tuple[str, str, bool]) -> str:
    return " (VAE tiling)" if choice[2] else ""


# Estimated GPU GiB each mode needs for REFERENCE_JOB with the text encoder off the GPU and no
# VAE tiling (add `text_encoder_on_gpu` to keep the encoder there), derived from the parameter
# counts above: estimates, not measurements; tests/unit/test_speed.py checks the table against
# `memory_need`. As thresholds on free memory: 14B resident from ~55 GiB (~66 with the text
# encoder: an 80 GB card), offload from ~22 (a 24 GB card), below that fp8+offload for 480p
# only; 1.3B resident from ~18 GiB at 720p (~11 at 480p 5 s: a 12 GB card at 480p).
MEMORY_TABLE_GIB: Mapping[str, Mapping[str, float]] = {
    "wan2.1-vace-14b": {"resident": 54.8, "fp8": 37.2, "offload": 21.5, "fp8+offload": 20.4,
                        "text_encoder_on_gpu": 10.6},
    "wan2.1-vace-1.3b": {"resident": 18.3, "fp8": 16.1, "offload": 14.2, "fp8+offload": 14.0,
                         "text_encoder_on_gpu": 10.6},
}  # fmt: skip


def vae_tiling_for(report: SpeedReport, width: int, height: int) -> bool:
    """Whether a job rendered at this size uses VAE tiling. Fixed per size, so the runner's
    gray-clip latent cache (keyed by size) never mixes tiled and untiled encodes."""
    if report.vae_tiling == "on":
        return True
    if report.vae_tiling == "720p":
        return width * height >= 1280 * 720
    return False


def set_vae_tiling(pipe: Any, report: SpeedReport, width: int, height: int) -> bool:
    """Turn the VAE's tiling on or off for the next job (render size); returns which."""
    on = vae_tiling_for(report, width, height)
    if on:
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()
    return on


# ---------------------------------------------------------------------------------------------
# Putting it together


def apply_speed(pipe: WanVACEPipeline, config: SpeedConfig, device: str | torch.device) -> SpeedReport:
    """Place the pipeline's components on `device` in the configured (or chosen) memory mode,
    set the attention backend and, when asked, compile the transformer's blocks (they compile
    on first use: call `warm_up` before serving). Best called with the pipeline still in host
    memory, so a model larger than the GPU never has to fit there first."""
    import torch

    dev = torch.device(device)
    fp = ModelFootprint.of(pipe)
    budget = _gpu_budget(pipe, dev)
    mode, te, tiling, memory_note, estimates = choose_memory(
        fp, budget, memory=config.memory, text_encoder=config.text_encoder, vae_tiling=config.vae_tiling
    )
    _place_transformer(pipe.transformer, mode, dev)
    pipe.vae.to(dev)  # always resident: group offloading on the VAE breaks its tiling (diffusers #12096)
    te_note = _place_text_encoder(pipe.text_encoder, te, dev)
    attention, attention_note, rejected = choose_attention(pipe.transformer, dev, config.attention)
    compile_note = "off"
    if config.compile:
        if "fp8" in mode:
            compile_note = (
                "skipped: layerwise fp8 casting cannot be compiled (its hooks run inside every "
                "layer); use memory=resident or offload to compile"
            )
        else:
            compile_transformer(pipe.transformer, fullgraph=mode == "resident")
            compile_note = "pending warm-up"
    report = SpeedReport(
        device=str(dev),
        attention=attention,
        attention_note=attention_note,
        attention_rejected=rejected,
        memory=mode,
        memory_note=memory_note,
        # "gpu" means "with the transformer"; on a CPU-only machine say what it is.
        text_encoder=te if dev.type == "cuda" or te != "gpu" else "resident",
        text_encoder_note=te_note,
        vae_tiling=tiling,
        compile=compile_note,
        estimates_gib=estimates,
        budget_gib=None if budget is None else round(budget / GIB, 1),
    )
    log.info("speed: %s", report.as_info())
    return report


def _gpu_budget(pipe: Any, dev: torch.device) -> int | None:
    """Free bytes on a CUDA device, counting back what this pipeline already holds there (the
    loader may have moved it): the estimate is for the whole pipeline."""
    import torch

    if dev.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(dev)
    held = 0
    for module in (pipe.transformer, pipe.text_encoder, pipe.vae):
        for t in list(module.parameters()) + list(module.buffers()):
            if t.device.type == "cuda" and (t.device.index or 0) == (dev.index or 0):
                held += t.numel() * t.element_size()
    return int(free + held)


def _compute_dtype(transformer: Any) -> torch.dtype:
    # ModelMixin.dtype reports the layerwise-casting compute dtype once that is enabled.
    return transformer.dtype


def _place_transformer(transformer: Any, mode: str, dev: torch.device) -> None:
    import torch

    if "fp8" in mode:
        # Cast before moving, so only fp8 bytes cross to the GPU. compute dtype = the model's
        # own (bf16 for real weights, fp32 for the tiny model); diffusers' skip patterns keep
        # the embedders and norms in their dtype.
        transformer.enable_layerwise_casting(
            storage_dtype=torch.float8_e4m3fn, compute_dtype=_compute_dtype(transformer)
        )
    if "offload" in mode:
        transformer.to("cpu")
        cuda = dev.type == "cuda"
        # One block per group is what streams allow; record_stream frees each block's GPU copy
        # without a sync. Block order is learned on the first forward.
        transformer.enable_group_offload(
            onload_device=dev,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=cuda,
            record_stream=cuda,
            non_blocking=cuda,
        )
    else:
        transformer.to(dev)


def _place_text_encoder(text_encoder: Any, mode: str, dev: torch.device) -> str:
    import torch

    if mode == "gpu":
        text_encoder.to(dev)
        where = "on the GPU" if dev.type == "cuda" else f"on the {dev.type}"
        return f"resident {where}: no transfer per prompt"
    from diffusers.hooks import apply_group_offloading

    text_encoder.to("cpu")
    cuda = dev.type == "cuda"
    # Leaf level: UMT5's blocks sit one level down (encoder.block) and its token embedding is
    # shared by the model and its encoder stack, which block-level groups would load twice;
    # with a stream, leaf level prefetches the next layer while one computes.
    apply_group_offloading(
        text_encoder,
        onload_device=dev,
        offload_device=torch.device("cpu"),
        offload_type="leaf_level",
        use_stream=cuda,
        record_stream=cuda,
        non_blocking=cuda,
    )
    gb = _params(text_encoder) * next(text_encoder.parameters()).dtype.itemsize / 1e9
    return (
        f"weights ({gb:.1f} GB) in pinned host memory, streamed onto the {dev.type} layer by layer "
        "for each prompt encoded and freed after it: about 0.3-1 s per prompt for UMT5-XXL "
        "(estimated), nothing held on the GPU between jobs"
    )


def compile_transformer(transformer: Any, *, fullgraph: bool = True, **compile_kwargs: Any) -> None:
    """Regional compile of the transformer's repeated blocks with dynamic shapes.

    Dynamo keeps two entries per block forward: VACE block 0 has `proj_in` (the others do
    not) and the first main block gets a view where the rest get a fresh tensor; the limit is
    raised above that with room to spare. Duck shapes are turned off (process-wide; diffusers'
    dynamic-shape tests do the same) so a size whose sides happen to be equal does not
    specialise the graph."""
    import torch
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    fx_config.use_duck_shape = False
    transformer.compile_repeated_blocks(fullgraph=fullgraph, dynamic=True, **compile_kwargs)


def _uncompile(transformer: Any) -> None:
    """Back to eager: `nn.Module.compile` keeps the compiled callable in `_compiled_call_impl`."""
    for module in transformer.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


def served_sizes(render_size: Callable[[int, int], tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """The API's sizes (width, height) as rendered (the tiny model renders smaller)."""
    sizes = [parse_size(s) for s in SIZES]
    return [render_size(w, h) for w, h in sizes] if render_size else sizes


def warm_up(
    pipe: WanVACEPipeline,
    sizes: Iterable[tuple[int, int]] | None = None,
    report: SpeedReport | None = None,
    *,
    latent_frames: int = 2,
) -> float:
    """One transformer forward per size (width, height), so compilation (and the offload hooks'
    first-pass bookkeeping) happens before the worker reports ready. Returns the seconds spent.

    Transformer only, at `latent_frames` latent frames: the compiled graphs are dynamic in the
    token count, so a short clip at each served size compiles what a full job uses, without
    the VAE or a 75,600-token forward (~8 PFLOP on 14B). Two frames, not one, so no dimension
    is specialised to size 1. With compile on, a failure here puts the transformer back to
    eager and says so in `report`; without compile, errors propagate."""
    import torch
    from torch._dynamo.utils import counters

    sizes = list(sizes) if sizes is not None else served_sizes()
    tr = pipe.transformer
    cfg = tr.config
    device = pipe._execution_device
    dtype = _compute_dtype(tr)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(2, device=device)
    timestep = scheduler.timesteps[0].expand(1)  # the dtype and device the pipeline passes
    spatial = pipe.vae_scale_factor_spatial
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    before = counters["stats"]["unique_graphs"]
    t0 = time.monotonic()
    compiling = report is not None and report.compile == "pending warm-up"
    try:
        with torch.no_grad():
            for width, height in sizes:
                grid = (latent_frames, height // spatial, width // spatial)
                tr(
                    hidden_states=randn(1, cfg.in_channels, *grid),
                    timestep=timestep,
                    encoder_hidden_states=randn(1, TEXT_TOKENS, cfg.text_dim),
                    control_hidden_states=randn(1, cfg.vace_in_channels, *grid),
                    control_hidden_states_scale=torch.ones(len(cfg.vace_layers), device=device, dtype=dtype),
                    return_dict=False,
                )
    except Exception as e:  # re-raised unless it is the compile that failed
        if not compiling:
            raise
        _uncompile(tr)
        report.compile = f"failed at warm-up, running eager: {_first_line(e)}"
        log.warning("speed: %s", report.compile)
    seconds = round(time.monotonic() - t0, 2)
    if report is not None:
        report.warm_up_s = seconds
        if compiling and report.compile == "pending warm-up":
            graphs = counters["stats"]["unique_graphs"] - before
            report.compiled_graphs = graphs
            report.compile = (
                f"regional (repeated blocks), dynamic shapes{', fullgraph' if report.memory == 'resident' else ''}: "
                f"{graphs} graphs compiled at warm-up over {len(sizes)} sizes in {seconds} s"
            )
    return seconds
