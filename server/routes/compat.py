"""Account endpoints that real clients call before they submit, answered with their
self-hosted meaning in the contract's shapes (contract §3.6). The WaveSpeed MCP server's
`get_balance` and `get_price` tools, the CLI and the desktop app call them; an error or a 404
there would stop a client that only wants to run a job.

- `GET /api/v3/balance` -> `{"balance": <number>}`: this server keeps no account and bills
  nothing, so there is no balance to run out of. JSON has no infinity, so the number is
  `UNLIMITED_BALANCE`, beside `"unlimited": true` for a reader that knows to look.
- `POST /api/v3/model/price` (MCP) and `POST /api/v3/model/pricing` (CLI, desktop), body
  `{"model_id", "inputs"}` -> price 0 whatever the inputs: a run costs nothing here but the
  operator's own hardware. The body is checked only as far as the hosted service is known to:
  a JSON object naming the model this server runs (partial `inputs` are accepted, as there).

Keyed like every API route: a balance or price answer tells a caller the key works.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request

from server.auth import require_key
from server.kernel.errors import ApiError, bad_request
from server.predictions import success
from server.routes.body import read_capped
from server.settings import MODEL_ID
from server.state import state_of

router = APIRouter(dependencies=[Depends(require_key)])

UNLIMITED_BALANCE = 1_000_000_000
CURRENCY = "USD"


@router.get("/api/v3/balance")
def balance() -> dict[str, Any]:
    return success({"balance": UNLIMITED_BALANCE, "currency": CURRENCY, "unlimited": True})


@router.post("/api/v3/model/price")
async def price(request: Request) -> dict[str, Any]:
    model_id = await _quoted_model(request)
    return success({"model_id": model_id, "price": 0, "discounted_price": 0, "currency": CURRENCY})


@router.post("/api/v3/model/pricing")
async def pricing(request: Request) -> dict[str, Any]:
    model_id = await _quoted_model(request)
    return success({"model_id": model_id, "unit_price": 0, "currency": CURRENCY})


async def _quoted_model(request: Request) -> str:
    """The body's model id, once the body is a JSON object naming this server's model."""
    cap = state_of(request).settings.max_request_bytes
    raw = await read_capped(request, cap, ApiError(413, f"request body larger than {cap // 2**20} MB"))
    try:
        body = json.loads(raw) if raw.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise bad_request('the request body must be a JSON object: {"model_id": ..., "inputs": {...}}')
    model_id = body.get("model_id")
    if not isinstance(model_id, str) or not model_id:
        raise bad_request(f"model_id is required (this server runs {MODEL_ID})")
    if model_id.strip("/") != MODEL_ID:
        raise bad_request(f"unknown model_id {model_id!r}: this server runs {MODEL_ID}")
    if not isinstance(body.get("inputs", {}), dict):
        raise bad_request("inputs must be a JSON object")
    return MODEL_ID
