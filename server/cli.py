"""`wan-vace serve` (API + local workers) and `wan-vace worker` (workers alone); `settings`
(what they would run with, and why); the client commands `submit`, `status`, `cancel`
(server/client_cli.py); `weights fetch` (pipelines/hub.py).

Every flag has a setting beside it (server/settings.py, `WAN_VACE_*`); a flag given wins over
the environment, because flags are passed to `Settings` as explicit values.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from server import client_cli
from server.logs import configure as configure_logging
from server.logs import uvicorn_log_config
from server.settings import Settings

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def package_version() -> str:
    try:
        return version("wan-vace")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name in ("model", "data_dir", "workers", "host", "port", "log_level", "log_format"):
        v = getattr(args, name, None)
        if v is not None:
            overrides[name] = v
    return overrides


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(**_overrides(args))


def parser(weights_args: bool = True) -> argparse.ArgumentParser:
    """The CLI. `weights_args=False` leaves out the flags of `weights fetch`, which live in
    pipelines/hub.py: `serve` then never imports `pipelines` (ARCHITECTURE.md)."""
    p = argparse.ArgumentParser(prog="wan-vace", description="Self-hosted Wan 2.1 VACE server (WaveSpeed v3 API)")
    p.add_argument("--version", action="version", version=f"wan-vace {package_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="a weights.toml name; 'tiny' = random weights, runs anywhere")
    common.add_argument("--data-dir", type=Path, help="jobs database, media and API key (default ./data)")
    common.add_argument("--log-level", choices=LOG_LEVELS, help="default info (WAN_VACE_LOG_LEVEL)")
    common.add_argument("--log-format", choices=LOG_FORMATS, help="default text (WAN_VACE_LOG_FORMAT)")
    serving = argparse.ArgumentParser(add_help=False)
    serving.add_argument("--host", help="default 127.0.0.1 (WAN_VACE_HOST)")
    serving.add_argument("--port", type=int, help="default 8000 (WAN_VACE_PORT)")
    serving.add_argument("--workers", type=int, help="local worker processes (0 = API only)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", parents=[common, serving], help="run the API and local worker processes")
    sub.add_parser("worker", parents=[common], help="run a worker alone, claiming jobs from the shared store")
    t = sub.add_parser("settings", parents=[common, serving],
                       help="print every effective setting, its value and its source (secrets masked)")  # fmt: skip
    t.add_argument("--json", action="store_true", dest="as_json", help="one JSON object per setting")
    client_cli.add_commands(sub)
    w = sub.add_parser("weights", help="fetch and verify model weights")
    fetch = w.add_subparsers(dest="weights_cmd", required=True).add_parser(
        "fetch", help="download weights.toml entries from the Hugging Face Hub, verify them, write a manifest"
    )
    if weights_args:
        # pipelines.hub is stdlib-only until a fetch starts (huggingface_hub, tqdm inside).
        from pipelines import hub

        hub.add_arguments(fetch)
    fetch.set_defaults(usage_error=fetch.error)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser(weights_args=argv[:1] == ["weights"])
    args = p.parse_args(argv)
    if args.cmd in client_cli.COMMANDS:  # a client of some server: this host's settings do not matter
        return client_cli.run(args)
    if args.cmd == "weights":
        from pipelines import hub

        return hub.run(args, args.usage_error)
    try:
        settings = _settings(args)
    except ValidationError as e:  # a WAN_VACE_* variable with a bad value: say which, no traceback
        p.error(str(e))
    if args.cmd == "settings":
        from server import provenance

        print(provenance.render(provenance.report(settings, _overrides(args)), settings, as_json=args.as_json))
        return 0
    if args.cmd == "serve":
        import uvicorn

        from server.app import create_app

        configure_logging(settings)
        app = create_app(settings)
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            log_config=uvicorn_log_config(settings),
        )
        return 0

    from server.kernel.ids import new_worker_id
    from server.worker import Worker, install_sigterm

    worker_id = new_worker_id()
    configure_logging(settings, worker=worker_id)
    worker = Worker(settings, worker_id)
    install_sigterm(worker)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
