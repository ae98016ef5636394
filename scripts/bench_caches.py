"""What the exact caches save: the device stage (`VaceRunner.render`) of the same text-to-video
job on the tiny model, without and with `pipelines.caches` (the gray clip's VAE latent and the
default negative prompt's embeddings), in one process, with the ratio. Outputs are compared too:
they must be identical.

    python scripts/bench_caches.py [--size 832*480] [--duration 5] [--steps 4] [--downscale 8] [--repeat 3]

The first cached job fills the caches and is not counted; each timing is the median of
`--repeat` jobs. On a GPU the VAE encode the gray cache removes is a full-resolution encode.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines.runner import VaceRunner  # noqa: E402
from pipelines.tiny import build_tiny_pipeline  # noqa: E402
from server.kernel.request import VaceRequest  # noqa: E402
from server.schemas import validate_submit  # noqa: E402


def runner(caches: bool, downscale: int) -> VaceRunner:
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return VaceRunner(pipe, name="tiny", kind="random", device="cpu", downscale=downscale, caches=caches)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="832*480")
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--downscale", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    inp, _ = validate_submit(
        {"prompt": "a cat walks on the beach", "seed": 3, "size": a.size, "duration": a.duration,
         "num_inference_steps": a.steps}
    )  # fmt: skip
    req = VaceRequest.from_input(inp)
    results: dict[bool, tuple[float, np.ndarray]] = {}
    for cached in (False, True):
        r = runner(cached, a.downscale)
        with tempfile.TemporaryDirectory() as tmp:
            r.render(req, {}, Path(tmp), lambda _f: None)  # warm-up (fills the caches when on)
            times, frames = [], None
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                out = r.render(req, {}, Path(tmp), lambda _f: None)
                times.append(time.perf_counter() - t0)
                frames = out.payload.frames
        results[cached] = (statistics.median(times), frames)
    (t_off, f_off), (t_on, f_on) = results[False], results[True]
    rw, rh = runner(False, a.downscale).render_size(req.width, req.height)
    print(f"text-to-video {a.size} x {req.num_frames} frames, rendered at {rw}x{rh}, {a.steps} steps, "
          f"CFG on, {a.threads} torch thread(s), median of {a.repeat}")  # fmt: skip
    print("| caches | render s | ratio |\n|---|---|---|")
    print(f"| off | {t_off:.3f} | 1.00 |\n| on | {t_on:.3f} | {t_on / t_off:.2f} |")
    same = np.array_equal(f_off, f_on)
    print(f"outputs identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
