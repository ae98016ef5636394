"""Context parallelism for the VACE transformer (pipelines/parallel.py) and the worker group that
runs one job over several processes (pipelines/group.py), on the CPU: two gloo processes and
the tiny random model (2 attention heads, so Ulysses 2).

Outputs are compared bit for bit: Ulysses only moves whole heads between ranks and each rank
runs the same attention kernel over the full sequence of its heads, so nothing is summed in a
different order (measured equal; a ring split would merge partial softmaxes and differ in the
last bits)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.config import PipelineConfig
from pipelines.parallel import (
    LSE_BACKENDS,
    NoParallelSplit,
    check_sequence,
    choose_degrees,
    sequence_length,
    vace_cp_plan,
)
from server.kernel.errors import InvalidParameter, JobCancelled
from server.kernel.request import VaceRequest
from server.schemas import validate_submit

REPO = Path(__file__).resolve().parents[2]

# --- the split ----------------------------------------------------------------------------------

L480 = sequence_length(832, 480, 81)
L720 = sequence_length(1280, 720, 81)


def test_sequence_lengths_of_the_real_sizes():
    assert L480 == 32760 and L720 == 75600  # vace.md §2 / performance.md §4.2
    assert sequence_length(480, 832, 81) == 32760  # portrait
    assert sequence_length(832, 480, 81, reference_images=1) == 32760 + 1560
    assert sequence_length(1280, 720, 81, reference_images=2) == 75600 + 2 * 3600


def test_sequence_length_uses_the_models_own_strides():
    from pipelines.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    # The tiny model keeps the real VAE's downsampling and the DiT's patch (vace.md §2, §4.1).
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (4, 8)
    assert tuple(pipe.transformer.config.patch_size) == (1, 2, 2)
    latent = torch.zeros(1, 16, (17 - 1) // 4 + 1, 64 // 8, 96 // 8)
    tokens = pipe.transformer.patch_embedding(latent).flatten(2).shape[-1]
    assert tokens == sequence_length(96, 64, 17)


@pytest.mark.parametrize(
    "heads, expected",
    [
        # 14B: 40 heads; Ulysses absorbs 2, 4, 5, 8; 3, 6, 7 leave a ring factor.
        (40, {1: (1, 1), 2: (2, 1), 3: (1, 3), 4: (4, 1), 5: (5, 1), 6: (2, 3), 7: (1, 7), 8: (8, 1)}),
        # 1.3B: 12 heads; 5, 7 and 8 need ring.
        (12, {1: (1, 1), 2: (2, 1), 3: (3, 1), 4: (4, 1), 5: (1, 5), 6: (6, 1), 7: (1, 7), 8: (4, 2)}),
    ],
)
def test_choose_degrees_prefers_ulysses_and_rings_only_with_an_lse_backend(heads, expected):
    for world, (ulysses, ring) in expected.items():
        assert choose_degrees(world, heads, L480, backend="flash") == (ulysses, ring)
        assert choose_degrees(world, heads, L720, backend="_native_cudnn") == (ulysses, ring)
        assert ulysses * ring == world and heads % ulysses == 0
        if ring == 1:
            assert choose_degrees(world, heads, L480) == (ulysses, 1)  # native is enough
        else:
            with pytest.raises(NoParallelSplit, match="log-sum-exp"):
                choose_degrees(world, heads, L480, backend="native")


def test_choose_degrees_refuses_uneven_sequences_and_nonsense():
    one_ref = sequence_length(832, 480, 81, reference_images=1)  # 34320 = 2^4 * 3 * 5 * 11 * 13
    assert choose_degrees(8, 40, one_ref) == (8, 1)
    with pytest.raises(NoParallelSplit, match="34320 transformer tokens do not split evenly over 7"):
        choose_degrees(7, 40, one_ref, backend="flash")
    with pytest.raises(NoParallelSplit):
        check_sequence(42, 4)
    with pytest.raises(NoParallelSplit, match="positive"):
        choose_degrees(0, 40)
    assert "native" not in LSE_BACKENDS


def test_the_plan_has_the_vace_entry_and_can_leave_it_out():
    plan = vace_cp_plan()
    assert set(plan) == {"rope", "vace_blocks.0", "blocks.0", "proj_out"}
    assert set(plan["vace_blocks.0"]) == {"hidden_states", "control_hidden_states"}
    assert "vace_blocks.0" not in vace_cp_plan(with_vace_blocks=False)


# --- two gloo processes: the transformer's forward ----------------------------------------------

_FORWARD = textwrap.dedent(
    """
    import os, sys, traceback
    import torch, torch.distributed as dist, torch.multiprocessing as mp

    def run(rank, port, out):
        torch.set_num_threads(1)
        from pipelines.parallel import enable_context_parallel, vace_cp_plan
        from pipelines.tiny import build_tiny_pipeline
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        g = torch.Generator().manual_seed(1)
        # 5 latent frames of 4x6 -> 5 * 2 * 3 = 30 tokens; control covers the same latent.
        args = dict(
            hidden_states=torch.randn(1, 16, 5, 4, 6, generator=g),
            timestep=torch.tensor([700]),
            encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
            control_hidden_states=torch.randn(1, 96, 5, 4, 6, generator=g),
            return_dict=False,
        )
        results = {}
        for name, plan in (("plan", vace_cp_plan()), ("no_vace", vace_cp_plan(with_vace_blocks=False))):
            model = build_tiny_pipeline(seed=0).transformer
            with torch.no_grad():
                single = model(**args)[0]
                enable_context_parallel(model, 2, 1, plan=plan)
                try:
                    split = model(**args)[0]
                    results[name] = ("ok", torch.equal(split, single), (split - single).abs().max().item())
                except Exception as e:
                    results[name] = ("error", type(e).__name__, str(e)[:200])
        if rank == 0:
            with open(out, "w") as f:
                f.write(repr(results))
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(run, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
    """
)


def _free_port() -> int:
    from pipelines.group import _free_port

    return _free_port()


def test_two_gloo_processes_give_the_single_process_forward_bit_for_bit(tmp_path):
    script = tmp_path / "forward.py"
    script.write_text(_FORWARD)
    out = tmp_path / "out.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(script), str(_free_port()), str(out)], env=env, cwd=REPO,
                   check=True, timeout=120, capture_output=True)  # fmt: skip
    results = eval(out.read_text())  # our own repr of plain tuples
    assert results["plan"][:2] == ("ok", True), results["plan"]
    # Without the VACE entry the hint blocks see every token against split rotary tables.
    assert results["no_vace"][0] == "error", results["no_vace"]


# --- the group runner ---------------------------------------------------------------------------


def _config(tmp_path: Path) -> PipelineConfig:
    return PipelineConfig(model="tiny", weights_root=tmp_path, device="cpu", tiny_downscale=32,
                          encode_preset="ultrafast", cpu_threads=1, gpus_per_job=2,
                          group_timeout_s=20)  # fmt: skip


def _request(**fields) -> VaceRequest:
    inp, _ = validate_submit({"prompt": "a red fox", "seed": 5, "num_inference_steps": 3, **fields})
    return VaceRequest.from_input(inp)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    from pipelines.runner import load_runner

    runner = load_runner(_config(tmp_path_factory.mktemp("weights")))
    yield runner
    runner.close()


def _single():
    from pipelines.runner import VaceRunner
    from pipelines.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return VaceRunner(pipe, name="tiny", kind="random", device="cpu", downscale=32,
                      encode_preset="ultrafast", caches=True)  # fmt: skip


@pytest.mark.timeout(120)
def test_group_runner_renders_the_single_runners_frames(group, tmp_path):
    from pipelines.group import GroupRunner

    assert isinstance(group, GroupRunner)
    assert group.info["group"] == {"world_size": 2, "ulysses_degree": 2, "ring_degree": 1,
                                   "backend": "gloo", "attention_backend": "native"}  # fmt: skip
    threads = torch.get_num_threads()
    single = _single()
    try:
        for req in (_request(), _request(negative_prompt="blurry", guidance_scale=3.0)):
            seen: list[float] = []
            rendered = group.render(req, {}, tmp_path, seen.append)
            expected = single.render(req, {}, tmp_path, lambda p: None)
            assert np.array_equal(rendered.payload.frames, expected.payload.frames)
            assert rendered.seed == expected.seed == 5 and len(seen) == 3
        result = group.finish(rendered, tmp_path, lambda p: None)
        assert result.video_path.stat().st_size > 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(120)
def test_a_cancel_at_step_k_stops_every_rank_and_the_group_runs_on(group, tmp_path):
    steps: list[float] = []

    def progress(p: float) -> None:
        steps.append(p)
        if len(steps) == 2:
            raise JobCancelled()

    t0 = time.monotonic()
    with pytest.raises(JobCancelled):
        group.render(_request(num_inference_steps=6), {}, tmp_path, progress)
    assert len(steps) == 2 and time.monotonic() - t0 < 15
    # The follower stopped at the same step (it acknowledged the stop): the next job runs.
    out = group.render(_request(), {}, tmp_path, lambda p: None)
    assert out.payload.frames.shape == (81, 16, 32, 3)


@pytest.mark.timeout(60)
def test_a_clip_that_does_not_split_evenly_fails_clearly_before_the_group_runs(group, tmp_path):
    # 832x480 at 1/32 renders 32x16: 2 tokens per latent frame x 21 frames = 42, even over 2
    # ranks, not over 4.
    req = _request()
    group.group.world_size = 4  # as a 4-rank group would see it; nothing is sent
    try:
        with pytest.raises(InvalidParameter, match="42 transformer tokens do not split evenly over 4"):
            group.render(req, {}, tmp_path, lambda p: None)
    finally:
        group.group.world_size = 2
    assert group.render(req, {}, tmp_path, lambda p: None).seed == 5


@pytest.mark.timeout(120)
def test_a_follower_killed_mid_job_fails_the_job_clearly(group, tmp_path):
    """Last of the group's tests: it breaks the group (a process holds one group at a time)."""
    from pipelines.group import GroupFailed

    runner = group
    (pid,) = runner.follower_pids
    calls: list[float] = []

    def progress(p: float) -> None:
        calls.append(p)
        if len(calls) == 1:
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)

    t0 = time.monotonic()
    with pytest.raises(GroupFailed, match="GPU group failed: rank 1") as info:
        runner.render(_request(num_inference_steps=6), {}, tmp_path, progress)
    assert time.monotonic() - t0 < 20 and info.value.retryable and GroupFailed.fatal
    with pytest.raises(GroupFailed, match="restarted"):  # the runner refuses further jobs
        runner.render(_request(), {}, tmp_path, lambda p: None)
    assert "failure" in runner.info["group"]
