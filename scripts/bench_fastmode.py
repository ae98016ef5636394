"""What `enable_fast_mode`'s step cache (pipelines/stepcache.py) buys and costs: the same
text-to-video call, same seed, exact and then with the cache at each `--threshold`, in one
process. Per run: wall time of the call and of the transformer alone, their ratios to exact,
forwards skipped, and PSNR of the decoded frames against the exact ones.

    python scripts/bench_fastmode.py                      # tiny model, CPU
    python scripts/bench_fastmode.py --model tiny-14b-layout   # 40 + 8 blocks, tiny widths
    python scripts/bench_fastmode.py --model wan2.1-vace-14b --weights-root /weights \\
        --device cuda --size 832*480 --frames 81 --steps 30 --threshold 0.05 0.1 0.2

The first call of each setting warms up and is not counted; timings are the median of
`--repeat` calls. On the tiny model the transformer is a small part of a call (the VAE
dominates), so its transformer ratio is the number to read; its outputs are noise, so PSNR
there only shows the cache is close to exact, not how a real video looks. The exact run also
prints the FLOPs a skipped step keeps (pipelines/flops.py) for the model's shape.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipelines.stepcache import StepCacheConfig, enable_step_cache


class TransformerClock:
    """Seconds spent inside the transformer's forward calls (synchronised on CUDA), from
    torch's module hooks, which fire around whatever diffusers hook replaces the forward; with
    `count_flops` on, also the FLOPs those calls ran (torch's FlopCounterMode: a number no
    other load on the machine can disturb)."""

    def __init__(self, transformer: torch.nn.Module, device: str):
        self.cuda = device.startswith("cuda")
        self.seconds = 0.0
        self.flops = 0
        self.count_flops = False
        self._t0 = 0.0
        self._counter: FlopCounterMode | None = None
        transformer.register_forward_pre_hook(self._start)
        transformer.register_forward_hook(self._stop)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _start(self, *_: object) -> None:
        if self.count_flops:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, *_: object) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._t0
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops += self._counter.get_total_flops()
            self._counter = None


def load(a: argparse.Namespace):
    if a.model in ("tiny", "tiny-14b-layout"):
        from pipelines.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(seed=0)
        if a.model == "tiny-14b-layout":
            pipe.transformer = layout_14b(pipe.transformer)
        pipe = pipe.to(a.device)
    else:
        from pipelines.loader import load_pipeline

        pipe, _ = load_pipeline(a.model, weights_root=a.weights_root, device=a.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def layout_14b(tiny: torch.nn.Module) -> torch.nn.Module:
    """The tiny transformer's widths (x4, so the blocks, not Python, take the time) with
    VACE-14B's depth: 40 main blocks, a VACE block at every fifth. What a skipped step saves
    in time on a CPU, for a model laid out like the real one (its skip decisions are a random
    model's)."""
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    config = {**tiny.config, "num_layers": 40, "vace_layers": list(range(0, 40, 5))}
    config |= {"attention_head_dim": 32, "ffn_dim": 256}
    return WanVACETransformer3DModel.from_config(config).eval()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)  # frames in [0, 1]


def skipped_step_share(transformer: torch.nn.Module, width: int, height: int, frames: int) -> str:
    try:
        from pipelines.flops import TransformerShape, tokens, transformer_forward_flops
    except ImportError:  # the FLOP model is optional here
        return "n/a"
    shape = TransformerShape.from_config(transformer.config)
    f = transformer_forward_flops(shape, tokens(width, height, frames, patch_size=shape.patch_size))
    kept = f["misc"] + f["vace"] + f["block"]["total"]
    return (f"{kept / f['total']:.1%} of a forward (main blocks {f['main'] / f['total']:.1%}, "
            f"VACE blocks {f['vace'] / f['total']:.1%})")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--weights-root", default="weights")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="112*64", help="render size W*H (the tiny model's 832*480 is 112*64)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--threshold", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--warmup", type=int, default=StepCacheConfig().warmup)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    width, height = (int(v) for v in a.size.split("*"))
    pipe = load(a)
    clock = TransformerClock(pipe.transformer, a.device)
    cache = enable_step_cache(pipe.transformer, StepCacheConfig(warmup=a.warmup))

    def call() -> torch.Tensor:
        return pipe(
            prompt="a cat walks on the beach, slow motion", negative_prompt="blurry, static",
            height=height, width=width, num_frames=a.frames, num_inference_steps=a.steps,
            guidance_scale=a.guidance, generator=torch.Generator().manual_seed(a.seed), output_type="pt",
        ).frames  # fmt: skip

    def timed(threshold: float | None) -> tuple[float, float, int, int, int, torch.Tensor]:
        walls, inner, out, skipped, forwards, flops = [], [], None, 0, 0, 0
        for i in range(a.repeat + 1):
            clock.seconds, clock.flops, clock.count_flops = 0.0, 0, i == 0
            t0 = time.perf_counter()
            if threshold is None:
                out = call()
            else:
                with cache.job(a.steps, threshold=threshold) as stats:
                    out = call()
                skipped, forwards = stats.skipped, stats.forwards
            if i:  # the first call warms up (and counts the FLOPs)
                walls.append(time.perf_counter() - t0)
                inner.append(clock.seconds)
            else:
                flops = clock.flops
        return statistics.median(walls), statistics.median(inner), skipped, forwards, flops, out

    wall0, inner0, _, _, flops0, exact = timed(None)
    print(f"{a.model} on {a.device}: {width}x{height} x {a.frames} frames, {a.steps} steps, "
          f"guidance {a.guidance}, warm-up {a.warmup}, seed {a.seed}, median of {a.repeat}")  # fmt: skip
    print(f"a skipped step runs {skipped_step_share(pipe.transformer, width, height, a.frames)}")
    print("| run | call s | transformer s | call speed-up | transformer speed-up | transformer FLOPs | "
          "skipped | PSNR dB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print(f"| exact | {wall0:.2f} | {inner0:.2f} | 1.00x | 1.00x | 100.0% | 0 | inf |")
    for threshold in a.threshold:
        wall, inner, skipped, forwards, flops, out = timed(threshold)
        print(f"| threshold {threshold:g} | {wall:.2f} | {inner:.2f} | {wall0 / wall:.2f}x | "
              f"{inner0 / inner:.2f}x | {flops / flops0:.1%} | {skipped}/{forwards} | "
              f"{psnr(out, exact):.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
