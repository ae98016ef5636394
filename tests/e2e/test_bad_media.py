"""Issue 4, end to end: bad media of each kind ends as a failed job (an HTTP 200 poll with
status `failed`) whose error names the request field and carries the right code (1401: decodable
but unacceptable, 1402: not fetchable or not decodable), and the server stays healthy.

The server here runs with the production SSRF policy (WAN_VACE_ALLOW_PRIVATE_URLS=false), so
loopback URLs are refused. To still serve media over http, and to test a redirect from an allowed
host to a refused one, the server's processes get a `sitecustomize` that treats exactly one
loopback address, 127.0.0.2, as a public host (a stand-in for "some web server": this machine
has no other network). 127.0.0.1 stays refused.
"""

from __future__ import annotations

import os
import struct
import zlib

import httpx
import pytest

from tests.conftest import FAST, ROOT, ServerProcess, wait_terminal
from tests.vace_media import MediaServer, data_uri, gradient, moving_frames, mp4, png, solid

MODEL = "wavespeed-ai/wan-2.1-14b-vace"
PUBLIC_STAND_IN = "127.0.0.2"

SITECUSTOMIZE = '''\
"""Test only (tests/test_bad_media.py): treat WAN_VACE_TEST_PUBLIC_IP as a public address."""
import os

_ip = os.environ.get("WAN_VACE_TEST_PUBLIC_IP")
if _ip:
    import server.netguard as _netguard

    _real = _netguard.is_forbidden_address
    _netguard.is_forbidden_address = lambda ip: False if ip == _ip else _real(ip)
'''

# Retry markers: WaveSpeed SDKs re-submit (paid) tasks whose error contains these (errors.py).
RETRY_MARKERS = ("http 5", "429", "timeout", "connection")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    shim = tmp_path_factory.mktemp("shim")
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(shim), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    srv = ServerProcess(
        tmp_path_factory.mktemp("bad-media"),
        WAN_VACE_ALLOW_PRIVATE_URLS="false",
        WAN_VACE_TEST_PUBLIC_IP=PUBLIC_STAND_IN,
        PYTHONPATH=path,
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def web():
    """The "public" web server (127.0.0.2, allowed by the shim)."""
    srv = MediaServer(PUBLIC_STAND_IN)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def loopback():
    """A server on 127.0.0.1 with a perfectly good image: only the address policy can refuse it."""
    srv = MediaServer("127.0.0.1")
    srv.add("/ok.png", png(gradient(64, 48)), "image/png")
    yield srv
    srv.close()


def submit(client: httpx.Client, fields: dict) -> str:
    body = {"prompt": "a cat walks on the beach", **FAST, **fields}
    r = client.post(f"/api/v3/{MODEL}", json=body)
    assert r.status_code == 200, r.text
    return r.json()["data"]["id"]


def wait(client: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    return wait_terminal(client, job_id, timeout)


def assert_failed(client: httpx.Client, fields: dict, code: int, field: str, *needles: str) -> str:
    d = wait(client, submit(client, fields))
    assert d["status"] == "failed", d
    error = d["error"]
    assert d["code"] == code, error
    assert error.startswith(f"{field}: "), error  # names the request field first
    for needle in needles:
        assert needle in error, error
    assert not any(m in error.lower() for m in RETRY_MARKERS), error  # no paid SDK re-submits
    assert d["attempts"] == 1, d  # deterministic: not retried
    assert d["outputs"] == []
    return error


def lying_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data holds a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x80" * 30)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def packet_boundary_cut(data: bytes) -> bytes:
    """`data` (an MP4) cut exactly where a video packet starts, half way through: the demuxer
    reports no error there, the file just seems to end early."""
    import io

    import av

    with av.open(io.BytesIO(data)) as c:
        starts = [p.pos for p in c.demux(c.streams.video[0]) if p.size]
    return data[: starts[len(starts) // 2]]


VIDEO = mp4(moving_frames(81, 64, 48))
HTML = b"<!doctype html><html><head><title>Sign in</title></head><body>Please log in</body></html>"


# ---------------------------------------------------------------------------------------------
# Undecodable or unacceptable media


@pytest.mark.parametrize("cut", ["mid_packet", "packet_boundary"])
def test_truncated_mp4(client, web, cut):
    data = VIDEO[: len(VIDEO) * 6 // 10] if cut == "mid_packet" else packet_boundary_cut(VIDEO)
    url = web.add(f"/truncated-{cut}.mp4", data, "video/mp4")
    assert_failed(client, {"video": url, "task": "none"}, 1402, "video", "truncated")


def test_mp4_cut_between_packets_fails_only_where_the_decode_reaches_the_cut():
    # The unit behind the packet_boundary case (no server): before the fix such a file decoded
    # as a shorter clip, which the builder then extended with gray frames and the job completed.
    from pipelines.media import decode_video
    from server.kernel.errors import MediaAccessError

    cut = packet_boundary_cut(VIDEO)  # about 40 of 81 frames left
    assert decode_video(cut, "video", width=32, height=16, max_frames=16).shape[0] == 16
    with pytest.raises(MediaAccessError, match=r"^video: the video is truncated"):
        decode_video(cut, "video", width=32, height=16, max_frames=81)
    assert decode_video(VIDEO, "video", width=32, height=16, max_frames=81).shape[0] == 81


def test_html_instead_of_an_image(client, web):
    url = web.add("/login.png", HTML, "text/html")  # a login wall answering 200
    assert_failed(client, {"first_image": url}, 1402, "first_image", "not a decodable image",
                  "HTML")


def test_one_pixel_image(client):
    good = data_uri(png(solid(32, 32, (200, 0, 0))), "image/png")
    tiny = data_uri(png(solid(1, 1, (200, 0, 0))), "image/png")
    assert_failed(client, {"images": [good, tiny]}, 1401, "images[1]", "1x1")


def test_png_header_claiming_100000x1(client, web):
    url = web.add("/wide.png", lying_png(100000, 1), "image/png")
    assert_failed(client, {"last_image": url}, 1401, "last_image", "100000x1")
    # As a mask (any side >= 1 is fine) the header passes; the missing pixel data does not.
    assert_failed(
        client,
        {"video": data_uri(VIDEO, "video/mp4"), "task": "none",
         "mask_image": data_uri(lying_png(100000, 1), "image/png")},
        1402, "mask_image", "truncated or corrupt",
    )


def test_404(client, web):
    assert_failed(client, {"video": web.url("/missing.mp4"), "task": "none"}, 1402, "video",
                  "answered 404")


# ---------------------------------------------------------------------------------------------
# The address policy


def test_plain_loopback_url_is_refused(client, loopback):
    assert_failed(client, {"first_image": loopback.url("/ok.png")}, 1402, "first_image",
                  "127.0.0.1", "refused", "WAN_VACE_ALLOW_PRIVATE_URLS")


def test_redirect_to_loopback_is_refused(client, web, loopback):
    url = web.redirect("/moved.png", loopback.url("/ok.png"))
    error = assert_failed(client, {"images": [url]}, 1402, "images[0]", "redirects to 127.0.0.1",
                          "refused")
    if "429" not in str(web.port):  # (a URL with a retry marker in it is not echoed)
        assert f"http://{PUBLIC_STAND_IN}:{web.port}/moved.png" in error  # where it came from


# ---------------------------------------------------------------------------------------------
# Still healthy


def test_server_stays_healthy_and_a_good_job_completes(server, client, web):
    from tests.videoprobe import probe_mp4

    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] in ("ready", "busy"), health
    assert all(w["alive"] for w in health["workers"]), health
    url = web.add("/first.png", png(gradient(96, 64)), "image/png")  # the allowed host works
    d = wait(client, submit(client, {"first_image": url}))
    assert d["status"] == "completed", d["error"]
    p = probe_mp4(httpx.get(d["outputs"][0], timeout=30).content)
    assert p.frames == 81 and p.fps == 16 and (p.width, p.height) == (832, 480)
    assert server.wait_health({"ready"}, timeout=30)["status"] == "ready"
