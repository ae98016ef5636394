"""The one settings object. Every field is read from an environment variable with the
`WAN_VACE_` prefix (e.g. `WAN_VACE_API_KEYS`), or passed explicitly by the CLI and tests.

There is no global instance: `create_app(settings)` and the worker receive it, so tests build
apps on temporary folders side by side.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server import gpus

MODEL_ID = "wavespeed-ai/wan-2.1-14b-vace"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WAN_VACE_", extra="ignore")

    # Where the SQLite store, uploads, outputs and the generated API key live.
    data_dir: Path = Path("./data")
    # A weights.toml name: `tiny` (random weights, runs anywhere), `wan2.1-vace-14b`, `wan2.1-vace-1.3b`.
    model: str = "tiny"
    weights_dir: Path | None = None  # default: <data_dir>/weights
    # Unset: a SQLite file in the data dir. `postgresql://user:pass@host:5432/db` shares one
    # PostgreSQL database between API replicas and workers on any number of machines.
    database_url: str | None = None
    # Connections each process keeps open to PostgreSQL at most (its pool); one more is held
    # for LISTEN by processes that wait for events.
    database_pool_size: int = Field(8, ge=1)
    # Unset: a folder in the data dir. `s3://bucket/prefix` (prefix optional): an S3-compatible
    # bucket shared by every replica and worker. Credentials come from boto3's usual chain
    # (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an instance role).
    storage_url: str | None = None
    # The S3 endpoint of a non-AWS server (MinIO, Ceph, R2, ...); unset: AWS for the region.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # How clients reach stored files: "api" through this server's /media/ route (any backend),
    # or "presigned" (S3 only): outputs answer presigned GET URLs of the bucket and the two-step
    # upload hands out a presigned PUT, so the bytes never pass through the API.
    media_urls: Literal["api", "presigned"] = "api"
    # How long a presigned URL stays valid.
    presign_seconds: float = Field(3600.0, gt=0, le=7 * 86400)
    # Absolute origin clients reach us at (behind a proxy). Unset: the request's own base URL.
    public_url: str | None = None
    # Where `wan-vace serve` listens; `--host` / `--port` win over these.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Logging of the `wan-vace` process (`--log-level` wins), uvicorn's included.
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # "text" lines for a terminal, or "json": one object a line (time, level, logger, message,
    # job_id when known, worker) for a log pipeline, uvicorn's access log and the workers' included.
    log_format: Literal["text", "json"] = "text"
    # GET /metrics (Prometheus): duration histograms cover the jobs that finished in the last
    # metrics_window seconds. Open like /health unless metrics_require_key.
    metrics_window: float = Field(3600.0, gt=0)
    metrics_require_key: bool = False

    # Comma-separated bearer keys. Unset and not open: a key is generated on first start and
    # kept in <data_dir>/api_key so the quickstart works without being open to the network.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Explicit opt-in to serving without any key (local experiments only).
    open_access: bool = False

    # Worker processes this server spawns (`--workers`); 0 = API only. Unset: one per visible
    # GPU (one per group of gpus_per_job GPUs), or one on a host without a GPU.
    workers: int | None = Field(None, ge=0)
    # The GPUs this host's workers use (`--gpus 0,1`), CUDA indices; unset: every visible GPU.
    gpus: Annotated[list[int], NoDecode] | None = None
    # GPUs one job runs on (context parallelism over torch.distributed); each worker is then a
    # group of this many processes, rank 0 claiming jobs.
    gpus_per_job: int = Field(1, ge=1)
    # A worker asked to stop (SIGTERM) stops claiming and finishes the job it holds if it can
    # within this many seconds; past it, the job is handed back to the queue (not counted).
    shutdown_grace: float = Field(30.0, ge=0)
    device: str = "auto"  # auto = cuda when available, else cpu
    # torch CPU threads per worker (unset: torch's default, one per core). On a shared or small
    # CPU host, OpenMP threads spin-waiting against other processes can make a job 5x slower.
    cpu_threads: int | None = None
    # The tiny model renders each side divided by this (rounded to 16) and scales frames up, so a
    # CPU renders an 832x480 job in seconds; /health reports it. Unset: weights.toml's
    # `render_downscale` for the model (8 for tiny). 1 = full size.
    tiny_downscale: int | None = None
    # x264 preset for outputs (CRF 18). veryfast, by scripts/bench_encode.py: half the wall time
    # and 0.42x the CPU time of "fast" at 832x480 and 1280x720, files 12-15% smaller, luma PSNR
    # 1.6 dB lower (~45 dB). "superfast" keeps fast's PSNR at 2-2.5x the file size.
    encode_preset: str = "veryfast"
    # x264 threads per encode; 0 = x264's own choice (about 1.5 per core). Lower it on a host
    # that encodes while it renders the next job on the CPU (the tiny model), or runs several
    # workers.
    encode_threads: int = Field(0, ge=0)
    # Speed and memory of the exact path (pipelines/speed.py; /health shows what was chosen).
    # attention: "auto" picks the fastest backend that runs and matches on this device
    # (FlashAttention-3 or SageAttention when installed, then cuDNN and flash SDPA, else native),
    # or name a diffusers backend. compile: regional torch.compile of the repeated blocks, warmed
    # up on the served sizes before the worker reports ready (minutes at start). memory: "auto"
    # (resident when it fits, else block offload with CUDA streams, else fp8 + offload), or
    # "resident", "fp8" (fp8 weight storage, a small quality cost), "offload", "fp8+offload".
    attention: str = "auto"
    compile: bool = False
    memory: Literal["auto", "resident", "fp8", "offload", "fp8+offload"] = "auto"
    vae_tiling: Literal["auto", "on", "off"] = "auto"
    text_encoder: Literal["auto", "gpu", "cpu-after-encode"] = "auto"
    # enable_fast_mode: "step_cache" skips the transformer's main blocks on steps whose first
    # block changed by less than fast_mode_threshold (relative L1), with the VACE hints
    # recomputed every step; "off" runs fast-mode requests exact.
    fast_mode: Literal["step_cache", "off"] = "step_cache"
    fast_mode_threshold: float = Field(0.1, ge=0)
    # GPU memory between the `task` preprocessors and the pipeline: "resident" keeps a built
    # preprocessor on the GPU, "offload" parks it in CPU memory while the pipeline denoises.
    preprocessor_memory: Literal["resident", "offload"] = "resident"
    # The NSFW checker: "auto" runs it when its weights are fetched (else outputs carry
    # safety_checked=false and /health says why), "off" never runs it.
    safety_checker: Literal["auto", "off"] = "auto"
    # A flagged output: "flag" delivers it with has_nsfw_contents [true] (as WaveSpeed does),
    # "withhold" fails the job (code 1405) and stores no video.
    nsfw_policy: Literal["flag", "withhold"] = "flag"

    # A job's lease: the worker renews it every lease_seconds/3. A worker that dies loses its jobs
    # after at most lease_seconds; they are retried until max_attempts, then failed clearly.
    lease_seconds: float = 30.0
    max_attempts: int = 2
    # A job that failed for a transient reason (a media host answering 503, a fetch that timed
    # out) waits this many seconds times its attempts before it is claimed again.
    retry_delay: float = 5.0
    # How often the worker looks for work when idle.
    poll_interval: float = 0.25
    # Queued (not yet running) jobs accepted at once; beyond it submit answers 429.
    max_queue: int = 1000
    # How long `enable_sync_mode` holds the POST before answering the 5004 "timed out" form.
    sync_timeout: float = 600.0
    # When every local worker failed to load its model (and no worker elsewhere is live), jobs
    # still queued are failed (code 5003, the reason in the message) after this many seconds.
    unservable_grace: float = Field(60.0, ge=0)
    # Free space the data dir keeps: below it, uploads and submits are refused with 507 before
    # the disk is full (jobs already accepted still run and store their outputs). Unset: 1 GiB,
    # or 5% of the data dir's file system when that is smaller (a small disk or tmpfs). 0: off.
    min_free_bytes: int | None = Field(None, ge=0)

    # Retention (server/retention.py), so history and storage stay bounded. A finished job's
    # output, inline inputs and conditioning files are deleted this many seconds after it ended
    # (its row stays: polls answer `outputs_expired`, the files 410), and uploads this long
    # after they were uploaded. Default 7 days, as the hosted API keeps files; 0 keeps them
    # forever. Queued and running jobs' files are never deleted, whatever their age.
    retention_seconds: float = Field(7 * 86400.0, ge=0)
    # Finished jobs' rows (and their webhook outbox rows, and any files left) are deleted this
    # many seconds after they ended; at least retention_seconds. 0 (the default): rows are kept.
    job_retention_seconds: float = Field(0.0, ge=0)
    # How often the cleanup pass runs (one API process at a time, under a lease in the store).
    retention_interval: float = Field(600.0, gt=0)

    # Webhook deliveries: attempts in all, and the first retry delay (doubling each time).
    webhook_max_attempts: int = 6
    webhook_backoff: float = 2.0
    webhook_timeout: float = 10.0
    # Uploads: tickets for the two-step flow expire after this many seconds.
    upload_ticket_seconds: float = 3600.0

    # Media fetching in the worker.
    allow_private_urls: bool = False
    # Seconds the whole fetch of one media input may take (connect, reads, redirects).
    fetch_timeout: float = 120.0
    max_image_bytes: int = 20 * 1024 * 1024
    max_video_bytes: int = 100 * 1024 * 1024
    # A submit body (inline data: media included) larger than this is refused with 413.
    max_request_bytes: int = 256 * 1024 * 1024

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("gpus", mode="before")
    @classmethod
    def _split_gpus(cls, v: object) -> object:
        if isinstance(v, str):
            parts = [p.strip() for p in v.split(",") if p.strip()]
            if not all(p.isdigit() for p in parts):
                raise ValueError(f"gpus must be CUDA device indices separated by commas, e.g. 0,1; got {v!r}")
            return [int(p) for p in parts]
        return v

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower_level(cls, v: object) -> object:
        return v.strip().lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _rows_outlive_files(self) -> Settings:
        # A pruned row takes its files with it: rows kept shorter than files would cut the
        # files' retention short without saying so.
        rows, files = self.job_retention_seconds, self.retention_seconds
        if rows and (not files or rows < files):
            raise ValueError(
                f"WAN_VACE_JOB_RETENTION_SECONDS ({rows:g}) must be at least WAN_VACE_RETENTION_SECONDS "
                f"({files:g}, 0 = files kept forever): deleting a job's row deletes its files too"
            )
        return self

    @property
    def worker_count(self) -> int:
        """Worker processes `serve` starts (each on its group of gpus_per_job GPUs): `workers`,
        else one per GPU group of this host, else one (server/gpus.py, detected once). Raises
        server.gpus.GpuPlanError for GPUs asked for that this host does not show."""
        return gpus.plan(self).count

    @property
    def resolved_weights_dir(self) -> Path:
        return self.weights_dir or self.data_dir / "weights"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "media"

    def effective_api_keys(self) -> list[str]:
        """The keys that authorise requests; generates and persists one on first start."""
        if self.open_access:
            return []
        if self.api_keys:
            return list(self.api_keys)
        key_file = self.data_dir / "api_key"
        if key_file.exists():
            return [key_file.read_text().strip()]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        key = "wvk_" + secrets.token_hex(24)
        # Written with owner-only permissions: it is a credential.
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        return [key]
