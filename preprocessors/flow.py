"""`flow`: RAFT optical flow between consecutive frames, drawn on the Middlebury colour wheel.

Official behaviour followed (ali-vilab/VACE `vace/annotators/flow.py`):
- `FlowAnnotator.__init__`: `RAFT(small=False, mixed_precision=False, alternate_corr=False)`
  (the princeton-vl RAFT code, packaged as `raft`), weights `flow/raft-things.pth` loaded with
  the `module.` prefix stripped; fp32 (no autocast).
- `FlowAnnotator.forward`: frames as float 0..255 RGB; for each consecutive pair
  `InputPadder(image1.shape).pad(image1, image2)` (replicate padding to a multiple of 8, split
  evenly, "sintel" mode), `model(image1, image2, iters=20, test_mode=True)`, the full-resolution
  flow `flow_up` of the first (only) pair visualised with `flow_viz.flow_to_image` (per-frame
  max-radius normalisation, Baker/Middlebury colour wheel). RAFT normalises its input inside
  `RAFT.forward` as `2 * (image / 255.0) - 1.0`.
- `FlowVisAnnotator.forward`: `vis[:1] + vis`, i.e. the first visualised frame duplicated, so F
  frames give F outputs.

Carrier here: torchvision's `raft_large` (the same network; torchvision's `Raft_Large_Weights.C_T_V1`
is its port of the same Chairs+Things checkpoint), with
- `raft-things.pth` (original RAFT parameter names, `module.` prefix) mapped onto torchvision's
  names by an exact, complete table (`original_to_torchvision`) and loaded with `strict=True`;
  a torchvision-format state dict `raft_large_C_T_V1-*.pth` in the same folder is accepted too;
- the inputs normalised exactly as the original `RAFT.forward` does (`2 * (x / 255.0) - 1.0`,
  which is also torchvision's expected [-1, 1] range), so the network sees the same numbers;
- `num_flow_updates=20` (= `iters=20`) and the last prediction (= `flow_up` in test mode);
- consecutive pairs BATCHED (VACE loops one pair at a time);
- `torchvision.utils.flow_to_image` for the colours: the same wheel and formula as RAFT's
  `flow_viz.flow_to_image`, called per frame (it normalises by the max over its whole input, so
  a batch must not be passed at once). [compat] Its epsilon is float32 eps instead of
  flow_viz's 1e-5 and it computes in float32 instead of float64: 1 level on rare pixels
  (measured: 1.2e-5 of the channel values of random 832x480 flows, never more than 1).

Sizes: the official code visualises the PADDED flow and returns it padded (it never calls
`unpad`); here the padded flow is visualised (the same max-radius normalisation) and the image
cropped back to H x W, so frames whose sides are multiples of 8 (e.g. 832x480) match exactly.
RAFT needs at least 128 px per side after padding (its correlation pyramid pools the 1/8 feature
map 3 times; the original code would produce NaNs below that, torchvision raises). A side whose
padded size is below 128 (e.g. 112x64 -> both) is first stretched to 128 (bilinear); the flow is
then cropped, resized back to H x W and each component scaled by the axis' size ratio, and
visualised at H x W. Only small frames take this path (no official equivalent: VACE's annotator
fails on them).

One frame (no pair): one white frame (the wheel's colour for zero motion). No frames: no frames.
The mask is passed through unchanged.

Tiny model (`context.tiny`): random weights, seeded, in torchvision's own RAFT classes (`RAFT`,
`FeatureEncoder`, `ResidualBlock`, `CorrBlock`, `UpdateBlock`, `MaskPredictor`) built at a quarter
of raft_large's widths, with 2 flow updates. Not raft_large itself: its two encoders cost ~93% of
a forward at 128x128 whatever the number of updates, ~10.6 s for an 81-frame job on one core even
with 1 update; the narrow one takes ~2 s (measured on this project's 2-core CPU, one thread).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from preprocessors.registry import Preprocessor, PreprocessorContext
from preprocessors.torchutil import ModelHolder

log = logging.getLogger("wan_vace.preprocessors.flow")

WEIGHTS_ENTRY = "raft"  # the weights.toml entry; context.weights() gives its `flow/` folder
OFFICIAL_FILE = "raft-things.pth"  # VACE-Annotators flow/raft-things.pth, original RAFT names
TORCHVISION_GLOB = "raft_large_C_T_V1-*.pth"  # torchvision's port of the same checkpoint

NUM_FLOW_UPDATES = 20  # FlowAnnotator.forward: iters=20
PAD_MULTIPLE = 8  # InputPadder
MIN_SIDE = 128  # raft_large's documented min_size: 8 * 2 * 2**(corr levels - 1)
TINY_NUM_FLOW_UPDATES = 2
TINY_SEED = 20250101

# ---------------------------------------------------------------------------------------------
# The key mapping: princeton-vl RAFT (core/raft.py, extractor.py, update.py; RAFT(small=False))
# -> torchvision.models.optical_flow.raft_large. Built as a table of MODULE paths (the parameter
# or buffer leaf, e.g. `weight`, `running_mean`, passes through), so it is exact and invertible.
#
#   RAFT.fnet / RAFT.cnet (BasicEncoder, instance / batch norm)  -> feature_encoder / context_encoder
#     conv1, norm1                                               -> convnormrelu.0, convnormrelu.1
#     layerL.B.conv{1,2}, layerL.B.norm{1,2} (ResidualBlock)     -> layerL.B.convnormrelu{1,2}.{0,1}
#     layerL.0.downsample.{0,1} (stride 2, layers 2 and 3)       -> layerL.0.downsample.{0,1}
#     layerL.0.norm3 = the same module as downsample.1 (so its tensors appear twice in the
#       original state dict, for batch norm only; instance norm has none): an alias, dropped
#     conv2                                                      -> conv
#   update_block (BasicUpdateBlock)
#     encoder.convc1, convc2, convf1, convf2, conv               -> motion_encoder.convcorr1.0,
#                                                                   convcorr2.0, convflow1.0,
#                                                                   convflow2.0, conv.0
#     gru.conv{z,r,q}{1,2} (SepConvGRU, (1,5) then (5,1))        -> recurrent_block.convgru{1,2}.conv{z,r,q}
#     flow_head.conv{1,2}                                        -> flow_head.conv{1,2}
#     mask.0, mask.2 (the 0.25 factor is in the forward)         -> mask_predictor.convrelu.0,
#                                                                   mask_predictor.conv (multiplier 0.25)
# Every raft_large parameter and buffer is covered (5,257,536 parameters; checked by a strict load
# in the tests). Missing `num_batches_tracked` buffers (older checkpoints) are filled in by
# BatchNorm's own loader, as for any pre-1.0 state dict.


def _module_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for orig, tv in (("fnet", "feature_encoder"), ("cnet", "context_encoder")):
        table[f"{orig}.conv1"] = f"{tv}.convnormrelu.0"
        table[f"{orig}.norm1"] = f"{tv}.convnormrelu.1"
        table[f"{orig}.conv2"] = f"{tv}.conv"
        for layer in (1, 2, 3):
            for block in (0, 1):
                ob, tb = f"{orig}.layer{layer}.{block}", f"{tv}.layer{layer}.{block}"
                for i in (1, 2):
                    table[f"{ob}.conv{i}"] = f"{tb}.convnormrelu{i}.0"
                    table[f"{ob}.norm{i}"] = f"{tb}.convnormrelu{i}.1"
                if layer > 1 and block == 0:  # the stride-2 block projects its shortcut
                    table[f"{ob}.downsample.0"] = f"{tb}.downsample.0"
                    table[f"{ob}.downsample.1"] = f"{tb}.downsample.1"
    enc, me = "update_block.encoder", "update_block.motion_encoder"
    for orig, tv in (
        ("convc1", "convcorr1.0"),
        ("convc2", "convcorr2.0"),
        ("convf1", "convflow1.0"),
        ("convf2", "convflow2.0"),
        ("conv", "conv.0"),
    ):
        table[f"{enc}.{orig}"] = f"{me}.{tv}"
    for gate in "zrq":
        for i in (1, 2):
            table[f"update_block.gru.conv{gate}{i}"] = f"update_block.recurrent_block.convgru{i}.conv{gate}"
    for i in (1, 2):
        table[f"update_block.flow_head.conv{i}"] = f"update_block.flow_head.conv{i}"
    table["update_block.mask.0"] = "mask_predictor.convrelu.0"
    table["update_block.mask.2"] = "mask_predictor.conv"
    return table


_TABLE = _module_table()
_INVERSE = {tv: orig for orig, tv in _TABLE.items()}
# layerL.0.norm3 is registered twice in the original ResidualBlock (as itself and as
# downsample[1]): alias -> the module it is.
_ALIASES = {
    f"{enc}.layer{layer}.0.norm3": f"{enc}.layer{layer}.0.downsample.1"
    for enc in ("fnet", "cnet")
    for layer in (2, 3)
}
_DDP_PREFIX = "module."


def is_torchvision_state_dict(state: dict) -> bool:
    return any(k.startswith(("feature_encoder.", "context_encoder.")) for k in state)


def original_to_torchvision(state: dict) -> dict:
    """princeton-vl RAFT state dict (optionally with DataParallel's `module.` prefix, as in
    VACE's `raft-things.pth`) -> torchvision raft_large names. Raises ValueError naming any key
    the table does not know, or an alias whose tensor differs from the module it aliases."""
    out: dict = {}
    aliased: dict[str, tuple[str, object]] = {}
    unknown: list[str] = []
    for key, value in state.items():
        k = key.removeprefix(_DDP_PREFIX)
        prefix, _, leaf = k.rpartition(".")
        if prefix in _ALIASES:
            aliased[f"{_ALIASES[prefix]}.{leaf}"] = (key, value)
        elif prefix in _TABLE:
            out[f"{_TABLE[prefix]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"not a RAFT-large (princeton-vl) state dict: {len(unknown)} unknown keys, "
            f"e.g. {', '.join(sorted(unknown)[:5])}"
        )
    import torch

    for orig_key, (alias_key, value) in aliased.items():
        prefix, _, leaf = orig_key.rpartition(".")
        target = f"{_TABLE[prefix]}.{leaf}"
        if target in out:
            if not torch.equal(out[target], value):
                raise ValueError(f"{alias_key} differs from {orig_key}, which it should alias")
        else:
            out[target] = value
    return out


def torchvision_to_original(state: dict, *, ddp_prefix: bool = True) -> dict:
    """The inverse: torchvision raft_large names -> the original RAFT layout as its
    `state_dict()` writes it (including the `norm3` alias of each batch-norm shortcut and,
    by default, DataParallel's `module.` prefix, as in `raft-things.pth`)."""
    pre = _DDP_PREFIX if ddp_prefix else ""
    out: dict = {}
    alias_of = {target: alias for alias, target in _ALIASES.items()}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in _INVERSE:
            raise ValueError(f"not a torchvision raft_large key: {key}")
        orig = _INVERSE[prefix]
        out[f"{pre}{orig}.{leaf}"] = value
        if orig in alias_of:
            out[f"{pre}{alias_of[orig]}.{leaf}"] = value
    return out


# ---------------------------------------------------------------------------------------------


def _find_weights(folder: Path) -> Path:
    """`raft-things.pth` in `folder`, else the one torchvision `raft_large_C_T_V1-*.pth`."""
    from preprocessors.torchutil import weights_file

    folder = Path(folder)
    official = folder / OFFICIAL_FILE
    if official.is_file():
        return official
    alternatives = sorted(p for p in folder.glob(TORCHVISION_GLOB) if p.is_file())
    if len(alternatives) == 1:
        return alternatives[0]
    if len(alternatives) > 1:
        raise FileNotFoundError(
            f"task 'flow': {len(alternatives)} torchvision RAFT files in {folder} "
            f"({', '.join(p.name for p in alternatives)}) and no {OFFICIAL_FILE}: keep one"
        )
    try:
        return weights_file(folder, OFFICIAL_FILE, "flow")
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e}; a torchvision {TORCHVISION_GLOB} state dict in that folder is accepted too"
        ) from None


def load_raft_large(path: Path):
    """torchvision raft_large with the weights of `path` (original or torchvision names), fp32,
    eval mode, on the CPU; strict load."""
    import torch
    from torchvision.models.optical_flow import raft_large

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"{path}: not a state dict")
    if not is_torchvision_state_dict(state):
        state = original_to_torchvision(state)
    model = raft_large(weights=None, progress=False)
    model.load_state_dict(state, strict=True)
    return model.float().eval().requires_grad_(False)


def tiny_raft(seed: int = TINY_SEED):
    """A random RAFT in torchvision's own classes, a quarter of raft_large's widths (the same
    layout and forward; 0.38 M parameters instead of 5.26 M). Seeded, without touching the
    global RNG."""
    import torch
    from torch import nn
    from torchvision.models.optical_flow import raft as R

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = (16, 16, 24, 32, 64)  # raft_large: (64, 64, 96, 128, 256)
        hidden = 32  # raft_large: 128 (and 128 context channels)
        feature = R.FeatureEncoder(block=R.ResidualBlock, layers=layers, norm_layer=nn.InstanceNorm2d)
        context = R.FeatureEncoder(block=R.ResidualBlock, layers=layers, norm_layer=nn.BatchNorm2d)
        corr = R.CorrBlock(num_levels=4, radius=4)
        motion = R.MotionEncoder(
            in_channels_corr=corr.out_channels,
            corr_layers=(64, 48),
            flow_layers=(32, 16),
            out_channels=32,
        )
        recurrent = R.RecurrentBlock(input_size=motion.out_channels + layers[-1] - hidden, hidden_size=hidden)
        update = R.UpdateBlock(
            motion_encoder=motion,
            recurrent_block=recurrent,
            flow_head=R.FlowHead(in_channels=hidden, hidden_size=64),
        )
        mask = R.MaskPredictor(in_channels=hidden, hidden_size=64, multiplier=0.25)
        model = R.RAFT(
            feature_encoder=feature,
            context_encoder=context,
            corr_block=corr,
            update_block=update,
            mask_predictor=mask,
        )
    return model.float().eval().requires_grad_(False)


def _pad_amounts(size: int) -> tuple[int, int]:
    """InputPadder ('sintel' mode): the padding split evenly, the odd pixel at the end."""
    pad = (((size // PAD_MULTIPLE) + 1) * PAD_MULTIPLE - size) % PAD_MULTIPLE
    return pad // 2, pad - pad // 2


def _model_side(size: int) -> int:
    """The side RAFT is run at: the frame's, or MIN_SIDE where the padded side would be smaller."""
    padded = size + sum(_pad_amounts(size))
    return MIN_SIDE if padded < MIN_SIDE else size


class FlowPreprocessor(ModelHolder, Preprocessor):
    """`flow` (VACE FlowVisAnnotator) on batches of consecutive frame pairs.

    `model(image1, image2, num_flow_updates=n)` must return a list of (B, 2, H, W) flows, as
    torchvision's RAFT does (the last one is used), for inputs in [-1, 1] whose sides are
    multiples of 8 and at least 128."""

    name = "flow"
    needs_mask = False

    def __init__(
        self,
        model: Callable,
        device: str = "cpu",
        *,
        num_flow_updates: int = NUM_FLOW_UPDATES,
        batch_size: int = 8,
        info: str = "",
    ):
        self.model = model
        self.device = str(device)
        self.num_flow_updates = int(num_flow_updates)
        self.batch_size = max(1, int(batch_size))
        self.info = info
        if hasattr(model, "to"):
            model.to(self.device)

    def __call__(self, frames, mask):
        import torch

        from preprocessors.torchutil import batches

        self.check_call(frames)
        n, h, w, _ = frames.shape
        out = np.empty((n, h, w, 3), dtype=np.uint8)
        if n == 0:
            return out, mask
        if n == 1:
            out[:] = 255  # zero motion is white on the wheel
            return out, mask
        with torch.inference_mode():
            for sl in batches(n - 1, self.batch_size):
                # frames sl.start .. sl.stop: B pairs from B + 1 frames, each frame moved once
                vis = self._pairs(frames[sl.start : sl.stop + 1])
                out[sl.start + 1 : sl.stop + 1] = vis
        out[0] = out[1]  # FlowVisAnnotator: vis[:1] + vis
        return out, mask

    def _pairs(self, clip: np.ndarray) -> np.ndarray:
        """B + 1 frames (uint8) -> B flow pictures (uint8, H x W) of pairs (i, i + 1)."""
        import torch
        import torch.nn.functional as F
        from torchvision.utils import flow_to_image

        from preprocessors.torchutil import to_tensor

        _, h, w, _ = clip.shape
        x = to_tensor(clip, self.device, torch.float32)  # 0..255, as FlowAnnotator.forward
        mh, mw = _model_side(h), _model_side(w)
        stretched = (mh, mw) != (h, w)
        if stretched:
            x = F.interpolate(x, size=(mh, mw), mode="bilinear", align_corners=False)
        (top, bottom), (left, right) = _pad_amounts(mh), _pad_amounts(mw)
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom], mode="replicate")  # InputPadder.pad
        x = 2 * (x / 255.0) - 1.0  # RAFT.forward's own normalisation, bit for bit
        flow = self.model(x[:-1], x[1:], num_flow_updates=self.num_flow_updates)[-1]
        flow = flow.float()
        if stretched:
            flow = flow[:, :, top : top + mh, left : left + mw]
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
            flow = flow * torch.tensor([w / mw, h / mh], device=flow.device).view(1, 2, 1, 1)
            top = left = 0
        # One frame at a time: flow_to_image normalises by the max over its whole input.
        vis = torch.stack([flow_to_image(f) for f in flow])
        vis = vis[:, :, top : top + h, left : left + w]
        return vis.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def build_flow(context: PreprocessorContext) -> FlowPreprocessor:
    """The `flow` preprocessor for `context`: raft_large with `raft-things.pth` (or torchvision's
    C_T_V1 file) from `context.weights("raft")`; the tiny model gets a seeded random narrow RAFT
    and needs no files."""
    device = context.device
    batch = 8 if str(device).startswith("cuda") else 2
    if context.tiny:
        return FlowPreprocessor(
            tiny_raft(),
            device,
            num_flow_updates=TINY_NUM_FLOW_UPDATES,
            batch_size=16,
            info="random tiny RAFT (torchvision classes, 1/4 width), 2 updates",
        )
    if context.weights is None:
        raise FileNotFoundError(
            f"task 'flow': no weights folder is configured for the {WEIGHTS_ENTRY!r} entry "
            f"(file {OFFICIAL_FILE}); fetch it with: python scripts/fetch_weights.py "
            "--with-preprocessors"
        )
    folder = Path(context.weights(WEIGHTS_ENTRY))
    path = _find_weights(folder)
    model = load_raft_large(path)
    log.info("flow: raft_large from %s", path)
    return FlowPreprocessor(model, device, batch_size=batch, info=f"raft_large {path.name}")


__all__ = [
    "FlowPreprocessor",
    "build_flow",
    "load_raft_large",
    "original_to_torchvision",
    "tiny_raft",
    "torchvision_to_original",
]
