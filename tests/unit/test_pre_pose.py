"""`pose` / `pose_body` (DWPose on onnxruntime) with stand-in ONNX graphs that plant a known
person: the real sessions, letterbox, grid decoding, NMS, affine crop, SimCC decoding, keypoint
reorder and drawing all run; the assertions look for the drawn limbs where the planted
keypoints must land, computed here from the official formulas (not from the code under test)."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import onnx  # noqa: F401  (a dependency: its absence must fail, not skip)
import onnxruntime  # noqa: F401  (a dependency: its absence must fail, not skip)
import pytest

from preprocessors import dwpose
from preprocessors.pose import (
    DETECTOR_FILE,
    POSE_FILE,
    build_pose,
    build_pose_body,
    providers_for,
)
from preprocessors.registry import PreprocessorContext

# A square 256x256 frame: the detection frame is 1024x1024 (x4), the 640 letterbox holds it
# whole (ratio 0.625), so 640-space box [220, 120, 420, 520] is [352, 192, 672, 832] there.
FRAME = 256
DET = 1024
BOX_640 = [220.0, 120.0, 420.0, 520.0]
BOX_DET = [v / 0.625 for v in BOX_640]
WHOLE_FRAME = [0.0, 0.0, float(DET), float(DET)]

# Planted keypoints, in pose-model crop pixels (288 x 384), on SimCC's half-pixel grid.
R_SHOULDER, R_ELBOW = 6, 8  # COCO-WholeBody (mmpose) indices -> OpenPose 2 and 3
FACE = {23: (150.0, 40.0), 24: (160.0, 40.0), 25: (170.0, 40.0)}  # face points 0..2
PLANT = {R_SHOULDER: (120.0, 120.0), R_ELBOW: (96.0, 220.0), **FACE}
# OpenPose limb 2 (right shoulder -> right elbow) has colour [255, 170, 0], drawn at 0.6; the
# official annotator returns the canvas channel-flipped, so in RGB: (0, 102, 153).
LIMB_RGB = np.array([0, 102, 153], dtype=np.float64)


def crop_to_frame(pt, box_det):
    """onnxpose.py: a crop point -> detection-frame pixels (box padded 1.25, widened to the
    3:4 input, keypoint / input * scale + centre - scale / 2) -> 256x256 frame pixels."""
    x1, y1, x2, y2 = box_det
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    bw, bh = (x2 - x1) * 1.25, (y2 - y1) * 1.25
    bw, bh = (bw, bw / 0.75) if bw > bh * 0.75 else (bh * 0.75, bh)
    x = pt[0] / 288 * bw + cx - bw / 2
    y = pt[1] / 384 * bh + cy - bh / 2
    return np.array([x, y]) * FRAME / DET


def pose_keypoints(points: dict, score: float = 0.9):
    kps = np.zeros((dwpose.NUM_KEYPOINTS, 2))
    scores = np.zeros(dwpose.NUM_KEYPOINTS)
    for k, xy in points.items():
        kps[k] = xy
        scores[k] = score
    return kps, scores


def write_models(folder, det: bytes, pose: bytes):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DETECTOR_FILE).write_bytes(det)
    (folder / POSE_FILE).write_bytes(pose)
    return folder


def context_for(folder):
    return PreprocessorContext(weights=lambda name: folder if name == "dwpose" else None)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Folder with a detector that finds one person at BOX_640 (0.95 * 0.95) and a pose model
    that puts the right shoulder, right elbow and three face points at PLANT."""
    det = dwpose.fake_detector([BOX_640], [0.95], batch=1)  # the official export: batch 1
    pose = dwpose.fake_pose(*pose_keypoints(PLANT))
    return write_models(tmp_path_factory.mktemp("dwpose"), det, pose)


def frames(n=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, FRAME, FRAME, 3), dtype=np.uint8)


def _near(img, xy, r=1):
    x, y = round(xy[0]), round(xy[1])
    return img[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1].reshape(-1, 3)


def _dist_to_segment(px, a, b):
    ab = b - a
    t = np.clip(((px - a) @ ab) / (ab @ ab), 0, 1)
    return np.linalg.norm(px - (a + t[:, None] * ab), axis=1)


def assert_limb(img, a, b):
    """Lit along a -> b (away from the joint dots) in the limb colour."""
    for t in np.linspace(0.3, 0.7, 9):
        patch = _near(img, a + t * (b - a)).astype(np.float64)
        px = patch[patch.sum(1).argmax()]
        assert px.sum() > 60, (t, patch)
        assert px[0] <= 0.1 * px[2] + 2, px  # no red: the official channel flip
        assert abs(px[1] / px[2] - LIMB_RGB[1] / LIMB_RGB[2]) < 0.12, px


def lit_pixels(img):
    ys, xs = np.nonzero(img.max(axis=2))
    return np.stack([xs, ys], axis=1).astype(np.float64)


# --- the planted person -------------------------------------------------------------------


def test_pose_draws_body_and_face_at_the_planted_places(planted):
    pre = build_pose(context_for(planted))
    src = frames(2)
    before = src.copy()
    out, mask = pre(src, None)
    assert mask is None
    assert out.shape == src.shape and out.dtype == np.uint8
    assert np.array_equal(src, before)  # inputs untouched
    a, b = crop_to_frame(PLANT[R_SHOULDER], BOX_DET), crop_to_frame(PLANT[R_ELBOW], BOX_DET)
    faces = [crop_to_frame(p, BOX_DET) for p in FACE.values()]
    for img in out:
        assert_limb(img, a, b)
        for f in faces:  # white dots: grey after the area resize, all channels equal
            px = _near(img, f).astype(int)
            bright = px[px.sum(1).argmax()]
            assert bright.min() > 20 and bright.max() - bright.min() <= 2, px
        # Black everywhere else: every lit pixel is on the limb (or its joint dots) or a face dot.
        lit = lit_pixels(img)
        d = np.minimum.reduce(
            [_dist_to_segment(lit, a, b), *(np.linalg.norm(lit - f, axis=1) for f in faces)]
        )
        assert d.max() <= 3.5, lit[d.argmax()]
    assert np.array_equal(out[0], out[1])  # the stand-ins ignore the picture


def test_pose_body_draws_the_body_without_the_face(planted):
    pre = build_pose_body(context_for(planted))
    out, _ = pre(frames(1), None)
    img = out[0]
    a, b = crop_to_frame(PLANT[R_SHOULDER], BOX_DET), crop_to_frame(PLANT[R_ELBOW], BOX_DET)
    assert_limb(img, a, b)
    for p in FACE.values():
        assert _near(img, crop_to_frame(p, BOX_DET), r=2).max() == 0
    assert _dist_to_segment(lit_pixels(img), a, b).max() <= 3.5


def test_the_detector_output_decodes_to_the_planted_box():
    raw = dwpose.yolox_raw_output([BOX_640], [0.95])
    boxes = dwpose.person_boxes(raw, 0.625)
    np.testing.assert_allclose(boxes, [BOX_DET], atol=1e-3)
    # letterbox ratio of the 1024x1024 detection frame, and the 114 padding of a 1024x1792 one
    _, r = dwpose.letterbox(np.zeros((DET, DET, 3), np.uint8))
    assert r == 0.625
    x, r = dwpose.letterbox(np.zeros((1024, 1792, 3), np.uint8))
    assert x.shape == (3, 640, 640) and x.dtype == np.float32
    assert x[:, :365].max() == 0 and (x[:, 366:] == 114).all() and r == pytest.approx(640 / 1792)


def test_detection_threshold_and_nms():
    # score = objectness * class: 0.56^2 = 0.314 passes 0.3, 0.54^2 = 0.292 does not
    assert len(dwpose.person_boxes(dwpose.yolox_raw_output([BOX_640], [0.56]), 1.0)) == 1
    assert len(dwpose.person_boxes(dwpose.yolox_raw_output([BOX_640], [0.54]), 1.0)) == 0
    # an overlapping weaker box (IoU 0.82 > 0.45) is suppressed, a separate one is kept
    near = [230.0, 130.0, 430.0, 530.0]
    far = [20.0, 20.0, 120.0, 220.0]
    raw = dwpose.yolox_raw_output([BOX_640, near, far], [0.95, 0.9, 0.8])
    boxes = dwpose.person_boxes(raw, 1.0)
    np.testing.assert_allclose(boxes, [BOX_640, far], atol=1e-3)  # best first


def test_simcc_decoding_and_openpose_order():
    kps, scores = pose_keypoints({5: (10.0, 20.0), 6: (30.0, 40.5), 8: (7.5, 9.0)})
    sx, sy = dwpose.simcc_output(kps, scores)
    assert sx.shape == (133, 576) and sy.shape == (133, 768)
    loc, val = dwpose.simcc_decode(sx[None], sy[None])
    np.testing.assert_allclose(loc[0, [5, 6, 8]], kps[[5, 6, 8]])
    assert val[0, 6] == pytest.approx(0.9) and val[0, 0] == 0 and (loc[0, 0] == -0.5).all()
    op, op_scores = dwpose.to_openpose(loc, val)
    assert op.shape == (1, 134, 2)
    np.testing.assert_allclose(op[0, 1], [20.0, 30.25])  # neck = shoulder midpoint, at 1
    assert op_scores[0, 1] == 1.0  # both shoulders > 0.3
    np.testing.assert_allclose(op[0, 2], kps[6])  # right shoulder -> OpenPose 2
    np.testing.assert_allclose(op[0, 3], kps[8])  # right elbow -> OpenPose 3
    np.testing.assert_allclose(op[0, 5], kps[5])  # left shoulder -> OpenPose 5


def test_detection_size_follows_the_official_resize():
    assert dwpose.detection_size(480, 832)[:2] == (1024, 1792)
    assert dwpose.detection_size(832, 480)[:2] == (1792, 1024)
    assert dwpose.detection_size(64, 112)[:2] == (1024, 1792)
    assert dwpose.detection_size(1080, 1920)[:2] == (1024, 1792)


# --- no person, batching ------------------------------------------------------------------


def test_no_person_and_no_confident_keypoint_gives_black(tmp_path):
    det = dwpose.fake_detector([BOX_640], [0.5])  # 0.25 < 0.3: no person
    pose = dwpose.fake_pose(*pose_keypoints(PLANT, score=0.2))  # nothing above 0.3 either
    pre = build_pose(context_for(write_models(tmp_path, det, pose)))
    out, _ = pre(frames(2), None)
    assert out.shape == (2, FRAME, FRAME, 3) and out.max() == 0


def test_batches_equal_frame_by_frame_with_the_official_whole_frame_fallback(tmp_path):
    """A detector that sees a person only in bright frames: dark frames fall back to the whole
    frame as the box (onnxpose.py preprocess), so a batch mixes both cases; one call on five
    frames equals five calls, with dynamic-batch graphs and with batch-1 graphs."""
    kps = pose_keypoints({R_SHOULDER: PLANT[R_SHOULDER], R_ELBOW: PLANT[R_ELBOW]})
    outs = []
    for batch in (None, 1):
        det = dwpose.fake_detector([BOX_640], [0.95], batch=batch, gate=(100.0, ([BOX_640], [0.1])))
        pose = dwpose.fake_pose(*kps, batch=batch)
        pre = build_pose_body(context_for(write_models(tmp_path / str(batch), det, pose)))
        src = np.zeros((5, FRAME, FRAME, 3), np.uint8)
        src[[0, 2]] = 255  # bright: the detector's person
        together, _ = pre(src, None)
        alone = np.concatenate([pre(src[i : i + 1], None)[0] for i in range(5)])
        assert np.array_equal(together, alone)
        outs.append(together)
    assert np.array_equal(outs[0], outs[1])
    together = outs[0]
    assert not np.array_equal(together[0], together[1])
    assert np.array_equal(together[0], together[2]) and np.array_equal(together[1], together[4])
    assert_limb(
        together[0], crop_to_frame(PLANT[R_SHOULDER], BOX_DET), crop_to_frame(PLANT[R_ELBOW], BOX_DET)
    )
    a, b = crop_to_frame(PLANT[R_SHOULDER], WHOLE_FRAME), crop_to_frame(PLANT[R_ELBOW], WHOLE_FRAME)
    assert_limb(together[1], a, b)
    assert _dist_to_segment(lit_pixels(together[1]), a, b).max() <= 3.5


def test_many_frames_run_in_chunks(planted):
    pre = build_pose_body(context_for(planted))
    out, _ = pre(frames(18), None)  # more than one chunk of 16
    assert out.shape == (18, FRAME, FRAME, 3)
    assert all(np.array_equal(out[0], o) for o in out)
    empty, _ = pre(np.zeros((0, FRAME, FRAME, 3), np.uint8), None)
    assert empty.shape == (0, FRAME, FRAME, 3)


# --- sessions and weights -----------------------------------------------------------------


def test_providers_are_explicit(planted, monkeypatch):
    pre = build_pose(context_for(planted))
    assert pre.providers == ["CPUExecutionProvider"]
    assert pre._det.get_providers() == pre._pose.get_providers() == ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert providers_for("cuda") == (["CPUExecutionProvider"], [{}])
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert providers_for("cuda:1") == (
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
        [{"device_id": 1}, {}],
    )
    assert providers_for("cuda")[0] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers_for("cpu") == (["CPUExecutionProvider"], [{}])


def test_to_and_close(planted):
    pre = build_pose_body(context_for(planted))
    first, _ = pre(frames(1), None)
    pre.close()
    assert pre._det is None and pre._pose is None and pre.providers == []
    pre.to("cpu")
    assert pre.providers == ["CPUExecutionProvider"]
    pre.close()
    again, _ = pre(frames(1), None)  # reopened on use
    assert np.array_equal(first, again)


@pytest.mark.parametrize("build, task", [(build_pose, "pose"), (build_pose_body, "pose_body")])
def test_missing_weights_name_task_file_and_folder(tmp_path, build, task):
    with pytest.raises(FileNotFoundError) as e:
        build(context_for(tmp_path))
    msg = str(e.value)
    assert repr(task) in msg and DETECTOR_FILE in msg and str(tmp_path) in msg
    (tmp_path / DETECTOR_FILE).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=POSE_FILE) as e:
        build(context_for(tmp_path))
    assert str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError, match=task):
        build(PreprocessorContext())  # no weights at all and not the tiny model


# --- the tiny model -----------------------------------------------------------------------


def test_tiny_runs_both_tasks_offline():
    src = np.random.default_rng(1).integers(0, 256, (3, 64, 112, 3), dtype=np.uint8)
    pre = build_pose(PreprocessorContext(tiny=True))
    pre(src[:1], None)  # warm-up
    t = time.perf_counter()
    out, _ = pre(src, None)
    per_frame = (time.perf_counter() - t) / 3
    assert out.shape == src.shape and out.dtype == np.uint8
    assert per_frame < 1.0
    body, _ = build_pose_body(PreprocessorContext(tiny=True))(src, None)
    assert body.shape == src.shape and body.max() > 0
    # the face dots are white: (near-)gray pixels appear with `pose` only
    gray = lambda x: ((x.min(axis=-1) > 40) & (x.max(axis=-1) - x.min(axis=-1) <= 3)).sum()
    assert gray(out) > gray(body)
    assert (out != body).any()


def test_the_pose_path_imports_neither_torch_nor_the_controlnet_aux_package():
    code = (
        "import sys, numpy as np\n"
        "from preprocessors.pose import build_pose\n"
        "from preprocessors.registry import PreprocessorContext\n"
        "out, _ = build_pose(PreprocessorContext(tiny=True))(np.zeros((1, 64, 112, 3), np.uint8), None)\n"
        "assert out.max() > 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'controlnet_aux', 'timm')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
