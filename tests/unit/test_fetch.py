"""server/fetch.py and server/netguard.py against a real HTTP server on loopback (no internet is
needed or used)."""

from __future__ import annotations

import base64
import http.server
import threading
import time
from urllib.parse import parse_qs, urlparse

import pytest

from server import netguard
from server.kernel.errors import CODE_MEDIA_ACCESS, MediaAccessError
from server.fetch import FetchPolicy, MediaTemporarilyUnavailable, fetch_media
from server.netguard import is_forbidden_address

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # content is opaque to the fetcher
HTML = b"<!DOCTYPE html><html><body>Not found, but served with 200</body></html>"

OPEN = FetchPolicy(max_bytes=1_000_000, timeout_s=5.0, allow_private=True)
DEFAULT = FetchPolicy(max_bytes=1_000_000, timeout_s=5.0)  # allow_private=False


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - stdlib name
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.server.hits.append(url.path)  # type: ignore[attr-defined]
        if url.path == "/ok.png":
            self._send(200, PNG_BYTES, {"Content-Type": "image/png"})
        elif url.path == "/page.html":
            self._send(200, HTML, {"Content-Type": "text/html"})
        elif url.path == "/redirect":
            self._send(int(q.get("status", "302")), b"", {"Location": q["to"]})
        elif url.path == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif url.path == "/status":
            self._send(int(q["code"]), b"nope")
        elif url.path == "/chunked":
            # No Content-Length: the cap must be enforced while streaming.
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"x" * 16384
            try:
                for _ in range(int(q["n"])):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client hung up once over its cap: expected
        elif url.path == "/declared-huge":
            # Claims 10 GB but sends a few bytes: must be refused from the header alone.
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 1024**3))
            self.end_headers()
            try:
                self.wfile.write(b"abc")
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True
        elif url.path == "/drip":  # a byte every `s` seconds, `n` bytes, forever by default
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.end_headers()
            try:
                for _ in range(int(q.get("n", "1000000"))):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(float(q.get("s", "0.2")))
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif url.path == "/slow":
            time.sleep(float(q.get("s", "2")))
            try:
                self._send(200, b"late")
            except (BrokenPipeError, ConnectionResetError):
                pass
        else:
            self._send(404, b"not here")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients hanging up mid-answer is part of these tests


def _serve(host: str):
    server = _Server((host, 0), _Handler)
    server.hits = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="module")
def srv():
    server = _serve("127.0.0.1")
    server.base = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    yield server
    server.shutdown()
    server.server_close()


def _assert_no_retry_markers(message: str) -> None:
    low = message.lower()
    for marker in ("http 5", "429", "timeout", "connection"):
        assert marker not in low, (marker, message)


# ---------------------------------------------------------------------------------------------
# Address policy


@pytest.mark.parametrize(
    "ip, forbidden",
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("172.31.255.255", True),
        ("192.168.1.1", True),
        ("169.254.169.254", True),  # cloud metadata
        ("::1", True),
        ("fe80::1", True),
        ("fe80::1%eth0", True),
        ("fc00::1", True),
        ("fd12:3456::1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:169.254.169.254", True),
        ("::ffff:10.0.0.1", True),
        ("2002:7f00:1::", True),  # 6to4 wrapping 127.0.0.1
        ("64:ff9b::a9fe:a9fe", True),  # NAT64 wrapping 169.254.169.254
        ("100.64.0.1", True),  # CGNAT
        ("0.0.0.0", True),
        ("::", True),
        ("224.0.0.1", True),
        ("239.255.255.250", True),
        ("ff02::1", True),
        ("255.255.255.255", True),
        ("240.0.0.1", True),
        ("192.0.2.1", True),  # documentation range
        ("not-an-ip", True),  # fail closed
        ("8.8.8.8", False),
        ("1.1.1.1", False),
        ("::ffff:8.8.8.8", False),
        ("2001:4860:4860::8888", False),
    ],
)
def test_is_forbidden_address(ip, forbidden):
    assert is_forbidden_address(ip) is forbidden


# ---------------------------------------------------------------------------------------------
# Plain downloads


def test_download_ok_when_private_allowed(srv):
    assert fetch_media(srv.base + "/ok.png", "images[0]", OPEN) == PNG_BYTES


def test_loopback_refused_by_default_policy(srv):
    before = len(srv.hits)
    with pytest.raises(MediaAccessError) as ei:
        fetch_media(srv.base + "/ok.png", "video", DEFAULT)
    msg = ei.value.message
    assert msg.startswith("video: ")
    assert "127.0.0.1" in msg and "WAN_VACE_ALLOW_PRIVATE_URLS=true" in msg
    assert ei.value.code == CODE_MEDIA_ACCESS and not ei.value.retryable
    assert len(srv.hits) == before, "the refused URL must not be requested at all"
    _assert_no_retry_markers(msg)


def test_localhost_name_refused(srv):
    port = srv.server_address[1]
    with pytest.raises(MediaAccessError, match=r"^first_image: .*private or loopback"):
        fetch_media(f"http://localhost:{port}/ok.png", "first_image", DEFAULT)


@pytest.mark.parametrize("host", ["[::1]", "2130706433", "0x7f.0.0.1", "0.0.0.0"])
def test_other_spellings_of_local_hosts_refused(host):
    with pytest.raises(MediaAccessError, match=r"^video: .*private or loopback"):
        fetch_media(f"http://{host}:9/x.mp4", "video", DEFAULT)


def test_html_is_returned_as_is(srv):
    # Whether the bytes are an image is the decoder's call, not the fetcher's.
    assert fetch_media(srv.base + "/page.html", "images[0]", OPEN) == HTML


def test_404_names_field_and_status(srv):
    with pytest.raises(MediaAccessError) as ei:
        fetch_media(srv.base + "/missing.png", "images[1]", OPEN)
    assert not isinstance(ei.value, MediaTemporarilyUnavailable)
    assert ei.value.message == (
        f"images[1]: could not download {srv.base}/missing.png: the server answered 404"
    )


@pytest.mark.parametrize("code", [500, 503, 429])
def test_transient_statuses_are_retryable(srv, code):
    with pytest.raises(MediaTemporarilyUnavailable) as ei:
        fetch_media(srv.base + f"/status?code={code}", "video", OPEN)
    assert ei.value.retryable and ei.value.code == CODE_MEDIA_ACCESS
    assert ei.value.message.startswith("video: ") and str(code) in ei.value.message


def test_query_string_not_echoed(srv):
    with pytest.raises(MediaAccessError) as ei:
        fetch_media(srv.base + "/missing.png?X-Amz-Signature=secret", "video", OPEN)
    assert "secret" not in ei.value.message


def test_url_containing_a_retry_marker_is_not_echoed(srv):
    with pytest.raises(MediaAccessError) as ei:
        fetch_media(srv.base + "/a8f429c/connection-timeout.png", "video", OPEN)
    assert "404" in ei.value.message
    _assert_no_retry_markers(ei.value.message)


def test_streaming_cap_without_content_length(srv):
    policy = FetchPolicy(max_bytes=100 * 2**10, timeout_s=5.0, allow_private=True)
    with pytest.raises(MediaAccessError) as ei:
        fetch_media(srv.base + "/chunked?n=64", "video", policy)  # 1 MiB, chunked
    assert ei.value.message == "video: larger than the 100 kB limit"
    # Under the cap, the same chunked answer is fine.
    assert len(fetch_media(srv.base + "/chunked?n=4", "video", policy)) == 4 * 16384


def test_content_length_over_cap_refused_up_front(srv):
    policy = FetchPolicy(max_bytes=100 * 2**20, timeout_s=5.0, allow_private=True)
    with pytest.raises(MediaAccessError) as ei:
        fetch_media(srv.base + "/declared-huge", "video", policy)
    # The settings' 100 MB (100 * 2**20, WAN_VACE_MAX_VIDEO_BYTES) reads as the README says.
    assert ei.value.message == "video: larger than the 100 MB limit"


def test_a_host_that_drips_fails_within_the_fetch_setting_and_is_not_retried(srv):
    policy = FetchPolicy(max_bytes=10**6, timeout_s=1.0, allow_private=True)
    started = time.monotonic()
    with pytest.raises(MediaAccessError) as ei:
        fetch_media(srv.base + "/drip?s=0.2", "video", policy)
    took = time.monotonic() - started
    assert 1.0 <= took < 1.6  # the setting, not ten times it
    assert not ei.value.retryable  # a retry would hold the worker as long again
    assert ei.value.message.endswith("took longer than the 1 s download limit")
    _assert_no_retry_markers(ei.value.message)


def test_read_timeout_is_retryable(srv):
    policy = FetchPolicy(max_bytes=1000, timeout_s=0.3, allow_private=True)
    with pytest.raises(MediaTemporarilyUnavailable, match=r"^video: .*timed out"):
        fetch_media(srv.base + "/slow?s=1.5", "video", policy)


def test_nothing_listening_is_deterministic():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # the port is now (very likely) closed
    with pytest.raises(MediaAccessError) as ei:
        fetch_media(f"http://127.0.0.1:{port}/x.png", "images[0]", OPEN)
    assert not ei.value.retryable
    assert ei.value.message.startswith("images[0]: ")
    _assert_no_retry_markers(ei.value.message)


def test_unresolvable_host(monkeypatch):
    import socket

    def no_dns(host):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(netguard, "_resolve", no_dns)
    with pytest.raises(MediaAccessError, match=r"^video: could not resolve the host name"):
        fetch_media("https://nowhere.invalid/x.mp4", "video", DEFAULT)


# ---------------------------------------------------------------------------------------------
# Redirects


def test_redirect_followed_between_allowed_hosts(srv):
    target = srv.base + "/ok.png"
    url = f"{srv.base}/redirect?to={target}"
    assert fetch_media(url, "images[0]", OPEN) == PNG_BYTES
    # Relative Location and 307/308 too.
    assert fetch_media(f"{srv.base}/redirect?to=/ok.png&status=308", "images[0]", OPEN) == PNG_BYTES


def test_redirect_loop_is_capped(srv):
    policy = FetchPolicy(max_bytes=1000, timeout_s=5.0, allow_private=True, max_redirects=3)
    with pytest.raises(MediaAccessError, match=r"^video: .*redirects more than 3 times"):
        fetch_media(srv.base + "/loop", "video", policy)


def test_redirect_to_unsupported_scheme(srv):
    with pytest.raises(MediaAccessError, match=r"^video: .*unsupported URL scheme 'file'"):
        fetch_media(f"{srv.base}/redirect?to=file:///etc/passwd", "video", OPEN)


@pytest.fixture()
def public_stand_in(monkeypatch):
    """A server on 127.0.0.2 that the guard treats as a public host: only for that address is
    the real policy relaxed, so 127.0.0.1 stays forbidden. DNS: "public.test" -> 127.0.0.2."""
    try:
        server = _serve("127.0.0.2")
    except OSError:
        pytest.skip("this OS cannot bind 127.0.0.2 (only Linux routes all of 127/8)")
    real = netguard.is_forbidden_address
    monkeypatch.setattr(netguard, "is_forbidden_address", lambda ip: ip != "127.0.0.2" and real(ip))
    real_resolve = netguard._resolve
    monkeypatch.setattr(
        netguard, "_resolve",
        lambda host: ["127.0.0.2"] if host == "public.test" else real_resolve(host),
    )
    server.base = f"http://public.test:{server.server_address[1]}"  # type: ignore[attr-defined]
    yield server
    server.shutdown()
    server.server_close()


def test_public_stand_in_is_reachable(public_stand_in):
    # Sanity check for the next test: the first hop alone is allowed and works.
    assert fetch_media(public_stand_in.base + "/ok.png", "images[0]", DEFAULT) == PNG_BYTES


def test_redirect_to_loopback_is_refused(public_stand_in, srv):
    """The lead's key case: a public URL that redirects to 127.0.0.1 must fail, naming the
    field, and the loopback server must never see the request."""
    before = len(srv.hits)
    url = f"{public_stand_in.base}/redirect?to={srv.base}/ok.png"
    with pytest.raises(MediaAccessError) as ei:
        fetch_media(url, "images[1]", DEFAULT)
    msg = ei.value.message
    assert msg.startswith("images[1]: ")
    assert "redirects to 127.0.0.1" in msg and "private or loopback" in msg
    assert len(srv.hits) == before
    _assert_no_retry_markers(msg)


def test_dns_rebinding_is_refused_at_connect(monkeypatch, srv):
    """The name answers a public address to the pre-check and loopback afterwards: the
    connection is made only to vetted addresses, so this fails instead of reaching 127.0.0.1."""
    answers = iter([["8.8.8.8"]])
    monkeypatch.setattr(netguard, "_resolve", lambda host: next(answers, ["127.0.0.1"]))
    before = len(srv.hits)
    port = srv.server_address[1]
    with pytest.raises(MediaAccessError, match=r"^video: .*private or loopback address \(127"):
        fetch_media(f"http://rebind.test:{port}/ok.png", "video", DEFAULT)
    assert len(srv.hits) == before


def test_any_forbidden_address_refuses_the_host(monkeypatch):
    monkeypatch.setattr(netguard, "_resolve", lambda host: ["8.8.8.8", "10.0.0.5"])
    with pytest.raises(MediaAccessError, match=r"\(10\.0\.0\.5\)"):
        fetch_media("https://mixed.test/x.png", "video", DEFAULT)


# ---------------------------------------------------------------------------------------------
# Schemes, data: URIs, local media


@pytest.mark.parametrize(
    "url, pattern",
    [
        ("ftp://example.com/x.png", "unsupported URL scheme 'ftp'"),
        ("file:///etc/passwd", "unsupported URL scheme 'file'"),
        ("gopher://example.com/", "unsupported URL scheme 'gopher'"),
        ("example.com/x.png", "not a URL"),
    ],
)
def test_unsupported_schemes(url, pattern):
    with pytest.raises(MediaAccessError) as ei:
        fetch_media(url, "mask_image", DEFAULT)
    assert ei.value.message.startswith("mask_image: ") and pattern in ei.value.message


def test_data_uri_base64():
    url = "data:image/png;base64," + base64.b64encode(PNG_BYTES).decode()
    assert fetch_media(url, "images[0]", DEFAULT) == PNG_BYTES


def test_data_uri_tolerates_whitespace_urlsafe_and_missing_padding():
    raw = b"\xfb\xff\xfe hello"
    std = base64.b64encode(raw).decode()
    urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert fetch_media("data:application/octet-stream;base64," + std[:4] + "\n" + std[4:],
                       "video", DEFAULT) == raw
    assert fetch_media("data:;base64," + urlsafe, "video", DEFAULT) == raw


def test_data_uri_percent_encoded():
    assert fetch_media("data:text/plain,hello%20world%00%FF", "video", DEFAULT) == (
        b"hello world\x00\xff"
    )
    assert fetch_media("data:,", "video", DEFAULT) == b""


def test_data_uri_bad_base64():
    with pytest.raises(MediaAccessError) as ei:
        fetch_media("data:image/png;base64,iVBOR*w0KGgo!!", "images[2]", DEFAULT)
    assert ei.value.message == "images[2]: the data: URI is not valid base64"


def test_data_uri_malformed():
    with pytest.raises(MediaAccessError, match=r"^video: malformed data: URI"):
        fetch_media("data:image/png;base64", "video", DEFAULT)


def test_data_uri_size_cap():
    policy = FetchPolicy(max_bytes=1024)
    url = "data:video/mp4;base64," + base64.b64encode(b"\0" * 1025).decode()
    with pytest.raises(MediaAccessError, match=r"^video: larger than the 1 kB limit$"):
        fetch_media(url, "video", policy)
    big = "data:video/mp4;base64," + "A" * 10_000  # refused before decoding
    with pytest.raises(MediaAccessError, match="larger than"):
        fetch_media(big, "video", policy)
    url_ok = "data:video/mp4;base64," + base64.b64encode(b"\0" * 1000).decode()
    assert len(fetch_media(url_ok, "video", policy)) == 1000
    with pytest.raises(MediaAccessError, match="larger than"):
        fetch_media("data:," + "%41" * 1025, "video", policy)


def test_one_data_uri_decoder_for_fetch_and_submit():
    """server/datauri.py is the only decoder: fetch and the submit path both call it, and its
    errors are plain ValueErrors each caller maps to its own (MediaAccessError here)."""
    import inspect

    from server import datauri, fetch, inputs

    assert fetch.decode_data_uri is inputs.decode_data_uri is datauri.decode_data_uri
    assert issubclass(datauri.DataURIError, ValueError) and not issubclass(datauri.DataURIError, MediaAccessError)
    assert issubclass(datauri.DataURITooLarge, datauri.DataURIError)
    for module in (fetch, inputs):
        assert "b64decode" not in inspect.getsource(module), module.__name__
    assert datauri.decode_data_uri("data:image/PNG;base64,AAAA") == (b"\0\0\0", "image/png")
    assert datauri.decode_data_uri("data:,x")[1] == "application/octet-stream"
    with pytest.raises(datauri.DataURITooLarge):
        datauri.decode_data_uri("data:;base64,AAAAAAAA", max_bytes=5)
    with pytest.raises(datauri.DataURIError, match="malformed"):
        datauri.decode_data_uri("data:nocomma")


def test_local_resolver_bypasses_http(srv):
    own = f"{srv.base}/media/outputs/abc.mp4"
    seen = []

    def resolver(url):
        seen.append(url)
        return b"stored bytes" if url == own else None

    # Our own URL is read from storage even under the default (private-refusing) policy.
    assert fetch_media(own, "video", DEFAULT, local_resolver=resolver) == b"stored bytes"
    # Anything else goes through the normal (guarded) path.
    with pytest.raises(MediaAccessError, match="private or loopback"):
        fetch_media(srv.base + "/ok.png", "video", DEFAULT, local_resolver=resolver)
    assert seen == [own, srv.base + "/ok.png"]
    with pytest.raises(MediaAccessError, match="larger than"):
        fetch_media(own, "video", FetchPolicy(max_bytes=5), local_resolver=resolver)


def test_guarded_client_refuses_at_connect(srv):
    """The client offered to other outbound callers (webhooks) carries the same guard."""
    with netguard.guarded_client(allow_private=False, timeout=5.0) as client:
        with pytest.raises(netguard.AddressRefused) as ei:
            client.post(srv.base + "/hook", content=b"{}")
    assert ei.value.ip == "127.0.0.1"
    with netguard.guarded_client(allow_private=True, timeout=5.0) as client:
        assert client.get(srv.base + "/ok.png").content == PNG_BYTES
