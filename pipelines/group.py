"""One job over several GPUs: a group of processes on one host, joined by torch.distributed, that
runs each denoising with context parallelism (pipelines/parallel.py) behind the ordinary runner
protocol, so the worker loop cannot tell it from a one-GPU runner.

The worker process is rank 0. It starts ranks 1..N-1 itself (spawned, same host, the same
CUDA_VISIBLE_DEVICES: rank r runs on cuda:r; NCCL on CUDA, gloo on CPU), and every rank loads
the same pipeline (the same weights; the tiny model from the same seed) and hooks its
transformer with the same plan. Per job:

1. Rank 0 alone decodes the media, runs the preprocessors and the text encoder (`VaceRunner`'s
   `render` up to the pipeline call), then hands every follower the pipeline call: the decoded
   conditioning, the prompt embeddings, the scheduler and the generator's state.
2. Every rank runs the pipeline with that call. The followers ask for `output_type="latent"`, so
   the VAE decode, the safety checker and the encode (`finish`) are rank 0's alone.
3. At each step's end rank 0 runs the job's progress callback and broadcasts continue or stop;
   a cancel or a lost lease therefore stops every rank after the same step, and the group is
   ready for the next job.

Still repeated on every rank: the VAE *encode* of the conditioning (the pipeline takes pixels,
not latents, and encodes them inside `__call__`; handing latents over would mean re-implementing
its `prepare_video_latents`/`prepare_masks`), a small cost next to the denoising; the no-video
gray clip's latent is cached on every rank (pipelines/caches.py). The followers drop their text
encoder once loaded (the loader has no way to skip it yet).

Why jobs reach the followers over a multiprocessing queue rather than a broadcast: a collective
waits at most the group's timeout, and an idle worker waits for its next job for ever. Inside a
job every wait is a collective with the timeout (`PipelineConfig.group_timeout_s`), and rank 0
watches its followers: a follower that errors reports why and exits (its collectives may be half
done, so the group cannot be trusted again), and rank 0 fails the job with a `GroupFailed` that
says which rank and why, instead of hanging. After that the runner refuses jobs (`GroupFailed`
is marked fatal): the worker must be restarted to rebuild the group.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import queue
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.config import PipelineConfig
from pipelines.parallel import (
    NoParallelSplit,
    attention_backend_of,
    check_sequence,
    choose_degrees,
    enable_context_parallel,
    sequence_length,
)
from pipelines.runner import VaceRunner, runner_options
from server.kernel.errors import ExecutionFailed, InvalidParameter

log = logging.getLogger("wan_vace.group")


class GroupFailed(ExecutionFailed):
    """A rank of the job's GPU group failed or stopped answering. The job itself may be fine
    (retryable); the group is not (fatal: the worker has to be restarted to rebuild it)."""

    retryable = True
    fatal = True


class _Stop(Exception):
    """A follower's side of rank 0's stop flag."""


def resolve_device(config: PipelineConfig, rank: int) -> str:
    """Rank r's device: cuda:r among the group's visible GPUs (any index in `config.device` is
    ignored: the group owns all of them), else the CPU."""
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{rank}" if device.startswith("cuda") else device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int, backend: str, timeout_s: float) -> Any:
    """Join the group; returns a gloo group for the per-step flag (a CPU tensor, whatever the
    denoising's backend)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timeout)  # fmt: skip
    return dist.new_group(backend="gloo", timeout=timeout)


def _load(config: PipelineConfig, device: str, *, text_encoder: bool) -> tuple[Any, Any]:
    from pipelines.loader import load_pipeline

    pipe, info = load_pipeline(config.model, weights_root=config.weights_root, device=device)
    pipe.set_progress_bar_config(disable=True)
    if not text_encoder:
        pipe.register_modules(text_encoder=None)
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return pipe, info


def _to(value: Any, device: str | torch.device) -> Any:
    """Tensors in a call's arguments moved to `device` (host memory for the queue's pickling)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


def _follower_main(rank: int, world: int, port: int, config: PipelineConfig, jobs: Any, results: Any,
                   parent_pid: int) -> None:  # fmt: skip
    """Rank `rank` > 0: load, join, then run each job rank 0 sends until it sends None."""
    try:
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        device = resolve_device(config, rank)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        pipe, _ = _load(config, device, text_encoder=False)
        results.put(("loaded", rank, None))
        control = _join(rank, world, port, "nccl" if device.startswith("cuda") else "gloo",
                        config.group_timeout_s)  # fmt: skip
        ulysses, ring = choose_degrees(world, pipe.transformer.config.num_attention_heads,
                                       backend=attention_backend_of(pipe.transformer))  # fmt: skip
        enable_context_parallel(pipe.transformer, ulysses, ring)
        from pipelines.caches import GrayClipCache

        GrayClipCache(pipe)  # exact: skips re-encoding the no-video gray clip on this rank too
        results.put(("ready", rank, None))
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, then this rank is gone
        results.put(("error", rank, f"start-up failed: {type(e).__name__}: {e}"))
        log.error("rank %d start-up failed:\n%s", rank, traceback.format_exc())
        os._exit(1)
    while True:
        try:
            message = jobs.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent_pid:  # the worker is gone without saying so
                os._exit(0)
            continue
        if message is None:
            break
        job_id = message[0]
        try:
            _follow(pipe, control, device, *message[1:])
            results.put(("done", rank, job_id))
        except _Stop:
            results.put(("stopped", rank, job_id))
        except BaseException as e:  # noqa: BLE001 - see the module docstring: report, then exit
            results.put(("error", rank, f"{type(e).__name__}: {e}"))
            log.error("rank %d failed in job %s:\n%s", rank, job_id, traceback.format_exc())
            os._exit(1)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def _follow(pipe: Any, control: Any, device: str, kwargs: dict[str, Any], scheduler: tuple[type, dict],
            generator_state: torch.Tensor) -> None:  # fmt: skip
    cls, config = scheduler
    pipe.scheduler = cls.from_config(config)
    generator = torch.Generator()
    generator.set_state(generator_state)

    def on_step(pipe: Any, step: int, timestep: Any, kw: dict[str, Any]) -> dict[str, Any]:
        flag = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(flag, src=0, group=control)
        if flag.item():
            raise _Stop()
        return {}

    pipe(**_to(kwargs, device), generator=generator, output_type="latent", callback_on_step_end=on_step)


class Group:
    """Rank 0's handle on its followers: their processes and queues, the flag group, and what
    went wrong (`failure`) once something did."""

    def __init__(self, world: int, backend: str, timeout_s: float, procs: list[Any], jobs: list[Any],
                 results: Any):  # fmt: skip
        self.world_size = world
        self.backend = backend
        self.timeout_s = timeout_s
        self.procs = procs
        self.jobs = jobs
        self.results = results
        self.control: Any = None
        self.ulysses = self.ring = 1
        self.failure: str | None = None
        self._reports: list[tuple[str, int, Any]] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _dead(self) -> str | None:
        for rank, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                return f"rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
        return None

    def _error_report(self) -> str | None:
        for kind, rank, detail in self._reports:
            if kind == "error":
                return f"rank {rank} failed: {detail}"
        return None

    def _drain(self, wait_s: float = 0.0) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._reports.append(self.results.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                return
            wait_s = 0.0
            deadline = time.monotonic()

    def wait_for(self, kind: str, job_id: Any = None) -> None:
        """Until every follower reported `kind` (for `job_id`); GroupFailed on an error report, a
        dead follower or the timeout."""
        deadline = time.monotonic() + self.timeout_s
        want = set(range(1, self.world_size))
        while True:
            got = {r for k, r, d in self._reports if k == kind and (job_id is None or d == job_id)}
            if want <= got:
                self._reports = [m for m in self._reports if not (m[0] == kind and m[2] == job_id)]
                return
            self._drain(0.2)
            problem = self._error_report() or self._dead()
            if problem is None and time.monotonic() > deadline:
                problem = f"ranks {sorted(want - got)} did not answer within {self.timeout_s:g} s"
            if problem is not None:
                self.fail(problem)

    def fail(self, problem: str) -> None:
        self.failure = self.failure or problem
        raise GroupFailed(
            f"The job's GPU group failed: {self.failure}. The worker has to be restarted to "
            "rebuild the group; the job can be retried."
        )

    def diagnose(self, exc: BaseException) -> None:
        """After a collective raised: the followers' own account if one arrives, else this."""
        self._drain(min(2.0, self.timeout_s))
        self.fail(self._error_report() or self._dead() or f"{type(exc).__name__}: {exc}")

    def check(self) -> None:
        if self.failure is not None:
            self.fail(self.failure)
        self._drain()
        problem = self._error_report() or self._dead()
        if problem is not None:
            self.fail(problem)

    def send(self, message: Any) -> None:
        for q in self.jobs:
            q.put(message)

    def step_flag(self, stop: bool) -> None:
        dist.broadcast(torch.tensor([int(stop)], dtype=torch.int64), src=0, group=self.control)

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """While a job runs: a follower that dies is noticed here. gloo fails the next
        collective by itself (the peer's socket closes); NCCL would wait out its timeout, so
        the process group is aborted to end the wait now."""
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.25):
                dead = self._dead()
                if dead is not None:
                    self.failure = self.failure or dead
                    if self.backend == "nccl":
                        with contextlib.suppress(Exception):
                            dist.distributed_c10d._abort_process_group()
                    return

        t = threading.Thread(target=poll, name="wan-vace-group-watch", daemon=True)
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join()

    def close(self) -> None:
        for q in self.jobs:
            with contextlib.suppress(Exception):
                q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if self.failure is None and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


class GroupRunner(VaceRunner):
    """`VaceRunner` on rank 0 of a group: the same render and finish, with the pipeline call
    run by every rank (`_call_pipe`)."""

    def __init__(self, pipe: Any, *, group: Group, **options: Any):
        super().__init__(pipe, **options)
        self.group = group
        self._jobs = 0

    @property
    def info(self) -> dict[str, Any]:
        info = dict(super().info)
        g = self.group
        info["group"] = {
            "world_size": g.world_size,
            "ulysses_degree": g.ulysses,
            "ring_degree": g.ring,
            "backend": g.backend,
            "attention_backend": attention_backend_of(self.pipe.transformer),
        }
        if g.failure is not None:
            info["group"]["failure"] = g.failure
        return info

    def close(self) -> None:
        super().close()
        self.group.close()

    @property
    def follower_pids(self) -> list[int]:
        return self.group.pids

    def warm_up(self) -> None:
        """`VaceRunner.warm_up` through the group: a width of 16 px per rank gives 2 tokens per
        rank (5 frames are 2 latent frames), so the split is even at any group size."""
        self._call_pipe(
            prompt="warm up", negative_prompt="", height=16, width=16 * self.group.world_size,
            num_frames=5, num_inference_steps=1, guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0), output_type="np",
        )  # fmt: skip
        if self.prompt_cache is not None:
            self.prompt_cache.embeds()

    def _embed(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The prompt embeddings, on rank 0: exactly the pipeline's own `encode_prompt` call,
        so the followers need no text encoder."""
        if kwargs.get("prompt_embeds") is not None:
            return kwargs
        kwargs = dict(kwargs)
        cfg = kwargs.get("guidance_scale", 5.0) > 1.0
        with torch.no_grad():
            positive, negative = self.pipe.encode_prompt(
                prompt=kwargs.pop("prompt"),
                negative_prompt=kwargs.pop("negative_prompt", None),
                do_classifier_free_guidance=cfg,
                num_videos_per_prompt=1,
                prompt_embeds=None,
                negative_prompt_embeds=kwargs.pop("negative_prompt_embeds", None),
                max_sequence_length=kwargs.get("max_sequence_length", 512),
                device=self.pipe._execution_device,
            )
        kwargs["prompt_embeds"] = positive
        kwargs["negative_prompt_embeds"] = negative if cfg else None
        return kwargs

    def _call_pipe(self, **kwargs: Any) -> Any:
        g = self.group
        g.check()
        refs = kwargs.get("reference_images") or []
        seq = sequence_length(kwargs["width"], kwargs["height"], kwargs["num_frames"], len(refs))
        try:
            check_sequence(seq, g.world_size)
        except NoParallelSplit as e:
            raise InvalidParameter(str(e)) from None
        callback = kwargs.pop("callback_on_step_end", None)
        generator: torch.Generator = kwargs.pop("generator")
        kwargs = self._embed(kwargs)
        self._jobs += 1
        job_id = self._jobs
        shared = _to({k: v for k, v in kwargs.items() if k != "output_type"}, "cpu")
        scheduler = (type(self.pipe.scheduler), dict(self.pipe.scheduler.config))
        g.send((job_id, shared, scheduler, generator.get_state()))
        stopped: list[BaseException] = []

        def on_step(pipe: Any, step: int, timestep: Any, kw: dict[str, Any]) -> dict[str, Any]:
            try:
                if callback is not None:
                    callback(pipe, step, timestep, kw)
            except BaseException as e:  # noqa: BLE001 - every rank stops, then it is re-raised
                stopped.append(e)
            g.step_flag(bool(stopped))
            if stopped:
                raise stopped[0]
            return {}

        try:
            with g.watch():
                out = self.pipe(**kwargs, generator=generator, callback_on_step_end=on_step)
        except BaseException as e:
            if stopped and e is stopped[0]:
                g.wait_for("stopped", job_id)
                raise
            # A collective that failed (a peer gone or timed out) is the group's failure; rank
            # 0 running out of memory is the job's own.
            collective = isinstance(e, (dist.DistError, RuntimeError)) and not isinstance(
                e, torch.OutOfMemoryError
            )
            if g.failure is not None or collective:
                g.diagnose(e)
            # Rank 0's own failure mid-call (out of memory, say): the followers may be inside a
            # collective, so the group is not to be trusted again; the job keeps its own error.
            g.failure = g.failure or f"rank 0 failed: {type(e).__name__}: {e}"
            raise
        g.wait_for("done", job_id)
        return out


def load_group_runner(config: PipelineConfig) -> GroupRunner:
    """Start the followers, load rank 0's pipeline beside them, join and hook every rank."""
    world = config.gpus_per_job
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    device = resolve_device(config, 0)
    if device.startswith("cuda"):
        if torch.cuda.device_count() < world:
            raise RuntimeError(
                f"gpus_per_job={world} needs {world} visible GPUs, and this worker sees "
                f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            )
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    port = _free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    jobs = [ctx.Queue() for _ in range(1, world)]
    procs = [
        ctx.Process(
            target=_follower_main,
            args=(r, world, port, config, jobs[r - 1], results, os.getpid()),
            name=f"wan-vace-rank{r}",
            daemon=True,
        )
        for r in range(1, world)
    ]
    for p in procs:
        p.start()
    group = Group(world, backend, config.group_timeout_s, procs, jobs, results)
    try:
        pipe, info = _load(config, device, text_encoder=True)
        group.wait_for("loaded")  # a follower that cannot load fails here, not at the rendezvous
        group.control = _join(0, world, port, backend, config.group_timeout_s)
        group.ulysses, group.ring = choose_degrees(world, pipe.transformer.config.num_attention_heads,
                                                   backend=attention_backend_of(pipe.transformer))  # fmt: skip
        enable_context_parallel(pipe.transformer, group.ulysses, group.ring)
        group.wait_for("ready")
        log.info("GPU group of %d (%s): Ulysses %d x ring %d", world, backend, group.ulysses, group.ring)
        return GroupRunner(pipe, group=group, **runner_options(config, info, device))
    except BaseException:
        group.failure = group.failure or "start-up failed"
        group.close()
        raise
