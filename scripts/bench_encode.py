"""The CPU stage's costs, measured: x264 presets and thread counts through the server's own
`pipelines.media.encode_mp4`, and (`--uint8`) the frames-to-uint8 conversion before and after it
moved onto the device.

    python scripts/bench_encode.py                        # both output sizes, all presets
    python scripts/bench_encode.py --sizes 81x832x480 --presets veryfast,fast --threads 0,2
    python scripts/bench_encode.py --uint8 --sizes 81x832x480,161x1280x720

The frames are a synthetic scene shaped like real output rather than noise (x264's worst case,
which is what the tiny random model renders): a three-octave texture under a slow camera pan,
with a level of per-frame dither (as a decoded render has), so motion search and rate control do real work. Each row: the best of
`--repeat` wall times and CPU times (all threads; steadier than wall time on a busy host), the
file size, luma PSNR against the source (the same yuv420p BT.709
conversion the encoder is fed, so it measures x264 only) and ratios against the baseline row
(the current default: `ENCODE_PRESET`, threads 0 = x264's auto) measured in the same run, so a
busy machine skews every row alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.media import ENCODE_PRESET, encode_mp4

PRESETS = ["ultrafast", "superfast", "veryfast", "faster", "fast"]
PSNR_EVERY = 8  # luma PSNR on every 8th frame: enough to rank presets, a fraction of the cost


def scene(frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 (F, H, W, 3): a crop moving 3 px right and 2 px down per frame across a larger
    canvas of smooth texture (1/8, 1/32 and 1/128 of the size, bicubic), plus +-1 level of
    per-frame dither."""
    rng = np.random.default_rng(seed)
    ch, cw = height + 2 * frames + 8, width + 3 * frames + 8
    canvas = np.zeros((ch, cw, 3), np.float32)
    for scale, weight in ((8, 0.6), (32, 0.3), (128, 0.1)):
        small = rng.integers(0, 256, (ch // scale + 2, cw // scale + 2, 3), dtype=np.uint8)
        up = Image.fromarray(small).resize((cw + scale, ch + scale), Image.Resampling.BICUBIC)
        canvas += weight * np.asarray(up, np.float32)[:ch, :cw]
    canvas = np.clip(canvas, 0, 255).astype(np.uint8)
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        crop = canvas[2 * i : 2 * i + height, 3 * i : 3 * i + width].astype(np.int16)
        crop += rng.integers(-1, 2, (height, width, 1), dtype=np.int16)
        out[i] = np.clip(crop, 0, 255)
    return out


def _luma(rgb: np.ndarray) -> np.ndarray:
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    frame = frame.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU709,
                           dst_color_range=ColorRange.MPEG)  # fmt: skip
    return frame.to_ndarray()[: rgb.shape[0]]  # yuv420p as one plane stack: Y is on top


def psnr(path: str, reference: dict[int, np.ndarray]) -> float:
    errors = []
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in reference:
                y = frame.reformat(format="yuv420p").to_ndarray()[: reference[i].shape[0]]
                errors.append(np.mean((y.astype(np.float64) - reference[i]) ** 2))
    mse = float(np.mean(errors))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def bench_encode(args: argparse.Namespace, size: tuple[int, int, int], workdir: str) -> None:
    f, w, h = size
    t0 = time.perf_counter()
    frames = scene(f, w, h)
    print(f"\n{f} frames x {w}x{h} (scene built in {time.perf_counter() - t0:.1f} s; "
          f"{os.cpu_count()} CPUs, CRF 18)")  # fmt: skip
    reference = {i: _luma(frames[i]) for i in range(0, f, PSNR_EVERY)}
    baseline = (args.baseline, 0)
    grid = [baseline] + [(p, t) for p in args.presets for t in args.threads if (p, t) != baseline]
    rows = []
    path = os.path.join(workdir, "bench.mp4")
    for preset, threads in grid:
        best = cpu = float("inf")
        for _ in range(args.repeat):
            t, c = time.perf_counter(), time.process_time()
            encode_mp4(frames, path, fps=16, preset=preset, threads=threads)
            best = min(best, time.perf_counter() - t)
            cpu = min(cpu, time.process_time() - c)  # all threads: the cost on a shared host
        rows.append((preset, threads, best, cpu, os.path.getsize(path), psnr(path, reference)))
    _, _, t_base, cpu_base, size_base, _ = rows[0]
    print(f"{'preset':<10} {'threads':>7} {'wall s':>7} {'CPU s':>7} {'MB':>7} {'PSNR-Y':>7} "
          f"{'wall/base':>9} {'CPU/base':>9} {'size/base':>9}")  # fmt: skip
    for preset, threads, secs, cpu, nbytes, db in rows:
        mark = "  <- baseline" if (preset, threads) == baseline else ""
        print(f"{preset:<10} {threads or 'auto':>7} {secs:>7.2f} {cpu:>7.2f} {nbytes / 1e6:>7.2f} "
              f"{db:>7.2f} {secs / t_base:>9.2f} {cpu / cpu_base:>9.2f} {nbytes / size_base:>9.2f}{mark}")  # fmt: skip


def bench_uint8(size: tuple[int, int, int], repeat: int) -> None:
    """The old host path (diffusers' "np" output, i.e. a float32 host copy, then `to_uint8`) vs
    `frames_to_host` (uint8 on the tensor's device, then one copy). With the tensor on a CPU both
    run on the host; on a GPU the second leaves the host only the uint8 copy."""
    import torch

    from pipelines.runner import frames_to_host, to_uint8

    f, w, h = size
    video = torch.rand((f, 3, h, w), generator=torch.Generator().manual_seed(0))

    def old() -> np.ndarray:
        return to_uint8(video.cpu().permute(0, 2, 3, 1).float().numpy())

    uint8 = torch.zeros((f, h, w, 3), dtype=torch.uint8)

    def host_share() -> np.ndarray:
        # What is left on the host when the tensor is on a GPU: one copy of the uint8 frames
        # (a device-to-host copy there, a memory copy here).
        return uint8.numpy().copy()

    timings = {}
    for name, fn in (("np output + to_uint8", old), ("frames_to_host", lambda: frames_to_host(video))):
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            result = fn()
            best = min(best, time.perf_counter() - t)
        timings[name] = (best, result)
    a, b = (r for _, r in timings.values())
    print(f"\nframes to uint8, {f} x {w}x{h}, tensor on the CPU (equal: {np.array_equal(a, b)})")
    for name, (secs, _) in timings.items():
        print(f"  {name:<22} {secs:6.2f} s")
    best = min(_timed(host_share) for _ in range(repeat))
    print(f"  {'uint8 copy only':<22} {best:6.2f} s   (the host's share when the tensor is on a GPU)")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="81x832x480,161x1280x720", help="FxWxH,...")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--threads", default="0,1,2", help="x264 thread counts; 0 = auto")
    ap.add_argument("--baseline", default=ENCODE_PRESET, help="the preset the ratios divide by")
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; the best one counts")
    ap.add_argument("--uint8", action="store_true", help="measure the uint8 conversion instead")
    args = ap.parse_args()
    args.presets = [p for p in args.presets.split(",") if p]
    args.threads = [int(t) for t in args.threads.split(",") if t]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    if args.uint8:
        for size in sizes:
            bench_uint8(size, args.repeat)
        return
    with tempfile.TemporaryDirectory() as workdir:
        for size in sizes:
            bench_encode(args, size, workdir)


if __name__ == "__main__":
    main()
