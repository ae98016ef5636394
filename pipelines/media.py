"""Decoding media inputs into arrays, and encoding the output MP4 (numpy, Pillow, PyAV; no torch).

Everything here takes bytes that came from an API caller, so it is written defensively:
- image sizes are checked from the header before any pixel is decoded (a 100000x100000 PNG is a
  few hundred bytes on the wire and 30 GB in memory);
- videos are opened with a demuxer allow-list (no playlists or concat scripts that make FFmpeg
  open further files or URLs), source frames are size-checked, and decoding stops as soon as the
  requested number of output frames exists;
- every failure raises `MediaAccessError` (undecodable input, code 1402) or `InvalidParameter`
  (decodable but unacceptable, code 1401) with a message that starts with the request field.

Geometry is the official VACE one (`pipelines.geometry.fit_cover`): resize to cover the target
size to rounded whole pixels, then an integer centre crop. Timing follows our API decision (design/vace.md §5 end): a source
video is read in real time at `fps`, output frame i being the source frame on screen at i/fps.
"""

from __future__ import annotations

import io
import os
import warnings
from fractions import Fraction
from typing import Callable

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.geometry import fit_cover
from server.kernel.errors import InvalidParameter, MediaAccessError

__all__ = [
    "decode_image",
    "decode_mask_image",
    "decode_mask_video",
    "decode_video",
    "encode_mp4",
    "fit_cover",
]

# Demuxers a source/mask video may use. An allow-list rather than FFmpeg's full probe: formats
# such as HLS playlists or concat scripts open further files/URLs named inside the data.
_VIDEO_DEMUXERS = ",".join(
    [
        "mov",  # mov,mp4,m4a,3gp,3g2,mj2
        "matroska",  # matroska,webm
        "avi",
        "flv",
        "mpegts",
        "mpeg",  # MPEG-PS
        "ogg",
        "asf",  # wmv
        "gif",  # animated GIFs are short videos
        "apng",
        "h264",
        "hevc",
        "m4v",
        "ivf",  # raw VP8/VP9/AV1
        "obu",
        "mjpeg",
    ]
)
_DEFAULT_MAX_SOURCE_PIXELS = 4096 * 4096


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _sniff(data: bytes) -> str:
    """A short hint about what undecodable bytes look like, for the error message: the usual
    mistake is a URL that served an HTML page (login wall, 404 page) with status 200."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head or b"<body" in head:
        return " (looks like HTML)"
    if head.startswith(b"<?xml") or head.startswith(b"<svg") or b"<svg" in head:
        return " (looks like XML or SVG)"
    if head.startswith((b"{", b"[")):
        return " (looks like JSON)"
    if data[4:8] == b"ftyp" or data[:4] == b"\x1a\x45\xdf\xa3":
        return " (looks like a video)"
    if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff" or data[:4] == b"RIFF":
        return " (looks like an image)"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head[:256]):
        return " (looks like text)"
    return ""


def _empty(field: str) -> MediaAccessError:
    return MediaAccessError(f"{field}: the file is empty")


def _luma(image: Image.Image, width: int, height: int) -> np.ndarray:
    """uint8 (height, width) luminance of a mask picture, fitted like a video frame. Not
    binarised: the threshold depends on the task (`pipelines.conditioning`)."""
    return np.asarray(fit_cover(image.convert("L"), width, height))


# ---------------------------------------------------------------------------------------------
# Images


def composite_on_white(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited over white. A deliberate deviation: the official Wan
    loader drops alpha (`convert("RGB")`), which turns a transparent background into whatever
    colour the hidden pixels hold (often black); VACE reference images are expected on white."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        "transparency" in image.info
    )
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale (16-bit PNG, some TIFFs) to "L". Pillow's own
    conversion clips at 255, which would turn most of a 16-bit image white."""
    arr = np.asarray(image, dtype=np.float64)
    peak = float(arr.max()) if arr.size else 0.0
    if image.mode == "F" and peak <= 1.0:
        arr = arr * 255.0
    elif peak > 255.0:
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def decode_image(
    data: bytes, field: str, *, max_pixels: int = 40_000_000, min_side: int = 16
) -> Image.Image:
    """Decode an input image to RGB: EXIF orientation applied, transparency composited over
    white, first frame of an animation. Size limits are checked from the header, before pixels
    are decoded."""
    if not data:
        raise _empty(field)
    with warnings.catch_warnings():
        # Our own limit below replaces Pillow's warning; its hard error (> ~179 MP) still fires.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise InvalidParameter(
                f"{field}: image is larger than the {max_pixels / 1e6:g} megapixel limit"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
            raise MediaAccessError(f"{field}: not a decodable image{_sniff(data)}") from None

    w, h = image.size
    if w * h > max_pixels:
        raise InvalidParameter(
            f"{field}: image is {w}x{h} pixels, more than the {max_pixels / 1e6:g} megapixel limit"
        )
    if min(w, h) < min_side:
        raise InvalidParameter(
            f"{field}: image is {w}x{h} pixels; each side must be at least {min_side}"
        )

    try:
        image.load()
    except MemoryError:
        raise
    except Exception:
        # Pillow reports truncation and corruption through many exception types.
        raise MediaAccessError(f"{field}: the image data is truncated or corrupt") from None

    try:
        image = ImageOps.exif_transpose(image)
    except Exception:
        pass  # a malformed EXIF block should not lose an otherwise fine image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _high_depth_to_8bit(image)
    return composite_on_white(image)


def decode_mask_image(data: bytes, field: str, *, width: int, height: int) -> np.ndarray:
    """A static mask: uint8 (height, width) luminance (255 = generate), covered and cropped like
    the video it applies to. Soft values are kept: `pipelines.conditioning` binarises with the
    task's threshold (> 0 for `inpainting` as the official annotator, >= 128 otherwise).

    Transparency is composited over white first, exactly as for images, so transparent pixels
    become 255 = generate. That matches the common editing convention (OpenAI's image-edit masks,
    "erase to transparent" in editors): the transparent hole is the area to fill in. Any side of
    at least 1 pixel is accepted: a mask is scaled, not looked at by the model."""
    image = decode_image(data, field, min_side=1)
    return _luma(image, width, height)


# ---------------------------------------------------------------------------------------------
# Videos


def _rotate_for_display(image: Image.Image, frame: av.VideoFrame) -> Image.Image:
    """Apply the container's display rotation (phone videos are usually stored landscape with a
    rotation tag). `frame.rotation` is the counter-clockwise angle to apply, as FFmpeg does."""
    try:
        degrees = int(round(frame.rotation or 0)) % 360
    except Exception:
        return image
    if degrees == 90:
        return image.transpose(Image.Transpose.ROTATE_90)
    if degrees == 180:
        return image.transpose(Image.Transpose.ROTATE_180)
    if degrees == 270:
        return image.transpose(Image.Transpose.ROTATE_270)
    return image


def _frame_time(frame: av.VideoFrame) -> Fraction | None:
    if frame.pts is None or frame.time_base is None:
        return None
    return Fraction(frame.pts) * Fraction(frame.time_base)


def _read_video(
    data: bytes,
    field: str,
    *,
    width: int,
    height: int,
    max_frames: int,
    fps: int,
    max_source_pixels: int,
    channels: int,
    convert: Callable[[Image.Image], np.ndarray],
) -> np.ndarray:
    """Decode `data` in real time at `fps`: output frame i is the source frame on screen at
    i/fps (the last one whose timestamp is <= i/fps), for as long as i/fps is inside the clip
    and i < max_frames. `convert` turns a display-oriented RGB frame into one output frame."""
    if max_frames < 1 or fps < 1 or width < 1 or height < 1:
        raise ValueError("width, height, max_frames and fps must be positive")
    if not data:
        raise _empty(field)
    try:
        container = av.open(io.BytesIO(data), mode="r",
                            options={"format_whitelist": _VIDEO_DEMUXERS})
    except Exception:
        if _isobmff_missing_bytes(data):  # cut inside the index itself
            raise _truncated(field, 0) from None
        raise MediaAccessError(f"{field}: not a decodable video{_sniff(data)}") from None

    with container:
        if not container.streams.video:
            if _isobmff_missing_bytes(data):
                raise _truncated(field, 0)
            raise MediaAccessError(f"{field}: the file has no video track{_sniff(data)}")
        stream = container.streams.video[0]
        declared = (stream.codec_context.width or 0) * (stream.codec_context.height or 0)
        if declared > max_source_pixels:
            raise _source_too_large(field, stream.codec_context.width,
                                    stream.codec_context.height, max_source_pixels)
        stream.thread_type = "AUTO"
        # Only used for frames without timestamps: the codec's declared rate (guessed_rate) is
        # right for raw streams, where average_rate is the demuxer's 25 fps placeholder.
        rate = stream.guessed_rate or stream.average_rate
        nominal = Fraction(1, 1) / Fraction(rate) if rate else Fraction(1, fps)

        # Untouched pages of a large np.empty are never committed, so sizing for max_frames
        # costs nothing when the clip turns out shorter.
        shape = (max_frames, height, width) + ((channels,) if channels > 1 else ())
        out = np.empty(shape, dtype=np.uint8)
        n = 0
        origin: Fraction | None = None
        pending: av.VideoFrame | None = None  # the frame on screen since `pending_time`
        pending_time = Fraction(0)
        pending_array: np.ndarray | None = None  # `pending` converted, once it is needed
        last_interval: Fraction | None = None
        decoded = 0
        # Pathological timestamps (all equal) would otherwise decode a long file to the end.
        max_decoded = 50 * max_frames + 500

        def emit_until(t: Fraction) -> None:
            """Emit `pending` for every output time i/fps < t."""
            nonlocal n, pending_array
            while n < max_frames and Fraction(n, fps) < t:
                if pending_array is None:
                    pending_array = _convert_frame(pending, field, n, convert)
                out[n] = pending_array
                n += 1

        # Only errors raised while demuxing and decoding mean the file is truncated or corrupt;
        # converting and fitting a decoded frame (`emit_until`) report their own errors.
        frames = _frames(container, stream, field, cut=_isobmff_missing_bytes(data) > 0)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except (InvalidParameter, MediaAccessError, MemoryError):
                raise
            except Exception:
                raise _truncated(field, decoded) from None
            decoded += 1
            if frame.width * frame.height > max_source_pixels:
                raise _source_too_large(field, frame.width, frame.height, max_source_pixels)
            raw = _frame_time(frame)
            if raw is not None and origin is None:
                origin = raw  # clips need not start at 0 (edit lists, cut streams)
            if raw is None or origin is None:
                # No timestamp (some raw streams): assume the clip's constant frame rate.
                t = pending_time + (last_interval or nominal) if pending is not None else Fraction(0)
            else:
                t = raw - origin
            if pending is not None:
                t = max(t, pending_time)  # out-of-order stamps: the newer frame wins
                if t > pending_time:
                    last_interval = t - pending_time
                emit_until(t)
            if n >= max_frames:
                break
            if decoded > max_decoded:
                raise MediaAccessError(f"{field}: the video's timestamps do not advance")
            pending, pending_time, pending_array = frame, t, None
        frames.close()

        if pending is None:
            raise MediaAccessError(f"{field}: the video has no decodable frames")
        if n < max_frames:
            # The last frame stays on screen for its own duration (or the clip's frame interval).
            duration = None
            if pending.duration and pending.time_base is not None:
                duration = Fraction(pending.duration) * Fraction(pending.time_base)
            end = pending_time + (duration or last_interval or nominal)
            emit_until(max(end, Fraction(1, 10**9)))  # a lone frame still gives one output
        return out[:n]


def _convert_frame(
    frame: av.VideoFrame, field: str, index: int, convert: Callable[[Image.Image], np.ndarray]
) -> np.ndarray:
    """One decoded frame as an output frame: to RGB (an unusual pixel format that swscale
    cannot convert is the input's problem, code 1402), display rotation, then `convert` (the
    frame fit: a failure there is ours, so it stays an internal error, named as such)."""
    try:
        image = frame.to_image()
    except Exception as exc:
        raise MediaAccessError(
            f"{field}: frame {index} ({frame.width}x{frame.height}, pixel format "
            f"{frame.format.name}) could not be converted to RGB: {exc}"
        ) from None
    image = _rotate_for_display(image, frame)
    try:
        return convert(image)
    except (InvalidParameter, MediaAccessError, MemoryError):
        raise
    except Exception as exc:
        raise RuntimeError(
            f"{field}: fitting frame {index} ({image.width}x{image.height}) to the target size "
            f"failed: {exc}"
        ) from exc


# Top-level box types an MP4/MOV file can start with (ISO BMFF; QuickTime's older layouts).
_ISOBMFF_LEADING_BOXES = frozenset(
    {b"ftyp", b"styp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"}
)


def _isobmff_missing_bytes(data: bytes) -> int:
    """For an MP4/MOV file, how many bytes its top-level boxes declare beyond the end of `data`
    (0: complete, or not an MP4). FFmpeg's MP4 demuxer reads packets from the index in the
    `moov` box; a file cut at a packet boundary (a stopped upload or download) then just ends
    early without any error, and would pass as a shorter clip. A `moov` or `mdat` box that
    declares more bytes than the file holds is exactly that cut."""
    if data[4:8] not in _ISOBMFF_LEADING_BOXES:
        return 0
    n, off = len(data), 0
    while off + 8 <= n:
        size, header = int.from_bytes(data[off : off + 4], "big"), 8
        if size == 1:  # 64-bit size follows the type
            if off + 16 > n:
                return off + 16 - n
            size, header = int.from_bytes(data[off + 8 : off + 16], "big"), 16
        elif size == 0:  # the box extends to the end of the file
            return 0
        if size < header:
            return 0  # not a box structure after all: leave the verdict to the demuxer
        if off + size > n:
            return off + size - n
        off += size
    return 0


def _frames(container, stream, field: str, *, cut: bool = False):
    """Decoded frames of `stream`. Demuxed by hand because with frame threading the decoder
    swallows the error of a cut-off last packet and the clip would just end early: the demuxer
    flags a short read as a corrupt packet, and a file whose data ends on one is truncated. (A
    corrupt packet mid-stream, e.g. a glitch in a broadcast recording, is left to the decoder's
    error concealment.) A file cut exactly between two packets raises no flag at all: `cut`
    (from the container's own declared length, `_isobmff_missing_bytes`) catches that one.
    Either way only a decode that reaches the cut fails: the frames before it are usable when
    the caller needs no more."""
    ended_corrupt = False
    count = 0
    for packet in container.demux(stream):
        if packet.size:
            ended_corrupt = packet.is_corrupt
        for frame in stream.decode(packet):
            count += 1
            yield frame
    if ended_corrupt or cut:
        raise _truncated(field, count)


def _truncated(field: str, decoded: int) -> MediaAccessError:
    return MediaAccessError(
        f"{field}: the video is truncated or corrupt (decoding failed after {decoded} frames)"
    )


def _source_too_large(field: str, w: int, h: int, limit: int) -> InvalidParameter:
    return InvalidParameter(
        f"{field}: video frames are {w}x{h} pixels, more than the {limit / 1e6:g} megapixel limit"
    )


def decode_video(
    data: bytes,
    field: str,
    *,
    width: int,
    height: int,
    max_frames: int,
    fps: int = 16,
    max_source_pixels: int = _DEFAULT_MAX_SOURCE_PIXELS,
) -> np.ndarray:
    """uint8 (F, height, width, 3) RGB with F <= max_frames: the clip read in real time at `fps`
    (a 10 s clip gives at most 10*fps frames, a 1 s clip fps frames), each frame covered and
    centre-cropped to width x height. Cutting to max_frames stops the decode there."""

    def convert(image: Image.Image) -> np.ndarray:
        return np.asarray(fit_cover(image.convert("RGB"), width, height))

    return _read_video(data, field, width=width, height=height, max_frames=max_frames, fps=fps,
                       max_source_pixels=max_source_pixels, channels=3, convert=convert)


def decode_mask_video(
    data: bytes, field: str, *, width: int, height: int, max_frames: int, fps: int = 16
) -> np.ndarray:
    """uint8 (F, height, width) luminance (255 = generate): the same timing, cover and crop as
    `decode_video`. Soft values are kept, as for `decode_mask_image`: the task decides the
    threshold."""

    def convert(image: Image.Image) -> np.ndarray:
        return _luma(image, width, height)

    return _read_video(data, field, width=width, height=height, max_frames=max_frames, fps=fps,
                       max_source_pixels=_DEFAULT_MAX_SOURCE_PIXELS, channels=1, convert=convert)


# ---------------------------------------------------------------------------------------------
# Output

# x264 preset of outputs unless configured (WAN_VACE_ENCODE_PRESET); chosen by
# scripts/bench_encode.py.
ENCODE_PRESET = "veryfast"


def encode_mp4(
    frames: np.ndarray,
    path: str,
    *,
    fps: int = 16,
    lossless: bool = False,
    preset: str = ENCODE_PRESET,
    threads: int = 0,
) -> None:
    """Write uint8 (F, H, W, 3) RGB frames as an H.264 MP4 at exactly `fps` with exactly F frames.

    Default: yuv420p, CRF 18 (visually lossless, plays everywhere), BT.709 tagged so browsers do
    not shift colours. `lossless=True`: CRF 0 in yuv444p (no chroma subsampling) for inspecting
    conditioning videos; fewer players handle it. The moov atom is moved to the front
    (+faststart) so the file streams. 4:2:0 needs even sides: an odd width/height is padded by
    repeating the last column/row. The file appears at `path` only once complete. `preset` is
    x264's speed/size trade-off: at a given CRF it changes the file size far more than the
    quality (scripts/bench_encode.py measures it). `threads`: x264's thread count, 0 = its own
    choice (about 1.5 per core).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be (F, H, W, 3) with F >= 1, got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if fps < 1:
        raise ValueError(f"fps must be positive, got {fps}")
    if threads < 0:
        raise ValueError(f"threads must be 0 (auto) or more, got {threads}")
    _, h, w, _ = frames.shape
    pix_fmt = "yuv444p" if lossless else "yuv420p"
    pad_h, pad_w = (0, 0) if lossless else (h % 2, w % 2)

    path = os.fspath(path)
    partial = path + ".part"
    try:
        container = av.open(partial, mode="w", format="mp4",
                            container_options={"movflags": "+faststart"})
        with container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w + pad_w, h + pad_h, pix_fmt
            cc = stream.codec_context
            # BT.709 primaries/transfer/matrix, limited range (enum value 1 for all four).
            cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range = 1, 1, 1, 1
            stream.options = {"crf": "0" if lossless else "18", "preset": preset}
            # PyAV's default thread count is already 0 (auto); set only an explicit count.
            if threads:
                stream.codec_context.thread_count = threads
            for i, rgb in enumerate(frames):
                if pad_h or pad_w:
                    rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame = frame.reformat(
                    format=pix_fmt, dst_colorspace=Colorspace.ITU709,
                    dst_color_range=ColorRange.MPEG,
                )
                frame.pts = i
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(partial, path)
    except BaseException:
        try:
            os.remove(partial)
        except OSError:
            pass
        raise
