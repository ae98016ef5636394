"""The HTTP contract, in process (no worker: `workers=0`), with FastAPI's TestClient."""

import re

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from server.store import StoreUnreachable

KEY = "k-123"


@pytest.fixture
def app_client(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, workers=0, api_keys=[KEY], max_queue=3))
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        yield c


def submit(c, body=None, **kw):
    return c.post("/api/v3/wavespeed-ai/wan-2.1-14b-vace", json=body or {"prompt": "a cat"}, **kw)


def test_submit_envelope(app_client):
    r = submit(app_client)
    assert r.status_code == 200
    body = r.json()
    assert body["code"] == 200 and body["message"] == "success" and "error" not in body
    d = body["data"]
    assert re.fullmatch(r"[0-9a-f]{32}", d["id"])
    assert d["status"] == "created" and d["model"] == "wavespeed-ai/wan-2.1-14b-vace"
    assert d["urls"]["get"] == f"http://testserver/api/v3/predictions/{d['id']}/result"
    assert d["outputs"] == [] and d["has_nsfw_contents"] == [] and d["error"] == ""
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", d["created_at"])
    assert d["timings"] == {"inference": 0}


def test_result_routes_identical_and_v2_alias(app_client):
    jid = submit(app_client).json()["data"]["id"]
    a = app_client.get(f"/api/v3/predictions/{jid}/result").json()
    b = app_client.get(f"/api/v3/predictions/{jid}").json()
    c = app_client.get(f"/api/v2/predictions/{jid}/result").json()
    assert a == b == c and a["data"]["id"] == jid


def test_ids_are_unique(app_client):
    ids = {submit(app_client).json()["data"]["id"] for _ in range(3)}
    assert len(ids) == 3


def test_public_url_setting(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, workers=0, open_access=True, public_url="https://vace.example.org/"))
    with TestClient(app) as c:
        d = submit(c).json()["data"]
        assert d["urls"]["get"].startswith("https://vace.example.org/api/v3/predictions/")


def test_validation_error_is_400_envelope(app_client):
    r = submit(app_client, {"prompt": "x", "duration": 11})
    assert r.status_code == 400
    assert r.json() == {
        "code": 400,
        "message": "duration must be between 5 and 10, got 11",
        "error": "duration must be between 5 and 10, got 11",
        "data": None,
    }


def test_invalid_json(app_client):
    r = app_client.post(
        "/api/v3/wavespeed-ai/wan-2.1-14b-vace", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["message"]


def test_auth(app_client):
    r = app_client.post("/api/v3/wavespeed-ai/wan-2.1-14b-vace", json={"prompt": "x"}, headers={"Authorization": ""})
    assert r.status_code == 401 and r.json()["code"] == 401 and "Missing API key" in r.json()["message"]
    r = app_client.post("/api/v3/wavespeed-ai/wan-2.1-14b-vace", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["message"] == "Invalid API key"
    r = app_client.get("/api/v3/predictions/abc/result", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    # Health needs no key.
    assert app_client.get("/health", headers={"Authorization": ""}).status_code == 200


def test_get_with_json_content_type_and_no_body(app_client):
    # The SDKs send Content-Type: application/json on GETs too (contract §2).
    jid = submit(app_client).json()["data"]["id"]
    r = app_client.get(f"/api/v3/predictions/{jid}/result", headers={"Content-Type": "application/json"})
    assert r.status_code == 200


def test_unknown_id_and_route_are_404_json(app_client):
    r = app_client.get("/api/v3/predictions/" + "0" * 32 + "/result")
    assert r.status_code == 404 and r.json()["code"] == 404 and r.json()["data"] is None
    r = app_client.get("/api/v3/nowhere")
    assert r.status_code == 404 and r.json()["code"] == 404


def test_generated_key_when_none_configured(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, workers=0))
    key = (tmp_path / "api_key").read_text().strip()
    assert (tmp_path / "api_key").stat().st_mode & 0o777 == 0o600
    with TestClient(app) as c:
        assert submit(c).status_code == 401
        assert submit(c, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    # The same key survives a restart.
    create_app(Settings(data_dir=tmp_path, workers=0))
    assert (tmp_path / "api_key").read_text().strip() == key


def test_open_mode_is_explicit(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, workers=0, open_access=True))
    with TestClient(app) as c:
        assert submit(c).status_code == 200
        assert c.get("/health").json()["auth"] == "open"


def test_queue_full_is_429(app_client):
    for _ in range(3):
        assert submit(app_client).status_code == 200
    r = submit(app_client)
    assert r.status_code == 429 and "queue is full" in r.json()["message"]
    assert r.headers["retry-after"] == "5"


def test_health_api_only(app_client):
    h = app_client.get("/health").json()
    assert h["status"] == "ready" and "API only" in h["reason"]
    assert h["queue_depth"] == 0 and h["model"]["name"] == "tiny"


def test_data_uri_inputs_are_moved_to_storage(app_client, tmp_path):
    import base64

    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * 32).decode()
    d = submit(app_client, {"prompt": "x", "images": [f"data:image/png;base64,{png}"]}).json()["data"]
    from server.store.sqlite import SqliteJobStore

    job = SqliteJobStore(tmp_path / "jobs.sqlite3").get(d["id"])
    url = job.input["images"][0]
    assert url.startswith("http://testserver/media/inputs/") and url.endswith(".png")
    assert app_client.get(url.replace("http://testserver", "")).content.startswith(b"\x89PNG")
    r = submit(app_client, {"prompt": "x", "video": "data:video/mp4;base64,@@@"})
    assert r.status_code == 400 and "video" in r.json()["message"]


def test_media_route_refuses_traversal(app_client):
    assert app_client.get("/media/../jobs.sqlite3").status_code == 404
    assert app_client.get("/media/%2e%2e/jobs.sqlite3").status_code == 404


@pytest.mark.parametrize(
    "key",
    [
        "a" * 300,  # one path component longer than any file system allows (ENAMETOOLONG)
        "/".join(["b" * 250] * 30),  # a path longer than PATH_MAX
        "outputs/%00/x.mp4",  # a NUL byte
        "outputs/" + "%ff%fe" * 50,  # bytes that are not UTF-8
        "outputs/\\..\\..\\jobs.sqlite3",
        "outputs/",
        "%20",
    ],
)
def test_media_route_answers_404_for_any_key_that_names_no_file(app_client, key):
    for method in ("GET", "HEAD"):
        r = app_client.request(method, "/media/" + key)
        assert r.status_code == 404, (method, key, r.status_code)
    body = app_client.get("/media/" + key).json()
    assert body["code"] == 404 and body["data"] is None and "not found" in body["message"]


def test_inline_html_is_not_served_as_html(app_client, tmp_path):
    import base64

    html = base64.b64encode(b"<html><script>alert(1)</script></html>").decode()
    d = submit(app_client, {"prompt": "x", "first_image": f"data:text/html;base64,{html}"}).json()["data"]
    from server.store.sqlite import SqliteJobStore

    url = SqliteJobStore(tmp_path / "jobs.sqlite3").get(d["id"]).input["first_image"]
    assert url.endswith(".bin")
    r = app_client.get(url.replace("http://testserver", ""))
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-content-type-options"] == "nosniff"


def test_bad_store_and_storage_urls_fail_at_startup(tmp_path):
    # Only s3:// is a storage URL (S3 itself is tested against moto: tests/api/test_s3_media.py).
    with pytest.raises(ValueError, match="WAN_VACE_STORAGE_URL must be s3://bucket"):
        create_app(Settings(data_dir=tmp_path, workers=0, storage_url="gs://bucket/x"))
    # A PostgreSQL URL is opened at start-up: a server that is not there fails it, naming it.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StoreUnreachable, match=f"127.0.0.1:{port}"):
        create_app(Settings(data_dir=tmp_path, workers=0, database_url=f"postgresql://127.0.0.1:{port}/test"))


def test_queue_position_of_queued_jobs(app_client):
    ids = [submit(app_client).json()["data"]["id"] for _ in range(3)]
    positions = [app_client.get(f"/api/v3/predictions/{i}/result").json()["data"]["queue_position"] for i in ids]
    assert positions == [0, 1, 2]
    app_client.post(f"/api/v3/predictions/{ids[0]}/cancel")
    assert app_client.get(f"/api/v3/predictions/{ids[2]}/result").json()["data"]["queue_position"] == 1
    assert "queue_position" not in app_client.get(f"/api/v3/predictions/{ids[0]}/result").json()["data"]


def test_oversized_submit_body_is_413(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, workers=0, open_access=True, max_request_bytes=1000))
    with TestClient(app) as c:
        r = submit(c, {"prompt": "x" * 2000})
        assert r.status_code == 413 and "media/uploads" in r.json()["message"]
        assert submit(c, {"prompt": "x" * 100}).status_code == 200


def test_routes_import_state_not_the_app_and_set_auth_once_per_router():
    """No route module imports server.app (which imports every route) or checks the key by
    hand: keyed routers carry the `require_key` dependency."""
    from pathlib import Path

    from fastapi.params import Depends

    from server.auth import require_key
    from server.routes import compat, health, media, platform, playground, predictions, uploads

    for f in (Path(__file__).parents[2] / "server" / "routes").glob("*.py"):
        text = f.read_text()
        # An escaped pattern, so that a grep for the call finds only server/auth.py.
        assert "server.app" not in text and not re.search(r"auth\.check", text), f.name
    for router in (predictions.router, platform.router, uploads.router, compat.router):
        assert [d.dependency for d in router.dependencies if isinstance(d, Depends)] == [require_key]
    for router in (health.router, media.router, uploads.signed, playground.router):
        assert router.dependencies == []


def test_key_is_checked_before_the_body_is_read(app_client):
    r = app_client.post(
        "/api/v3/wavespeed-ai/wan-2.1-14b-vace", content=b"{not json", headers={"Authorization": "Bearer nope"}
    )
    assert r.status_code == 401 and r.json()["message"] == "Invalid API key"
    r = app_client.post("/api/v3/predictions", content=b"[]", headers={"Authorization": ""})
    assert r.status_code == 401 and "Missing API key" in r.json()["message"]


def test_inline_data_uris_are_decoded_leniently_but_not_empty(app_client, tmp_path):
    """Submit and the worker's fetch share one decoder (server/datauri.py): the URL-safe
    alphabet, stripped padding and percent-encoding are accepted; an empty payload is not."""
    import base64

    from server.store.sqlite import SqliteJobStore

    png = b"\x89PNG\r\n\x1a\n" + b"\xfb\xff" * 16 + b"0"
    for uri in (
        "data:image/png;base64," + base64.urlsafe_b64encode(png).decode().rstrip("="),
        "data:image/png;base64," + base64.b64encode(png).decode().replace("/", "%2F").replace("+", "%2B"),
    ):
        r = submit(app_client, {"prompt": "x", "images": [uri]})
        assert r.status_code == 200, r.text
        url = SqliteJobStore(tmp_path / "jobs.sqlite3").get(r.json()["data"]["id"]).input["images"][0]
        assert app_client.get(url.replace("http://testserver", "")).content == png
    r = submit(app_client, {"prompt": "x", "mask_image": "data:image/png;base64,"})
    assert r.status_code == 400 and r.json()["message"] == "mask_image: the data: URI is empty"
    r = submit(app_client, {"prompt": "x", "video": "data:video/mp4;base64"})
    assert r.status_code == 400 and r.json()["message"].startswith("video: malformed data: URI")


def test_media_answers_range_requests(app_client):
    st = app_client.app.state.wan
    key = st.storage.put_bytes(st.storage.new_key("outputs/r", "o.mp4"), bytes(range(100)))
    r = app_client.get(f"/media/{key}", headers={"Range": "bytes=10-19", "Authorization": ""})
    assert r.status_code == 206 and r.content == bytes(range(10, 20))
    assert r.headers["content-range"] == "bytes 10-19/100" and r.headers["content-type"] == "video/mp4"
    assert app_client.head(f"/media/{key}").headers["content-length"] == "100"


def test_history_cursor_reads_every_job_once_while_jobs_arrive(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, workers=0, api_keys=[KEY]))
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        ids = [submit(c).json()["data"]["id"] for _ in range(7)]
        c.post(f"/api/v3/predictions/{ids[2]}/cancel")
        seen, body = [], {"page_size": 3}
        while True:
            data = c.post("/api/v3/predictions", json=body).json()["data"]
            assert data["total"] == 7 + len(seen) // 3  # one more job arrives after each full page
            seen += [it["id"] for it in data["items"]]
            if "next_cursor" not in data:
                break
            body = {"page_size": 3, "cursor": data["next_cursor"]}
            submit(c)
        assert seen == ids[::-1]
        cancelled = c.post("/api/v3/predictions", json={"status": "cancelled", "page_size": 1}).json()["data"]
        assert [it["id"] for it in cancelled["items"]] == [ids[2]] and cancelled["total"] == 1
        after = {"status": "cancelled", "page_size": 1, "cursor": cancelled["next_cursor"]}
        assert c.post("/api/v3/predictions", json=after).json()["data"]["items"] == []

        for bad in ("not base64!", "bm9wZQ", 7, "WzEsIDJd"):  # garbage, "nope", a number, [1, 2]
            r = c.post("/api/v3/predictions", json={"cursor": bad})
            assert r.status_code == 400 and r.json()["code"] == 400
            assert "cursor must be a next_cursor" in r.json()["message"]


def test_polls_answered_on_the_event_loop_keep_positions_and_404s(app_client):
    # (Base64 outputs, answered in the thread pool: test_platform_api.py.)
    ids = [submit(app_client).json()["data"]["id"] for _ in range(2)]
    data = app_client.get(f"/api/v3/predictions/{ids[1]}/result").json()["data"]
    assert data["status"] == "created" and data["queue_position"] == 1
    r = app_client.get("/api/v3/predictions/" + "0" * 32 + "/result")
    assert r.status_code == 404 and r.json()["code"] == 404
