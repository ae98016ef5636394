"""`GET /`: the playground page to browsers, the JSON links to API clients; its assets under
/playground/ with their content types, nothing from another host, and no field list of its own
(the form comes from /api/v3/models, so it cannot drift from the validator's table)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.kernel.request import FIELDS
from server.routes.playground import STATIC
from server.settings import Settings

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path, workers=0, api_keys=["k-pg"]))) as c:
        yield c


def assets_of(html: str) -> list[str]:
    return re.findall(r'<(?:script|link)\b[^>]*?\b(?:src|href)="([^"]+)"', html)


def test_a_browser_gets_the_page_without_a_key(client):
    r = client.get("/", headers={"Accept": BROWSER, "Authorization": ""})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert "Accept" in r.headers["vary"]
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert 'id="request-form"' in r.text and 'id="api-key"' in r.text
    assert set(assets_of(r.text)) >= {"playground/app.js", "playground/style.css"}


@pytest.mark.parametrize("accept", [None, "*/*", "application/json"])
def test_api_clients_still_get_the_json_links(client, accept):
    headers = {"Authorization": ""} | ({"Accept": accept} if accept else {})
    r = client.get("/", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    d = r.json()
    assert d["links"]["model_schema"] == "http://testserver/api/v3/models"
    assert d["submit"] == "POST http://testserver/api/v3/wavespeed-ai/wan-2.1-14b-vace"
    assert d["playground"] == "open http://testserver/ in a browser"


def test_every_asset_the_page_names_is_served_with_its_type(client):
    html = client.get("/", headers={"Accept": BROWSER}).text
    local = [a for a in assets_of(html) if not a.startswith("data:")]
    assert local
    for asset in local:
        assert not re.match(r"^(https?:)?//", asset), f"{asset} is on another host"
        r = client.get("/" + asset, headers={"Authorization": ""})
        assert r.status_code == 200, (asset, r.text)
        suffix = asset[asset.rindex(".") :]
        assert r.headers["content-type"].split(";")[0] == TYPES[suffix], asset
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.content == (STATIC / asset.rsplit("/", 1)[1]).read_bytes()


def test_nothing_is_loaded_from_another_host():
    for path in STATIC.iterdir():
        text = path.read_text()
        # Links the page shows are relative; an absolute URL would be a CDN or a phone-home.
        assert not re.search(r"https?://", text), f"{path.name} names another host"
        assert "@import" not in text and "fonts.googleapis" not in text


@pytest.mark.parametrize("name", ["nope.js", "..%2Fplayground.py", "%2E%2E%2F%2E%2E%2Fapp.py", "index"])
def test_an_unknown_asset_is_a_404_envelope(client, name):
    r = client.get(f"/playground/{name}")
    assert r.status_code == 404
    body = r.json()
    assert body["code"] == 404 and body["data"] is None and body["message"]


def test_the_script_lists_no_fields_of_its_own():
    # The form is built from /api/v3/models: a field name in the script would be a second list
    # that the next field added to the table would not be in.
    script = (STATIC / "app.js").read_text()
    named = [f.name for f in FIELDS if "_" in f.name and f.name in script]
    assert not named, f"app.js names request fields: {named}"
