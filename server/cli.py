"""`wan-vace serve` (API + local workers) and `wan-vace worker` (workers alone).

Every flag has a setting beside it (server/settings.py, `WAN_VACE_*`); a flag given wins over
the environment, because flags are passed to `Settings` as explicit values.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from server.settings import Settings

LOG_LEVELS = ("debug", "info", "warning", "error")


def package_version() -> str:
    try:
        return version("wan-vace")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in ("model", "data_dir", "workers", "host", "port", "log_level"):
        v = getattr(args, name, None)
        if v is not None:
            overrides[name] = v
    return Settings(**overrides)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wan-vace", description="Self-hosted Wan 2.1 VACE server (WaveSpeed v3 API)")
    p.add_argument("--version", action="version", version=f"wan-vace {package_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="a weights.toml name; 'tiny' = random weights, runs anywhere")
    common.add_argument("--data-dir", type=Path, help="jobs database, media and API key (default ./data)")
    common.add_argument("--log-level", choices=LOG_LEVELS, help="default info (WAN_VACE_LOG_LEVEL)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", parents=[common], help="run the API and local worker processes")
    s.add_argument("--host", help="default 127.0.0.1 (WAN_VACE_HOST)")
    s.add_argument("--port", type=int, help="default 8000 (WAN_VACE_PORT)")
    s.add_argument("--workers", type=int, help="local worker processes (0 = API only)")
    sub.add_parser("worker", parents=[common], help="run a worker alone, claiming jobs from the shared store")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        settings = _settings(args)
    except ValidationError as e:  # a WAN_VACE_* variable with a bad value: say which, no traceback
        p.error(str(e))
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )

    if args.cmd == "serve":
        import uvicorn

        from server.app import create_app

        app = create_app(settings)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
        return 0

    from server.kernel.ids import new_worker_id
    from server.worker import Worker, install_sigterm

    worker = Worker(settings, new_worker_id())
    install_sigterm(worker)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
