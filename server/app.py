"""The HTTP app factory. `create_app(settings)` builds everything from the settings object
(store, storage, auth, worker supervisor); nothing is global, so tests run several apps side by
side. This process never imports torch: it stays light and answers while workers are busy,
crashed or loading weights.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.auth import Authenticator
from server.kernel.errors import ApiError, envelope_for_error
from server.settings import Settings
from server.storage import LocalStorage
from server.store import JobStore, open_store

log = logging.getLogger("wan_vace.app")


@dataclass
class AppState:
    settings: Settings
    store: JobStore
    storage: LocalStorage
    auth: Authenticator
    supervisor: Any = None  # server.supervisor.Supervisor when workers run in this process
    dispatcher: Any = None  # server.webhooks.WebhookDispatcher

    def base_url(self, request: Request) -> str:
        """Absolute origin for URLs we hand out: the configured public URL, else the request's."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        return str(request.base_url).rstrip("/")


def state_of(request: Request) -> AppState:
    return request.app.state.wan


def create_app(settings: Settings) -> FastAPI:
    from server.routes import health, media, platform, predictions, uploads
    from server.supervisor import Supervisor
    from server.webhooks import WebhookDispatcher, webhook_payload_builder

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.storage_url:
        # Refused rather than ignored: outputs silently landing on local disk would be lost to
        # every other replica.
        raise NotImplementedError(
            "WAN_VACE_STORAGE_URL (S3-compatible storage) is not supported yet; unset it to keep "
            "outputs and uploads in the data dir"
        )
    store = open_store(settings)
    store.webhook_payload = webhook_payload_builder(settings)  # type: ignore[attr-defined]
    keys = settings.effective_api_keys()
    st = AppState(
        settings=settings,
        store=store,
        storage=LocalStorage(settings.storage_dir),
        auth=Authenticator(keys),
    )
    if not settings.open_access and not settings.api_keys:
        log.warning("API key (kept in %s): %s", settings.data_dir / "api_key", keys[0])
    if settings.open_access:
        log.warning("WAN_VACE_OPEN_ACCESS is on: the API accepts requests without a key")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st.supervisor = Supervisor(settings, store)
        st.supervisor.start()
        st.dispatcher = WebhookDispatcher(settings, store)
        st.dispatcher.start()
        try:
            yield
        finally:
            st.dispatcher.stop()
            st.supervisor.stop()

    app = FastAPI(title="wan-vace", version="0.1.0", lifespan=lifespan)
    app.state.wan = st
    _install_error_mapping(app)
    for module in (predictions, health, media, uploads, platform):
        app.include_router(module.router)
    return app


def _install_error_mapping(app: FastAPI) -> None:
    """The one place exceptions become HTTP answers, all in the contract's error envelope."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(envelope_for_error(exc.status, exc.message), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Never FastAPI's 422 {"detail": [...]}: clients read code/message (contract §5).
        errs = exc.errors()
        msg = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}" for e in errs
        )
        return JSONResponse(envelope_for_error(400, msg or "invalid request"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"Not found: {request.method} {request.url.path}"
        return JSONResponse(envelope_for_error(exc.status_code, message), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(envelope_for_error(500, "Internal server error"), 500)
