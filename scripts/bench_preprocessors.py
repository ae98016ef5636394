"""Frames per second of each `task` preprocessor, batched against frame by frame, in one run.

    python scripts/bench_preprocessors.py --tiny                      # random stand-ins, any CPU
    python scripts/bench_preprocessors.py --weights-dir /models --device cuda   # fetched weights

Each task runs on the same clip (832x480 by default) twice after a warm-up: once with its
default batch size, once with batch size 1, so the ratio is measured in the same process on the
same device. `--tiny` uses the random-weight models `--model tiny` serves (small stand-ins where
a model has a fixed size): it times the code around the models, not the real networks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessors.registry import PreprocessorContext, PreprocessorSet  # noqa: E402

TASKS = ["gray", "depth", "depthv2", "pose", "pose_body", "flow", "scribble"]


def clip(frames: int, width: int, height: int) -> np.ndarray:
    """A moving test pattern (gradients and a bright box), deterministic."""
    t = np.arange(frames)[:, None, None]
    y, x = np.mgrid[0:height, 0:width]
    r = (x[None] + 3 * t) % 256
    g = (y[None] + 5 * t) % 256
    b = ((x[None] + y[None]) // 2) % 256
    out = np.stack(np.broadcast_arrays(r, g, b), -1).astype(np.uint8)
    for i in range(frames):
        x0 = 40 + 6 * i
        out[i, height // 3 : height // 3 + 80, x0 : x0 + 60] = 250
    return out


def timed(pre, frames: np.ndarray) -> float:
    start = time.perf_counter()
    pre(frames, None)
    sync(pre)
    return time.perf_counter() - start


def sync(pre) -> None:
    try:
        import torch

        if str(getattr(pre, "device", "cpu")).startswith("cuda"):
            torch.cuda.synchronize()
    except ImportError:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="random-weight stand-ins (no weights)")
    ap.add_argument("--weights-dir", type=Path, help="weights root with fetched preprocessors")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", default="832*480")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not args.tiny and args.weights_dir is None:
        ap.error("give --tiny or --weights-dir")
    width, height = (int(v) for v in args.size.split("*"))
    resolve = None
    if args.weights_dir is not None:
        from pipelines.weights import weights_resolver

        resolve = weights_resolver(args.weights_dir)
    ctx = PreprocessorContext(device=args.device, weights=resolve, tiny=args.tiny)
    pres = PreprocessorSet(ctx)
    frames = clip(args.frames, width, height)
    rows = []
    print(f"{args.frames} frames at {width}x{height} on {args.device}"
          f" ({'tiny stand-ins' if args.tiny else 'fetched weights'})")  # fmt: skip
    print(f"{'task':>10} {'batch':>6} {'fps batched':>12} {'fps 1 by 1':>11} {'ratio':>6}")
    for task in args.tasks.split(","):
        pre = pres.get(task)
        pre(frames[:2], None)  # warm-up: lazy initialisation, kernels, allocator
        default = getattr(pre, "batch_size", None)
        batched = timed(pre, frames)
        if default is not None:
            pre.batch_size = 1
            single = timed(pre, frames)
            pre.batch_size = default
        else:
            single = batched  # model-free: there is no batch to speak of
        row = {"task": task, "batch_size": default, "fps_batched": args.frames / batched,
               "fps_single": args.frames / single, "ratio": single / batched}  # fmt: skip
        rows.append(row)
        print(f"{task:>10} {str(default):>6} {row['fps_batched']:>12.2f} {row['fps_single']:>11.2f}"
              f" {row['ratio']:>6.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    pres.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
