"""VaceRunner's two stages on the real tiny model: `render` (device) then `finish` (CPU) is the
job `run` was, uint8 on the device equals the old host conversion bit for bit, `finish` can run
beside the next `render`, and the runner's exact caches change no output.

Jobs render at 32x16 (downscale 32), 81 frames, 2 steps: about a second each on a CPU."""

from __future__ import annotations

import io
import threading

import av
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.media import encode_mp4
from pipelines.runner import VaceRunner, frames_to_host, to_uint8
from pipelines.tiny import build_tiny_pipeline
from server.kernel.request import VaceRequest
from server.schemas import validate_submit

URL = "https://example.com/input"  # validated as a URL; the runner reads the fetched bytes


def _runner(*, caches: bool = True) -> VaceRunner:
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return VaceRunner(pipe, name="tiny", kind="random", device="cpu", downscale=32,
                      encode_preset="ultrafast", caches=caches)  # fmt: skip


def _request(**fields) -> VaceRequest:
    inp, _ = validate_submit({"prompt": "a red fox", "seed": 5, "num_inference_steps": 2, **fields})
    return VaceRequest.from_input(inp)


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), color).save(buf, "PNG")
    return buf.getvalue()


def _mp4(tmp_path) -> bytes:
    ramp = np.linspace(0, 255, 48 * 32 * 3, dtype=np.float32).reshape(32, 48, 3)
    frames = np.stack([np.roll(ramp, 4 * i, axis=1) for i in range(17)]).astype(np.uint8)
    encode_mp4(frames, str(tmp_path / "in.mp4"), preset="ultrafast")
    return (tmp_path / "in.mp4").read_bytes()


def _decode(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_frames_to_host_equals_the_numpy_conversion_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    video = torch.rand((5, 3, 8, 16), generator=g)
    # Values at (or a rounding error from) the halfway points between levels, where the two
    # roundings would part first, and the ends.
    video[0].view(-1)[:256] = (torch.arange(256, dtype=torch.float32) + 0.5) / 255
    video[1].view(-1)[:4] = torch.tensor([0.0, 1.0, -0.25, 1.5])  # clamped either way
    want = to_uint8(video.permute(0, 2, 3, 1).numpy())  # what diffusers' "np" output got
    got = frames_to_host(video, chunk=2)  # chunks that do not divide F
    assert got.dtype == np.uint8 and got.shape == (5, 8, 16, 3) and got.flags.c_contiguous
    assert np.array_equal(got, want)


def test_pt_output_converted_on_the_device_equals_the_np_output_on_the_tiny_model():
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    args = {"prompt": "a red fox", "height": 32, "width": 48, "num_frames": 9, "num_inference_steps": 2}

    def call(kind):
        return pipe(**args, generator=torch.Generator().manual_seed(1), output_type=kind).frames[0]

    old, new = to_uint8(call("np")), frames_to_host(call("pt"))
    assert np.array_equal(new, old) and len(np.unique(new)) > 16  # real content, not one colour


def test_render_then_finish_is_the_job(tmp_path):
    runner = _runner()
    seen = []
    rendered = runner.render(_request(return_conditioning=True), {}, tmp_path, seen.append)
    # The device stage: progress up to 0.9, frames at the render size in host memory, no files.
    assert seen and max(seen) == pytest.approx(0.9) and all(0 < p <= 0.9 for p in seen)
    assert rendered.payload.frames.shape == (81, 16, 32, 3) and rendered.render_size == (32, 16)
    assert list(tmp_path.iterdir()) == []
    seen.clear()
    result = runner.finish(rendered, tmp_path, seen.append)
    assert seen == [1.0]
    assert (result.seed, result.inference_ms, result.render_size) == (5, rendered.inference_ms, (32, 16))
    out = _decode(result.video_path)
    assert out.shape == (81, 480, 832, 3)  # scaled up to the requested size in the CPU stage
    assert set(result.conditioning) == {"recipe"}  # asked for; no video, mask or references to save


def test_finish_uses_nothing_render_owns(tmp_path):
    """`finish` of one job beside `render` of the next: it must not need the pipeline (here
    gone altogether), and the next job renders exactly what it renders alone."""
    runner = _runner()
    first, second = _request(seed=1), _request(seed=2, prompt="a blue bird")
    alone = runner.render(second, {}, tmp_path, lambda p: None).payload.frames
    rendered = runner.render(first, {}, tmp_path, lambda p: None)

    (tmp_path / "a").mkdir()
    finished = {}
    cpu = threading.Thread(
        target=lambda: finished.update(r=runner.finish(rendered, tmp_path / "a", lambda p: None))
    )
    cpu.start()
    beside = runner.render(second, {}, tmp_path, lambda p: None).payload.frames
    cpu.join()
    assert np.array_equal(beside, alone)

    (tmp_path / "c").mkdir()
    alone_finish = runner.finish(rendered, tmp_path / "c", lambda p: None)
    assert np.array_equal(_decode(finished["r"].video_path), _decode(alone_finish.video_path))

    runner.pipe = None  # nothing of the device stage left: finish still completes
    (tmp_path / "b").mkdir()
    assert runner.finish(rendered, tmp_path / "b", lambda p: None).video_path.exists()


def test_cancel_from_a_step_stops_render_before_the_decode(tmp_path):
    runner = _runner()

    class Cancelled(Exception):
        pass

    def progress(p):
        if p > 0.3:
            raise Cancelled

    decoded = []
    vae_decode = runner.pipe.vae.decode
    runner.pipe.vae.decode = lambda *a, **k: decoded.append(1) or vae_decode(*a, **k)
    with pytest.raises(Cancelled):
        runner.render(_request(), {}, tmp_path, progress)
    assert decoded == [] and list(tmp_path.iterdir()) == []


def _frames(runner, req, media, tmp_path):
    return runner.render(req, media, tmp_path, lambda p: None).payload.frames


def test_the_caches_change_no_output(tmp_path):
    """Same seed with and without the caches: T2V (filling both), R2V (references only: the
    gray clip served from the cache, the references encoded per job), and a user's own negative
    prompt (encoded per job, as before)."""
    cached, plain = _runner(), _runner(caches=False)
    refs = {"images": [_png((200, 40, 90)), _png((20, 90, 220))]}
    jobs = [
        (_request(), {}),
        (_request(images=[URL, URL]), refs),
        (_request(negative_prompt="blurry, dark"), {}),
    ]
    for req, media in jobs:
        assert np.array_equal(_frames(cached, req, media, tmp_path), _frames(plain, req, media, tmp_path))
    gray, prompt = cached.gray_cache, cached.prompt_cache
    assert (gray.misses, gray.hits) == (1, 2)  # one size: every later no-video job hits
    assert (prompt.misses, prompt.hits) == (1, 1)  # the user's negative prompt bypasses it


def test_the_gray_cache_is_not_used_with_a_video_or_a_first_image(tmp_path):
    cached, plain = _runner(), _runner(caches=False)
    jobs = [
        (_request(video=URL), {"video": _mp4(tmp_path)}),
        (_request(first_image=URL), {"first_image": _png((250, 200, 10))}),
    ]
    for req, media in jobs:
        assert np.array_equal(_frames(cached, req, media, tmp_path), _frames(plain, req, media, tmp_path))
    assert (cached.gray_cache.misses, cached.gray_cache.hits) == (0, 0)
    assert len(cached.gray_cache) == 0


def test_the_runner_renders_what_diffusers_renders_with_its_defaults(tmp_path):
    """The whole device stage, caches on, against a direct call with diffusers' own defaults
    (the default negative prompt as text, its sequence length, its "np" output)."""
    from diffusers import UniPCMultistepScheduler

    from pipelines.runner import DEFAULT_NEGATIVE_PROMPT

    runner, pipe = _runner(), build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    req = _request()
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=req.flow_shift)
    direct = pipe(prompt=req.prompt, negative_prompt=DEFAULT_NEGATIVE_PROMPT, height=16, width=32,
                  num_frames=81, num_inference_steps=2, guidance_scale=req.guidance_scale,
                  conditioning_scale=req.context_scale, generator=torch.Generator().manual_seed(5),
                  output_type="np").frames[0]  # fmt: skip
    for _ in range(2):  # the second render is served from both caches
        assert np.array_equal(_frames(runner, req, {}, tmp_path), to_uint8(direct))
    assert runner.gray_cache.hits == 1 and runner.prompt_cache.hits == 1


def test_fast_mode_goes_through_the_step_cache_and_exact_requests_do_not(tmp_path):
    """enable_fast_mode runs the job under the VACE step cache (pipelines/stepcache.py) and says
    how many transformer passes it reused; the same request without it renders exactly what a
    runner without the cache renders. With every allowed step skipped the output stays close to
    exact (the hints are recomputed every step), but is not the exact output."""
    from pipelines.stepcache import StepCacheConfig

    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    fast = VaceRunner(pipe, name="tiny", kind="random", device="cpu", downscale=32, encode_preset="ultrafast",
                      caches=True, step_cache=StepCacheConfig(threshold=float("inf"), warmup=1))  # fmt: skip
    plain = _runner()
    exact_req, fast_req = _request(num_inference_steps=6), _request(num_inference_steps=6, enable_fast_mode=True)
    exact = _frames(plain, exact_req, {}, tmp_path)
    assert np.array_equal(_frames(fast, exact_req, {}, tmp_path), exact)  # off unless asked
    r = fast.render(fast_req, {}, tmp_path, lambda p: None)
    note = r.notes["fast_mode"]
    assert note.startswith("step cache:") and "of 12 transformer passes reused" in note
    skipped = int(note.split()[2])
    assert 0 < skipped < 12  # the warm-up step and the last step run in full, per CFG pass
    diff = np.abs(r.payload.frames.astype(int) - exact.astype(int))
    assert diff.max() > 0
    assert "step cache" in fast.info["fast_mode"] and "off" in plain.info["fast_mode"]
