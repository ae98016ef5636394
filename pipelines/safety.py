"""The NSFW safety checker run on each output video (`enable_safety_checker`, reported as
`has_nsfw_contents` through `RunResult.has_nsfw` / `safety_checked`).

Backend: diffusers' `StableDiffusionSafetyChecker` (CLIP ViT-L/14 vision tower + 17 concept and
3 special-care embeddings with per-concept thresholds) with its `CLIPImageProcessor`, loaded from
a local folder in the `CompVis/stable-diffusion-safety-checker` layout (weights.toml entry
`safety-checker`; nothing downloads). What it is known for: sexual-content focused, easy to evade;
it is a filter, not a guarantee.

How a video is checked:
- `sample_indices(F, k)`: k evenly spaced frames, the first and the last included (all frames
  when F <= k).
- Each sampled frame is cut into square tiles that cover it whole (`square_tiles`: a 832x480
  frame -> two 480x480 tiles at x 0 and 352; a square frame -> itself). The processor resizes the
  short side to 224 and centre-crops 224, so a wide frame given whole would lose its sides (42%
  of an 832x480 frame) — what diffusers does for its square images; tiles keep every pixel at the
  scale the checker expects. `cover="center"` gives diffusers' behaviour instead.
- All tiles go through the processor and the model in batches on the checker's device; the video
  is flagged when any tile of any sampled frame is.
- The model is called for its flags only: diffusers also blackens flagged images in the array it
  is given; a throw-away array takes that, and the output video is never touched here (what to do
  with a flagged video is the caller's policy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

DEFAULT_SAMPLES = 8
WEIGHTS_ENTRY = "safety-checker"  # weights.toml
HUB_REPO = "CompVis/stable-diffusion-safety-checker"
# What the folder must hold: both configs and one of the weight files.
CONFIG_FILES = ("config.json", "preprocessor_config.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@runtime_checkable
class SafetyChecker(Protocol):
    def check(self, frames: np.ndarray) -> bool:
        """True when the video (uint8 (F, H, W, 3) RGB) is flagged."""
        ...


def sample_indices(num_frames: int, k: int = DEFAULT_SAMPLES) -> list[int]:
    """`k` evenly spaced frame indices of `num_frames`, first and last included, ascending and
    distinct; every index when num_frames <= k."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if k < 2:
        raise ValueError(f"k must be >= 2 (the first and the last frame), got {k}")
    if num_frames <= k:
        return list(range(num_frames))
    # With num_frames > k the spacing (F-1)/(k-1) exceeds 1, so rounding keeps them distinct.
    return [round(i * (num_frames - 1) / (k - 1)) for i in range(k)]


def square_tiles(frame: np.ndarray) -> list[np.ndarray]:
    """Square views (side = the short side) that together cover the frame, evenly spaced along
    the long side, first and last flush with its ends. A square frame is one tile."""
    h, w = frame.shape[:2]
    side = min(h, w)
    long = max(h, w)
    n = math.ceil(long / side)
    if n == 1:
        return [frame]
    starts = [round(i * (long - side) / (n - 1)) for i in range(n)]
    if w >= h:
        return [frame[:, s : s + side] for s in starts]
    return [frame[s : s + side, :] for s in starts]


def _check_frames(frames: np.ndarray) -> None:
    if (
        not isinstance(frames, np.ndarray)
        or frames.dtype != np.uint8
        or frames.ndim != 4
        or frames.shape[-1] != 3
        or 0 in frames.shape
    ):
        raise ValueError(
            "the safety checker takes uint8 frames of shape (F, H, W, 3), got "
            f"{getattr(frames, 'dtype', type(frames))} {getattr(frames, 'shape', '')}"
        )


class ClipSafetyChecker:
    """diffusers `StableDiffusionSafetyChecker` + `CLIPImageProcessor` on sampled frames."""

    def __init__(
        self,
        model,
        processor,
        *,
        device: str = "cpu",
        samples: int = DEFAULT_SAMPLES,
        cover: str = "tiles",
        batch_size: int = 16,
        info: str = "",
    ):
        if cover not in ("tiles", "center"):
            raise ValueError(f"cover must be 'tiles' or 'center', got {cover!r}")
        self.model = model.eval()
        self.processor = processor
        self.device = str(device)
        self.samples = int(samples)
        self.cover = cover
        self.batch_size = max(1, int(batch_size))
        self.info = info or "diffusers StableDiffusionSafetyChecker"
        self.model.to(self.device)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _images(self, frames: np.ndarray, indices: Sequence[int]) -> tuple[list, list[int]]:
        """The images the model sees and, for each, the sampled frame it came from."""
        images, owner = [], []
        for i in indices:
            tiles = square_tiles(frames[i]) if self.cover == "tiles" else [frames[i]]
            images += [np.ascontiguousarray(t) for t in tiles]
            owner += [i] * len(tiles)
        return images, owner

    @torch.inference_mode()
    def frame_flags(self, frames: np.ndarray, indices: Sequence[int] | None = None) -> dict[int, bool]:
        """{frame index: flagged} for the sampled frames (`indices`, default `sample_indices`)."""
        _check_frames(frames)
        if indices is None:
            indices = sample_indices(frames.shape[0], self.samples)
        images, owner = self._images(frames, indices)
        flags = {int(i): False for i in indices}
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            pixels = self.processor(images=batch, return_tensors="pt").pixel_values
            pixels = pixels.to(self.device, self.dtype)
            # `images` is blackened in place for flagged items: a throw-away array takes that.
            _, has_nsfw = self.model(clip_input=pixels, images=np.zeros((len(batch), 1, 1, 1)))
            for j, flagged in enumerate(has_nsfw):
                if bool(flagged):
                    flags[owner[start + j]] = True
        return flags

    def check(self, frames: np.ndarray) -> bool:
        return any(self.frame_flags(frames).values())

    def to(self, device: str) -> None:
        self.device = str(device)
        self.model.to(self.device)

    def close(self) -> None:
        self.model = None
        self.processor = None
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()


def missing_files(folder: str | Path) -> list[str]:
    """What `folder` lacks for `load_safety_checker` ([] = loadable)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"the folder {folder}"]
    missing = [name for name in CONFIG_FILES if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    return missing


def load_safety_checker(
    folder: str | Path,
    device: str = "cpu",
    *,
    dtype: torch.dtype | str | None = None,
    samples: int = DEFAULT_SAMPLES,
    cover: str = "tiles",
) -> ClipSafetyChecker:
    """The real checker from a local folder in the `CompVis/stable-diffusion-safety-checker`
    layout (config.json, preprocessor_config.json, model.safetensors or pytorch_model.bin),
    offline. `dtype` defaults to float16 on CUDA (as diffusers' pipelines run it) and float32
    elsewhere. FileNotFoundError naming the folder and the missing files otherwise."""
    folder = Path(folder)
    missing = missing_files(folder)
    if missing:
        raise FileNotFoundError(
            f"safety checker: {folder} is not a {HUB_REPO} folder: missing "
            + ", ".join(missing)
            + " (fetch it with: python scripts/fetch_weights.py --with-preprocessors)"
        )
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = StableDiffusionSafetyChecker.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    return ClipSafetyChecker(
        model,
        processor,
        device=device,
        samples=samples,
        cover=cover,
        info=f"diffusers StableDiffusionSafetyChecker ({folder.name})",
    )


def build_tiny_safety_checker(
    flag: bool | None = None, *, device: str = "cpu", seed: int = 0, **kwargs
) -> ClipSafetyChecker:
    """A tiny random checker (CLIP vision hidden 32, 2 layers, patch 32, projection 32; ~115 k
    parameters) with the default `CLIPImageProcessor`, for the tiny model and the tests.

    `flag=True`: every concept threshold is set to -2, below any cosine similarity (>= -1), so
    every image is flagged; `flag=False`: every threshold (concept and special care) is 10,
    above any cosine similarity (<= 1), so none is. Both are independent of the input and the
    random weights. `flag=None`: the thresholds as built (diffusers initialises embeddings and
    thresholds to 1, which a cosine practically never exceeds)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tiny = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config=dict(
            tiny, vocab_size=99, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1
        ),
        vision_config=dict(tiny, patch_size=32, image_size=224, projection_dim=32),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        if flag is True:
            model.concept_embeds_weights.fill_(-2.0)
        elif flag is False:
            model.concept_embeds_weights.fill_(10.0)
            model.special_care_embeds_weights.fill_(10.0)
    info = "tiny random safety checker" + ("" if flag is None else f" (forced {flag})")
    return ClipSafetyChecker(model, CLIPImageProcessor(), device=device, info=info, **kwargs)
