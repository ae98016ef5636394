"""What a pipeline needs to know from the server's settings, as its own small dataclass: the
worker builds it from `Settings` (`server/worker/`), so `pipelines/` never imports the server's
settings object, and a speed feature adds one field here rather than one more argument to every
loading function."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipelines.speed import SpeedConfig


@dataclass(frozen=True)
class PipelineConfig:
    model: str  # a weights.toml name
    weights_root: Path  # where the fetch step put the weights
    device: str = "auto"  # auto = cuda when available, else cpu
    # The random-weight model renders each side divided by this (rounded to 16); None =
    # weights.toml's `render_downscale` for the model.
    tiny_downscale: int | None = None
    encode_preset: str = "veryfast"  # x264 preset for outputs (see server/settings.py)
    encode_threads: int = 0  # x264 threads for outputs; 0 = x264's own choice
    cpu_threads: int | None = None  # torch CPU threads (None: torch's default)
    # GPU memory between the preprocessors and the pipeline: "resident" keeps a built
    # preprocessor on the GPU (fastest, when both fit: the 14B model takes ~47 GB), "offload"
    # moves it to CPU memory after each use and back on the next.
    preprocessor_memory: str = "resident"
    # The NSFW checker: "auto" runs it when its weights are in place (the tiny model uses a
    # random tiny one that never flags), "off" never. With "flag" a flagged output is delivered
    # with has_nsfw_contents [true] (as WaveSpeed); "withhold" fails the job instead.
    safety_checker: str = "auto"
    nsfw_policy: str = "flag"
    # GPUs one job is split over (context parallelism, pipelines/group.py): 1 = one process on
    # one device; N > 1 = this process is rank 0 of a torch.distributed group it starts itself.
    gpus_per_job: int = 1
    # How long a rank waits in a collective (or at start-up for the others) before the job fails
    # as a broken group rather than hanging.
    group_timeout_s: float = 300.0
    # The exact path's speed and memory modes (pipelines/speed.py): attention backend, regional
    # compile, resident / fp8 / offload, VAE tiling, text encoder placement.
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    # What `enable_fast_mode: true` does: "step_cache" (pipelines/stepcache.py: skip the main
    # blocks on steps whose first block barely changed; the VACE hints are recomputed every
    # step) or "off" (fast mode requests run exact).
    fast_mode: str = "step_cache"
    fast_mode_threshold: float = 0.1
    fast_mode_warmup: int = 2
