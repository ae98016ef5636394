"""The account stubs clients call before they submit (balance, price), in process: the
contract's envelope and shapes, the self-hosted values, bad bodies and a missing key refused."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import MODEL_ID, Settings

KEY = "k-compat"


@pytest.fixture
def app_client(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, workers=0, api_keys=[KEY]))
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        yield c


def test_balance_shape(app_client):
    r = app_client.get("/api/v3/balance")
    assert r.status_code == 200
    body = r.json()
    assert body["code"] == 200 and body["message"] == "success" and "error" not in body
    # The MCP server reads data.balance as a number; nothing here is billed.
    assert isinstance(body["data"]["balance"], (int, float)) and body["data"]["balance"] > 0
    assert body["data"]["unlimited"] is True


@pytest.mark.parametrize("inputs", [{}, {"prompt": "a cat", "duration": 10, "size": "1280*720"}])
def test_price_is_zero_whatever_the_inputs(app_client, inputs):
    r = app_client.post("/api/v3/model/price", json={"model_id": MODEL_ID, "inputs": inputs})
    assert r.status_code == 200
    body = r.json()
    assert body["code"] == 200 and "error" not in body
    d = body["data"]
    assert d["model_id"] == MODEL_ID and d["price"] == 0 and d["discounted_price"] == 0


def test_pricing_shape(app_client):
    r = app_client.post("/api/v3/model/pricing", json={"model_id": MODEL_ID, "inputs": {"prompt": "x"}})
    assert r.status_code == 200 and r.json()["data"]["unit_price"] == 0


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "must be a JSON object"),
        (b'{"inputs": {}}', "model_id is required"),
        (b'{"model_id": "black-forest-labs/flux-dev"}', "unknown model_id 'black-forest-labs/flux-dev'"),
        (f'{{"model_id": "{MODEL_ID}", "inputs": "x"}}'.encode(), "inputs must be a JSON object"),
    ],
)
def test_price_bad_bodies_are_400_envelopes(app_client, body, message):
    r = app_client.post("/api/v3/model/price", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    got = r.json()
    assert got["code"] == 400 and got["data"] is None and message in got["message"]


@pytest.mark.parametrize(
    "method, path",
    [("GET", "/api/v3/balance"), ("POST", "/api/v3/model/price"), ("POST", "/api/v3/model/pricing")],
)
def test_stubs_need_the_key(app_client, method, path):
    body = {"model_id": MODEL_ID, "inputs": {}}
    r = app_client.request(method, path, json=body, headers={"Authorization": ""})
    assert r.status_code == 401 and r.json()["code"] == 401 and "Missing API key" in r.json()["message"]
    r = app_client.request(method, path, json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["message"] == "Invalid API key"


def test_the_router_carries_the_key_dependency():
    from fastapi.params import Depends

    from server.auth import require_key
    from server.routes import compat

    assert [d.dependency for d in compat.router.dependencies if isinstance(d, Depends)] == [require_key]
