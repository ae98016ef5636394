"""The `face` preprocessor: the official crop of the main face of each reference image, whole
image when there is none; a real offline detector (scikit-image's bundled LBP cascade) on
skimage's astronaut; the insightface backend's wiring checked against a fake insightface."""

from __future__ import annotations

import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch

from preprocessors import face
from preprocessors.face import (
    INFO_CASCADE,
    INFO_INSIGHTFACE,
    Box,
    CascadeFaceDetector,
    FaceDetector,
    FacePreprocessor,
    InsightFaceDetector,
    build_face,
    crop_box,
)
from preprocessors.registry import PreprocessorContext

torch.set_num_threads(1)


def _image(w=100, h=80, seed=0) -> PIL.Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return PIL.Image.fromarray(arr)


class FakeDetector:
    """Returns the boxes planted for an image, found by its size."""

    info = "fake"

    def __init__(self, boxes_by_size: dict[tuple[int, int], list[Box]]):
        self.boxes_by_size = boxes_by_size
        self.seen: list[tuple[int, int]] = []

    def detect(self, image):
        assert image.mode == "RGB"
        self.seen.append(image.size)
        return list(self.boxes_by_size.get(image.size, []))


@pytest.fixture(scope="module")
def cascade() -> CascadeFaceDetector:
    return CascadeFaceDetector()


@pytest.fixture(scope="module")
def astronaut() -> PIL.Image.Image:
    from skimage.data import astronaut as load

    return PIL.Image.fromarray(load())


# --- crop geometry with an injected detector --------------------------------------------------


def test_crop_is_the_official_inclusive_slice_of_the_first_box():
    img = _image(100, 80)
    arr = np.asarray(img)
    # official: image[int(20.2): int(59.5) + 1, int(10.7): int(49.9) + 1] = [20:60, 10:50]
    det = FakeDetector({(100, 80): [Box(10.7, 20.2, 49.9, 59.5, 0.9), Box(0, 0, 5, 5, 0.3)]})
    pre = FacePreprocessor(det)
    out, cropped = pre.crop_references([img])
    assert cropped == [True]
    assert out[0].size == (40, 40)
    np.testing.assert_array_equal(np.asarray(out[0]), arr[20:60, 10:50])


def test_crop_of_integer_box_includes_its_far_edge():
    img = _image(50, 40)
    arr = np.asarray(img)
    got = crop_box(img, Box(5, 6, 14, 20))
    assert got.size == (10, 15)  # x 5..14, y 6..20 inclusive
    np.testing.assert_array_equal(np.asarray(got), arr[6:21, 5:15])


def test_box_past_the_border_is_clamped():
    img = _image(60, 50)
    arr = np.asarray(img)
    # The official int() of -3.7 is -3, which would slice from the END; clamped to 0 here.
    got = crop_box(img, Box(-3.7, -1.2, 70.0, 30.4))
    np.testing.assert_array_equal(np.asarray(got), arr[0:31, 0:60])


def test_box_outside_the_image_means_no_face():
    img = _image(60, 50)
    assert crop_box(img, Box(70, 10, 90, 30)) is None
    pre = FacePreprocessor(FakeDetector({(60, 50): [Box(70, 10, 90, 30)]}))
    out, cropped = pre.crop_references([img])
    assert cropped == [False] and out[0] is img


def test_no_face_gives_the_whole_image():
    img = _image(64, 48)
    out, cropped = FacePreprocessor(FakeDetector({})).crop_references([img])
    assert cropped == [False]
    assert out[0].size == (64, 48)
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(img))


def test_no_detector_gives_whole_images():
    imgs = [_image(32, 32, 1), _image(40, 30, 2)]
    pre = FacePreprocessor(None)
    out, cropped = pre.crop_references(imgs)
    assert cropped == [False, False] and out == imgs


def test_multiple_images_keep_their_order():
    a, b, c = _image(100, 80, 1), _image(90, 70, 2), _image(120, 60, 3)
    det = FakeDetector({(100, 80): [Box(0, 0, 9, 9)], (120, 60): [Box(50, 10, 69, 39)]})
    out, cropped = FacePreprocessor(det).crop_references([a, b, c])
    assert det.seen == [(100, 80), (90, 70), (120, 60)]
    assert cropped == [True, False, True]
    assert [o.size for o in out] == [(10, 10), (90, 70), (20, 30)]
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(a)[0:10, 0:10])
    assert out[1] is b
    np.testing.assert_array_equal(np.asarray(out[2]), np.asarray(c)[10:40, 50:70])


def test_non_rgb_images_are_converted():
    rgba = PIL.Image.new("RGBA", (30, 20), (10, 20, 30, 255))
    gray = PIL.Image.new("L", (30, 20), 77)
    det = FakeDetector({(30, 20): [Box(0, 0, 9, 9)]})
    out, cropped = FacePreprocessor(det).crop_references([rgba, gray])
    assert cropped == [True, True]
    assert all(o.mode == "RGB" for o in out)


def test_call_is_the_none_task():
    frames = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    mask = np.zeros((3, 16, 16), np.uint8)
    pre = FacePreprocessor(FakeDetector({}))
    f, m = pre(frames, mask)
    assert f is frames and m is mask
    assert pre.name == "face" and not pre.needs_mask


# --- the real cascade detector --------------------------------------------------------------


def test_cascade_finds_the_astronaut_face(cascade, astronaut):
    assert isinstance(cascade, FaceDetector)
    boxes = cascade.detect(astronaut)
    assert len(boxes) >= 1
    b = boxes[0]
    assert abs(b.y0 - 70) <= 12 and abs(b.x0 - 175) <= 12, b
    assert 70 <= b.x1 - b.x0 + 1 <= 120 and 70 <= b.y1 - b.y0 + 1 <= 120, b

    out, cropped = FacePreprocessor(cascade).crop_references([astronaut])
    assert cropped == [True]
    arr = np.asarray(astronaut)
    x0, y0 = int(b.x0), int(b.y0)
    w, h = out[0].size
    np.testing.assert_array_equal(np.asarray(out[0]), arr[y0 : y0 + h, x0 : x0 + w])
    # the crop holds the face: its centre (eyes-nose, about r 115, c 220) lies inside
    assert x0 <= 220 < x0 + w and y0 <= 115 < y0 + h


def test_cascade_searches_large_images_downscaled(cascade, astronaut):
    big = astronaut.resize((1280, 1280), PIL.Image.Resampling.BICUBIC)
    boxes = cascade.detect(big)
    assert boxes, "no face in the 1280 px astronaut"
    b = boxes[0]
    # back in the big image's pixels: 2.5x the 512 px position
    assert abs(b.y0 - 70 * 2.5) <= 35 and abs(b.x0 - 175 * 2.5) <= 35, b


def test_cascade_finds_nothing_in_a_plain_image(cascade):
    img = PIL.Image.new("RGB", (832, 480), (128, 128, 128))
    assert cascade.detect(img) == []
    out, cropped = FacePreprocessor(cascade).crop_references([img])
    assert cropped == [False] and out[0] is img


def test_cascade_on_a_tiny_image_does_not_fail(cascade):
    assert cascade.detect(_image(16, 12)) == []


# --- the factory ----------------------------------------------------------------------------


def test_build_face_tiny_or_no_weights_uses_the_cascade():
    for ctx in (PreprocessorContext(tiny=True), PreprocessorContext()):
        pre = build_face(ctx)
        assert isinstance(pre.detector, CascadeFaceDetector)
        assert pre.info == INFO_CASCADE


def test_build_face_falls_back_when_the_weights_are_missing(monkeypatch):
    monkeypatch.setattr(face, "insightface_installed", lambda: True)

    from pipelines.weights import ModelNotAvailable

    def missing(name):
        assert name == "antelopev2"
        raise ModelNotAvailable("weights 'antelopev2' are not in ...", name=name)

    def gone(name):
        raise FileNotFoundError("not there")

    for resolver in (missing, gone):
        pre = build_face(PreprocessorContext(weights=resolver))
        assert pre.info == INFO_CASCADE


def test_build_face_without_the_package_uses_the_cascade(monkeypatch, tmp_path):
    monkeypatch.setattr(face, "insightface_installed", lambda: False)
    (tmp_path / "models" / "antelopev2").mkdir(parents=True)
    (tmp_path / "models" / "antelopev2" / "scrfd_10g_bnkps.onnx").write_bytes(b"x")
    pre = build_face(PreprocessorContext(weights=lambda name: tmp_path))
    assert pre.info == INFO_CASCADE


@pytest.fixture
def fake_insightface(monkeypatch):
    """A stand-in `insightface.app.FaceAnalysis` that records how it is built and called."""
    calls: dict = {}

    class FaceAnalysis:
        def __init__(self, name, root, **kwargs):
            calls["init"] = dict(name=name, root=root, **kwargs)

        def prepare(self, ctx_id, det_size):
            calls["prepare"] = {"ctx_id": ctx_id, "det_size": det_size}

        def get(self, img):
            calls["get"] = img
            return [
                {"bbox": np.array([10.5, 5.2, 29.9, 24.0], np.float32), "det_score": 0.8},
                {"bbox": np.array([0, 0, 3, 3], np.float32), "det_score": 0.95},
            ]

    pkg = types.ModuleType("insightface")
    app = types.ModuleType("insightface.app")
    app.FaceAnalysis = FaceAnalysis
    pkg.app = app
    monkeypatch.setitem(sys.modules, "insightface", pkg)
    monkeypatch.setitem(sys.modules, "insightface.app", app)
    monkeypatch.setattr(face, "insightface_installed", lambda: True)
    return calls


def test_insightface_backend_wiring(fake_insightface, tmp_path):
    model_dir = tmp_path / "models" / "antelopev2"
    model_dir.mkdir(parents=True)
    (model_dir / "scrfd_10g_bnkps.onnx").write_bytes(b"x")
    pre = build_face(PreprocessorContext(device="cuda:1", weights=lambda name: tmp_path))
    assert isinstance(pre.detector, InsightFaceDetector) and pre.info == INFO_INSIGHTFACE
    init = fake_insightface["init"]
    assert init["name"] == "antelopev2" and init["root"] == str(tmp_path)
    assert init["allowed_modules"] == ["detection"]
    assert init["providers"][0] == "CUDAExecutionProvider"
    assert init["provider_options"][0] == {"device_id": 1}
    assert fake_insightface["prepare"] == {"ctx_id": 1, "det_size": (640, 640)}

    img = _image(40, 30)
    out, cropped = pre.crop_references([img])
    # fed the RGB array, as the official annotator does
    np.testing.assert_array_equal(fake_insightface["get"], np.asarray(img))
    # best score first: the 0.95 box [0:4, 0:4]
    assert cropped == [True]
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(img)[0:4, 0:4])


def test_insightface_accepts_the_model_folder_itself(fake_insightface, tmp_path):
    model_dir = tmp_path / "models" / "antelopev2"
    model_dir.mkdir(parents=True)
    (model_dir / "scrfd_10g_bnkps.onnx").write_bytes(b"x")
    InsightFaceDetector(model_dir, "cpu")
    assert fake_insightface["init"]["root"] == str(tmp_path)
    assert fake_insightface["prepare"]["ctx_id"] == -1


def test_insightface_missing_models_never_reach_insightface(fake_insightface, tmp_path):
    nested = tmp_path / "models" / "antelopev2" / "antelopev2"
    nested.mkdir(parents=True)
    (nested / "scrfd_10g_bnkps.onnx").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="one level too deep"):
        build_face(PreprocessorContext(weights=lambda name: tmp_path))
    assert "init" not in fake_insightface  # FaceAnalysis would have downloaded the pack
