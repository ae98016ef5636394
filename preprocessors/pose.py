"""`pose` and `pose_body`: DWPose skeletons on black (VACE's PoseBodyFaceVideoAnnotator, the
official default, and PoseBodyVideoAnnotator).

The two official ONNX models run on onnxruntime: `yolox_l.onnx` (YOLOX-L person detector) and
`dw-ll_ucoco_384.onnx` (DWPose-L whole-body top-down pose, 288x384, SimCC outputs), from the
folder of the `dwpose` weights.toml entry. Everything around them (frame resize, letterbox,
grid decoding, NMS, affine crop, SimCC decoding, neck and keypoint reorder) is in
`preprocessors.dwpose`, written after VACE's `vace/annotators/dwpose/` and `pose.py`; the
drawing is controlnet-aux's DWPose helpers. Per frame, as the official annotator:

1. the RGB frame is flipped to BGR and resized to short side 1024, sides multiples of 64;
2. persons are detected (score > 0.3, NMS 0.45); with none, the whole frame is one box
   (the official fallback: the pose model still runs, and draws what it finds with score > 0.3);
3. each box is cropped and the 133 whole-body keypoints are estimated;
4. the body (`pose_body`), or body + face (`pose`), is drawn on black at the 1024 size and
   resized back to the input size.

[compat] The official `process` draws on a canvas and returns `canvas[..., ::-1]`, so its
control videos have the drawing colours' R and B swapped (the first limb, "red" [255, 0, 0]
in the colour table, comes out blue). The model was trained on those frames; the flip is kept.

Batching: frames go through in chunks; each chunk's frames run the detector together and all
their person crops run the pose model together, where the ONNX graph's batch dimension is
dynamic (the official exports have batch 1, so they run one image at a time, as VACE does).

Sessions are always created with explicit providers: CUDA (then CPU) when the context's device
is "cuda..." and onnxruntime has the CUDA provider, else CPU only.

Tiny model (`context.tiny`): no weights are read; two stand-in graphs with the official input
and output names and shapes are built in memory with `onnx.helper`
(`preprocessors.dwpose.tiny_models`): their outputs are seeded constants that plant one person
box and a standing whole-body pose, so both tasks run end to end offline (the stand-ins ignore
the picture, so every frame shows the same skeleton).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from preprocessors import dwpose
from preprocessors.registry import Preprocessor, PreprocessorContext

log = logging.getLogger(__name__)

WEIGHTS_ENTRY = "dwpose"  # the weights.toml [preprocessors.*] entry
DETECTOR_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"
FETCH_HINT = "fetch it with: python scripts/fetch_weights.py --with-preprocessors"

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

FRAME_CHUNK = 16  # frames letterboxed and detected together (bounds host memory)
POSE_BATCH = 64  # person crops per pose run when the graph's batch is dynamic
# Threads for the per-frame OpenCV/numpy work (resize, letterbox, drawing): those release the
# GIL, and the drawing's full-canvas multiply is single-threaded otherwise.
THREADS = max(1, min(8, os.cpu_count() or 1))


def providers_for(device: str) -> tuple[list[str], list[dict]]:
    """(provider names, their options) for `device`: CUDA then CPU when the device is
    "cuda"/"cuda:N" and this onnxruntime build has CUDA, else CPU only. Never left implicit
    (onnxruntime-gpu would otherwise pick whatever it finds)."""
    import onnxruntime as ort

    device = str(device)
    if device.startswith("cuda") and CUDA in ort.get_available_providers():
        index = device.partition(":")[2]
        return [CUDA, CPU], [{"device_id": int(index)} if index.isdigit() else {}, {}]
    return [CPU], [{}]


def _weights_file(folder: Path, name: str, task: str) -> Path:
    """`folder/name`, checked before onnxruntime sees it (the message names task, file and
    folder, and how to fetch)."""
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"task {task!r}: weights file {name} is missing in {folder} ({FETCH_HINT})")
    return path


class PosePreprocessor(Preprocessor):
    """DWPose on onnxruntime; `face=True` is `pose` (body + face), `face=False` `pose_body`."""

    needs_mask = False

    def __init__(self, detector, pose_model, *, face: bool, device: str = "cpu", name: str = ""):
        # `detector` / `pose_model`: a path to the .onnx file or its serialised bytes.
        self.name = name or ("pose" if face else "pose_body")
        self.face = face
        self._models = (detector, pose_model)
        self._device = str(device)
        self._det = None
        self._pose = None
        self.providers: list[str] = []
        self._open()

    # --- sessions -------------------------------------------------------------------------

    def _open(self) -> None:
        import onnxruntime as ort

        names, options = providers_for(self._device)
        so = ort.SessionOptions()
        so.log_severity_level = 3  # no per-node placement warnings
        self._det, self._pose = (
            ort.InferenceSession(
                m if isinstance(m, bytes) else str(m),
                sess_options=so,
                providers=names,
                provider_options=options,
            )
            for m in self._models
        )
        got = self._det.get_providers()
        if names[0] not in got:
            log.warning("%s: asked onnxruntime for %s, got %s", self.name, names, got)
        self.providers = list(got)
        inp = self._pose.get_inputs()[0]
        h, w = inp.shape[2:]
        self._pose_size = (int(w), int(h)) if isinstance(w, int) and isinstance(h, int) else dwpose.POSE_INPUT
        outs = [o.name for o in self._pose.get_outputs()]
        self._pose_outputs = ["simcc_x", "simcc_y"] if {"simcc_x", "simcc_y"} <= set(outs) else outs[:2]

    def to(self, device: str) -> None:
        """Recreate the sessions for `device` (onnxruntime sessions cannot move)."""
        device = str(device)
        if device == self._device and self._det is not None:
            return
        self.close()
        self._device = device
        self._open()

    def close(self) -> None:
        self._det = None
        self._pose = None
        self.providers = []

    @staticmethod
    def _run(session, x: np.ndarray, outputs: list[str] | None, limit: int) -> list[np.ndarray]:
        """`session` on the batch `x`, in runs of the graph's fixed batch size (padded to it) or,
        for a dynamic batch dimension, of at most `limit`."""
        inp = session.get_inputs()[0]
        fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        step = fixed or limit
        parts: list[list[np.ndarray]] = []
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            n = len(chunk)
            if fixed and n < fixed:
                chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
            parts.append([o[:n] for o in session.run(outputs, {inp.name: chunk})])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    # --- the call -------------------------------------------------------------------------

    def __call__(self, frames, mask):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"{self.name}: expected uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}"
            )
        if self._det is None:
            self._open()
        out = np.zeros_like(frames)
        for start in range(0, frames.shape[0], FRAME_CHUNK):
            chunk = frames[start : start + FRAME_CHUNK]
            out[start : start + len(chunk)] = self._chunk(chunk)
        return out, mask

    def _chunk(self, frames: np.ndarray) -> np.ndarray:
        f, ori_h, ori_w, _ = frames.shape
        h, w, interp_in = dwpose.detection_size(ori_h, ori_w)

        # wholebody.py resize_image on HWC3(image[..., ::-1]): the resize is per channel, so
        # resizing the RGB frame and then flipping it gives the same BGR pixels.
        def prepare(frame: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, float]]:
            img = np.ascontiguousarray(cv2.resize(frame, (w, h), interpolation=interp_in)[..., ::-1])
            return img, dwpose.letterbox(img)

        with ThreadPoolExecutor(min(THREADS, f)) as pool:
            prepared = list(pool.map(prepare, frames))
        images = [p[0] for p in prepared]
        boxed = [p[1] for p in prepared]
        # 1. Detection, all frames of the chunk in one batch.
        batch = np.stack([b[0] for b in boxed])
        (pred,) = self._run(self._det, batch, [self._det.get_outputs()[0].name], FRAME_CHUNK)
        # 2. Crops of every person of every frame (the whole frame where none was found).
        crops, centers, scales, owner = [], [], [], []
        for i, img in enumerate(images):
            boxes = dwpose.boxes_or_whole_frame(dwpose.person_boxes(pred[i], boxed[i][1]), h, w)
            for box in boxes:
                crop, c, s = dwpose.crop_person(img, box, self._pose_size)
                crops.append(crop)
                centers.append(c)
                scales.append(s)
                owner.append(i)
        # 3. Pose of all crops at once, decoded and put in the OpenPose layout.
        simcc_x, simcc_y = self._run(self._pose, np.stack(crops), self._pose_outputs, POSE_BATCH)
        kps, scores = dwpose.simcc_decode(simcc_x, simcc_y)
        kps = dwpose.keypoints_to_frame(kps, np.array(centers), np.array(scales), self._pose_size)
        kps, scores = dwpose.to_openpose(kps, scores)
        # 4. Drawing at the detection size, flipped and resized back (pose.py process).
        owner_arr = np.array(owner)
        interp_out = dwpose.output_interpolation(ori_h, ori_w, h, w)
        result = np.empty_like(frames)

        def draw(i: int) -> None:
            sel = owner_arr == i
            canvas = dwpose.draw_pose(kps[sel], scores[sel], h, w, body=True, face=self.face)
            result[i] = cv2.resize(canvas, (ori_w, ori_h), interpolation=interp_out)[..., ::-1]

        with ThreadPoolExecutor(min(THREADS, f)) as pool:
            list(pool.map(draw, range(f)))
        return result


def _build(context: PreprocessorContext, *, face: bool) -> PosePreprocessor:
    task = "pose" if face else "pose_body"
    if context.tiny:
        det, pose = dwpose.tiny_models()
        return PosePreprocessor(det, pose, face=face, device=context.device, name=task)
    if context.weights is None:
        raise FileNotFoundError(
            f"task {task!r}: no local weights for the {WEIGHTS_ENTRY!r} entry "
            f"({DETECTOR_FILE}, {POSE_FILE}); {FETCH_HINT}"
        )
    folder = Path(context.weights(WEIGHTS_ENTRY))
    det = _weights_file(folder, DETECTOR_FILE, task)
    pose = _weights_file(folder, POSE_FILE, task)
    return PosePreprocessor(det, pose, face=face, device=context.device, name=task)


def build_pose(context: PreprocessorContext) -> PosePreprocessor:
    """`pose`: body + face (VACE PoseBodyFaceVideoAnnotator)."""
    return _build(context, face=True)


def build_pose_body(context: PreprocessorContext) -> PosePreprocessor:
    """`pose_body`: body only (VACE PoseBodyVideoAnnotator)."""
    return _build(context, face=False)
