"""Media uploads (contract §3.4): the SDK's two-step ticket flow, the legacy multipart endpoint
and its aliases, limits and content sniffing. In process (TestClient, no worker) except the
ComfyUI round trip at the end, which runs a job on the live server."""

import time

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.routes import uploads
from server.settings import Settings
from tests.conftest import API_KEY, wait_terminal
from tests.samples import QUICK, png_bytes, write_mp4

KEY = "k-upload"
IMAGE_LIMIT = 4000
VIDEO_LIMIT = 60_000
HTML = b"<!doctype html><html><body><script>alert(document.cookie)</script></body></html>"


@pytest.fixture
def app_client(tmp_path):
    app = create_app(
        Settings(
            data_dir=tmp_path,
            workers=0,
            api_keys=[KEY],
            max_image_bytes=IMAGE_LIMIT,
            max_video_bytes=VIDEO_LIMIT,
        )
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        yield c


@pytest.fixture
def mp4(tmp_path):
    return write_mp4(tmp_path / "clip.mp4").read_bytes()


def local(url: str) -> str:
    assert url.startswith("http://testserver/")
    return url[len("http://testserver") :]


def ticket(c, filename="ref.png", size=None, content_type="image/png"):
    body = {"filename": filename}
    if size is not None:
        body["size"] = size
    if content_type:
        body["content_type"] = content_type
    return c.post("/api/v3/media/uploads", json=body)


def put(c, url, data, headers=None):
    # Exactly what the SDK sends: the ticket's headers, no Authorization.
    return c.put(local(url), content=data, headers={"Authorization": "", **(headers or {})})


# Two-step ticket flow ----------------------------------------------------------------------------


def test_ticket_flow_put_needs_no_key_and_works_once(app_client):
    png = png_bytes()
    r = ticket(app_client, size=len(png))
    assert r.status_code == 200
    body = r.json()
    assert body["code"] == 200 and body["message"] == "success"
    d = body["data"]
    assert d["type"] == "image" and d["filename"] == "ref.png" and d["size"] == len(png)
    up = d["upload"]
    assert up["method"] == "PUT" and up["headers"] == {"Content-Type": "image/png"}
    assert up["url"].startswith("http://testserver/api/v3/media/uploads/")
    assert d["download_url"].startswith("http://testserver/media/uploads/")
    assert d["download_url"].endswith("/ref.png")
    # Nothing there before the PUT.
    assert app_client.get(local(d["download_url"])).status_code == 404

    r = put(app_client, up["url"], png, up["headers"])
    assert r.status_code == 200, r.text
    assert r.json()["code"] == 200 and r.json()["data"]["download_url"] == d["download_url"]
    got = app_client.get(local(d["download_url"]), headers={"Authorization": ""})
    assert got.status_code == 200 and got.content == png and got.headers["content-type"] == "image/png"

    again = put(app_client, up["url"], png_bytes(8, 8), up["headers"])
    assert again.status_code == 409 and "already used" in again.json()["message"]
    assert app_client.get(local(d["download_url"])).content == png  # not overwritten


def test_ticket_needs_a_key(app_client):
    r = app_client.post("/api/v3/media/uploads", json={"filename": "a.png"}, headers={"Authorization": ""})
    assert r.status_code == 401 and r.json()["code"] == 401


def test_forged_and_expired_tickets_are_refused(app_client):
    png = png_bytes()
    url = ticket(app_client).json()["data"]["upload"]["url"]
    token = url.rsplit("/", 1)[1]
    body, sig = token.split(".")
    flipped = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")
    for bad in (
        f"{body}.{flipped}",  # signature changed
        f"{body[:-4]}abcd.{sig}",  # claims changed under the old signature
        body,  # no signature at all
        "not-a-token",
        "%C3%A9.%C3%A9",  # non-ASCII: refused, not a 500
    ):
        r = app_client.put(f"/api/v3/media/uploads/{bad}", content=png)
        assert r.status_code == 403, (bad, r.text)
        assert r.json()["message"] == "invalid upload URL"

    # A correctly signed ticket whose time ran out.
    st = app_client.app.state.wan
    expired = uploads._sign(st, {"key": "uploads/0123456789abcdef/old.png", "exp": time.time() - 1})
    r = app_client.put(f"/api/v3/media/uploads/{expired}", content=png)
    assert r.status_code == 403 and "expired" in r.json()["message"]
    # The real ticket still works afterwards.
    assert app_client.put(local(url), content=png).status_code == 200


def test_ticket_of_another_server_is_refused(app_client, tmp_path):
    other = create_app(Settings(data_dir=tmp_path / "other", workers=0, api_keys=[KEY]))
    with TestClient(other) as c2:
        c2.headers["Authorization"] = f"Bearer {KEY}"
        foreign = ticket(c2).json()["data"]["upload"]["url"]
    r = app_client.put(local(foreign), content=png_bytes())
    assert r.status_code == 403


def test_tickets_have_their_own_secret_and_survive_a_restart(app_client, tmp_path):
    import inspect

    from server.webhooks import webhook_secret

    st = app_client.app.state.wan
    url = ticket(app_client).json()["data"]["upload"]["url"]
    secret = st.store.get_setting("upload_ticket_secret")
    hook = webhook_secret(st.store)
    assert secret and secret not in hook and hook.removeprefix("whsec_") not in secret
    assert "server.webhooks" not in inspect.getsource(uploads)
    # A new app on the same data dir (a restart) verifies tickets the first one signed.
    again = create_app(Settings(data_dir=tmp_path, workers=0, api_keys=[KEY]))
    with TestClient(again) as c2:
        assert put(c2, url, png_bytes()).status_code == 200
    assert st.store.get_setting("upload_ticket_secret") == secret


def test_ticket_put_sniffs_the_bytes(app_client, mp4):
    up = ticket(app_client).json()["data"]["upload"]
    # HTML claiming to be a PNG: refused, and the ticket stays usable for the real file.
    r = put(app_client, up["url"], HTML, {"Content-Type": "image/png"})
    assert r.status_code == 400 and "unsupported file type" in r.json()["message"]
    r = put(app_client, up["url"], b"")
    assert r.status_code == 400 and "empty" in r.json()["message"]
    # The type comes from the bytes, not the claim: an MP4 sent on an image ticket is a video.
    r = put(app_client, up["url"], mp4, {"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["data"]["type"] == "video"
    assert r.json()["data"]["content_type"] == "video/mp4"


def test_ticket_size_limits(app_client, mp4):
    # Declared too large for its declared type: refused before any byte is sent.
    r = ticket(app_client, size=IMAGE_LIMIT + 1)
    assert r.status_code == 413 and r.json()["code"] == 413
    assert "image uploads are limited" in r.json()["message"]
    r = ticket(app_client, "big.mp4", size=VIDEO_LIMIT + 1, content_type="video/mp4")
    assert r.status_code == 413 and "video uploads are limited" in r.json()["message"]
    assert ticket(app_client, "clip.mp4", size=IMAGE_LIMIT + 1, content_type="video/mp4").status_code == 200
    r = ticket(app_client, size="12")
    assert r.status_code == 400 and "size" in r.json()["message"]

    # Declared small (or not at all) but the bytes are larger: the PUT refuses them.
    big_png = png_bytes(64, 64, noise=True)
    assert IMAGE_LIMIT < len(big_png) < VIDEO_LIMIT
    up = ticket(app_client, size=100).json()["data"]["upload"]
    r = put(app_client, up["url"], big_png)
    assert r.status_code == 413 and "image uploads are limited" in r.json()["message"]
    up = ticket(app_client, "x", content_type=None).json()["data"]["upload"]
    r = put(app_client, up["url"], b"\x89PNG\r\n\x1a\n" + b"\0" * VIDEO_LIMIT)
    assert r.status_code == 413
    # A video between the two limits is fine.
    up = ticket(app_client, "clip.mp4", content_type="video/mp4").json()["data"]["upload"]
    assert put(app_client, up["url"], mp4).status_code == 200


def test_stored_names_keep_a_media_extension(app_client):
    png = png_bytes()
    # A PNG named .html must not be served as text/html from this origin.
    d = ticket(app_client, "evil.html", content_type="image/png").json()["data"]
    assert d["download_url"].endswith("/evil.html.png")
    assert put(app_client, d["upload"]["url"], png).status_code == 200
    assert app_client.get(local(d["download_url"])).headers["content-type"] == "image/png"
    d = ticket(app_client, "noext", content_type=None).json()["data"]
    assert d["download_url"].endswith("/noext.bin")
    r = app_client.post("/api/v3/media/upload/binary", files={"file": ("page.svg", png, "image/svg+xml")})
    url = r.json()["data"]["download_url"]
    assert url.endswith("/page.svg.png")
    assert app_client.get(local(url)).headers["content-type"] == "image/png"


# Multipart --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/api/v3/media/upload/binary", "/api/v2/media/upload/binary", "/api/v3/upload"]
)
def test_multipart_endpoints(app_client, path):
    png = png_bytes()
    r = app_client.post(path, files={"file": ("ref.png", png, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["code"] == 200 and body["message"] == "success"
    d = body["data"]
    assert d["type"] == "image" and d["filename"] == "ref.png" and d["size"] == len(png)
    assert d["url"] == d["download_url"] and d["download_url"].startswith("http://testserver/media/uploads/")
    assert app_client.get(local(d["download_url"])).content == png


def test_multipart_refusals(app_client, mp4):
    path = "/api/v3/media/upload/binary"
    r = app_client.post(path, files={"file": ("ref.png", png_bytes())}, headers={"Authorization": ""})
    assert r.status_code == 401
    r = app_client.post(path, files={"image": ("ref.png", png_bytes())})
    assert r.status_code == 400 and "field named 'file'" in r.json()["message"]
    r = app_client.post(path, files={"file": ("ref.png", HTML, "image/png")})
    assert r.status_code == 400 and "unsupported file type" in r.json()["message"]
    r = app_client.post(path, files={"file": ("ref.png", png_bytes(64, 64, noise=True), "image/png")})
    assert r.status_code == 413 and r.json()["code"] == 413
    assert f"({IMAGE_LIMIT} bytes)" in r.json()["message"]
    r = app_client.post(path, files={"file": ("huge.mp4", mp4 + b"\0" * VIDEO_LIMIT, "video/mp4")})
    assert r.status_code == 413
    r = app_client.post(path, files={"file": ("clip.mp4", mp4, "video/mp4")})
    assert r.status_code == 200 and r.json()["data"]["type"] == "video"


# Live: the way ComfyUI nodes upload and poll ---------------------------------------------------


def test_comfyui_multipart_v2_upload_then_v2_poll(live_server):
    import requests

    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = requests.post(
        f"{live_server.url}/api/v2/media/upload/binary",
        headers=headers,
        files={"file": ("ref.png", png_bytes(96, 64), "image/png")},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["code"] == 200
    url = r.json()["data"]["download_url"]
    assert url.startswith(live_server.url + "/media/uploads/")

    # ComfyUI's VACE node body: explicit nulls, video "", enable_base64_output false.
    body = {
        "prompt": "a ref image comes alive",
        "images": [url],
        "video": "",
        "mask_image": None,
        "first_image": None,
        "last_image": None,
        "enable_base64_output": False,
        **QUICK,
    }
    r = requests.post(
        f"{live_server.url}/api/v3/wavespeed-ai/wan-2.1-14b-vace", json=body, headers=headers, timeout=60
    )
    assert r.status_code == 200 and r.json()["code"] == 200
    jid = r.json()["data"]["id"]
    deadline = time.monotonic() + 180
    while True:
        r = requests.get(f"{live_server.url}/api/v2/predictions/{jid}/result", headers=headers, timeout=30)
        assert r.status_code == 200 and r.json()["code"] == 200
        data = r.json()["data"]
        if data["status"] in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert data["status"] == "completed", data
    (out,) = data["outputs"]
    assert httpx.get(out, timeout=30).content[4:8] == b"ftyp"
    with live_server.client() as c:
        assert wait_terminal(c, jid)["outputs"] == [out]
