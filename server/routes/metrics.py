"""`GET /metrics`: Prometheus' text exposition (OpenMetrics when the scraper asks for it) of
server/metrics.py's collector. Open like /health, since it shows no more than /health does (counts,
worker states, durations; no prompt, id or URL); `WAN_VACE_METRICS_REQUIRE_KEY=true` puts it
behind the API key (the scraper then sends `Authorization: Bearer <key>`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from server.auth import require_key
from server.metrics import StoreCollector
from server.state import state_of


async def _key_when_required(request: Request) -> None:
    if state_of(request).settings.metrics_require_key:
        await require_key(request, None)


router = APIRouter(dependencies=[Depends(_key_when_required)])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    st = state_of(request)
    # A registry per scrape: nothing global, so apps side by side (the tests) never share one.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(st))
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(registry), media_type=content_type)
