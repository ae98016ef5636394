"""Reading an MP4 back with PyAV, as a client's player would."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np


@dataclass
class Probe:
    frames: int
    fps: Fraction
    width: int
    height: int
    codec: str
    first: np.ndarray
    last: np.ndarray


def probe_mp4(data_or_path) -> Probe:
    import io

    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with av.open(src) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        return Probe(
            frames=len(frames),
            fps=s.average_rate,
            width=s.codec_context.width,
            height=s.codec_context.height,
            codec=s.codec_context.name,
            first=frames[0],
            last=frames[-1],
        )
