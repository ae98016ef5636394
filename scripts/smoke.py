"""Smoke test a running server the way a user would: the real WaveSpeed SDK submits one job,
waits, downloads the MP4 and checks its frame count, rate and size.

    python scripts/smoke.py --base-url http://127.0.0.1:8000 --api-key "$(cat data/api_key)"

Defaults are cheap (2 steps); pass --steps 30 for a real run on a GPU.
"""

from __future__ import annotations

import argparse
import io
import sys
import time

import av
import httpx
from wavespeed import Client

from server.kernel.request import FPS, num_frames_for, parse_size

MODEL = "wavespeed-ai/wan-2.1-14b-vace"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", required=True)
    p.add_argument("--prompt", default="a cat walks on the beach at sunset")
    p.add_argument("--size", default="832*480")
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600)
    a = p.parse_args()

    health = httpx.get(a.base_url.rstrip("/") + "/health", timeout=10).json()
    print(f"health: {health['status']} {health.get('reason', '')} model={health['model']}")
    client = Client(api_key=a.api_key, base_url=a.base_url)
    t0 = time.monotonic()
    out = client.run(
        MODEL,
        {"prompt": a.prompt, "size": a.size, "duration": a.duration, "num_inference_steps": a.steps},
        timeout=a.timeout,
        poll_interval=1.0,
    )
    wall = time.monotonic() - t0
    url = out["outputs"][0]
    data = httpx.get(url, timeout=60).content
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        frames = sum(1 for _ in c.decode(s))
        fps, w, h = s.average_rate, s.codec_context.width, s.codec_context.height
    want_w, want_h = parse_size(a.size)
    ok = frames == num_frames_for(a.duration) and fps == FPS and (w, h) == (want_w, want_h)
    print(f"{'OK' if ok else 'MISMATCH'}: {url}\n  {frames} frames at {fps} fps, {w}x{h}, "
          f"{len(data) / 1e6:.2f} MB, {wall:.1f} s from submit to result")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
