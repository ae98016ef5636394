#!/usr/bin/env python
"""Fetch a model from weights.toml into the weights folder, verify it, and record a manifest.

    python scripts/fetch_weights.py wan2.1-vace-14b [--weights-dir DIR]
    python scripts/fetch_weights.py wan2.1-vace-14b [--weights-dir DIR] --verify-only

The same as `wan-vace weights fetch`; the work is done in pipelines/hub.py (its docstring says
how a fetch is verified). This script stays because the server's messages name it and it runs
from a checkout that was never installed. Exit status: 0 ok, 1 failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from pipelines import hub
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipelines import hub


# Module attributes so a test can replace the two network calls here, as it could before the
# body moved; `main` reads them at call time.
hub_model_info = hub.hub_model_info
hub_snapshot_download = hub.hub_snapshot_download


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="fetch_weights.py",
        description="Fetch a model listed in weights.toml, verify its checksums, write a manifest.",
    )
    hub.add_arguments(ap)
    args = ap.parse_args(argv)
    return hub.run(args, ap.error, hub.Hub(hub_model_info, hub_snapshot_download))


if __name__ == "__main__":
    sys.exit(main())
