"""`wan-vace serve` (API + local workers) and `wan-vace worker` (workers alone)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from server.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in ("model", "data_dir", "workers"):
        v = getattr(args, name, None)
        if v is not None:
            overrides[name] = v
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wan-vace", description="Self-hosted Wan 2.1 VACE server (WaveSpeed v3 API)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the API and local worker processes")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model", help="a weights.toml name; 'tiny' = random weights, runs anywhere")
    s.add_argument("--data-dir", type=Path, help="jobs database, media and API key (default ./data)")
    s.add_argument("--workers", type=int, help="local worker processes (0 = API only)")
    w = sub.add_parser("worker", help="run a worker alone, claiming jobs from the shared store")
    w.add_argument("--model")
    w.add_argument("--data-dir", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = _settings(args)

    if args.cmd == "serve":
        import uvicorn

        from server.app import create_app

        app = create_app(settings)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
        return 0

    from server.kernel.ids import new_worker_id
    from server.worker import Worker, install_sigterm

    worker = Worker(settings, new_worker_id())
    install_sigterm(worker)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
