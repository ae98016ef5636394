"""`face`: VACE's face task works on IMAGES (the reference images), not on frames.

Official behaviour (ali-vilab/VACE `vace/annotators/face.py`, `FaceAnnotator.forward`, with the
`image_face_anno` config of `vace/configs/image_preproccess.py`: `RETURN_RAW = False`,
`MULTI_FACE = False`): insightface `FaceAnalysis(name="antelopev2", root=...)` prepared with
`det_size=(640, 640)`, `faces = model.get(image)`, keep `faces[:1]` (insightface returns the
detections best score first), and crop

    image[int(y_min): int(y_max) + 1, int(x_min): int(x_max) + 1]

from the face's `bbox` (x_min, y_min, x_max, y_max): no margin, no square-up, no resize; the crop
becomes the reference image. No face -> the official annotator returns None; here the WHOLE image
is used instead (and reported). The image the official code hands insightface is the PIL image as
an RGB array (`convert_to_numpy`), although insightface expects BGR; the insightface backend here
does the same, for parity.

Deviations, both for robustness only: a box reaching past the image is clamped to it (the
official `int()` of a negative coordinate would wrap around in the slice), and a box that leaves
an empty crop counts as "no face".

A `video` sent with task `face` is used as is: `__call__` is the `none` task. The reference crop
is `crop_references`, which the conditioning builder calls on `MediaInputs.images` (raw images,
before they are letterboxed onto the canvas).

Detectors (the `FaceDetector` protocol): `InsightFaceDetector` (antelopev2 from a local folder,
for parity; insightface's pretrained models are NON-COMMERCIAL research only and the user
supplies them) and `CascadeFaceDetector` (scikit-image's bundled LBP frontal-face cascade: a real
detector that ships inside the scikit-image wheel, no download; OpenCV 5 has no
CascadeClassifier). `build_face` picks one.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import PIL.Image

from preprocessors.registry import Preprocessor, PreprocessorContext

log = logging.getLogger("wan_vace.preprocessors.face")

INSIGHTFACE_MODEL = "antelopev2"
INSIGHTFACE_DET_SIZE = (640, 640)  # as VACE's FaceAnnotator
WEIGHTS_ENTRY = "antelopev2"  # the weights.toml entry (a "manual" one: the user places it)

INFO_INSIGHTFACE = "insightface antelopev2"
INFO_CASCADE = "scikit-image LBP cascade"


@dataclass(frozen=True)
class Box:
    """A detected face in image pixels, insightface's `bbox` convention: (x0, y0) the top-left
    corner, (x1, y1) the bottom-right one, cropped inclusively as the official code does
    (`[int(y0): int(y1) + 1, int(x0): int(x1) + 1]`). `score`: higher is better (a detector
    without scores gives 1.0)."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0


@runtime_checkable
class FaceDetector(Protocol):
    info: str

    def detect(self, image: PIL.Image.Image) -> list[Box]:
        """The faces in an RGB image, best first ([] = none)."""
        ...


def _rgb_array(image: PIL.Image.Image) -> np.ndarray:
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def crop_box(image: PIL.Image.Image, box: Box) -> PIL.Image.Image | None:
    """The official crop of `box` (see the module docstring), clamped to the image; None when
    nothing of the box lies inside it."""
    w, h = image.size
    x0 = max(0, math.floor(box.x0))
    y0 = max(0, math.floor(box.y0))
    x1 = min(w, math.floor(box.x1) + 1)  # exclusive
    y1 = min(h, math.floor(box.y1) + 1)
    if x1 <= x0 or y1 <= y0:
        return None
    return image.crop((x0, y0, x1, y1))


# --- detectors ------------------------------------------------------------------------------


class CascadeFaceDetector:
    """scikit-image's bundled LBP frontal-face cascade (`skimage.data.lbp_frontal_face_cascade_
    filename()`): offline, CPU, frontal faces only, no scores. Faces are ranked largest first
    (the main subject of a reference image); every score is 1.0.

    Images larger than `max_side` are searched on a downscaled copy (as insightface searches
    at 640) and the boxes mapped back. Windows from min(H, W)/16 (at least 24 px) to the full
    short side are searched."""

    info = INFO_CASCADE

    def __init__(
        self,
        *,
        max_side: int = 640,
        scale_factor: float = 1.2,
        step_ratio: float = 1.0,
        min_neighbor_number: int = 4,
    ):
        from skimage.data import lbp_frontal_face_cascade_filename
        from skimage.feature import Cascade

        self._cascade = Cascade(lbp_frontal_face_cascade_filename())
        self.max_side = int(max_side)
        self.scale_factor = float(scale_factor)
        self.step_ratio = float(step_ratio)
        self.min_neighbor_number = int(min_neighbor_number)

    def detect(self, image: PIL.Image.Image) -> list[Box]:
        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = image.size
        scale = 1.0
        if max(w, h) > self.max_side:
            scale = self.max_side / max(w, h)
            image = image.resize(
                (max(1, round(w * scale)), max(1, round(h * scale))), PIL.Image.Resampling.BILINEAR
            )
        # The cascade works on luminance; skimage converts RGB itself, but gray keeps it cheap.
        gray = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
        short = min(gray.shape)
        min_win = max(24, short // 16)
        if short < min_win:
            return []
        found = self._cascade.detect_multi_scale(
            img=gray,
            scale_factor=self.scale_factor,
            step_ratio=self.step_ratio,
            min_size=(min_win, min_win),
            max_size=(short, short),
            min_neighbor_number=self.min_neighbor_number,
        )
        boxes = []
        for d in found:
            r, c, bw, bh = d["r"], d["c"], d["width"], d["height"]
            # The window covers rows r..r+bh-1 and columns c..c+bw-1 (inclusive corners).
            boxes.append(Box(c / scale, r / scale, (c + bw) / scale - 1, (r + bh) / scale - 1, 1.0))
        boxes.sort(key=lambda b: (b.x1 - b.x0) * (b.y1 - b.y0), reverse=True)
        return boxes


def _insightface_model_root(folder: Path) -> Path:
    """The `root` to give `FaceAnalysis(name="antelopev2", root=...)`: the folder that holds
    `models/antelopev2/*.onnx`. `folder` may be that root or the model folder itself. Checked
    here, because FaceAnalysis DOWNLOADS a missing model pack (nothing here may download)."""
    folder = Path(folder)
    candidates = [folder]
    if folder.name == INSIGHTFACE_MODEL and folder.parent.name == "models":
        candidates.append(folder.parent.parent)
    for root in candidates:
        model_dir = root / "models" / INSIGHTFACE_MODEL
        if any(model_dir.glob("*.onnx")):
            return root
    nested = folder / "models" / INSIGHTFACE_MODEL / INSIGHTFACE_MODEL
    hint = (
        f" (the .onnx files are one level too deep, in {nested}: move them up)"
        if any(nested.glob("*.onnx"))
        else ""
    )
    raise FileNotFoundError(
        f"task 'face': no insightface {INSIGHTFACE_MODEL} model files (*.onnx) in "
        f"{folder / 'models' / INSIGHTFACE_MODEL}{hint}"
    )


def _ort_providers(device: str) -> tuple[list[str], list[dict], int]:
    """onnxruntime providers, their options and insightface's ctx_id for `device`."""
    device = str(device)
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return (
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            [{"device_id": index}, {}],
            index,
        )
    return ["CPUExecutionProvider"], [{}], -1


class InsightFaceDetector:
    """insightface `FaceAnalysis(name="antelopev2", root=folder)`, det_size 640, as VACE's
    FaceAnnotator; only the detection model is kept (`allowed_modules=["detection"]`: the
    bounding boxes are the detector's alone, so the crop is the official one and the landmark,
    gender/age and recognition models are not run).

    The antelopev2 weights are NON-COMMERCIAL research only (insightface's terms); the user
    obtains and places them. insightface is imported here, lazily."""

    info = INFO_INSIGHTFACE

    def __init__(self, folder: Path, device: str = "cpu"):
        root = _insightface_model_root(folder)
        from insightface.app import FaceAnalysis

        providers, options, ctx_id = _ort_providers(device)
        self._app = FaceAnalysis(
            name=INSIGHTFACE_MODEL,
            root=str(root),
            allowed_modules=["detection"],
            providers=providers,
            provider_options=options,
        )
        self._app.prepare(ctx_id=ctx_id, det_size=INSIGHTFACE_DET_SIZE)

    def detect(self, image: PIL.Image.Image) -> list[Box]:
        # RGB, exactly as the official annotator passes it (see the module docstring).
        faces = self._app.get(_rgb_array(image))
        boxes = []
        for face in faces:
            x0, y0, x1, y1 = (float(v) for v in np.asarray(face["bbox"]).tolist()[:4])
            score = face.get("det_score", 1.0) if hasattr(face, "get") else 1.0
            boxes.append(Box(x0, y0, x1, y1, float(score)))
        # insightface already returns best score first; a stable sort keeps its order on ties.
        boxes.sort(key=lambda b: b.score, reverse=True)
        return boxes

    def close(self) -> None:
        self._app = None


# --- the preprocessor -----------------------------------------------------------------------


class FacePreprocessor(Preprocessor):
    """`face`: `crop_references` crops the main face of each reference image; a video given
    with task face is used as is (`__call__` = the `none` task)."""

    name = "face"
    needs_mask = False

    def __init__(self, detector: FaceDetector | None):
        self.detector = detector
        self.info = detector.info if detector is not None else "no face detector (whole images)"

    def __call__(self, frames, mask):
        return frames, mask

    def crop_references(self, images: Sequence[PIL.Image.Image]) -> tuple[list[PIL.Image.Image], list[bool]]:
        """For each image, in order: the crop of its main (best, first) face, or the WHOLE image
        when no face is found or there is no detector. The bools say which were cropped."""
        out: list[PIL.Image.Image] = []
        cropped: list[bool] = []
        for image in images:
            if image.mode != "RGB":
                image = image.convert("RGB")
            crop = None
            if self.detector is not None:
                boxes = self.detector.detect(image)
                if boxes:
                    crop = crop_box(image, boxes[0])
            out.append(crop if crop is not None else image)
            cropped.append(crop is not None)
        return out, cropped

    def close(self) -> None:
        close = getattr(self.detector, "close", None)
        if close is not None:
            close()
        self.detector = None


def insightface_installed() -> bool:
    return importlib.util.find_spec("insightface") is not None


def build_face(context: PreprocessorContext) -> FacePreprocessor:
    """The `face` preprocessor for `context`: insightface antelopev2 when its weights folder
    (weights.toml entry `antelopev2`) resolves and the insightface package is installed, else
    scikit-image's LBP cascade; the tiny (random) model always gets the cascade. `info` on the
    result says which."""
    if not context.tiny and context.weights is not None and insightface_installed():
        from pipelines.weights import ModelNotAvailable  # UnknownModel is one too

        try:
            folder = context.weights(WEIGHTS_ENTRY)
        except (ModelNotAvailable, FileNotFoundError) as e:
            log.info("face: insightface weights not available (%s); using %s", e, INFO_CASCADE)
        else:
            return FacePreprocessor(InsightFaceDetector(folder, context.device))
    return FacePreprocessor(CascadeFaceDetector())
