"""`wan-vace serve` (API + local workers) and `wan-vace worker` (workers alone); `settings`
(what they would run with, and why); the client commands `submit`, `status`, `cancel`
(server/client_cli.py); `weights fetch` (pipelines/hub.py).

Both serve and worker run the host's worker plan (server/gpus.py: one worker per GPU, or per
group of `--gpus-per-job` GPUs, or `--workers N`); a plan asking for GPUs that are not there is
a usage error before anything starts. `serve --workers 0` is an API replica. `worker` runs one
worker in this process, or several as supervised child processes (server/worker/supervision.py)
when the plan has more than one slot; SIGTERM or Ctrl-C drains them all (`--shutdown-grace`).

Every flag has a setting beside it (server/settings.py, `WAN_VACE_*`); a flag given wins over
the environment, because flags are passed to `Settings` as explicit values.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from server import client_cli, gpus
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
    names = ("model", "data_dir", "workers", "gpus", "gpus_per_job", "shutdown_grace", "host", "port",
             "log_level", "log_format")  # fmt: skip
    for name in names:
        v = getattr(args, name, None)
        if v is not None:
            overrides[name] = v
    return overrides


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(**_overrides(args))


def parser(weights_args: bool = True) -> argparse.ArgumentParser:
    """The CLI. `weights_args=False` leaves out the flags of `weights fetch`, which live in
    pipelines/hub.py: `serve` then never imports `pipelines` (ARCHITECTURE.md)."""
    p = argparse.ArgumentParser(
        prog="wan-vace", description="Self-hosted Wan 2.1 VACE server (WaveSpeed v3 API)"
    )
    p.add_argument("--version", action="version", version=f"wan-vace {package_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="a weights.toml name; 'tiny' = random weights, runs anywhere")
    common.add_argument("--data-dir", type=Path, help="jobs database, media and API key (default ./data)")
    common.add_argument("--log-level", choices=LOG_LEVELS, help="default info (WAN_VACE_LOG_LEVEL)")
    common.add_argument("--log-format", choices=LOG_FORMATS, help="default text (WAN_VACE_LOG_FORMAT)")
    working = argparse.ArgumentParser(add_help=False)
    working.add_argument("--workers", type=int,
                         help="worker processes on this host (default: one per GPU group, one without a GPU; "
                              "0 = API only) (WAN_VACE_WORKERS)")  # fmt: skip
    working.add_argument("--gpus", metavar="I,J,...",
                         help="the CUDA indices of the GPUs to use (default: every visible GPU) (WAN_VACE_GPUS)")  # fmt: skip
    working.add_argument("--gpus-per-job", type=int, metavar="K",
                         help="GPUs one job runs on: workers get groups of K (default 1) (WAN_VACE_GPUS_PER_JOB)")  # fmt: skip
    working.add_argument("--shutdown-grace", type=float, metavar="S",
                         help="seconds a stopping worker may take to finish its jobs before handing them back "
                              "(default 30; 0 = hand back at once) (WAN_VACE_SHUTDOWN_GRACE)")  # fmt: skip
    serving = argparse.ArgumentParser(add_help=False)
    serving.add_argument("--host", help="default 127.0.0.1 (WAN_VACE_HOST)")
    serving.add_argument("--port", type=int, help="default 8000 (WAN_VACE_PORT)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", parents=[common, serving, working], help="run the API and local worker processes")
    sub.add_parser("worker", parents=[common, working],
                   help="run this host's workers alone, claiming jobs from the shared store")  # fmt: skip
    t = sub.add_parser("settings", parents=[common, serving, working],
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

        print(
            provenance.render(provenance.report(settings, _overrides(args)), settings, as_json=args.as_json)
        )
        if not args.as_json:
            try:
                print(f"\nWorker plan: {gpus.plan(settings).describe()}")
            except gpus.GpuPlanError as e:
                print(f"\nWorker plan: none: {e}")
                return 2
        return 0
    if args.cmd == "worker" and settings.workers == 0:
        if args.workers == 0:
            p.error("wan-vace worker --workers 0 would run no worker; serve --workers 0 runs an API replica")
        # WAN_VACE_WORKERS=0 in an environment shared with the API replicas means "API only"
        # for serve; a worker host runs its plan.
        settings = settings.model_copy(update={"workers": None})
    try:
        plan = gpus.plan(settings)  # GPUs asked for that are not there: say so before starting
    except gpus.GpuPlanError as e:
        p.error(str(e))
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

    if plan.count > 1:
        configure_logging(settings)
        return run_workers(settings)

    from server.kernel.ids import new_worker_id
    from server.worker import Worker, install_sigterm

    (slot,) = plan.slots
    os.environ.update(slot.env)  # its GPUs, before anything imports torch (the runner, later)
    worker_id = new_worker_id()
    configure_logging(settings, worker=worker_id)
    worker = Worker(settings, worker_id, slot_info=slot.info())
    install_sigterm(worker)
    return worker.run()


def run_workers(settings: Settings) -> int:
    """`wan-vace worker` for a plan of several workers: each a supervised child process (the
    supervisor of `serve`, without the API), until SIGTERM or Ctrl-C, which drain them all.
    Exits 0 after a stop, EXIT_LOAD_FAILED when no worker could load the model."""
    from server.store import open_store
    from server.worker import EXIT_LOAD_FAILED
    from server.worker.supervision import Supervisor

    log = logging.getLogger("wan_vace.worker")
    stop = threading.Event()
    signals: list[str] = []

    def on_signal(signum: int, frame: Any) -> None:
        signals.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sup = Supervisor(settings, open_store(settings))
    sup.start()
    try:
        while not stop.wait(0.5):
            if all(slot.given_up for slot in sup.slots):
                log.error("no worker can run: %s", sup.failed_reason)
                return EXIT_LOAD_FAILED
    finally:
        if signals:
            log.info(
                "%s: stopping %d workers (grace %g s)", signals[0], len(sup.slots), settings.shutdown_grace
            )
        sup.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
