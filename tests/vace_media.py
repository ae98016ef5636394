"""Test media for the end-to-end VACE tests: small images and videos made here (PIL, and the
server's own H.264 encoder), `data:` URIs, and a stdlib HTTP server thread that serves them
(and redirects, 404s, ...) from a loopback address."""

from __future__ import annotations

import base64
import io
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image


# ---------------------------------------------------------------------------------------------
# Images and videos


def png(arr_or_image) -> bytes:
    img = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def gradient(width: int, height: int, *, base=(40, 80, 200), step=(1.0, 0.5, -0.5)) -> np.ndarray:
    """A smooth RGB image (smooth, so video compression barely changes it)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = x / max(width - 1, 1) * 120 + y / max(height - 1, 1) * 60
    chans = [np.clip(b + s * t, 0, 255) for b, s in zip(base, step)]
    return np.stack(chans, -1).round().astype(np.uint8)


def solid(width: int, height: int, color) -> np.ndarray:
    return np.broadcast_to(np.array(color, dtype=np.uint8), (height, width, 3)).copy()


def box_mask(width: int, height: int, *, inside: int, margin: float = 0.25) -> np.ndarray:
    """uint8 (H, W): `inside` (0 or 255) in a centred box, the other value outside."""
    m = np.full((height, width), 255 - inside, dtype=np.uint8)
    mx, my = int(width * margin), int(height * margin)
    m[my : height - my, mx : width - mx] = inside
    return m


def moving_frames(n: int, width: int = 64, height: int = 48) -> np.ndarray:
    t = np.arange(n)[:, None, None]
    y, x = np.mgrid[0:height, 0:width]
    r = (x[None] * 4 + t * 8) % 256
    g = (y[None] * 5 + t * 3) % 256
    b = np.broadcast_to((t * 16) % 256, r.shape)
    return np.stack([r, g, b], -1).astype(np.uint8)


def mp4(frames: np.ndarray, fps: int = 16) -> bytes:
    """H.264 MP4 bytes of uint8 (F, H, W, 3) frames (or (F, H, W) gray), via the server's encoder."""
    from pipelines.media import encode_mp4

    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "v.mp4"
        encode_mp4(np.ascontiguousarray(frames), str(path), fps=fps)
        return path.read_bytes()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def frames_of(mp4_bytes: bytes) -> np.ndarray:
    """All frames of an MP4 as uint8 (F, H, W, 3) RGB."""
    import av

    with av.open(io.BytesIO(mp4_bytes)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def image_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ---------------------------------------------------------------------------------------------
# A local media server


class MediaServer:
    """`ThreadingHTTPServer` on `host` (any loopback address) in a daemon thread.

    `add(path, body, content_type)` serves bytes; `redirect(path, location)` answers 302;
    any other path is a 404."""

    def __init__(self, host: str = "127.0.0.1"):
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        routes = self.routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (stdlib name)
                status, headers, body = routes.get(
                    self.path.split("?", 1)[0], (404, {"Content-Type": "text/plain"}, b"not found")
                )
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.host = host
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="media-server", daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def add(self, path: str, body: bytes, content_type: str = "application/octet-stream") -> str:
        self.routes[path] = (200, {"Content-Type": content_type}, body)
        return self.url(path)

    def redirect(self, path: str, location: str) -> str:
        self.routes[path] = (302, {"Location": location}, b"")
        return self.url(path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
