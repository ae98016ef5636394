"""`scribble`: VACE's "anime_style" contour network on batches of frames.

Official behaviour followed (ali-vilab/VACE `vace/annotators/scribble.py`):
- `ScribbleAnnotator.__init__`: `ContourInference(input_nc=3, output_nc=1, n_residual_blocks=3,
  sigmoid=True)` (the informative-drawings generator), weights
  `scribble/anime_style/netG_A_latest.pth` loaded with `torch.load(..., weights_only=True)` and
  a strict `load_state_dict`; eval, fp32 (`torch.autocast('cuda', enabled=False)`).
- `ScribbleAnnotator.forward`: the RGB frame as float `/ 255` (`image.float().div(255)`), at its
  own size (no resize, no padding), `contour_map = model(image)`, then
  `(contour_map.squeeze(1) * 255.0).clip(0, 255)` converted with `.astype(np.uint8)`, i.e.
  TRUNCATED, not rounded, and repeated to 3 channels. Not inverted: the network's own picture
  (dark lines on a light ground).
- `ScribbleVideoAnnotator.forward`: one frame at a time; here frames go through in batches.

Carrier: `controlnet_aux.lineart.Generator(3, 1, 3)`, the same module with the same parameter
names as `ContourInference` (VACE's file loads into it unchanged, strict).

Sizes: the two stride-2 convolutions and two transposed convolutions give ceil(side / 4) * 4, so
a side that is not a multiple of 4 comes back larger (the official annotator returns that larger
picture); the extra rows and columns are at the bottom and right (the network is top-left
aligned), so the output is cropped to H x W.

Tiny model (`context.tiny`): the same Generator(3, 1, 3) with seeded random weights (4.29 M
parameters; fast enough at the tiny model's frame sizes).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from preprocessors.registry import Preprocessor, PreprocessorContext
from preprocessors.torchutil import ModelHolder

log = logging.getLogger("wan_vace.preprocessors.scribble")

WEIGHTS_ENTRY = "scribble"  # weights.toml; context.weights() gives its scribble/anime_style/
OFFICIAL_FILE = "netG_A_latest.pth"
# ScribbleAnnotator's defaults (INPUT_NC, OUTPUT_NC, N_RESIDUAL_BLOCKS; SIGMOID=True)
INPUT_NC, OUTPUT_NC, N_RESIDUAL_BLOCKS = 3, 1, 3
TINY_SEED = 20250102


def _generator():
    import warnings

    # Importing controlnet_aux imports all its detectors: timm deprecation notices and "mediapipe
    # is not installed", which say nothing about this network.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from controlnet_aux.lineart import Generator

    return Generator(INPUT_NC, OUTPUT_NC, N_RESIDUAL_BLOCKS, sigmoid=True)


def load_generator(path: Path):
    """The contour network with VACE's weights from `path`: weights_only load, strict."""
    import torch

    model = _generator()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.float().eval().requires_grad_(False)


def tiny_generator(seed: int = TINY_SEED):
    """The same network with seeded random weights, without touching the global RNG."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _generator()
    return model.float().eval().requires_grad_(False)


class ScribblePreprocessor(ModelHolder, Preprocessor):
    """`scribble` (VACE ScribbleVideoAnnotator), batched."""

    name = "scribble"
    needs_mask = False

    def __init__(self, model, device: str = "cpu", *, batch_size: int = 8, info: str = ""):
        self.model = model
        self.device = str(device)
        self.batch_size = max(1, int(batch_size))
        self.info = info
        model.to(self.device)

    def __call__(self, frames, mask):
        import torch

        from preprocessors.torchutil import batches, to_tensor

        self.check_call(frames)
        n, h, w, _ = frames.shape
        out = np.empty((n, h, w, 3), dtype=np.uint8)
        with torch.inference_mode():
            for sl in batches(n, self.batch_size):
                x = to_tensor(frames[sl], self.device, torch.float32).div(255)
                y = self.model(x)[:, 0, :h, :w]  # (B, H, W); crop a side that is not a multiple of 4
                # `.clip(0, 255)` then uint8: truncation toward zero, as numpy's astype
                y = (y * 255.0).clamp(0, 255).to(torch.uint8)
                out[sl] = y.unsqueeze(-1).expand(-1, -1, -1, 3).cpu().numpy()
        return out, mask


def build_scribble(context: PreprocessorContext) -> ScribblePreprocessor:
    """The `scribble` preprocessor for `context`: VACE's `netG_A_latest.pth` from
    `context.weights("scribble")`; the tiny model gets seeded random weights and needs no file."""
    device = context.device
    batch = 8 if str(device).startswith("cuda") else 2
    if context.tiny:
        return ScribblePreprocessor(
            tiny_generator(), device, batch_size=batch, info="random contour network (tiny)"
        )
    if context.weights is None:
        raise FileNotFoundError(
            f"task 'scribble': no weights folder is configured for the {WEIGHTS_ENTRY!r} entry "
            f"(file {OFFICIAL_FILE}); fetch it with: python scripts/fetch_weights.py "
            "--with-preprocessors"
        )
    from preprocessors.torchutil import weights_file

    folder = Path(context.weights(WEIGHTS_ENTRY))
    path = weights_file(folder, OFFICIAL_FILE, "scribble")
    model = load_generator(path)
    log.info("scribble: contour network from %s", path)
    return ScribblePreprocessor(model, device, batch_size=batch, info=f"anime_style {path.name}")


__all__ = ["ScribblePreprocessor", "build_scribble", "load_generator", "tiny_generator"]
