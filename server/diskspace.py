"""The data dir's disk: how full it is, the floor of free space below which new uploads and jobs
are refused (507 Insufficient Storage) before the disk is actually full, and the `disk` field
of /health.

A full disk is not the client's fault and not forever: every answer it causes is a 507 in the
contract's envelope with `Retry-After`, whether the floor refused the request up front, the job
store could not write (`StoreUnavailable`), or storage could not (ENOSPC, EDQUOT).
"""

from __future__ import annotations

import errno
import shutil
import time
from pathlib import Path
from typing import Any

from server.kernel.errors import ApiError

GIB = 1 << 30
# The floor when WAN_VACE_MIN_FREE_BYTES is unset: 1 GiB, or this share of a smaller disk.
_DEFAULT_FLOOR_SHARE = 0.05
# A write that failed for want of space is reported by /health this long (or until a write
# succeeds), even once free space is back above the floor.
_RECENT_S = 60.0
RETRY_AFTER = {"Retry-After": "30"}
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def is_disk_full(exc: BaseException) -> bool:
    """An OSError that says the disk (or the quota) is full."""
    return isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS


def human(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _usage(path: Path) -> tuple[int, int] | None:
    """(free, total) bytes of the file system holding `path` (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        u = shutil.disk_usage(p)
    except OSError:
        return None
    return u.free, u.total


def floor_bytes(settings: Any, total: int) -> int:
    if settings.min_free_bytes is not None:
        return settings.min_free_bytes
    return min(GIB, int(total * _DEFAULT_FLOOR_SHARE))


def insufficient_storage(what: str) -> str:
    """The message of every 507: what could not be stored, and what to do."""
    return f"Insufficient storage on the server: {what}. Nothing was stored; retry once space is freed."


def check_free_space(settings: Any) -> None:
    """Refuse a new upload or job with 507 while the data dir is below its free-space floor.
    With object storage (`storage_url`) nothing accepted is written to the data dir: no floor."""
    if getattr(settings, "storage_url", None):
        return
    usage = _usage(settings.data_dir)
    if usage is None:
        return
    free, total = usage
    floor = floor_bytes(settings, total)
    if floor and free < floor:
        raise ApiError(
            507,
            insufficient_storage(
                f"the data dir has {human(free)} free, below the {human(floor)} it keeps free "
                "(WAN_VACE_MIN_FREE_BYTES)"
            ),
            headers=RETRY_AFTER,
        )


def _last_write_error(store: Any, storage: Any) -> tuple[float, str] | None:
    """(when, what) of the latest write the store or storage refused for want of space and that
    no successful write has followed yet."""
    found = []
    if (err := getattr(store, "write_error", None)) is not None:
        found.append((err.at, f"the job store: {err}"))
    if (err := getattr(storage, "write_error", None)) is not None:
        found.append((storage.write_error_at, f"storage: {err}"))
    return max(found) if found else None


def disk_report(settings: Any, store: Any, storage: Any) -> dict[str, Any]:
    """/health's `disk`: free bytes of the data dir, the floor, and why writes are refused."""
    usage = _usage(settings.data_dir)
    free, total = usage if usage is not None else (None, None)
    floor = floor_bytes(settings, total or 0)
    reasons = []
    if free is not None and floor and free < floor:
        reasons.append(
            f"the data dir has {human(free)} free, below the {human(floor)} it keeps free "
            "(WAN_VACE_MIN_FREE_BYTES): new jobs and uploads are refused"
        )
    elif free == 0:
        reasons.append("the data dir's disk is full")
    last = _last_write_error(store, storage)
    # Reported until a write succeeds again; once there is room again, only for a while.
    if last is not None and (reasons or time.time() - last[0] <= _RECENT_S):
        reasons.append(f"a write failed for want of disk space ({last[1]})")
    return {
        "ok": not reasons,
        "free_bytes": free,
        "total_bytes": total,
        "min_free_bytes": floor,
        "reason": "; ".join(reasons),
    }
