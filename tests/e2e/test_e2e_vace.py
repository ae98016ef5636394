"""Issue 4, end to end: every request field becomes the right WanVACEPipeline call.

Each combination of media fields is submitted over HTTP to the real server (uvicorn, a spawned
worker, the tiny random-weight model) with media given as `data:` URIs or as http URLs served by a
local stdlib HTTP server, and the finished MP4 is decoded: 16*duration+1 frames at 16 fps at the
requested size. Every job also asks for `return_conditioning`, so its recipe (what the pipeline
was fed) is checked too, and for several the conditioning video and mask are checked pixel by
pixel. The last test checks, on a stub pipeline, that the sampling settings reach the pipeline.

One server for the whole module, and every job is queued up front (`jobs`), so the worker keeps
busy while each test downloads and checks an earlier job's files.
"""

from __future__ import annotations

import functools
import re
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines.geometry import fit_cover, letterbox
from tests.conftest import FAST, ServerProcess, wait_terminal
from tests.vace_media import (
    MediaServer,
    box_mask,
    data_uri,
    frames_of,
    gradient,
    image_of,
    jpeg,
    moving_frames,
    mp4,
    png,
    solid,
)

MODEL = "wavespeed-ai/wan-2.1-14b-vace"
W, H, F = 832, 480, 81  # the default size and 5 s: the smallest request the API allows


# ---------------------------------------------------------------------------------------------
# The media. Small sources: the server fits them (cover + centre crop) to the render size.

FIRST = gradient(160, 96)  # wider than 112x64 -> cropped left and right
LAST = gradient(96, 128, base=(220, 200, 30), step=(-0.8, -0.4, 1.0))  # taller -> cropped
REF_COLORS = [(230, 30, 30), (30, 200, 60), (40, 60, 220), (240, 200, 20), (150, 40, 180)]
REF_SIZES = [(40 + 8 * i, 56 - 4 * i) for i in range(5)]  # (width, height), all different
SOURCE = moving_frames(F, 64, 48)  # 5 s at 16 fps: exactly the clip the job needs
SHORT = moving_frames(16, 64, 48)  # 1 s: extended forward by 65 frames
MASK_BOX = box_mask(64, 48, inside=255)  # white (generate) box in the middle
BORDER = box_mask(64, 48, inside=0, margin=0.2)  # white border, black (keep) centre
RGBA = np.zeros((48, 48, 4), dtype=np.uint8)
RGBA[12:36, 12:36] = (200, 30, 30, 255)  # a red square on a transparent background
PHOTO = gradient(64, 40)
# A portrait phone clip at the default 832*480: the source size whose frame fit used to crash.
PORTRAIT = moving_frames(16, 720, 1280)


@functools.cache
def encoded(name: str) -> bytes:
    """The MP4 of one of the clips above, encoded once: the tests compare against a decode of
    the very bytes the server got (x264 need not give the same bytes twice on a loaded host)."""
    return mp4(globals()[name])


def ref(i: int) -> np.ndarray:
    return solid(*REF_SIZES[i], REF_COLORS[i])


def job_specs(media: MediaServer) -> dict[str, dict]:
    """name -> request fields of every job this module runs. Media are served over http by
    `media` (the server allows private URLs here) or inlined as data: URIs, mixed."""
    first = media.add("/first.png", png(FIRST), "image/png")
    last = media.add("/last.png", png(LAST), "image/png")
    source = media.add("/source.mp4", encoded("SOURCE"), "video/mp4")
    short = media.add("/short.mp4", encoded("SHORT"), "video/mp4")
    mask_video = media.add("/mask.mp4", mp4(np.stack([MASK_BOX] * F)), "video/mp4")
    border = media.add("/border.mp4", mp4(np.stack([BORDER] * F)), "video/mp4")
    refs = [media.add(f"/ref{i}.png", png(ref(i)), "image/png") for i in range(5)]
    black = data_uri(png(np.zeros((48, 64), np.uint8)), "image/png")
    return {
        "t2v_random_seed": {"seed": -1},
        # No `task` at all: the default `depth` with no video (the WaveSpeed playground's own
        # example) is ignored; the job is plain R2V.
        "r2v_one": {"images": [refs[0]]},
        "r2v_five": {
            "images": [
                refs[1],  # http
                data_uri(png(Image.fromarray(RGBA, "RGBA")), "image/png"),  # with alpha
                data_uri(jpeg(PHOTO), "image/jpeg"),
                refs[3],
                data_uri(png(solid(24, 24, (10, 10, 10))), "image/png"),
            ]
        },
        "depth_without_video": {"task": "depth", "images": [refs[2]]},
        "control_none": {"video": source, "task": "none"},
        "control_gray": {"video": data_uri(encoded("SOURCE"), "video/mp4"), "task": "gray"},
        "depth_with_video": {"video": source, "task": "depth"},
        "control_refs": {"video": source, "task": "none", "images": refs[:2]},
        "inpaint_mask_video": {"video": source, "task": "inpainting", "mask_video": mask_video},
        "inpaint_mask_image": {
            "video": source,
            "task": "inpainting",
            "mask_image": data_uri(png(box_mask(160, 120, inside=255, margin=0.3)), "image/png"),
        },
        "inpaint_no_mask": {"video": source, "task": "inpainting"},
        "outpaint": {"video": source, "task": "none", "mask_video": border},
        "first": {"first_image": first},
        "image_alias": {"image": data_uri(png(FIRST), "image/png")},
        "last": {"last_image": last},
        "first_last": {"first_image": first, "last_image": data_uri(png(LAST), "image/png")},
        "first_last_refs": {"first_image": first, "last_image": last, "images": [refs[4], refs[0]]},
        # Official `firstclip`: keep a 1 s clip (black mask), generate the other 65 frames.
        "extension": {"video": short, "task": "none", "mask_image": black},
        "portrait_phone_clip": {
            "video": media.add("/portrait.mp4", encoded("PORTRAIT"), "video/mp4"),
            "task": "none",
            "mask_image": data_uri(png(box_mask(720, 1280, inside=255)), "image/png"),
            "first_image": data_uri(png(PORTRAIT[0]), "image/png"),
        },
    }


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("vace-e2e")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def jobs(client, media) -> dict[str, str]:
    """Every job of the module, submitted at once (name -> job id): the worker then never waits
    while a test downloads and checks an earlier job's files."""
    return {name: submit(client, fields) for name, fields in job_specs(media).items()}


@pytest.fixture(scope="module")
def render(server) -> tuple[int, int]:
    """The tiny model's render size for 832x480, as /health describes it (each side / 8,
    rounded to 16)."""
    from pipelines.tiny import render_size

    health = httpx.get(server.url + "/health", timeout=10).json()
    m = re.search(r"at 1/(\d+)", health["model"]["render"] or "")
    assert m, health["model"]
    size = render_size(W, H, int(m.group(1)))
    assert size == (112, 64)  # documented in the README
    return size


def submit(client: httpx.Client, fields: dict) -> str:
    body = {"prompt": "a cat walks on the beach", **FAST, "return_conditioning": True, **fields}
    r = client.post(f"/api/v3/{MODEL}", json=body)
    assert r.status_code == 200, r.text
    return r.json()["data"]["id"]


def wait(client: httpx.Client, job_id: str, timeout: float = 600) -> dict:
    return wait_terminal(client, job_id, timeout)


def get(url: str) -> bytes:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200, url
    return r.content


def check_output(url: str) -> None:
    """The MP4 a client gets: H.264, 16*duration+1 frames at 16 fps, the requested size."""
    import io

    import av

    with av.open(io.BytesIO(get(url))) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264"
        assert s.average_rate == 16
        assert (s.codec_context.width, s.codec_context.height) == (W, H)
        assert sum(1 for _ in c.decode(s)) == F


def completed(client: httpx.Client, job_id: str, recipe: str) -> dict:
    """Wait for a job that must complete; check its MP4 and its conditioning recipe."""
    d = wait(client, job_id)
    assert d["status"] == "completed", (d["code"], d["error"])
    assert d["error"] == "" and d["code"] == 0
    (url,) = d["outputs"]
    check_output(url)
    assert d["conditioning"]["recipe"] == recipe
    return d


def failed(client: httpx.Client, job_id: str, code: int, *needles: str) -> dict:
    d = wait(client, job_id)
    assert d["status"] == "failed", d
    assert d["code"] == code, d["error"]
    for needle in needles:
        assert needle in d["error"], d["error"]
    assert d["outputs"] == []
    return d


def lossless_probe(url: str) -> tuple[np.ndarray, dict]:
    """Frames of a conditioning MP4, with its stream facts."""
    import io

    import av

    data = get(url)
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        facts = {"codec": s.codec_context.name, "pix_fmt": s.codec_context.pix_fmt,
                 "fps": s.average_rate}
    return frames_of(data), facts


def fitted(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(fit_cover(Image.fromarray(arr), *size)).astype(np.int16)


def close_to(a: np.ndarray, b: np.ndarray, *, mean: float = 2.0, peak: int = 8) -> bool:
    """Equal up to the few levels an RGB -> YUV -> RGB round trip (and x264) costs."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(diff.mean()) <= mean and int(diff.max()) <= peak


def refs_of(d: dict) -> list[np.ndarray]:
    return [image_of(get(u)) for u in d["conditioning"].get("reference_images", [])]


def canvas(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A reference as the pipeline sees it: letterboxed onto the white render-size canvas."""
    return np.asarray(letterbox(Image.fromarray(arr).convert("RGB"), *size))


# ---------------------------------------------------------------------------------------------
# Text and references


def test_r2v_one_reference_by_url_with_the_default_task(client, jobs, render):
    d = completed(client, jobs["r2v_one"], "r2v")
    assert [r.tolist() for r in refs_of(d)] == [canvas(ref(0), render).tolist()]
    assert "video" not in d["conditioning"] and "mask" not in d["conditioning"]


def test_r2v_five_references_mixed_sources_in_api_order(client, jobs, render):
    got = refs_of(completed(client, jobs["r2v_five"], "r2v"))
    assert len(got) == 5
    assert all(g.shape == (render[1], render[0], 3) for g in got)  # canvases, as fed
    assert np.array_equal(got[0], canvas(ref(1), render))
    on_white = np.full((48, 48, 3), 255, dtype=np.uint8)  # alpha composited over white
    on_white[12:36, 12:36] = (200, 30, 30)
    assert np.array_equal(got[1], canvas(on_white, render))
    assert close_to(got[2], canvas(PHOTO, render), mean=3, peak=40)  # JPEG
    assert np.array_equal(got[3], canvas(ref(3), render))
    assert np.array_equal(got[4], canvas(solid(24, 24, (10, 10, 10)), render))


def test_task_depth_without_a_video_is_ignored(client, jobs, render):
    d = completed(client, jobs["depth_without_video"], "r2v")
    assert [r.tolist() for r in refs_of(d)] == [canvas(ref(2), render).tolist()]


# ---------------------------------------------------------------------------------------------
# Control videos


def test_control_video_task_none_is_used_verbatim(client, jobs, render):
    d = completed(client, jobs["control_none"], "control(none)")
    frames, facts = lossless_probe(d["conditioning"]["video"])
    assert facts["codec"] == "h264" and facts["pix_fmt"] == "yuv444p" and facts["fps"] == 16
    assert frames.shape == (F, render[1], render[0], 3)
    source = frames_of(encoded("SOURCE"))  # what the server decoded: the same encoder, the same decoder
    for i in (0, 40, 80):  # real time at 16 fps: output frame i is source frame i
        assert close_to(frames[i], fitted(source[i], render)), i
    assert "mask" not in d["conditioning"]  # a pure control signal: generate everything


def test_control_video_task_gray_by_data_uri(client, jobs):
    d = completed(client, jobs["control_gray"], "control(gray)")
    frames, _ = lossless_probe(d["conditioning"]["video"])
    spread = frames.astype(np.int16).max(-1) - frames.astype(np.int16).min(-1)
    assert spread.max() <= 3  # R = G = B, up to the YUV round trip
    assert frames[..., 1].std() > 10  # and not a flat frame


def test_task_depth_with_a_video_runs_the_depth_preprocessor(client, jobs, render):
    d = completed(client, jobs["depth_with_video"], "control(depth)")
    frames, _ = lossless_probe(d["conditioning"]["video"])
    assert frames.shape == (F, render[1], render[0], 3)
    spread = frames.astype(np.int16).max(-1) - frames.astype(np.int16).min(-1)
    assert spread.max() <= 3  # a 3-channel gray depth map, not the source


def test_control_video_with_references(client, jobs, render):
    d = completed(client, jobs["control_refs"], "control(none)+refs")
    expected = [canvas(ref(0), render).tolist(), canvas(ref(1), render).tolist()]
    assert [r.tolist() for r in refs_of(d)] == expected


# ---------------------------------------------------------------------------------------------
# Masks: inpainting, outpainting


def test_inpainting_with_mask_video(client, jobs, render):
    d = completed(client, jobs["inpaint_mask_video"], "control(inpainting)+mask_video")
    mask, _ = lossless_probe(d["conditioning"]["mask"])
    video, _ = lossless_probe(d["conditioning"]["video"])
    expect = np.asarray(fit_cover(Image.fromarray(MASK_BOX), *render)) >= 128
    for i in (0, 40, 80):
        white = mask[i, ..., 0] > 127
        assert (white == expect).mean() > 0.97, i  # the box, up to resampling at its edge
        gen = video[i][white]  # masked pixels are mid-gray 128 ...
        assert np.abs(gen.astype(np.int16) - 128).max() <= 3, i
        kept = video[i][~white]  # ... the others keep the source
        assert np.abs(kept.astype(np.int16) - 128).mean() > 10, i


def test_inpainting_with_mask_image(client, jobs):
    d = completed(client, jobs["inpaint_mask_image"], "control(inpainting)+mask_image")
    mask, _ = lossless_probe(d["conditioning"]["mask"])
    assert all(np.array_equal(mask[0] > 127, mask[i] > 127) for i in (1, 40, 80))  # static
    assert 0.1 < (mask[..., 0] > 127).mean() < 0.6


def test_task_inpainting_without_a_mask_fails_clearly(client, jobs):
    failed(client, jobs["inpaint_no_mask"], 1401, "'inpainting'", "mask_video or mask_image")


def test_outpainting_like_mask_with_white_border(client, jobs, render):
    d = completed(client, jobs["outpaint"], "control(none)+mask_video")
    mask, _ = lossless_probe(d["conditioning"]["mask"])
    m = mask[40, ..., 0] > 127
    assert m[0].all() and m[-1].all() and m[:, 0].all() and m[:, -1].all()  # white border
    assert not m[render[1] // 2, render[0] // 2]  # black centre


# ---------------------------------------------------------------------------------------------
# First / last frame, extension


def test_first_image(client, jobs):
    d = completed(client, jobs["first"], "first_image")
    mask, _ = lossless_probe(d["conditioning"]["mask"])
    assert mask[0].max() <= 2 and mask[1:].min() >= 253


def test_image_alias_for_first_image(client, jobs, render):
    d = completed(client, jobs["image_alias"], "first_image")
    video, _ = lossless_probe(d["conditioning"]["video"])
    assert close_to(video[0], fitted(FIRST, render))


def test_last_image(client, jobs):
    d = completed(client, jobs["last"], "last_image")
    mask, _ = lossless_probe(d["conditioning"]["mask"])
    assert mask[-1].max() <= 2 and mask[:-1].min() >= 253


def test_first_and_last_image_conditioning_files(client, jobs, render):
    cond = completed(client, jobs["first_last"], "first_image+last_image")["conditioning"]
    assert "reference_images" not in cond
    video, vfacts = lossless_probe(cond["video"])
    mask, mfacts = lossless_probe(cond["mask"])
    rw, rh = render
    for facts in (vfacts, mfacts):  # lossless H.264 (4:4:4) at 16 fps
        assert facts["codec"] == "h264" and facts["pix_fmt"] == "yuv444p" and facts["fps"] == 16
    assert video.shape == mask.shape == (F, rh, rw, 3)
    assert close_to(video[0], fitted(FIRST, render))
    assert close_to(video[-1], fitted(LAST, render))
    assert np.abs(video[1:-1].astype(np.int16) - 128).max() <= 2  # mid-gray in between
    assert mask[0].max() <= 2 and mask[-1].max() <= 2  # keep the given frames
    assert mask[1:-1].min() >= 253  # generate the rest


def test_first_and_last_image_with_references_in_api_order(client, jobs, render):
    d = completed(client, jobs["first_last_refs"], "first_image+last_image+refs")
    expected = [canvas(ref(4), render).tolist(), canvas(ref(0), render).tolist()]
    assert [r.tolist() for r in refs_of(d)] == expected


def test_short_source_video_is_extended(client, jobs, render):
    d = completed(client, jobs["extension"], "control(none)+mask_image+extension(65)")
    video, _ = lossless_probe(d["conditioning"]["video"])
    mask, _ = lossless_probe(d["conditioning"]["mask"])
    short = frames_of(encoded("SHORT"))
    assert close_to(video[15], fitted(short[15], render))
    assert np.abs(video[16:].astype(np.int16) - 128).max() <= 2  # gray after the clip
    assert mask[:16].max() <= 2 and mask[16:].min() >= 253  # keep the clip, generate the rest


def test_portrait_phone_clip_at_the_default_size(client, jobs, render):
    # 720x1280 video, mask_image and first_image into 832*480 (rendered at 112x64 by the tiny
    # model; tests/test_geometry.py covers the fit at the full API sizes).
    d = completed(
        client, jobs["portrait_phone_clip"], "control(none)+mask_image+extension(65)+first_image"
    )
    video, _ = lossless_probe(d["conditioning"]["video"])
    mask, _ = lossless_probe(d["conditioning"]["mask"])
    source = frames_of(encoded("PORTRAIT"))
    assert close_to(video[0], fitted(PORTRAIT[0], render))  # first_image over frame 0
    assert close_to(video[8], fitted(source[8], render))
    expect = np.asarray(fit_cover(Image.fromarray(box_mask(720, 1280, inside=255)), *render)) >= 128
    assert ((mask[8, ..., 0] > 127) == expect).mean() > 0.97
    assert mask[0].max() <= 2 and mask[16:].min() >= 253


# ---------------------------------------------------------------------------------------------
# Seed


def test_random_seed_is_reported_and_reproducible(client, jobs):
    # seed -1: a random seed, reported in data.seed (a T2V job: no conditioning video at all).
    a = completed(client, jobs["t2v_random_seed"], "t2v")
    seed = a["seed"]
    assert 0 <= seed < 2**31
    assert set(a["conditioning"]) == {"recipe"}
    # The same seed again gives the identical video, and so does that seed plus 2^31: a seed
    # above 2^31-1 is reduced modulo 2^31 and the reduced one is reported.
    b_id = submit(client, {"seed": seed})
    c_id = submit(client, {"seed": seed + 2**31})
    b = completed(client, b_id, "t2v")
    c = completed(client, c_id, "t2v")
    assert b["seed"] == seed and c["seed"] == seed
    va, vb, vc = (frames_of(get(d["outputs"][0])) for d in (a, b, c))
    assert np.array_equal(va, vb) and np.array_equal(va, vc)


# ---------------------------------------------------------------------------------------------
# Sampling settings reach the pipeline (a stub pipeline; no server)


class StubPipe:
    """Records each call's kwargs and the scheduler in place during the call."""

    def __init__(self):
        from diffusers import UniPCMultistepScheduler

        self.scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
            flow_shift=3.0,
        )
        self.calls: list[dict] = []

    def __call__(self, **kw):
        self.calls.append({**kw, "scheduler": self.scheduler})
        cb = kw.get("callback_on_step_end")
        for step in range(kw["num_inference_steps"]):
            if cb is not None:
                cb(self, step, 0, {})
        return SimpleNamespace(frames=[np.zeros((kw["num_frames"], kw["height"], kw["width"], 3),
                                                np.float32)])


def test_sampling_settings_reach_the_pipeline_per_job(tmp_path):
    from diffusers import UniPCMultistepScheduler

    from pipelines.runner import DEFAULT_NEGATIVE_PROMPT, VaceRunner
    from server.kernel.request import VaceRequest
    from server.schemas import validate_submit

    official = (  # Wan2.1 wan/configs/shared_config.py `sample_neg_prompt`, verbatim
        "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
        "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
        "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
    )
    assert DEFAULT_NEGATIVE_PROMPT == official

    pipe = StubPipe()
    runner = VaceRunner(pipe, name="tiny", kind="random", device="cpu", downscale=8,
                        encode_preset="ultrafast")
    progress: list[float] = []
    jobs = [
        ({"prompt": "a", "flow_shift": 7.5, "guidance_scale": 3.5, "num_inference_steps": 4,
          "context_scale": 0.7, "seed": 11}, official),
        ({"prompt": "b", "negative_prompt": "blurry, low quality", "seed": 12}, "blurry, low quality"),
        ({"prompt": "c", "flow_shift": 2, "negative_prompt": "", "seed": 13}, official),
    ]
    for i, (body, negative) in enumerate(jobs):
        inp, _ = validate_submit(body)
        workdir = tmp_path / str(i)
        workdir.mkdir()
        result = runner.run(VaceRequest.from_input(inp), {}, workdir, progress.append)
        call = pipe.calls[-1]
        sched = call["scheduler"]
        assert isinstance(sched, UniPCMultistepScheduler)
        assert sched.config.flow_shift == inp["flow_shift"]  # the request's shift, per job
        assert sched.config.use_flow_sigmas and sched.config.prediction_type == "flow_prediction"
        assert call["negative_prompt"] == negative
        assert call["prompt"] == body["prompt"]
        assert call["guidance_scale"] == inp["guidance_scale"]
        assert call["num_inference_steps"] == inp["num_inference_steps"]
        assert call["conditioning_scale"] == inp["context_scale"]
        assert (call["width"], call["height"], call["num_frames"]) == (112, 64, 81)
        assert call["generator"].initial_seed() == body["seed"] == result.seed
        assert result.video_path.exists() and progress[-1] == 1.0
    # Defaults where the request gave none: WaveSpeed's 16 / 5 / 30 / 1.
    assert pipe.calls[1]["scheduler"].config.flow_shift == 16.0
    assert (pipe.calls[1]["guidance_scale"], pipe.calls[1]["num_inference_steps"]) == (5.0, 30)
    assert pipe.calls[1]["conditioning_scale"] == 1.0
    assert pipe.calls[0]["scheduler"] is not pipe.calls[2]["scheduler"]
