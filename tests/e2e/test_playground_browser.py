"""The playground page in a real browser: headless Chromium (Debian's, /usr/bin/chromium, driven
by Playwright's bundled driver; no browser download) against the real tiny server.

A user's first run: open `/`, meet the key prompt, enter the key once (it survives a reload),
fill the generated form, pick a PNG through the file picker (the two-step upload), submit,
watch the progress bar move, and see the video play. Then the error envelope, the queue
position, and the cancel buttons of the recent-jobs list on a running and a queued job. The
screenshot lands in tmp_path, and at $PLAYGROUND_SCREENSHOT when that is set.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.conftest import API_KEY, ServerProcess

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("no chromium binary (apt-get install chromium)", allow_module_level=True)

SUBMIT = "/api/v3/wavespeed-ai/wan-2.1-14b-vace"
# The table's most steps: several seconds of denoising for the tiny model on a CPU (each step
# reports progress), so the page's 1 s polls see the bar between 0 and 1 on a fast host too.
STEPS = 40


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("playground")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        # --no-sandbox: CI and this machine run as root, where Chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1360, "height": 1000})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, f"the page threw: {errors}"


def reference_png(path: Path) -> Path:
    img = Image.new("RGB", (96, 64), (30, 60, 200))
    ImageDraw.Draw(img).ellipse((28, 12, 68, 52), fill=(240, 200, 20))
    img.save(path)
    return path


def video_states(page) -> list[dict]:
    return page.eval_on_selector_all(
        "video",
        "vs => vs.map(v => ({src: v.currentSrc, ready: v.readyState, network: v.networkState,"
        " error: v.error && v.error.message, paused: v.paused, time: v.currentTime}))",
    )


def enter_key(page) -> None:
    page.fill("#api-key", API_KEY)
    page.click("text=Save key")
    page.wait_for_selector("#f-prompt")


def test_a_first_job_from_the_page(page, server, tmp_path):
    page.goto(server.url + "/")
    # No key yet: the server's 401 message and what to do about it.
    page.wait_for_selector("#form-error:not([hidden])")
    assert "API key" in page.inner_text("#form-error")
    enter_key(page)
    # Entered once: a reload finds it in localStorage and loads the form by itself.
    page.reload()
    page.wait_for_selector("#f-prompt")
    assert page.input_value("#api-key") == API_KEY

    # Ranges and defaults come from the field table, through /api/v3/models.
    assert page.get_attribute("#f-duration", "min") == "5"
    assert page.input_value("#f-num_inference_steps") == "30"
    assert "Extensions" in page.inner_text("details.extensions summary")

    page.fill("#f-prompt", "a yellow sun over a blue sea")
    page.select_option("#f-size", "832*480")
    page.fill("#f-duration", "5")
    page.fill("#f-num_inference_steps", str(STEPS))
    page.fill("#f-seed", "7")
    page.click("details.extensions summary")
    page.check("#f-return_conditioning")
    page.set_input_files("#f-images-file", str(reference_png(tmp_path / "sun.png")))
    page.wait_for_function("() => document.querySelector('#f-images').value.includes('/media/uploads/')")
    page.wait_for_selector("[data-field=images] .preview img")

    with page.expect_response(lambda r: r.url.endswith(SUBMIT) and r.request.method == "POST") as resp:
        page.click("#submit")
    job_id = resp.value.json()["data"]["id"]

    # The bar while the job runs, sampled faster than the page polls.
    seen: list[float] = []
    deadline = time.monotonic() + 180
    while not page.query_selector("#videos video"):
        assert time.monotonic() < deadline, (
            f"no video; progress seen {seen}: {page.inner_text('#progress-text')}"
        )
        seen.append(float(page.eval_on_selector("#progress", "p => p.value")))
        page.wait_for_timeout(100)
    moving = sorted({v for v in seen if 0 < v < 1})
    assert moving, f"the progress bar never showed a value between 0 and 1: {sorted(set(seen))}"
    assert seen == sorted(seen), "the progress bar went backwards"

    try:
        page.wait_for_function(
            "() => { const v = document.querySelector('#videos video');"
            " return v && !v.paused && v.currentTime > 0; }",
            timeout=30_000,
        )
    except playwright_api.TimeoutError:
        pytest.fail(f"the output video never played: {video_states(page)}")
    assert page.eval_on_selector("#videos video", "v => v.muted && v.loop && v.controls && v.autoplay")
    assert page.eval_on_selector("#progress", "p => p.value") == 1
    # return_conditioning: the reference image as the pipeline was fed it, beside the output.
    page.wait_for_function(
        "() => [...document.querySelectorAll('#videos img')].some(i => i.naturalWidth > 0)"
    )
    page.wait_for_selector(f"#jobs tr[data-id='{job_id}'] .badge.completed")

    # What the form sent, read back from the server: the uploaded file and the fields typed.
    with server.client() as c:
        items = c.post("/api/v3/predictions", json={"include_inputs": True}).json()["data"]["items"]
    sent = next(i for i in items if i["id"] == job_id)["input"]
    assert sent["prompt"] == "a yellow sun over a blue sea" and sent["num_inference_steps"] == STEPS
    assert sent["seed"] == 7 and sent["return_conditioning"] is True
    assert len(sent["images"]) == 1 and "/media/uploads/" in sent["images"][0]

    # What the user sees, from the top: the key, the prompt and picked image, the result.
    page.evaluate("() => window.scrollTo(0, 0)")
    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot))
    if os.environ.get("PLAYGROUND_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["PLAYGROUND_SCREENSHOT"])
    assert shot.stat().st_size > 10_000


def submit(page) -> str:
    with page.expect_response(lambda r: r.url.endswith(SUBMIT) and r.request.method == "POST") as resp:
        page.click("#submit")
    return resp.value.json()["data"]["id"]


def test_refusals_the_queue_and_cancel_buttons(page, server):
    page.goto(server.url + "/")
    page.evaluate("k => localStorage.setItem('wan-vace.api-key', k)", API_KEY)
    page.reload()
    page.wait_for_selector("#f-prompt")

    page.fill("#f-prompt", "refused")
    page.fill("#f-duration", "11")  # the table's maximum is 10
    page.click("#submit")
    page.wait_for_selector("#form-error:not([hidden])")
    assert "duration" in page.inner_text("#form-error")

    # Two jobs: the first runs (its steps take seconds), the second waits behind it and the
    # page, watching the latest, says where it stands.
    page.fill("#f-duration", "5")
    page.fill("#f-num_inference_steps", str(STEPS))
    page.fill("#f-prompt", "running, then cancelled")
    running = submit(page)
    page.fill("#f-prompt", "queued, then cancelled")
    queued = submit(page)
    page.wait_for_function(
        "() => document.querySelector('#progress-text').textContent.includes('next in line')"
    )

    for job_id in (queued, running):
        row = f"#jobs tr[data-id='{job_id}']"
        page.click(f"{row} button:has-text('Cancel')")
        page.wait_for_selector(f"{row} .badge.cancelled")
        assert not page.query_selector(f"{row} button:has-text('Cancel')")  # nothing left to cancel
    assert "cancelled" in page.inner_text("#progress-text")
    with server.client() as c:
        for job_id in (queued, running):
            assert c.get(f"/api/v3/predictions/{job_id}/result").json()["data"]["status"] == "cancelled"
