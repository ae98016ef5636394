"""The app on S3 storage: a real app (TestClient, no worker) whose storage is a bucket on a real
moto server process (tests/s3.py). Uploads in both shapes and both `media_urls` modes, /media/
streaming with GET, HEAD and Range, presigned URLs fetched over HTTP, the worker's read of a URL
we handed out, retention's 410, and the 503 of a bucket that cannot be reached."""

import base64

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.kernel.errors import MediaAccessError
from server.kernel.request import VaceRequest
from server.settings import Settings
from server.storage.s3 import S3Storage
from server.testing import free_port
from server.worker.fetching import fetch_inputs
from tests.samples import png_bytes, write_mp4

# The moto server fixtures, registered once for the run: one server for every module using them.
pytest_plugins = ["tests.s3"]

KEY = "k-s3"
SUBMIT = "/api/v3/wavespeed-ai/wan-2.1-14b-vace"
PREFIX = "media"


def make_client(tmp_path, server, bucket, mode="api", **kw) -> TestClient:
    settings = Settings(
        data_dir=tmp_path,
        workers=0,
        api_keys=[KEY],
        storage_url=f"s3://{bucket}/{PREFIX}",
        s3_endpoint_url=server.endpoint,
        s3_region="us-east-1",
        media_urls=mode,
        presign_seconds=120,
        **kw,
    )
    c = TestClient(create_app(settings), raise_server_exceptions=False)
    c.headers["Authorization"] = f"Bearer {KEY}"
    return c


@pytest.fixture
def api(tmp_path, moto_server, s3_bucket):
    with make_client(tmp_path, moto_server, s3_bucket) as c:
        yield c


@pytest.fixture
def presigned(tmp_path, moto_server, s3_bucket):
    with make_client(tmp_path, moto_server, s3_bucket, mode="presigned") as c:
        yield c


def path_of(url: str) -> str:
    assert url.startswith("http://testserver/media/"), url
    return url[len("http://testserver") :]


def in_bucket(server, bucket, key) -> bytes:
    return server.client().get_object(Bucket=bucket, Key=f"{PREFIX}/{key}")["Body"].read()


def upload(c, data: bytes, name: str = "ref.png") -> dict:
    r = c.post("/api/v3/media/upload/binary", files={"file": (name, data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    return r.json()["data"]


def fetch_as_worker(c, **inp) -> dict:
    """What the worker's fetch makes of a job input naming these URLs (server/worker/fetching.py)."""
    st = c.app.state.wan
    req = VaceRequest.from_input({"prompt": "x", **inp})
    return fetch_inputs(req, settings=st.settings, storage=st.storage, base_urls=["http://testserver"])


# "api" mode: everything through /media/ -----------------------------------------------------------


def test_multipart_upload_is_streamed_from_the_bucket_with_ranges(api, moto_server, s3_bucket):
    png = png_bytes()
    d = upload(api, png)
    assert d["content_type"] == "image/png" and d["size"] == len(png)
    url = path_of(d["download_url"])
    key = url[len("/media/") :]
    assert in_bucket(moto_server, s3_bucket, key) == png  # stored in the bucket, under the prefix
    anon = {"Authorization": ""}

    r = api.get(url, headers=anon)
    assert r.status_code == 200 and r.content == png
    assert r.headers["content-type"] == "image/png" and r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["content-length"] == str(len(png)) and r.headers["accept-ranges"] == "bytes"
    assert r.headers["last-modified"].endswith(" GMT")

    n = len(png)
    for rng, (start, stop) in {
        "bytes=2-5": (2, 6),
        "bytes=5-": (5, n),
        "bytes=-3": (n - 3, n),
        "bytes=0-0": (0, 1),
        f"bytes=10-{n + 500}": (10, n),  # an end past the file: up to its end
        f"bytes=-{n + 7}": (0, n),  # a suffix longer than the file: all of it
        "BYTES=1-2": (1, 3),
    }.items():
        r = api.get(url, headers={**anon, "Range": rng})
        assert r.status_code == 206, rng
        assert r.content == png[start:stop], rng
        assert r.headers["content-range"] == f"bytes {start}-{stop - 1}/{n}", rng
        assert r.headers["content-length"] == str(stop - start)

    for unsatisfiable in (f"bytes={n}-", f"bytes={n + 10}-{n + 20}", "bytes=-0"):
        r = api.get(url, headers={**anon, "Range": unsatisfiable})
        assert r.status_code == 416, unsatisfiable
        assert r.headers["content-range"] == f"bytes */{n}"
        body = r.json()
        assert body["code"] == 416 and body["data"] is None and f"{n} bytes long" in body["message"]

    # Range headers this route does not serve get the whole file (RFC 9110 lets a server ignore them).
    for ignored in ("bytes=0-1,4-5", "items=0-1", "bytes=5-2", "bytes=-", "bytes=x-y"):
        r = api.get(url, headers={**anon, "Range": ignored})
        assert r.status_code == 200 and r.content == png, ignored

    h = api.head(url, headers=anon)
    assert h.status_code == 200 and h.content == b"" and h.headers["content-length"] == str(n)
    assert h.headers["content-type"] == "image/png" and h.headers["x-content-type-options"] == "nosniff"
    h = api.head(url, headers={**anon, "Range": "bytes=1-3"})
    assert h.status_code == 206 and h.content == b"" and h.headers["content-range"] == f"bytes 1-3/{n}"
    assert h.headers["content-length"] == "3"


def test_missing_and_invalid_keys_are_404(api):
    for path in ("/media/uploads/" + "0" * 32 + "/none.png", "/media/uploads/a/../../x", "/media/uploads//x"):
        r = api.get(path, headers={"Authorization": ""})
        assert r.status_code == 404, path
        assert r.json()["code"] == 404 and r.json()["message"].startswith("media not found")
        assert api.head(path).status_code == 404


def test_two_step_ticket_goes_through_the_api(api, moto_server, s3_bucket):
    png = png_bytes()
    d = api.post("/api/v3/media/uploads", json={"filename": "ref.png", "content_type": "image/png"}).json()[
        "data"
    ]
    up = d["upload"]
    assert up["url"].startswith("http://testserver/api/v3/media/uploads/") and up["headers"] == {
        "Content-Type": "image/png"
    }
    put = up["url"][len("http://testserver") :]
    assert api.get(path_of(d["download_url"])).status_code == 404  # nothing before the PUT
    r = api.put(put, content=png, headers={"Authorization": "", **up["headers"]})
    assert r.status_code == 200, r.text
    assert api.get(path_of(d["download_url"])).content == png
    key = path_of(d["download_url"])[len("/media/") :]
    assert in_bucket(moto_server, s3_bucket, key) == png
    # Checked here as with the local folder: once only, and the sniffed type.
    assert api.put(put, content=png, headers={"Authorization": ""}).status_code == 409
    d2 = api.post("/api/v3/media/uploads", json={"filename": "x.png", "content_type": "image/png"}).json()[
        "data"
    ]
    r = api.put(
        d2["upload"]["url"][len("http://testserver") :], content=b"<html>", headers={"Authorization": ""}
    )
    assert r.status_code == 400


def test_an_expired_output_answers_410_on_s3(api, tmp_path, moto_server, s3_bucket):
    r = api.post(SUBMIT, json={"prompt": "a cat"})
    jid = r.json()["data"]["id"]
    st = api.app.state.wan
    assert st.store.claim("w1", 30).id == jid
    out = st.storage.put_file(
        st.storage.new_key(f"outputs/{jid}", "output.mp4"), write_mp4(tmp_path / "o.mp4")
    )
    assert st.store.complete(jid, "w1", outputs=[out], has_nsfw=[False], inference_ms=5, seed=1, extra={})
    url = api.get(f"/api/v3/predictions/{jid}/result").json()["data"]["outputs"][0]
    assert api.get(path_of(url)).status_code == 200
    finished = st.store.get(jid).finished_at
    rep = st.retention.run_once(now=finished + st.settings.retention_seconds + 1)
    assert rep.expired_jobs == 1 and rep.deleted_files == 1
    assert list(st.storage.iter_objects(f"outputs/{jid}")) == []  # gone from the bucket
    r = api.get(path_of(url))
    assert r.status_code == 410 and "expired after 7 days" in r.json()["message"]
    assert api.head(path_of(url)).status_code == 410


# "presigned" mode: the bucket's own URLs ----------------------------------------------------------


def test_presigned_ticket_puts_straight_into_the_bucket(presigned, moto_server, s3_bucket):
    png = png_bytes()
    r = presigned.post(
        "/api/v3/media/uploads", json={"filename": "ref.png", "content_type": "image/png", "size": len(png)}
    )
    assert r.status_code == 200, r.text
    d = r.json()["data"]
    up = d["upload"]
    bucket_url = f"{moto_server.endpoint}/{s3_bucket}/{PREFIX}/uploads/"
    assert up["method"] == "PUT" and up["url"].startswith(bucket_url) and "X-Amz-Signature=" in up["url"]
    assert up["headers"] == {"Content-Type": "image/png"} and "content-type%3Bhost" in up["url"]
    assert d["download_url"].startswith(bucket_url) and d["download_url"].split("?")[0].endswith("/ref.png")
    # Exactly what the SDK does: PUT the ticket's headers, no Authorization.
    assert httpx.put(up["url"], content=png, headers=up["headers"], trust_env=False).status_code == 200
    got = httpx.get(d["download_url"], trust_env=False)
    assert got.status_code == 200 and got.content == png and got.headers["content-type"] == "image/png"
    # A client that sends the download_url back as an input: the worker reads it from the bucket.
    st = presigned.app.state.wan
    key = st.storage.key_from_url(d["download_url"], [])
    assert key is not None and key.startswith("uploads/") and in_bucket(moto_server, s3_bucket, key) == png
    assert fetch_as_worker(presigned, images=[d["download_url"]]) == {"images": [png]}
    # The API still streams it too.
    assert presigned.get(f"/media/{key}", headers={"Range": "bytes=0-3"}).content == png[:4]
    # A size declared on the ticket is still checked here.
    big = presigned.post(
        "/api/v3/media/uploads", json={"filename": "a.png", "content_type": "image/png", "size": 10**12}
    )
    assert big.status_code == 413


def test_what_a_presigned_put_does_not_check_the_worker_does(tmp_path, moto_server, s3_bucket):
    with make_client(tmp_path, moto_server, s3_bucket, mode="presigned", max_image_bytes=1000) as c:
        d = c.post("/api/v3/media/uploads", json={"filename": "a.png", "content_type": "image/png"}).json()[
            "data"
        ]
        # The bucket takes any size (and would take it again: no one-time use).
        for _ in range(2):
            put = httpx.put(
                d["upload"]["url"], content=b"\x89PNG" + b"\0" * 5000, headers=d["upload"]["headers"]
            )
            assert put.status_code == 200
        with pytest.raises(MediaAccessError, match="images\\[0\\]"):
            fetch_as_worker(c, images=[d["download_url"]])


def test_presigned_multipart_upload_and_outputs(presigned, moto_server, s3_bucket, tmp_path):
    png = png_bytes()
    d = upload(presigned, png)
    assert d["download_url"].startswith(f"{moto_server.endpoint}/{s3_bucket}/{PREFIX}/uploads/")
    assert httpx.get(d["download_url"], trust_env=False).content == png
    # Inline inputs are moved to the bucket at submit; the job's input names them by a URL the
    # worker maps back to the key, long after that URL's signature expired.
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    jid = presigned.post(SUBMIT, json={"prompt": "a cat", "images": [uri]}).json()["data"]["id"]
    st = presigned.app.state.wan
    (inline,) = st.store.get(jid).input["images"]
    assert "X-Amz-Signature=" in inline and st.storage.key_from_url(inline, []).startswith(f"inputs/{jid}/")
    assert fetch_as_worker(presigned, images=[inline]) == {"images": [png]}
    # Outputs are stored as keys and rendered as fresh presigned URLs on every poll.
    assert st.store.claim("w1", 30).id == jid
    mp4 = write_mp4(tmp_path / "o.mp4").read_bytes()
    out = st.storage.put_bytes(st.storage.new_key(f"outputs/{jid}", "output.mp4"), mp4)
    assert st.store.complete(jid, "w1", outputs=[out], has_nsfw=[False], inference_ms=5, seed=1, extra={})
    assert st.store.get(jid).outputs == [out]
    (url,) = presigned.get(f"/api/v3/predictions/{jid}/result").json()["data"]["outputs"]
    assert (
        url.startswith(f"{moto_server.endpoint}/{s3_bucket}/{PREFIX}/{out}?") and "X-Amz-Expires=120&" in url
    )
    r = httpx.get(url, trust_env=False)
    assert r.status_code == 200 and r.content == mp4 and r.headers["content-type"] == "video/mp4"
    assert st.storage.key_from_url(url, []) == out


# Failures ---------------------------------------------------------------------------------------


def test_a_missing_bucket_stops_the_app_at_start_up(tmp_path, moto_server):
    with pytest.raises(RuntimeError, match="the S3 bucket 'no-such-bucket' does not exist"):
        make_client(tmp_path, moto_server, "no-such-bucket")
    with pytest.raises(ValueError, match="WAN_VACE_MEDIA_URLS=presigned needs S3 storage"):
        create_app(Settings(data_dir=tmp_path, workers=0, media_urls="presigned"))


def test_an_unreachable_bucket_answers_503(api):
    st = api.app.state.wan
    # The bucket's endpoint goes away after start-up: nothing listens at this port.
    st.storage = S3Storage("bucket", PREFIX, endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1)
    for r in (
        api.get("/media/uploads/" + "0" * 32 + "/a.png", headers={"Authorization": ""}),
        api.post("/api/v3/media/upload/binary", files={"file": ("a.png", png_bytes(), "image/png")}),
    ):
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["code"] == 503 and body["data"] is None and r.headers["retry-after"] == "5"
        assert body["message"].startswith("The media storage is unavailable right now")
