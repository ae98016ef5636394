"""The HTTP app factory. `create_app(settings)` builds everything from the settings object
(store, storage, auth, worker supervisor) into an `AppState` (server/state.py, which the routes
import; nothing imports this module but the CLI and tests); nothing is global, so tests run
several apps side by side. This process never imports torch: it stays light and answers while
workers are busy, crashed or loading weights.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.auth import Authenticator
from server.diskspace import RETRY_AFTER, insufficient_storage, is_disk_full
from server.kernel.errors import ApiError, envelope_for_error
from server.notify import FinishedWaiters
from server.settings import Settings
from server.state import AppState
from server.storage import open_storage
from server.store import StoreUnavailable, StoreUnreachable, open_store

log = logging.getLogger("wan_vace.app")


def create_app(settings: Settings) -> FastAPI:
    from server.retention import Retention
    from server.routes import compat, health, media, metrics, platform, playground, predictions, uploads
    from server.webhooks import WebhookDispatcher
    from server.worker.supervision import Supervisor

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(settings)
    store = open_store(settings)
    keys = settings.effective_api_keys()
    st = AppState(
        settings=settings,
        store=store,
        storage=storage,
        auth=Authenticator(keys),
        finished=FinishedWaiters(store),
    )
    if not settings.open_access and not settings.api_keys:
        log.warning("API key (kept in %s): %s", settings.data_dir / "api_key", keys[0])
    if settings.open_access:
        log.warning("WAN_VACE_OPEN_ACCESS is on: the API accepts requests without a key")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st.supervisor = Supervisor(settings, store)
        st.supervisor.start()
        st.dispatcher = WebhookDispatcher(settings, store, storage)
        st.dispatcher.start()
        st.retention = Retention(settings, store, storage)
        st.retention.start()
        try:
            yield
        finally:
            st.retention.stop()
            st.dispatcher.stop()
            st.supervisor.stop()
            st.finished.close()

    # /docs and /redoc with Swagger UI and ReDoc served from this app (fastapi-offline's copies),
    # not FastAPI's default CDN: the docs must work air-gapped.
    app = FastAPIOffline(title="wan-vace", version="0.1.0", lifespan=lifespan, static_url="/docs/assets")
    app.state.wan = st
    _install_error_mapping(app)
    # Keyed routers carry `require_key` themselves; health, media, the signed upload PUT, the
    # playground page and /metrics (unless metrics_require_key) are public by design.
    for router in (
        predictions.router,
        health.router,
        media.router,
        uploads.router,
        uploads.signed,
        platform.router,
        compat.router,
        metrics.router,
        playground.router,
    ):
        app.include_router(router)
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
        headers = dict(exc.headers or {})
        if exc.status_code == 404 and message == "Not Found":
            message = f"Not found: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            # e.g. GET /api/v3/predictions: history is a POST. Say which methods the route takes.
            allowed = headers.get("allow") or headers.get("Allow") or ""
            message = f"{request.method} is not allowed on {request.url.path}; it takes {allowed or 'other methods'}"
        return JSONResponse(envelope_for_error(exc.status_code, message), exc.status_code, headers=headers)

    # A full disk (the job store's, or storage's): 507 Insufficient Storage with Retry-After,
    # not a bare 500; what is stored already stays readable (server/diskspace.py).
    def _insufficient(request: Request, what: str) -> JSONResponse:
        log.warning("%s %s refused: %s", request.method, request.url.path, what)
        return JSONResponse(envelope_for_error(507, insufficient_storage(what)), 507, headers=RETRY_AFTER)

    # The job store's database server is down, restarting or cut off: nothing is wrong with the
    # request or a disk, and every process reconnects by itself, so 503 and "try again shortly".
    # Starlette picks the handler of the nearest class in the exception's MRO, so this one, not
    # StoreUnavailable's 507, answers it. Logged at info: the store logs the outage's start.
    @app.exception_handler(StoreUnreachable)
    async def _store_unreachable(request: Request, exc: StoreUnreachable) -> JSONResponse:
        log.info("%s %s refused: %s", request.method, request.url.path, exc.message)
        message = f"The job store is unavailable right now ({exc.message}); try again in a few seconds."
        return JSONResponse(envelope_for_error(503, message), 503, headers={"Retry-After": "5"})

    @app.exception_handler(StoreUnavailable)
    async def _store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return _insufficient(request, exc.message)

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        if is_disk_full(exc):
            return _insufficient(request, f"the server's disk is full ({exc.strerror or exc})")
        return _internal(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _internal(request, exc)

    def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(envelope_for_error(500, "Internal server error"), 500)
