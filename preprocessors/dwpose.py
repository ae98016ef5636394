"""DWPose's pre- and post-processing, batched: numpy and OpenCV only (no model library here).

Written after the official VACE annotator (ali-vilab/VACE, Apache-2.0, itself taken from
IDEA-Research/DWPose's ControlNet annotator), whose steps are reproduced exactly; each function
names the official function it follows:

- `vace/annotators/dwpose/wholebody.py` `resize_image` (short side 1024, sides rounded to 64) and
  `Wholebody.__call__` (neck insertion, mmpose -> OpenPose reorder);
- `vace/annotators/dwpose/onnxdet.py` `preprocess` (letterbox), `demo_postprocess` (YOLOX grid
  decoding), `nms` / `multiclass_nms` and `inference_detector` (person boxes);
- `vace/annotators/dwpose/onnxpose.py` `preprocess`, `bbox_xyxy2cs`, `_fix_aspect_ratio`,
  `get_warp_matrix`, `top_down_affine` (affine crop), `get_simcc_maximum`, `decode`,
  `postprocess` (SimCC decoding);
- `vace/annotators/pose.py` `PoseAnnotator.process` and `draw_pose` (what is drawn, on black).

What differs is only the batching: every frame of a chunk is letterboxed before one detector
run, and the person crops of all those frames go through the pose model together, where the
ONNX graph has a dynamic batch dimension (otherwise one by one, as the official code does).

The drawing itself is controlnet-aux's copy of the DWPose helpers (`draw_bodypose`,
`draw_facepose`), the same functions as VACE's `dwpose/util.py`.

The second half of this module builds stand-in ONNX graphs (`onnx.helper`) with the official
graphs' input/output names and shapes whose outputs are constants (`out = C + 0 * mean(input)`,
so the graph still consumes its input): they plant known boxes and keypoints, for the tests and
for the random tiny model.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np

# --- constants of the official code -------------------------------------------------------

RESIZE_SIZE = 1024  # pose.py PoseAnnotator: cfg RESIZE_SIZE (default 1024)
DET_INPUT = (640, 640)  # onnxdet.py inference_detector: input_shape (h, w)
DET_PAD_VALUE = 114  # onnxdet.py preprocess: padded_img = ones * 114
DET_STRIDES = (8, 16, 32)  # onnxdet.py demo_postprocess (p6=False)
DET_PRE_SCORE = 0.1  # onnxdet.py inference_detector: multiclass_nms(score_thr=0.1)
DET_SCORE = 0.3  # onnxdet.py inference_detector: final_scores > 0.3
DET_NMS = 0.45  # onnxdet.py inference_detector: nms_thr=0.45
PERSON_CLASS = 0  # onnxdet.py inference_detector: final_cls_inds == 0
NUM_CLASSES = 80  # YOLOX COCO head: 85 = 4 box + 1 objectness + 80 classes

POSE_INPUT = (288, 384)  # (w, h) of dw-ll_ucoco_384.onnx (read from the session when fixed)
BBOX_PADDING = 1.25  # onnxpose.py preprocess: bbox_xyxy2cs(bbox, padding=1.25)
SIMCC_SPLIT_RATIO = 2.0  # onnxpose.py postprocess: simcc_split_ratio=2.0
POSE_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)  # onnxpose.py preprocess
POSE_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)  # (applied to BGR crops as-is)
NUM_KEYPOINTS = 133  # COCO-WholeBody: 17 body, 6 feet, 68 face, 2 x 21 hands

KEYPOINT_SCORE = 0.3  # pose.py process: body `score > 0.3`, the rest `subset < 0.3` hidden
# wholebody.py Wholebody.__call__: after the neck is inserted at 17, these mmpose slots move to
# these OpenPose slots.
MMPOSE_IDX = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
OPENPOSE_IDX = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
FACE_SLICE = slice(24, 92)  # pose.py process: faces = candidate[:, 24:92] (after the neck)


# --- frame size ---------------------------------------------------------------------------


def detection_size(h: int, w: int, resolution: int = RESIZE_SIZE) -> tuple[int, int, int]:
    """(H, W, cv2 interpolation) of the frame the pose runs on, after wholebody.py
    `resize_image`: short side scaled to `resolution`, each side rounded to a multiple of 64;
    Lanczos when enlarging, area when shrinking."""
    k = float(resolution) / min(float(h), float(w))
    hh = int(np.round(float(h) * k / 64.0)) * 64
    ww = int(np.round(float(w) * k / 64.0)) * 64
    return hh, ww, (cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


def output_interpolation(ori_h: int, ori_w: int, h: int, w: int) -> int:
    """pose.py `process`: the drawing goes back to the input size with Lanczos when that is
    larger than the detection size, else with area averaging."""
    return cv2.INTER_LANCZOS4 if ori_h * ori_w > h * w else cv2.INTER_AREA


# --- detector -----------------------------------------------------------------------------


def letterbox(img: np.ndarray, size: tuple[int, int] = DET_INPUT) -> tuple[np.ndarray, float]:
    """onnxdet.py `preprocess`: BGR uint8 (H, W, 3) -> float32 (3, 640, 640) in 0..255, resized
    by r = min(640/H, 640/W) (bilinear) into the top-left corner of a canvas of 114."""
    padded = np.full((size[0], size[1], 3), DET_PAD_VALUE, dtype=np.uint8)
    r = min(size[0] / img.shape[0], size[1] / img.shape[1])
    nh, nw = int(img.shape[0] * r), int(img.shape[1] * r)
    padded[:nh, :nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32), r


def _grids(size: tuple[int, int] = DET_INPUT) -> tuple[np.ndarray, np.ndarray]:
    """onnxdet.py `demo_postprocess`: the (x, y) cell of each of the 8400 anchors and its
    stride, strides 8, 16, 32 in that order, row-major within a stride."""
    grids, strides = [], []
    for s in DET_STRIDES:
        hs, ws = size[0] // s, size[1] // s
        xv, yv = np.meshgrid(np.arange(ws), np.arange(hs))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((hs * ws, 1), s))
    return np.concatenate(grids, 0), np.concatenate(strides, 0)


_GRID, _STRIDE = _grids()


def nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """onnxdet.py `nms`: greedy single-class NMS, areas with the +1 pixel convention, a box is
    kept when its IoU with every better kept box is <= thr."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= thr)[0] + 1]
    return keep


def person_boxes(prediction: np.ndarray, ratio: float) -> np.ndarray:
    """One frame's detector output (8400, 85) -> person boxes (n, 4) xyxy float64 in the
    detection frame's pixels, best first.

    onnxdet.py `demo_postprocess` + `inference_detector`: centre = (raw + cell) * stride,
    size = exp(raw) * stride, score = objectness * class score, divided back by the letterbox
    ratio. The official `multiclass_nms` runs NMS per class (score > 0.1) and then keeps class 0
    with score > 0.3; only the person class can survive that, so only it is decoded here (the
    other classes' NMS never touches person boxes)."""
    pred = prediction.astype(np.float32, copy=True)
    pred[:, :2] = (pred[:, :2] + _GRID) * _STRIDE
    pred[:, 2:4] = np.exp(pred[:, 2:4]) * _STRIDE
    boxes = np.ones_like(pred[:, :4])
    boxes[:, 0] = pred[:, 0] - pred[:, 2] / 2.0
    boxes[:, 1] = pred[:, 1] - pred[:, 3] / 2.0
    boxes[:, 2] = pred[:, 0] + pred[:, 2] / 2.0
    boxes[:, 3] = pred[:, 1] + pred[:, 3] / 2.0
    boxes /= ratio
    scores = pred[:, 4] * pred[:, 5 + PERSON_CLASS]
    valid = scores > DET_PRE_SCORE
    if not valid.any():
        return np.zeros((0, 4))
    vb, vs = boxes[valid], scores[valid]
    keep = nms(vb, vs, DET_NMS)
    kept_boxes, kept_scores = vb[keep].astype(np.float64), vs[keep]
    return kept_boxes[kept_scores > DET_SCORE]


# --- pose crops ---------------------------------------------------------------------------


def bbox_center_scale(box: np.ndarray, padding: float = BBOX_PADDING) -> tuple[np.ndarray, np.ndarray]:
    """onnxpose.py `bbox_xyxy2cs`: centre and padded size (w, h) of an xyxy box."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    center = np.array([x1 + x2, y1 + y2]) * 0.5
    scale = np.array([x2 - x1, y2 - y1]) * padding
    return center, scale


def fix_aspect_ratio(scale: np.ndarray, aspect_ratio: float) -> np.ndarray:
    """onnxpose.py `_fix_aspect_ratio`: grow the short side to the model's w/h ratio."""
    w, h = float(scale[0]), float(scale[1])
    return np.array([w, w / aspect_ratio]) if w > h * aspect_ratio else np.array([h * aspect_ratio, h])


def warp_matrix(center: np.ndarray, scale: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
    """onnxpose.py `get_warp_matrix` with rot = 0, shift = 0: the three float32 point pairs
    (centre, centre - half width up, and the point 90 degrees from it) to cv2.getAffineTransform."""
    src_w = scale[0]
    dst_w, dst_h = output_size
    src_dir = np.array([0.0, src_w * -0.5])
    dst_dir = np.array([0.0, dst_w * -0.5])

    def third(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # onnxpose.py `_get_3rd_point`
        d = a - b
        return b + np.r_[-d[1], d[0]]

    src = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + src_dir
    src[2] = third(src[0], src[1])
    dst = np.zeros((3, 2), dtype=np.float32)
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = np.array([dst_w * 0.5, dst_h * 0.5]) + dst_dir
    dst[2] = third(dst[0], dst[1])
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def crop_person(
    img: np.ndarray, box: np.ndarray, input_size: tuple[int, int] = POSE_INPUT
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """onnxpose.py `preprocess` + `top_down_affine` for one box: the (3, h, w) float32
    normalised crop of the BGR frame, and the box centre and aspect-fixed scale that map the
    model's coordinates back."""
    w, h = input_size
    center, scale = bbox_center_scale(box)
    scale = fix_aspect_ratio(scale, aspect_ratio=w / h)
    mat = warp_matrix(center, scale, (w, h))
    crop = cv2.warpAffine(img, mat, (int(w), int(h)), flags=cv2.INTER_LINEAR)
    crop = (crop.astype(np.float32) - POSE_MEAN) / POSE_STD
    return np.ascontiguousarray(crop.transpose(2, 0, 1)), center, scale


def boxes_or_whole_frame(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """onnxpose.py `preprocess`: with no detection the whole frame is one box (so the pose
    model still runs, and draws whatever it finds with enough confidence)."""
    if len(boxes) == 0:
        return np.array([[0.0, 0.0, float(w), float(h)]])
    return boxes


# --- SimCC decoding and the OpenPose layout -----------------------------------------------


def simcc_decode(
    simcc_x: np.ndarray, simcc_y: np.ndarray, split_ratio: float = SIMCC_SPLIT_RATIO
) -> tuple[np.ndarray, np.ndarray]:
    """onnxpose.py `get_simcc_maximum` + `decode`: (N, K, Wx), (N, K, Wy) -> keypoints (N, K, 2)
    in model-input pixels and scores (N, K) = min(max x, max y); a keypoint whose score is <= 0
    gets location -1 before the division by the split ratio."""
    n, k, _ = simcc_x.shape
    sx = simcc_x.reshape(n * k, -1)
    sy = simcc_y.reshape(n * k, -1)
    locs = np.stack((np.argmax(sx, axis=1), np.argmax(sy, axis=1)), axis=-1).astype(np.float32)
    vals = np.minimum(np.amax(sx, axis=1), np.amax(sy, axis=1))
    locs[vals <= 0.0] = -1
    return locs.reshape(n, k, 2) / split_ratio, vals.reshape(n, k)


def keypoints_to_frame(
    keypoints: np.ndarray, centers: np.ndarray, scales: np.ndarray, input_size: tuple[int, int] = POSE_INPUT
) -> np.ndarray:
    """onnxpose.py `postprocess`: model-input pixels -> frame pixels, per crop
    (keypoints / input_size * scale + center - scale / 2)."""
    size = np.asarray(input_size, dtype=np.float64)
    return keypoints / size * scales[:, None, :] + centers[:, None, :] - scales[:, None, :] / 2


def to_openpose(keypoints: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """wholebody.py `Wholebody.__call__`: (N, 133, 2), (N, 133) -> (N, 134, 2), (N, 134): the
    neck (mean of the shoulders, score 1 when both shoulders score > 0.3, else 0) inserted at
    17, then the body reordered from mmpose to OpenPose slots."""
    info = np.concatenate((keypoints, scores[..., None]), axis=-1)
    neck = np.mean(info[:, [5, 6]], axis=1)
    both = np.logical_and(info[:, 5, 2:4] > KEYPOINT_SCORE, info[:, 6, 2:4] > KEYPOINT_SCORE)
    neck[:, 2:4] = both.astype(int)
    new = np.insert(info, 17, neck, axis=1)
    new[:, OPENPOSE_IDX] = new[:, MMPOSE_IDX]
    return new[..., :2], new[..., 2]


# --- drawing ------------------------------------------------------------------------------

_draw_module: ModuleType | None = None


def drawing() -> ModuleType:
    """controlnet-aux's `controlnet_aux/dwpose/util.py` (`draw_bodypose`, `draw_facepose`).

    `import controlnet_aux.dwpose.util` runs `controlnet_aux/__init__.py`, which imports every
    detector (torch, timm, ...: ~5 s and a GPU context's worth of libraries). The helpers file
    itself imports only math, numpy and cv2, so it is loaded alone, from the installed package,
    without that `__init__` (falling back to the ordinary import if the file is not where the
    pinned 0.0.10 puts it)."""
    global _draw_module
    if _draw_module is not None:
        return _draw_module
    mod = sys.modules.get("controlnet_aux.dwpose.util")
    if mod is None:
        spec = importlib.util.find_spec("controlnet_aux")
        if spec is None:
            raise ImportError(
                "the pose tasks draw with controlnet-aux's DWPose helpers: pip install controlnet-aux==0.0.10"
            )
        path = next((Path(p) / "dwpose" / "util.py" for p in spec.submodule_search_locations or []), None)
        if path is not None and path.is_file():
            file_spec = importlib.util.spec_from_file_location("_wan_vace_controlnet_aux_dwpose_util", path)
            assert file_spec is not None and file_spec.loader is not None
            mod = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(mod)
        else:  # pragma: no cover - a different controlnet-aux layout
            import controlnet_aux.dwpose.util as mod  # type: ignore[no-redef]
    _draw_module = mod
    return mod


def draw_pose(
    keypoints: np.ndarray, scores: np.ndarray, h: int, w: int, *, body: bool, face: bool
) -> np.ndarray:
    """pose.py `PoseAnnotator.process` + `draw_pose` for one frame: OpenPose-layout keypoints
    (N, 134, 2) in pixels of the (h, w) detection frame -> the canvas (h, w, 3) uint8 as the
    official code draws it (its channel order; the caller flips it as `process` does).

    Body: the 18 OpenPose points, shown when score > 0.3, limbs and joints by `draw_bodypose`.
    Face: the 68 face points, hidden (set to -1) when score < 0.3, white dots by `draw_facepose`.
    Hands and feet are never drawn (`pose` = body + face, `pose_body` = body)."""
    util = drawing()
    n = keypoints.shape[0]
    candidate = keypoints.astype(np.float64, copy=True)
    candidate[..., 0] /= float(w)
    candidate[..., 1] /= float(h)
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    if body:
        body_points = candidate[:, :18].reshape(n * 18, 2)
        idx = np.arange(n * 18, dtype=np.float64).reshape(n, 18)
        subset = np.where(scores[:, :18] > KEYPOINT_SCORE, idx, -1.0)
        canvas = util.draw_bodypose(canvas, body_points, subset)
    if face:
        # The official code tests `subset < 0.3` after overwriting the body scores with indices
        # (which only changes body slots, never drawn from `candidate`); for the face it is the
        # plain score test.
        faces = candidate[:, FACE_SLICE].copy()
        faces[scores[:, FACE_SLICE] < KEYPOINT_SCORE] = -1
        canvas = util.draw_facepose(canvas, faces)
    return canvas


# --- stand-in ONNX graphs (tests and the random tiny model) -------------------------------


def yolox_raw_output(boxes, scores) -> np.ndarray:
    """A detector output (8400, 85) that decodes to `boxes` (xyxy in 640x640 letterbox pixels)
    with person score objectness * class = score**2 for each (objectness = class 0 = score).

    Each box sits on the stride-32 cell holding its centre (then 16, then 8 if that cell is
    taken): raw x, y = centre / stride - cell, raw w, h = log(size / stride)."""
    out = np.zeros((len(_GRID), 5 + NUM_CLASSES), dtype=np.float32)
    used: set[int] = set()
    offsets = {s: 0 for s in DET_STRIDES}
    start = 0
    for s in DET_STRIDES:
        offsets[s] = start
        start += (DET_INPUT[0] // s) * (DET_INPUT[1] // s)
    for box, score in zip(boxes, scores):
        x1, y1, x2, y2 = (float(v) for v in box)
        cx, cy, bw, bh = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        for s in (32, 16, 8):
            ws, hs = DET_INPUT[1] // s, DET_INPUT[0] // s
            gx, gy = min(max(int(cx // s), 0), ws - 1), min(max(int(cy // s), 0), hs - 1)
            i = offsets[s] + gy * ws + gx
            if i not in used:
                break
        else:
            raise ValueError("too many boxes on the same cells")
        used.add(i)
        out[i, :4] = [cx / s - gx, cy / s - gy, np.log(bw / s), np.log(bh / s)]
        out[i, 4] = out[i, 5 + PERSON_CLASS] = float(score)
    return out


def simcc_output(
    keypoints, scores, input_size: tuple[int, int] = POSE_INPUT
) -> tuple[np.ndarray, np.ndarray]:
    """Pose outputs simcc_x (133, 2w), simcc_y (133, 2h) with a one-hot peak of height `score`
    at each keypoint (x, y in model-input pixels, quantised to the 1/2-pixel SimCC bins); a
    score of 0 leaves the rows zero (decoded as not found)."""
    w, h = input_size
    sx = np.zeros((NUM_KEYPOINTS, int(w * SIMCC_SPLIT_RATIO)), dtype=np.float32)
    sy = np.zeros((NUM_KEYPOINTS, int(h * SIMCC_SPLIT_RATIO)), dtype=np.float32)
    for k, ((x, y), s) in enumerate(zip(keypoints, scores)):
        if s > 0:
            sx[k, int(np.clip(round(x * SIMCC_SPLIT_RATIO), 0, sx.shape[1] - 1))] = s
            sy[k, int(np.clip(round(y * SIMCC_SPLIT_RATIO), 0, sy.shape[1] - 1))] = s
    return sx, sy


def constant_onnx(
    input_name: str,
    input_shape: tuple[int, int, int],
    outputs: dict[str, np.ndarray],
    *,
    batch: int | None = None,
    gate: tuple[float, dict[str, np.ndarray]] | None = None,
) -> bytes:
    """A serialised ONNX model with one float input `input_name` of shape (batch, *input_shape)
    (batch None = dynamic) whose outputs are `outputs[name]` (per-sample arrays) repeated over the
    batch: `out = C + 0 * mean(input)`, so the graph consumes its input.

    With `gate = (threshold, dark)`, a sample whose input mean is <= threshold gets `dark[name]`
    instead of `outputs[name]` (`out = dark + (mean > threshold) * (C - dark)`): a detector
    that finds a person only in bright frames, to test batches that mix both.

    Needs the `onnx` package (a test dependency; the random tiny model uses it too)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:  # pragma: no cover - onnx is installed with the test extras
        raise ImportError(
            "the stand-in DWPose graphs of the tiny model are built with the onnx package: pip install onnx"
        ) from e

    dim0: int | str = "N" if batch is None else int(batch)
    inits = [
        numpy_helper.from_array(np.array([-1, 1, 1], dtype=np.int64), "shape_n11"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("Flatten", [input_name], ["flat"], axis=1),
        helper.make_node("ReduceMean", ["flat"], ["mean2"], axes=[1], keepdims=1),  # (N, 1)
        helper.make_node("Reshape", ["mean2", "shape_n11"], ["mean"]),  # (N, 1, 1)
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
    ]
    if gate is not None:
        threshold, dark = gate
        inits.append(numpy_helper.from_array(np.array(threshold, dtype=np.float32), "threshold"))
        nodes += [
            helper.make_node("Greater", ["mean", "threshold"], ["bright"]),
            helper.make_node("Cast", ["bright"], ["g"], to=TensorProto.FLOAT),
        ]
    graph_outputs = []
    for name, value in outputs.items():
        value = np.asarray(value, dtype=np.float32)[None]
        if gate is None:
            inits.append(numpy_helper.from_array(value, f"{name}_const"))
            nodes.append(helper.make_node("Add", [f"{name}_const", "nothing"], [name]))
        else:
            low = np.asarray(dark[name], dtype=np.float32)[None]
            inits += [
                numpy_helper.from_array(low, f"{name}_dark"),
                numpy_helper.from_array(value - low, f"{name}_diff"),
            ]
            nodes += [
                helper.make_node("Mul", ["g", f"{name}_diff"], [f"{name}_step"]),
                helper.make_node("Add", [f"{name}_dark", f"{name}_step"], [f"{name}_sum"]),
                helper.make_node("Add", [f"{name}_sum", "nothing"], [name]),
            ]
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [dim0, *value.shape[1:]]))
    graph = helper.make_graph(
        nodes,
        "dwpose_stand_in",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [dim0, *input_shape])],
        graph_outputs,
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="wan-vace")
    model.ir_version = 8  # readable by every onnxruntime this project allows (>= 1.20)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def fake_detector(boxes, scores, *, batch: int | None = 1, gate=None) -> bytes:
    """A stand-in `yolox_l.onnx`: input `images` (batch, 3, 640, 640), output `output`
    (batch, 8400, 85) planting `boxes` (640-space xyxy) with objectness = class 0 = score.
    `gate = (threshold, (dark_boxes, dark_scores))`: those in frames whose letterboxed input mean
    is <= threshold."""
    dark = None
    if gate is not None:
        dark = (gate[0], {"output": yolox_raw_output(*gate[1])})
    return constant_onnx(
        "images", (3, *DET_INPUT), {"output": yolox_raw_output(boxes, scores)}, batch=batch, gate=dark
    )


def fake_pose(keypoints, scores, *, batch: int | None = None, input_size=POSE_INPUT) -> bytes:
    """A stand-in `dw-ll_ucoco_384.onnx`: input `input` (batch, 3, 384, 288), outputs
    `simcc_x` (batch, 133, 576) and `simcc_y` (batch, 133, 768) with one-hot peaks at
    `keypoints` (133 x (x, y) in crop pixels) of height `scores`."""
    sx, sy = simcc_output(keypoints, scores, input_size)
    w, h = input_size
    return constant_onnx("input", (3, h, w), {"simcc_x": sx, "simcc_y": sy}, batch=batch)


# COCO-WholeBody body keypoints of a person standing in the 288x384 crop (nose, eyes, ears,
# shoulders, elbows, wrists, hips, knees, ankles): the tiny model's planted pose.
_TINY_BODY = [
    (144, 70), (152, 62), (136, 62), (162, 66), (126, 66),
    (172, 110), (116, 110), (188, 160), (100, 160), (196, 205), (92, 205),
    (162, 210), (126, 210), (166, 270), (122, 270), (168, 325), (120, 325),
]  # fmt: skip


def tiny_models(seed: int = 0) -> tuple[bytes, bytes]:
    """The random tiny model's stand-ins for (yolox_l.onnx, dw-ll_ucoco_384.onnx), seeded:

    - detector: one person box (score 0.95^2), jittered around 640-space [100, 40, 260, 340],
      inside the letterboxed picture for any frame up to 16:9 either way;
    - pose: a standing body (COCO order) plus feet, a ring of 68 face points around the nose and
      two hands near the wrists, each point jittered by a few pixels, scores 0.9.

    Both take a dynamic batch, so the batched path runs as with an exported dynamic model."""
    rng = np.random.default_rng(seed)
    box = np.array([100.0, 40.0, 260.0, 340.0]) + rng.uniform(-8, 8, 4)
    body = np.array(_TINY_BODY, dtype=np.float64)
    feet = np.repeat(body[15:17], 3, axis=0) + [0, 12]
    t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    face = body[0] + np.stack([18 * np.cos(t), 22 * np.sin(t)], axis=1)
    hands = np.concatenate([np.repeat(body[9:10], 21, 0), np.repeat(body[10:11], 21, 0)]) + [0, 14]
    kps = np.concatenate([body, feet, face, hands]) + rng.uniform(-3, 3, (NUM_KEYPOINTS, 2))
    det = fake_detector([box], [0.95], batch=None)
    pose = fake_pose(kps, np.full(NUM_KEYPOINTS, 0.9), batch=None)
    return det, pose
