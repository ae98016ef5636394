"""Discovery and platform endpoints that WaveSpeed's CLI, desktop app and MCP servers call
(contract §3.6). The model's request schema is the field table's (`server.schemas`): our
extension fields are in it with their ranges and defaults, each marked `"x-extension": true`,
so WaveSpeed's own shape is kept and a client can tell which fields only this server has."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from server.auth import require_key
from server.predictions import success
from server.schemas import request_schema
from server.settings import MODEL_ID
from server.state import state_of
from server.webhooks import webhook_secret

router = APIRouter(dependencies=[Depends(require_key)])


@router.get("/api/v3/models")
def models(request: Request) -> dict[str, Any]:
    st = state_of(request)
    return success(
        [
            {
                "model_id": MODEL_ID,
                "name": "Wan 2.1 VACE (self-hosted)",
                "description": (
                    "Wan 2.1 VACE all-in-one video creation and editing: reference-to-video, "
                    "control video, masked editing, first/last frame, extension. "
                    "Extension fields (x-extension): extend at either end, keep_frames, "
                    "outpainting, layout_bbox, mask_bbox. "
                    f"Served model: {st.settings.model}."
                ),
                "type": "video-generation",
                "base_price": 0,
                "formula": "",
                "api_schema": {"api_schemas": [{"type": "model_run", "request_schema": request_schema()}]},
            }
        ]
    )


@router.get("/api/v3/webhook/secret")
def secret(request: Request) -> dict[str, Any]:
    st = state_of(request)
    s = webhook_secret(st.store)
    return success({"secret": s, "webhook_secret": s})
