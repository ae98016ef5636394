"""pipelines/media.py on real files built in the tests (PNG/JPEG via Pillow, MP4 via PyAV)."""

from __future__ import annotations

import io
import struct
import time
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from pipelines.media import (
    decode_image,
    decode_mask_image,
    decode_mask_video,
    decode_video,
    encode_mp4,
    fit_cover,
)
from server.kernel.errors import (
    CODE_INVALID_PARAMETER,
    CODE_MEDIA_ACCESS,
    InvalidParameter,
    MediaAccessError,
)

HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>...</body></html>"


def _png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, followed by a token IDAT: decoding its pixels
    would need width*height*3 bytes; only a header check can refuse it cheaply."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _mp4(frames: np.ndarray, fps: int, tmp_path, *, lossless: bool = True, name="v.mp4") -> bytes:
    path = tmp_path / name
    encode_mp4(frames, str(path), fps=fps, lossless=lossless)
    return path.read_bytes()


def _index_frames(n: int, h: int = 16, w: int = 16) -> np.ndarray:
    """Frame k is a flat colour whose red channel encodes k (4 levels per index)."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    for k in range(n):
        frames[k] = (4 * k, 255 - 4 * k, 128)
    return frames


def _indices(video: np.ndarray) -> list[int]:
    return [int(round(float(f[..., 0].mean()) / 4)) for f in video]


# ---------------------------------------------------------------------------------------------
# Images


def test_decode_png_rgb():
    src = Image.new("RGB", (40, 30), (10, 200, 30))
    out = decode_image(_png(src), "images[0]")
    assert out.mode == "RGB" and out.size == (40, 30)
    assert out.getpixel((5, 5)) == (10, 200, 30)


@pytest.mark.parametrize("encoder", [_png, _jpeg])
def test_exif_orientation_is_applied(encoder):
    # Stored 40x20 with a marker at top-left; Orientation=6 means "rotate 90 deg clockwise to
    # display", so the displayed image is 20x40 with the marker at the top-right.
    src = Image.new("RGB", (40, 20), (0, 0, 0))
    src.paste((255, 255, 255), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encoder(src, exif=exif), "first_image")
    assert out.size == (20, 40)
    assert out.getpixel((17, 2))[0] > 200  # top-right
    assert out.getpixel((2, 2))[0] < 50


def test_rgba_transparency_composited_over_white():
    src = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    src.paste((0, 0, 255, 0), (0, 0, 16, 32))  # left half fully transparent blue
    src.paste((0, 0, 0, 128), (16, 0, 32, 8))  # half-transparent black strip
    out = decode_image(_png(src), "images[0]")
    assert out.mode == "RGB"
    assert out.getpixel((4, 20)) == (255, 255, 255)
    assert out.getpixel((24, 20)) == (255, 0, 0)
    assert all(abs(c - 127) <= 2 for c in out.getpixel((24, 4)))


def test_palette_and_la_transparency_become_white():
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (10, 0, 20, 20))
    out = decode_image(_png(pal, transparency=0), "images[0]")
    assert out.getpixel((2, 2)) == (255, 255, 255) and out.getpixel((15, 2)) == (255, 0, 0)
    la = Image.new("LA", (20, 20), (0, 0))
    assert decode_image(_png(la), "images[0]").getpixel((3, 3)) == (255, 255, 255)


def test_16bit_grayscale_is_scaled_not_clipped():
    arr = np.full((20, 20), 32768, np.uint16)  # mid grey in 16 bits
    out = decode_image(_png(Image.fromarray(arr)), "images[0]")
    assert all(abs(c - 128) <= 1 for c in out.getpixel((5, 5)))


def test_html_is_not_an_image():
    with pytest.raises(MediaAccessError) as ei:
        decode_image(HTML, "first_image")
    assert ei.value.message == "first_image: not a decodable image (looks like HTML)"
    assert ei.value.code == CODE_MEDIA_ACCESS


def test_empty_and_garbage_images():
    with pytest.raises(MediaAccessError, match=r"^images\[2\]: the file is empty$"):
        decode_image(b"", "images[2]")
    with pytest.raises(MediaAccessError, match=r"^last_image: not a decodable image"):
        decode_image(bytes(range(256)) * 8, "last_image")


@pytest.mark.parametrize("encoder", [_png, _jpeg])
def test_truncated_image(encoder):
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = encoder(src)
    with pytest.raises(MediaAccessError) as ei:
        decode_image(data[: len(data) // 2], "images[0]")
    assert ei.value.message == "images[0]: the image data is truncated or corrupt"


def test_tiny_image_is_invalid_parameter():
    with pytest.raises(InvalidParameter) as ei:
        decode_image(_png(Image.new("RGB", (1, 1))), "images[0]")
    assert ei.value.message == "images[0]: image is 1x1 pixels; each side must be at least 16"
    assert ei.value.code == CODE_INVALID_PARAMETER


@pytest.mark.parametrize(
    "width, height, pattern",
    [
        (100000, 1, r"^images\[0\]: image is 100000x1 pixels; each side must be at least 16$"),
        # 48 MP: under Pillow's own bomb limit, so only our header check stops it (decoding it
        # would allocate 144 MB and then fail as truncated, with a different error).
        (8000, 6000, r"^images\[0\]: image is 8000x6000 pixels, more than the 40 megapixel"),
        # 10 GP: Pillow refuses at open; still reported as our InvalidParameter.
        (100000, 100000, r"^images\[0\]: image is larger than the 40 megapixel limit$"),
    ],
)
def test_header_size_checked_before_decoding(width, height, pattern):
    data = _png_header_only(width, height)
    t0 = time.perf_counter()
    with pytest.raises(InvalidParameter, match=pattern):
        decode_image(data, "images[0]")
    assert time.perf_counter() - t0 < 0.5


def test_max_pixels_is_configurable():
    with pytest.raises(InvalidParameter, match="more than the 0.001 megapixel limit"):
        decode_image(_png(Image.new("RGB", (40, 40))), "images[0]", max_pixels=1000)


# ---------------------------------------------------------------------------------------------
# Cover + crop


def _bands(width: int, height: int) -> Image.Image:
    """Red left quarter, green middle half, blue right quarter."""
    img = Image.new("RGB", (width, height), (0, 255, 0))
    img.paste((255, 0, 0), (0, 0, width // 4, height))
    img.paste((0, 0, 255), (width - width // 4, 0, width, height))
    return img


def test_fit_cover_crops_the_sides_of_a_wide_image():
    out = fit_cover(_bands(200, 100), 64, 64)
    assert out.size == (64, 64)
    arr = np.asarray(out).astype(int)
    # The centred 100x100 box is exactly the green band. The outermost columns may carry a trace
    # of the neighbouring bands (the bicubic kernel reaches past the crop edge, as resizing the
    # whole image and then cropping would), but the red and blue bands themselves are gone.
    inner = arr[:, 1:-1]
    assert inner[..., 1].min() >= 250 and inner[..., 0].max() <= 5 and inner[..., 2].max() <= 5
    assert arr[..., 1].min() >= 200 and max(arr[..., 0].max(), arr[..., 2].max()) <= 40


def test_fit_cover_crops_top_and_bottom_of_a_tall_image():
    img = Image.new("RGB", (100, 200), (0, 255, 0))
    img.paste((255, 0, 0), (0, 0, 100, 50))
    img.paste((0, 0, 255), (0, 150, 100, 200))
    arr = np.asarray(fit_cover(img, 32, 32)).astype(int)
    assert arr.shape == (32, 32, 3) and arr[1:-1, :, 1].min() >= 250
    assert arr[..., 1].min() >= 200 and max(arr[..., 0].max(), arr[..., 2].max()) <= 40


def test_fit_cover_keeps_aspect_when_shapes_differ():
    # 100x100 into 64x32: scale 0.64, rows 25..75 of the source are kept.
    img = Image.new("RGB", (100, 100), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 100, 20))  # removed by the crop
    img.paste((0, 0, 0), (0, 80, 100, 100))
    arr = np.asarray(fit_cover(img, 64, 32))
    assert arr.shape == (32, 64, 3) and arr.min() >= 250
    assert fit_cover(img, 100, 100) is img  # nothing to do


# ---------------------------------------------------------------------------------------------
# Mask images


def test_mask_image_is_covered_luminance_left_soft():
    # The decoder fits the mask like a frame and keeps its values; the threshold is the task's
    # (tests/test_conditioning.py), so nothing is binarised here.
    img = Image.new("L", (80, 40), 100)  # below 0.5 -> keep once binarised at 128
    img.paste(200, (40, 0, 80, 40))  # above 0.5 -> generate
    mask = decode_mask_image(_png(img), "mask_image", width=32, height=16)
    assert mask.dtype == np.uint8 and mask.shape == (16, 32)
    assert (np.abs(mask[:, :14].astype(int) - 100) <= 1).all()
    assert (np.abs(mask[:, 18:].astype(int) - 200) <= 1).all()
    binary = np.where(mask >= 128, 255, 0)
    assert (binary[:, :14] == 0).all() and (binary[:, 18:] == 255).all()


def test_mask_image_transparent_counts_as_generate():
    img = Image.new("RGBA", (20, 20), (0, 0, 0, 255))
    img.paste((0, 0, 0, 0), (10, 0, 20, 20))  # transparent right half
    mask = decode_mask_image(_png(img), "mask_image", width=20, height=20)
    assert (mask[:, :9] == 0).all() and (mask[:, 11:] == 255).all()


def test_mask_image_allows_tiny_masks():
    mask = decode_mask_image(_png(Image.new("L", (1, 1), 255)), "mask_image", width=16, height=8)
    assert mask.shape == (8, 16) and (mask == 255).all()


# ---------------------------------------------------------------------------------------------
# encode_mp4


def test_encode_mp4_round_trip(tmp_path):
    frames = _index_frames(17, h=48, w=64)
    path = tmp_path / "out.mp4"
    encode_mp4(frames, str(path), fps=16)
    data = path.read_bytes()
    assert not (tmp_path / "out.mp4.part").exists()
    assert data.find(b"moov") < data.find(b"mdat"), "+faststart puts the index first"
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert s.average_rate == 16
        decoded = list(c.decode(s))
        assert len(decoded) == 17
        assert (decoded[0].width, decoded[0].height) == (64, 48)
        assert [f.pts * f.time_base for f in decoded] == [Fraction(i, 16) for i in range(17)]
        got = decoded[8].to_ndarray(format="rgb24").astype(int)
        assert np.abs(got - frames[8].astype(int)).max() <= 6  # CRF 18: close, not exact


def test_encode_mp4_lossless(tmp_path):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
    path = tmp_path / "l.mp4"
    encode_mp4(frames, str(path), fps=16, lossless=True)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.pix_fmt == "yuv444p"
        got = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)]).astype(int)
    # Only the RGB<->YUV conversion rounds; the H.264 layer is lossless.
    assert got.shape == frames.shape and np.abs(got - frames.astype(int)).max() <= 3


def test_encode_mp4_odd_size_is_padded(tmp_path):
    frames = np.full((2, 17, 33, 3), 90, np.uint8)
    path = tmp_path / "odd.mp4"
    encode_mp4(frames, str(path), fps=16)
    with av.open(str(path)) as c:
        f = next(c.decode(video=0))
        assert (f.width, f.height) == (34, 18)


def test_encode_mp4_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError):
        encode_mp4(np.zeros((2, 16, 16, 3), np.float32), str(tmp_path / "a.mp4"))
    with pytest.raises(ValueError):
        encode_mp4(np.zeros((16, 16, 3), np.uint8), str(tmp_path / "a.mp4"))


# ---------------------------------------------------------------------------------------------
# decode_video: timing


def test_30fps_2s_gives_32_frames_in_real_time(tmp_path):
    data = _mp4(_index_frames(60), 30, tmp_path)
    video = decode_video(data, "video", width=16, height=16, max_frames=81, fps=16)
    assert video.dtype == np.uint8 and video.shape == (32, 16, 16, 3)
    # Output frame i shows the source frame on screen at i/16 s: floor(i * 30 / 16).
    assert _indices(video) == [i * 30 // 16 for i in range(32)]


def test_1s_30fps_gives_16_frames(tmp_path):
    data = _mp4(_index_frames(30), 30, tmp_path)
    assert decode_video(data, "video", width=16, height=16, max_frames=81).shape[0] == 16


def test_long_clip_is_cut_at_max_frames(tmp_path):
    data = _mp4(_index_frames(50), 5, tmp_path)  # 10 s at 5 fps
    video = decode_video(data, "video", width=16, height=16, max_frames=81)
    assert video.shape[0] == 81
    # Frame 80 is at 5.0 s: source frame 25. Later source frames are never needed.
    assert _indices(video)[-1] == 25


def test_decoding_stops_once_max_frames_exist(tmp_path):
    # Cut the file at 60%: the index (moov, first thanks to +faststart) is intact, the later
    # frames are gone. Asking for the first second never reaches the cut; asking for all does.
    data = _mp4(_index_frames(50, 32, 32), 5, tmp_path, lossless=False)
    cut = data[: len(data) * 6 // 10]
    assert decode_video(cut, "video", width=16, height=16, max_frames=16).shape[0] == 16
    with pytest.raises(MediaAccessError, match=r"^video: the video is truncated or corrupt"):
        decode_video(cut, "video", width=16, height=16, max_frames=161)


def test_slow_source_repeats_frames(tmp_path):
    data = _mp4(_index_frames(4), 4, tmp_path)  # 1 s at 4 fps
    video = decode_video(data, "video", width=16, height=16, max_frames=81)
    assert _indices(video) == [i // 4 for i in range(16)]


def test_raw_h264_without_timestamps_uses_the_declared_rate(tmp_path):
    path = tmp_path / "raw.h264"
    with av.open(str(path), "w", format="h264") as c:  # Annex B: no container timestamps
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 16, 16, "yuv444p"
        s.options = {"crf": "0"}
        for k, rgb in enumerate(_index_frames(60)):
            f = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            f.pts = k
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    video = decode_video(path.read_bytes(), "video", width=16, height=16, max_frames=81)
    assert _indices(video) == [i * 30 // 16 for i in range(32)]


def test_animated_gif_is_a_video():
    frames = [Image.new("RGB", (32, 32), (40 * k, 0, 0)) for k in range(5)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=250)
    video = decode_video(buf.getvalue(), "video", width=16, height=16, max_frames=81)
    # 5 frames of 0.25 s = 1.25 s -> 20 frames at 16 fps, 4 per GIF frame.
    assert [int(f[..., 0].mean()) for f in video] == [40 * (i // 4) for i in range(20)]


def test_single_frame_video_gives_one_frame(tmp_path):
    data = _mp4(_index_frames(1), 16, tmp_path)
    assert decode_video(data, "video", width=16, height=16, max_frames=81).shape[0] == 1


def test_video_cover_and_crop(tmp_path):
    frame = np.asarray(_bands(200, 100))
    data = _mp4(np.stack([frame] * 4), 16, tmp_path)
    video = decode_video(data, "video", width=32, height=32, max_frames=81)
    assert video.shape == (4, 32, 32, 3)
    inner = video[:, :, 1:-1].astype(int)
    assert inner[..., 1].min() >= 245 and inner[..., 0].max() <= 10 and inner[..., 2].max() <= 10
    assert video[..., 1].min() >= 200 and max(video[..., 0].max(), video[..., 2].max()) <= 40


def test_display_rotation_is_applied(tmp_path):
    path = tmp_path / "rot.mp4"
    img = np.zeros((32, 48, 3), np.uint8)
    img[:8, :8] = 255  # top-left marker in the stored (landscape) frame
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=16)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv444p"
        s.options = {"crf": "0"}
        s.set_display_rotation(90)  # counter-clockwise: the marker ends bottom-left
        f = av.VideoFrame.from_ndarray(img, format="rgb24")
        f.pts = 0
        c.mux(s.encode(f))
        c.mux(s.encode(None))
    video = decode_video(path.read_bytes(), "video", width=32, height=48, max_frames=4)
    assert video.shape[1:] == (48, 32, 3)
    assert video[0, -4, 4].min() > 200 and video[0, 4, 4].max() < 50


# ---------------------------------------------------------------------------------------------
# decode_video: failures


def test_truncated_mp4(tmp_path):
    data = _mp4(_index_frames(30, 32, 32), 16, tmp_path, lossless=False)
    for cut in (len(data) // 2, 200):
        with pytest.raises(MediaAccessError) as ei:
            decode_video(data[:cut], "video", width=16, height=16, max_frames=81)
        assert ei.value.message.startswith("video: ")


def test_html_empty_and_images_are_not_videos():
    with pytest.raises(MediaAccessError) as ei:
        decode_video(HTML, "video", width=16, height=16, max_frames=81)
    assert ei.value.message == "video: not a decodable video (looks like HTML)"
    with pytest.raises(MediaAccessError, match=r"^mask_video: the file is empty$"):
        decode_mask_video(b"", "mask_video", width=16, height=16, max_frames=81)
    png = _png(Image.new("RGB", (32, 32)))
    # Still images are refused as videos (no silent one-frame clip), with a hint.
    with pytest.raises(MediaAccessError, match=r"^video: not a decodable video \(looks like an"):
        decode_video(png, "video", width=16, height=16, max_frames=81)


def test_playlists_are_not_opened():
    playlist = (b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n"
                b"#EXT-X-ENDLIST\n")
    with pytest.raises(MediaAccessError, match=r"^video: not a decodable video"):
        decode_video(playlist, "video", width=16, height=16, max_frames=81)


def test_source_frames_over_the_pixel_limit(tmp_path):
    data = _mp4(_index_frames(2, 64, 64), 16, tmp_path)
    with pytest.raises(InvalidParameter, match=r"^video: video frames are 64x64 pixels"):
        decode_video(data, "video", width=16, height=16, max_frames=81, max_source_pixels=1000)


# ---------------------------------------------------------------------------------------------
# decode_mask_video


def test_mask_video_is_luminance_binarised_at_128_by_default(tmp_path):
    frames = np.full((8, 32, 64, 3), 90, np.uint8)  # dark grey -> keep
    frames[:, :, 32:] = 170  # light grey -> generate
    frames[4:, :, :] = 250  # second half of the clip: generate everywhere
    data = _mp4(frames, 16, tmp_path, lossless=False)
    mask = decode_mask_video(data, "mask_video", width=32, height=16, max_frames=81)
    assert mask.dtype == np.uint8 and mask.shape == (8, 16, 32)
    # Soft values as decoded (x264 moves them a few levels); >= 128 is the default threshold.
    assert (np.abs(mask[:4, :, :14].astype(int) - 90) <= 6).all()
    assert (np.abs(mask[:4, :, 18:].astype(int) - 170) <= 6).all()
    binary = np.where(mask >= 128, 255, 0)
    assert (binary[:4, :, :14] == 0).all() and (binary[:4, :, 18:] == 255).all()
    assert (binary[4:] == 255).all()


# ---------------------------------------------------------------------------------------------
# At the real API sizes (the tiny model's small render sizes hid a crash of the frame fit)


@pytest.fixture(scope="module")
def portrait_clip(tmp_path_factory):
    """4 frames of a 720x1280 portrait phone video (lossy H.264, as phones write it)."""
    frames = np.zeros((4, 1280, 720, 3), np.uint8)
    frames[:, :640] = (200, 40, 40)  # top half red, bottom half blue
    frames[:, 640:] = (40, 40, 200)
    return _mp4(frames, 30, tmp_path_factory.mktemp("portrait"), lossless=False)


@pytest.mark.parametrize("size", [(832, 480), (480, 832), (1280, 720), (720, 1280)])
def test_portrait_phone_video_decodes_at_every_api_size(portrait_clip, size):
    w, h = size
    video = decode_video(portrait_clip, "video", width=w, height=h, max_frames=81)
    assert video.shape == (3, h, w, 3)  # 4 frames at 30 fps = 0.133 s -> 3 frames at 16 fps
    mask = decode_mask_video(portrait_clip, "mask_video", width=w, height=h, max_frames=81)
    assert mask.shape == (3, h, w)


def test_portrait_phone_video_at_832x480_keeps_the_centre(portrait_clip):
    # Covering 832x480 from 720x1280 scales by 832/720 and keeps rows 499..979 of the 1479: the
    # red/blue boundary (source row 640 -> 739.5) sits in the middle of the output.
    video = decode_video(portrait_clip, "video", width=832, height=480, max_frames=81)
    assert abs(int(video[0, 200, 416, 0]) - 200) <= 8 and abs(int(video[0, 280, 416, 2]) - 200) <= 8


@pytest.mark.parametrize("source", [(720, 1280), (1440, 1080), (1080, 1440), (2560, 1440)])
def test_mask_image_and_first_image_at_the_default_size(source):
    mask = decode_mask_image(_png(Image.new("L", source, 255)), "mask_image", width=832, height=480)
    assert mask.shape == (480, 832) and (mask == 255).all()
    from pipelines.conditioning import MediaInputs, build_conditioning

    first = decode_image(_png(Image.new("RGB", source, (9, 99, 199))), "first_image")
    c = build_conditioning("none", MediaInputs(first_image=first), width=832, height=480,
                           num_frames=81)
    assert c.video.shape == (81, 480, 832, 3)
    assert (np.rint(c.video[0] * 255) == (9, 99, 199)).all()


# ---------------------------------------------------------------------------------------------
# Only decoder errors are reported as truncation


def test_a_failing_frame_fit_is_an_internal_error_not_truncation(tmp_path, monkeypatch):
    from pipelines import media

    data = _mp4(_index_frames(8, 32, 32), 16, tmp_path)

    def broken_fit(image, width, height):
        raise ValueError("box offset can't be negative")

    monkeypatch.setattr(media, "fit_cover", broken_fit)
    for decode, field in ((decode_video, "video"), (decode_mask_video, "mask_video")):
        with pytest.raises(RuntimeError) as ei:
            decode(data, field, width=16, height=16, max_frames=81)
        assert not isinstance(ei.value, MediaAccessError)
        message = str(ei.value)
        assert message.startswith(f"{field}: fitting frame 0 (32x32) to the target size failed")
        assert "box offset" in message and "truncated" not in message


def test_a_frame_that_cannot_become_rgb_says_so():
    from pipelines.media import _convert_frame

    class Frame:
        width, height = 64, 32
        format = type("Fmt", (), {"name": "xyz12le"})()

        def to_image(self):
            raise ValueError("unsupported pixel format")

    with pytest.raises(MediaAccessError) as ei:
        _convert_frame(Frame(), "video", 5, lambda image: np.zeros(1))
    assert ei.value.message == (
        "video: frame 5 (64x32, pixel format xyz12le) could not be converted to RGB: "
        "unsupported pixel format"
    )
    assert ei.value.code == CODE_MEDIA_ACCESS


def test_truncation_is_still_truncation_at_the_real_size(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (12, 480, 832, 3), np.uint8)
    data = _mp4(frames, 16, tmp_path, lossless=False)
    with pytest.raises(MediaAccessError, match="truncated or corrupt"):
        decode_video(data[: len(data) // 2], "video", width=832, height=480, max_frames=81)
