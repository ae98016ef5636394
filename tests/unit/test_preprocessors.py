"""The preprocessor registry and the model-free preprocessors (none, gray, inpainting)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from preprocessors import available_tasks, get_preprocessor, known_tasks, registry
from preprocessors.basic import GrayPreprocessor, InpaintingPreprocessor, NonePreprocessor
from server.kernel.errors import CODE_INVALID_PARAMETER, NotSupportedYet

MODEL_BACKED = ["depth", "pose", "face", "flow", "scribble", "depthv2", "pose_body"]


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registry changes made by a test vanish after it."""
    monkeypatch.setattr(registry, "_entries", dict(registry._entries))


def _frames(f=2, h=4, w=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (f, h, w, 3), dtype=np.uint8)


# --- registry -----------------------------------------------------------------------------


def test_registry_lists_tasks():
    geometric = ["outpainting", "outpainting_inner"]
    assert available_tasks() == ["none", "gray", "inpainting", *MODEL_BACKED, *geometric]
    assert set(known_tasks()) == {"none", "gray", "inpainting", *MODEL_BACKED, *geometric}
    # every WaveSpeed task value is known
    assert {"depth", "pose", "face", "inpainting", "none"} <= set(known_tasks())


def test_the_api_accepts_exactly_the_tasks_the_registry_knows():
    # The task names exist once on each side of the process boundary; this ties them together.
    from server.kernel.request import TASKS, WAVESPEED_TASKS

    assert sorted(known_tasks()) == sorted(TASKS)
    assert set(WAVESPEED_TASKS) <= set(known_tasks())


def test_a_set_builds_each_task_once_with_attributes():
    s = registry.PreprocessorSet()
    for task, cls, needs_mask in [
        ("none", NonePreprocessor, False),
        ("gray", GrayPreprocessor, False),
        ("inpainting", InpaintingPreprocessor, True),
    ]:
        pre = s.get(task)
        assert isinstance(pre, cls)
        assert pre.name == task
        assert pre.needs_mask is needs_mask
        assert s.get(task) is pre
        assert isinstance(get_preprocessor(task), cls)  # a fresh one, for callers without a set
    assert s.built() == ["none", "gray", "inpainting"]
    assert registry.PreprocessorSet().get("gray") is not s.get("gray")  # sets share nothing


@pytest.mark.parametrize("task", MODEL_BACKED)
def test_planned_tasks_raise_not_supported_yet(task, isolated_registry):
    # A task declared but not built (a trimmed install, a task still to come).
    registry.register_planned(task, "a future model")
    with pytest.raises(NotSupportedYet) as exc:
        get_preprocessor(task)
    msg = exc.value.message
    assert f"task {task!r} is not supported yet by this server" in msg
    assert "use task 'none' with an already-made control video, or omit video" in msg
    assert exc.value.code == CODE_INVALID_PARAMETER


def test_planned_message_names_its_model(isolated_registry):
    registry.register_planned("depth", "MiDaS depth")
    with pytest.raises(NotSupportedYet, match=r"its preprocessor \(MiDaS depth\) is not installed"):
        get_preprocessor("depth")


@pytest.mark.parametrize(
    "task,entry",
    [("depth", "midas-dpt-hybrid"), ("depthv2", "depth-anything-v2"), ("pose", "dwpose"),
     ("pose_body", "dwpose"), ("flow", "raft"), ("scribble", "scribble")],
)  # fmt: skip
def test_missing_weights_name_the_task_the_folder_and_the_fetch_command(task, entry, tmp_path):
    from pipelines.weights import weights_resolver

    ctx = registry.PreprocessorContext(weights=weights_resolver(tmp_path))
    with pytest.raises(registry.PreprocessorUnavailable) as exc:
        registry.PreprocessorSet(ctx).get(task)
    msg = exc.value.message
    assert msg.startswith(f"task {task!r} cannot run on this server: ")
    assert str(tmp_path / "preprocessors") in msg
    assert f"python scripts/fetch_weights.py {entry} --weights-dir {tmp_path}" in msg
    assert exc.value.code == CODE_INVALID_PARAMETER


def test_unknown_task_raises_with_its_name():
    with pytest.raises(NotSupportedYet) as exc:
        get_preprocessor("layout_bbox")
    assert "'layout_bbox'" in exc.value.message
    assert "none, gray, inpainting, depth" in exc.value.message


def test_register_is_lazy_and_replaces_planned_entries(isolated_registry):
    calls = []

    class Fake(registry.Preprocessor):
        name = "depth"

        def __call__(self, frames, mask):
            return frames, mask

        closed = 0

        def close(self):
            Fake.closed += 1

    def factory(context):
        calls.append(context)
        return Fake()

    registry.register("depth", factory)
    assert calls == []  # nothing built at registration
    assert "depth" in available_tasks()
    ctx = registry.PreprocessorContext(device="cuda:1", dtype="bfloat16", tiny=True)
    s = registry.PreprocessorSet(ctx)
    pre = s.get("depth")
    assert isinstance(pre, Fake) and s.get("depth") is pre and calls == [ctx]
    s.close()  # the runner frees what it built: close() on each, then they are dropped
    assert Fake.closed == 1 and s.built() == []
    s.get("depth")
    assert calls == [ctx, ctx]
    # the description survives a replacement; re-planning makes the task unavailable again
    registry.register_planned("depth", "MiDaS depth")
    with pytest.raises(NotSupportedYet, match="MiDaS depth"):
        get_preprocessor("depth")


def test_package_import_is_light():
    code = "import sys, preprocessors; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- none ---------------------------------------------------------------------------------


def test_none_is_verbatim():
    frames = _frames()
    mask = np.zeros(frames.shape[:3], np.uint8)
    out, out_mask = get_preprocessor("none")(frames, mask)
    np.testing.assert_array_equal(out, frames)
    assert out_mask is mask


# --- gray ---------------------------------------------------------------------------------


def _gray_reference(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit BGR2GRAY fixed-point formula applied to RGB data (integer arithmetic)."""
    x = rgb.astype(np.int64)
    return ((x[..., 0] * 3735 + x[..., 1] * 19235 + x[..., 2] * 9798 + (1 << 14)) >> 15).astype(
        np.uint8
    )


def test_gray_hand_computed_pixel():
    frames = np.zeros((1, 2, 2, 3), np.uint8)
    frames[:] = (200, 100, 50)
    out, mask = get_preprocessor("gray")(frames, None)
    expected = round(0.114 * 200 + 0.587 * 100 + 0.299 * 50)  # 96.45 -> 96: R has B's weight
    assert expected == 96
    assert out.dtype == np.uint8 and out.shape == frames.shape
    assert (out == expected).all()
    assert mask is None


def test_gray_matches_values_taken_from_opencv():
    # cv2.cvtColor(px, cv2.COLOR_BGR2GRAY) with opencv-python-headless 4.14 and 5.0; several of
    # these sit on a .5 boundary in real arithmetic where plain rounding gives another value.
    pixels = [
        (200, 100, 50), (236, 122, 117), (127, 199, 91), (220, 234, 37), (19, 135, 211),
        (225, 8, 44), (255, 255, 255), (0, 0, 0), (255, 0, 0), (0, 0, 255),
    ]  # fmt: skip
    opencv = [96, 133, 159, 173, 145, 43, 255, 0, 29, 76]
    frames = np.array(pixels, np.uint8).reshape(1, 1, -1, 3)
    out, _ = get_preprocessor("gray")(frames, None)
    assert out[0, 0, :, 0].tolist() == opencv
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_gray_is_exact_for_every_colour():
    # All 2**24 RGB values: the float32 fast path equals the integer formula bit for bit.
    v = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], axis=-1).astype(np.uint8)
    frames = rgb.reshape(4, 2048, 2048, 3)
    out, _ = GrayPreprocessor()(frames, None)
    np.testing.assert_array_equal(out[..., 0], _gray_reference(frames))


def test_gray_keeps_mask_and_input():
    frames = _frames()
    before = frames.copy()
    mask = np.full(frames.shape[:3], 255, np.uint8)
    out, out_mask = get_preprocessor("gray")(frames, mask)
    np.testing.assert_array_equal(frames, before)
    assert out_mask is mask
    np.testing.assert_array_equal(out[..., 0], _gray_reference(frames))


# --- inpainting ---------------------------------------------------------------------------


def test_inpainting_sets_masked_pixels_to_gray():
    frames = _frames(f=3, h=4, w=5)
    before = frames.copy()
    mask = np.zeros((3, 4, 5), np.uint8)
    mask[0, 1:3, 1:4] = 255
    mask[2] = 255
    pre = get_preprocessor("inpainting")
    out, out_mask = pre(frames, mask)
    assert out.dtype == np.uint8 and out.shape == frames.shape
    sel = mask == 255
    assert (out[sel] == 128).all()
    np.testing.assert_array_equal(out[~sel], frames[~sel])
    np.testing.assert_array_equal(out_mask, mask)
    np.testing.assert_array_equal(frames, before)  # input untouched


def test_inpainting_without_mask_is_refused():
    with pytest.raises(ValueError):
        get_preprocessor("inpainting")(_frames(), None)
