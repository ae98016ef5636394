"""The OpenAPI document and the docs pages: the submit body comes from the kernel's field table,
keyed routes declare the bearer scheme, and /docs and /redoc load nothing from another host."""

import re
import warnings
from urllib.parse import urlparse

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.schemas import request_schema
from server.settings import MODEL_ID, Settings

PUBLIC = {
    ("get", "/"),  # the links page
    ("get", "/health"),
    ("get", "/health/ready"),
    ("get", "/media/{key}"),
    ("head", "/media/{key}"),
    ("put", "/api/v3/media/uploads/{token}"),
}


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path, workers=0, api_keys=["k-docs"]))) as c:
        yield c


def _operations(doc):
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield method, path, op


def test_openapi_needs_no_key_and_warns_of_nothing(client):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. duplicate operation ids
        r = client.get("/openapi.json", headers={"Authorization": ""})
    assert r.status_code == 200 and r.json()["openapi"].startswith("3.")


def test_submit_body_is_the_field_table_schema(client):
    doc = client.get("/openapi.json").json()
    for version in ("v3", "v2"):
        body = doc["paths"][f"/api/{version}/{MODEL_ID}"]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == request_schema()


def test_bearer_scheme_on_keyed_routes_only(client):
    doc = client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        **doc["components"]["securitySchemes"]["bearer"],
        "type": "http",
        "scheme": "bearer",
    }
    seen = set()
    for method, path, op in _operations(doc):
        seen.add((method, path))
        if (method, path) in PUBLIC:
            assert "security" not in op, (method, path)
        else:
            assert op.get("security") == [{"bearer": []}], (method, path)
    assert PUBLIC <= seen
    assert ("get", "/api/v3/models") in seen and ("post", "/api/v3/media/uploads") in seen


def _asset_urls(html: str) -> list[str]:
    return re.findall(r'<(?:script|link)\b[^>]*?\b(?:src|href)="([^"]+)"', html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_are_served_from_the_app_alone(client, page):
    r = client.get(page, headers={"Authorization": ""})
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    html = r.text
    # Nothing on another host: no CDN script, stylesheet, font or favicon.
    for url in re.findall(r"https?://[^\s\"'<>)]+", html):
        assert urlparse(url).hostname == "testserver", url
    assets = _asset_urls(html)
    assert any(a.endswith(".js") for a in assets), assets
    if page == "/docs":
        assert any(a.endswith(".css") for a in assets), assets
    for url in assets:
        assert not urlparse(url).netloc, url
        got = client.get(url, headers={"Authorization": ""})
        assert got.status_code == 200 and len(got.content) > 0, url
    assert "/openapi.json" in html


def test_docs_oauth2_redirect_is_local(client):
    r = client.get("/docs/oauth2-redirect")
    assert r.status_code == 200
    for url in re.findall(r"https?://[^\s\"'<>)]+", r.text):
        assert urlparse(url).hostname == "testserver", url
