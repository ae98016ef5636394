"""Ids handed out by workers (job ids come from the API, `secrets.token_hex`)."""

from __future__ import annotations

import uuid


def new_worker_id() -> str:
    """A worker's id: short, random, unique enough across hosts for one store."""
    return uuid.uuid4().hex[:12]
