"""Depth control videos: `depth` (MiDaS DPT-Hybrid) and `depthv2` (Depth-Anything-V2).

Both reproduce the official VACE annotators (ali-vilab/VACE `vace/annotators/depth.py`), frame
for frame, but run the frames through the model in batches on the context's device (VACE loops
one frame at a time):

- `depth` = `DepthAnnotator.forward`: the frame is resized with VACE's `resize_image` (utils.py)
  to its own short side capped at 1024, each side rounded to a multiple of 64 (cv2, INTER_AREA;
  LANCZOS4 only when it scales up, which the cap never does), normalised `x / 127.5 - 1`, run
  through MiDaS v3 DPT-Hybrid in fp32 (autocast off), min-max normalised per frame, truncated to
  uint8, repeated to 3 channels and resized back to H x W with `resize_image_ori` (same cv2 rule).
  Carrier: controlnet-aux's `DPTDepthModel(backbone="vitb_rn50_384", non_negative=True)`, the
  module the official `MiDaSInference("dpt_hybrid")` builds, loaded strictly from the official
  `dpt_hybrid-midas-501f0c75.pt`.
- `depthv2` = `DepthV2Annotator.forward` -> Depth-Anything-V2 `infer_image(image, 518)`
  (`depth_anything_v2/dpt.py` `image2tensor` + `util/transform.py`): `cv2.COLOR_BGR2RGB` on the
  frame, `/ 255`, cv2 INTER_CUBIC resize keeping the aspect with both sides >= 518 and rounded to
  a multiple of 14 ("lower_bound"), ImageNet mean/std, the model, bilinear (align_corners) back
  to H x W, per-frame min-max, truncated to uint8, 3 channels. Carrier: transformers'
  `DepthAnythingForDepthEstimation` from a `*-hf` folder.

With `context.tiny` both are built from small seeded random configs and need no files (see
`tiny_midas_model`, `tiny_depth_anything_model`).

torch, cv2 and numpy are imported here; controlnet-aux (which imports timm) and transformers
only inside the functions that build each model, so one task never pays for the other's library.
"""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from preprocessors.registry import Preprocessor, PreprocessorContext
from preprocessors.torchutil import ModelHolder, batches, to_tensor, weights_file

# weights.toml entries and the files read from their folders.
MIDAS_ENTRY = "midas-dpt-hybrid"
MIDAS_FILE = "dpt_hybrid-midas-501f0c75.pt"  # ali-vilab/VACE-Annotators depth/ (= lllyasviel/Annotators)
DAV2_ENTRY = "depth-anything-v2"
DAV2_CONFIG = "config.json"
DAV2_WEIGHTS = "model.safetensors"

# Official constants.
# DepthAnnotator.forward: resize_image(img, 1024 if min(h, w) > 1024 else min(h, w))
MIDAS_MAX_SHORT_SIDE = 1024
MIDAS_MULTIPLE = 64  # utils.resize_image rounds each side to a multiple of 64
DAV2_INPUT_SIZE = 518  # infer_image(raw_image, input_size=518)
TINY_DAV2_INPUT_SIZE = 70  # the tiny model's stand-in only (see build_depthv2)
DAV2_MULTIPLE = 14  # Resize(ensure_multiple_of=14): the DINOv2 patch
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])  # float64, as the official NormalizeImage
IMAGENET_STD = np.array([0.229, 0.224, 0.225])

DEFAULT_BATCH_SIZE = 8  # frames per forward; ~0.5 GB of activations per 832x480 frame (fp32)

# controlnet-aux's ViT backbone hands its intermediate features to DPT through forward hooks that
# write into one module-level dict (`controlnet_aux.midas.midas.vit.activations`) shared by every
# DPT model in the process; forwards are serialised on this lock and the dict is emptied after
# each one (it would otherwise keep the last batch's features alive on the GPU).
_MIDAS_LOCK = threading.Lock()


# --- geometry (pure functions, tested against hand-computed sizes) ---------------------------


def midas_input_size(h: int, w: int) -> tuple[int, int, float]:
    """(height, width, k) the official `depth` annotator runs the model at for an h x w frame.

    VACE `DepthAnnotator.forward` calls `resize_image(img, resolution)` with
    `resolution = 1024 if min(h, w) > 1024 else min(h, w)`; `resize_image` scales by
    `k = resolution / min(h, w)` and rounds each side to a multiple of 64 with `np.round`
    (half to even: 480 -> 7.5 -> 8 -> 512, 416 -> 6.5 -> 6 -> 384). [deviation] A side that
    would round to 0 (under 32 px; the official code then crashes in cv2) is kept at 64.
    """
    resolution = float(min(min(h, w), MIDAS_MAX_SHORT_SIDE))
    k = resolution / min(float(h), float(w))
    nh = int(np.round(float(h) * k / MIDAS_MULTIPLE)) * MIDAS_MULTIPLE
    nw = int(np.round(float(w) * k / MIDAS_MULTIPLE)) * MIDAS_MULTIPLE
    return max(nh, MIDAS_MULTIPLE), max(nw, MIDAS_MULTIPLE), k


def midas_interpolation(k: float) -> int:
    """The cv2 flag of VACE's `resize_image` / `resize_image_ori` for scale `k`."""
    return cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA


def _multiple_of(x: float, multiple: int, min_val: int) -> int:
    # Depth-Anything-V2 util/transform.py Resize.constrain_to_multiple_of (no max_val).
    y = int(np.round(x / multiple) * multiple)
    if y < min_val:
        y = int(np.ceil(x / multiple) * multiple)
    return y


def dav2_input_size(h: int, w: int, size: int = DAV2_INPUT_SIZE, multiple: int = DAV2_MULTIPLE):
    """(height, width) Depth-Anything-V2's `infer_image` runs the model at for an h x w frame:
    `Resize(size, size, keep_aspect_ratio=True, ensure_multiple_of=14,
    resize_method="lower_bound")` -- one scale for both sides, the larger of size/h and size/w
    (both sides >= size), then each side rounded to a multiple of 14 (up when rounding would
    fall under `size`)."""
    scale_h = size / h
    scale_w = size / w
    scale = max(scale_h, scale_w)  # "lower_bound": fit the side that needs the larger scale
    return _multiple_of(scale * h, multiple, size), _multiple_of(scale * w, multiple, size)


def minmax_uint8(depth: torch.Tensor) -> torch.Tensor:
    """Per-frame min-max of (B, h, w) float depth to uint8 0..255, as the official annotators:
    `d -= d.min(); d /= d.max(); (d * 255).clip(0, 255).astype(uint8)` (truncation, not
    rounding). [deviation] A constant frame (official: 0/0 = NaN) gives 0."""
    d = depth.float()
    d = d - d.amin(dim=(1, 2), keepdim=True)
    top = d.amax(dim=(1, 2), keepdim=True)
    d = torch.where(top > 0, d / top, torch.zeros_like(d))
    return (d * 255.0).clamp_(0, 255).to(torch.uint8)  # float -> uint8 truncates, like numpy


# --- the preprocessors ------------------------------------------------------------------------


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"not a torch floating-point dtype: {name!r}")
    return dtype


def _check_frames(frames: np.ndarray) -> None:
    if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4
            and frames.shape[-1] == 3):  # fmt: skip
        raise ValueError(
            "frames must be a uint8 array of shape (F, H, W, 3), got "
            f"{getattr(frames, 'dtype', type(frames))} {getattr(frames, 'shape', '')}"
        )


class _BatchedDepth(ModelHolder, Preprocessor):
    """Shared frame loop: batches of `batch_size` frames through `_run` on `device`."""

    needs_mask = False

    def __init__(self, model: torch.nn.Module, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = DEFAULT_BATCH_SIZE,
                 tiny: bool = False):  # fmt: skip
        self.model = model.eval()
        self.device = str(device)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.tiny = tiny  # random weights (the tiny model): the output is a valid but meaningless map

    def __call__(self, frames, mask):
        _check_frames(frames)
        self.check_open()
        out = np.empty_like(frames)
        if len(frames) == 0:
            return out, mask
        device_type = torch.device(self.device).type
        # fp32 like the official annotators (`@torch.autocast('cuda', enabled=False)`); a lower
        # context dtype is the weights' own dtype, not autocast.
        with torch.inference_mode(), torch.autocast(device_type, enabled=False):
            for sl in batches(len(frames), self.batch_size):
                out[sl] = self._run(frames[sl])[..., None]
        return out, mask

    def _run(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) -> uint8 (B, H, W) depth."""
        raise NotImplementedError


class MidasDepthPreprocessor(_BatchedDepth):
    """`depth` (VACE DepthVideoAnnotator): MiDaS v3 DPT-Hybrid relative depth, 3-channel gray,
    near = bright. See the module docstring for the official steps it reproduces."""

    name = "depth"

    def _run(self, frames):
        _, h, w, _ = frames.shape
        nh, nw, k = midas_input_size(h, w)
        interp = midas_interpolation(k)
        # VACE utils.resize_image: cv2 on the uint8 frame (always called, also at the same size).
        x = np.stack([cv2.resize(np.ascontiguousarray(f), (nw, nh), interpolation=interp)
                      for f in frames])  # fmt: skip
        # `torch.from_numpy(img).float() / 127.5 - 1.0`, in fp32, then the weights' dtype.
        t = (to_tensor(x, self.device, torch.float32) / 127.5 - 1.0).to(self.dtype)
        from controlnet_aux.midas.midas import vit as _vit

        with _MIDAS_LOCK:
            try:
                depth = self.model(t)  # (B, nh, nw)
            finally:
                _vit.activations.clear()
        q = minmax_uint8(depth).cpu().numpy()
        if (nh, nw) == (h, w):
            return q  # resize_image_ori to the same size is a copy
        # VACE resize_image_ori: the uint8 map back to H x W with the same cv2 rule (per channel,
        # so resizing one channel and repeating it equals the official 3-channel resize).
        return np.stack([cv2.resize(d, (w, h), interpolation=interp) for d in q])


class DepthAnythingV2Preprocessor(_BatchedDepth):
    """`depthv2` (VACE DepthV2VideoAnnotator): Depth-Anything-V2 relative depth (disparity-like,
    near = bright), 3-channel gray. See the module docstring for the official steps.

    [compat] The official `image2tensor` applies `cv2.COLOR_BGR2RGB` (written for cv2.imread
    frames) to VACE's RGB frames, so the network sees R and B swapped; reproduced (`swap_rb`), as
    the `gray` task reproduces VACE's BGR2GRAY-on-RGB, because that is the control signal the
    official pipeline produces."""

    name = "depthv2"
    swap_rb = True
    input_size = DAV2_INPUT_SIZE

    def _run(self, frames):
        b, h, w, _ = frames.shape
        nh, nw = dav2_input_size(h, w, self.input_size)
        x = np.empty((b, 3, nh, nw), dtype=np.float32)
        for i, f in enumerate(frames):
            img = (f[..., ::-1] if self.swap_rb else f) / 255.0  # float64, as the official code
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_CUBIC)
            img = (img - IMAGENET_MEAN) / IMAGENET_STD
            x[i] = img.transpose(2, 0, 1)  # PrepareForNet: CHW float32
        t = torch.from_numpy(x).to(self.device).to(self.dtype)
        depth = self.model(pixel_values=t).predicted_depth.float()  # (B, nh, nw), ReLU'd
        depth = F.interpolate(depth[:, None], (h, w), mode="bilinear", align_corners=True)[:, 0]
        return minmax_uint8(depth).cpu().numpy()


# --- model builders -----------------------------------------------------------------------------


def _weights_folder(context: PreprocessorContext, entry: str, task: str) -> Path:
    if context.weights is None:
        raise FileNotFoundError(
            f"task {task!r}: no weights folder for {entry!r} (no weights resolver was given; "
            "only the random tiny model runs without weights). Fetch it with: "
            "python scripts/fetch_weights.py --with-preprocessors"
        )
    return Path(context.weights(entry))


def load_midas_model(path: Path) -> torch.nn.Module:
    """controlnet-aux's `DPTDepthModel` (the official DPT-Hybrid: `vitb_rn50_384`, i.e. timm's
    `vit_base_resnet50_384` R50+ViT-B/16, 123 M parameters) with the state dict of `path` loaded
    strictly, on the CPU in the file's dtype. The module is built on the meta device (no random
    init of 123 M parameters, no timm download: `pretrained=False`) and the tensors are assigned."""
    import warnings

    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    with torch.device("meta"), warnings.catch_warnings():
        # timm: "Mapping deprecated model name vit_base_resnet50_384 to vit_base_r50_s16_384"
        warnings.filterwarnings("ignore", message="Mapping deprecated model name")
        model = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "optimizer" in state:  # as MiDaS BaseModel.load
        state = state["model"]
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def tiny_midas_model(seed: int = 0) -> torch.nn.Module:
    """The tiny model's stand-in for DPT-Hybrid (random, seeded, ~0.33 M parameters).

    `DPTDepthModel` only builds full-size timm ViTs (B/16 or L/16), so this is the same class and
    forward (controlnet-aux's `DPT.forward` / `forward_vit` / `forward_flex`, the same readout
    projection, reassemble, fusion blocks and head) around a small timm R50+ViT-style hybrid
    backbone: a 3-stage ResNetV2 (channels 16/32/64, one bottleneck each, GroupNorm 4 groups,
    StdConv2dSame like the real one), patch-1 ViT with 48-d tokens, 4 blocks, 2 heads (features
    hooked at ResNet stages 0 and 1 and blocks 2 and 3, as the real one at stages 0, 1 and blocks
    8, 11), fusion width 32. Same strides (1/4, 1/8, 1/16, 1/32) and output size as the real one.
    """
    from controlnet_aux.midas.midas.blocks import Interpolate, _make_scratch
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel, _make_fusion_block
    from controlnet_aux.midas.midas.vit import _make_vit_b_rn50_backbone
    from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer

    class TinyDPTHybrid(DPTDepthModel):
        def __init__(self, features=32, channels=(16, 32, 64), embed_dim=48, depth=4, heads=2):
            torch.nn.Module.__init__(self)  # DPT.__init__ would build the full-size ViT-B
            self.channels_last = False
            backbone = ResNetV2(
                layers=(1, 1, 1), channels=channels, stem_chs=8, num_classes=0, global_pool="",
                preact=False, stem_type="same", conv_layer=partial(StdConv2dSame, eps=1e-8),
                norm_layer=partial(GroupNormAct, num_groups=4),
            )  # fmt: skip
            vit = VisionTransformer(
                img_size=64, patch_size=1, embed_dim=embed_dim, depth=depth, num_heads=heads,
                mlp_ratio=2.0, num_classes=0, embed_layer=partial(HybridEmbed, backbone=backbone),
            )  # fmt: skip
            widths = [channels[0], channels[1], embed_dim, embed_dim]
            self.pretrained = _make_vit_b_rn50_backbone(
                vit, features=widths, size=[64, 64], hooks=[0, 1, depth - 2, depth - 1],
                vit_features=embed_dim, use_readout="project",
            )  # fmt: skip
            self.scratch = _make_scratch(widths, features)
            for i in (1, 2, 3, 4):
                setattr(self.scratch, f"refinenet{i}", _make_fusion_block(features, False))
            # DPTDepthModel's head, at this width.
            self.scratch.output_conv = torch.nn.Sequential(
                torch.nn.Conv2d(features, features // 2, kernel_size=3, stride=1, padding=1),
                Interpolate(scale_factor=2, mode="bilinear", align_corners=True),
                torch.nn.Conv2d(features // 2, 16, kernel_size=3, stride=1, padding=1),
                torch.nn.ReLU(True),
                torch.nn.Conv2d(16, 1, kernel_size=1, stride=1, padding=0),
                torch.nn.ReLU(True),
                torch.nn.Identity(),
            )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyDPTHybrid()
        # A random head whose last bias is below zero often outputs an all-zero (ReLU) map; a
        # small positive bias keeps the tiny model's map non-constant.
        torch.nn.init.constant_(model.scratch.output_conv[4].bias, 0.1)
    return model.eval()


def load_depth_anything_model(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """transformers `DepthAnythingForDepthEstimation` from a local `*-hf` folder, strictly: a
    missing, unexpected or mis-shaped weight is an error, not a random init."""
    from transformers import DepthAnythingForDepthEstimation

    model, info = DepthAnythingForDepthEstimation.from_pretrained(
        str(folder), local_files_only=True, dtype=dtype, output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    if bad:
        raise RuntimeError(f"task 'depthv2': the weights in {folder} do not fit the model: {bad}")
    return model.eval()


def tiny_depth_anything_config():
    """The tiny model's Depth-Anything-V2: the same transformers class (DINOv2 backbone, DPT
    neck and relative-depth head) with a small config: 32-d tokens, 4 layers, 2 heads, neck
    8/16/32/32, fusion 16, head 8 (~0.18 M parameters; ~0.2 s per frame on one CPU thread at
    the official 518-px input, which a 112x64 frame is scaled up to)."""
    from transformers import DepthAnythingConfig, Dinov2Config

    backbone = Dinov2Config(
        image_size=DAV2_INPUT_SIZE, patch_size=DAV2_MULTIPLE, hidden_size=32, num_hidden_layers=4,
        num_attention_heads=2, intermediate_size=64,
        out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False,
    )  # fmt: skip
    return DepthAnythingConfig(
        backbone_config=backbone, patch_size=DAV2_MULTIPLE, reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
    )  # fmt: skip


def tiny_depth_anything_model(seed: int = 0) -> torch.nn.Module:
    from transformers import DepthAnythingForDepthEstimation

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DepthAnythingForDepthEstimation(tiny_depth_anything_config())
    return model.eval()


# --- factories (the registry's entries) ---------------------------------------------------------


def build_depth(context: PreprocessorContext) -> Preprocessor:
    """`depth`: MiDaS DPT-Hybrid from `<weights("midas-dpt-hybrid")>/dpt_hybrid-midas-501f0c75.pt`
    (with `context.tiny`: the random `tiny_midas_model`, no files)."""
    dtype = _torch_dtype(context.dtype)
    if context.tiny:
        model = tiny_midas_model()
    else:
        folder = _weights_folder(context, MIDAS_ENTRY, "depth")
        model = load_midas_model(weights_file(folder, MIDAS_FILE, "depth"))
    model.to(device=context.device, dtype=dtype)
    return MidasDepthPreprocessor(model, device=context.device, dtype=dtype, tiny=context.tiny)


def build_depthv2(context: PreprocessorContext) -> Preprocessor:
    """`depthv2`: Depth-Anything-V2 (transformers format) from `<weights("depth-anything-v2")>`
    (config.json + model.safetensors); with `context.tiny`: the random tiny config, no files."""
    dtype = _torch_dtype(context.dtype)
    if context.tiny:
        model = tiny_depth_anything_model()
    else:
        folder = _weights_folder(context, DAV2_ENTRY, "depthv2")
        weights_file(folder, DAV2_CONFIG, "depthv2")
        weights_file(folder, DAV2_WEIGHTS, "depthv2")  # checked before transformers sees the folder
        model = load_depth_anything_model(folder, dtype)
    model.to(device=context.device, dtype=dtype)
    pre = DepthAnythingV2Preprocessor(model, device=context.device, dtype=dtype,
                                      tiny=context.tiny)  # fmt: skip
    if context.tiny:
        # The stand-in runs at a 70-px input (a multiple of 14) instead of the official 518, so
        # an offline 81-frame job costs about a second instead of 16 s; the geometry code is
        # the same.
        pre.input_size = TINY_DAV2_INPUT_SIZE
    return pre
