"""What one app holds, and how a route reaches it. `create_app` builds an `AppState` and keeps
it on `app.state.wan`; routes and dependencies read it with `state_of(request)`. It lives apart
from server/app.py so that routes import it and not the factory that imports every route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request

from server.settings import Settings
from server.storage import Storage
from server.store import JobStore

if TYPE_CHECKING:
    from server.auth import Authenticator


@dataclass
class AppState:
    settings: Settings
    store: JobStore
    storage: Storage
    auth: Authenticator
    supervisor: Any = None  # server.worker.supervision.Supervisor when workers run here
    dispatcher: Any = None  # server.webhooks.WebhookDispatcher
    retention: Any = None  # server.retention.Retention, the cleanup loop
    finished: Any = None  # server.notify.FinishedWaiters: sync-mode requests woken by events

    def base_url(self, request: Request) -> str:
        """Absolute origin for URLs we hand out: the configured public URL, else the request's."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        return str(request.base_url).rstrip("/")


def state_of(request: Request) -> AppState:
    return request.app.state.wan
