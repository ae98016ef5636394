"""Helpers the model-backed preprocessors share (torch is imported here, so only those import
this module, inside their factories)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


def batches(n: int, size: int) -> Iterator[slice]:
    """Slices of `range(n)` of at most `size` items (frames go through a model in batches)."""
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def to_tensor(frames: np.ndarray, device: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in 0..255 on `device`."""
    return torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).to(dtype)


def to_frames(images: torch.Tensor) -> np.ndarray:
    """float (B, C, H, W) in 0..255 (C = 1 or 3) -> uint8 (B, H, W, 3), rounded and clipped;
    one channel is repeated to three (VACE's control videos are 3-channel)."""
    x = images.detach().float().clamp(0, 255).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def weights_file(folder: Path, name: str, task: str) -> Path:
    """`folder/name`, which must exist: checked before any library is handed the path (some
    fall back to a download when a file is missing; nothing here may download)."""
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"task {task!r}: weights file {name} is missing in {folder} "
            f"(fetch it with: python scripts/fetch_weights.py --with-preprocessors)"
        )
    return path


def free(device: str) -> None:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelHolder:
    """The `to`/`close` part of a preprocessor that wraps one torch module (`self.model` on
    `self.device`): moving it is how the runner's memory policy parks it, closing drops it."""

    model: torch.nn.Module | None
    device: str

    def to(self, device: str) -> None:
        if self.model is not None and hasattr(self.model, "to"):
            self.model.to(device)
        self.device = str(device)

    def close(self) -> None:
        self.model = None
        free(self.device)

    def check_open(self) -> None:
        if self.model is None:
            raise RuntimeError(f"the {getattr(self, 'name', '')} preprocessor was closed")

    def check_call(self, frames) -> None:
        """What every call checks first: the model is still there, the frames are (F, H, W, 3)."""
        self.check_open()
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (F, H, W, 3), got {frames.shape}")
