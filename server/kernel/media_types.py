"""What kind of media some bytes are, from their magic numbers (never the client's claim)."""

from __future__ import annotations


def sniff(data: bytes) -> tuple[str, str] | None:
    """("image" | "video", mime type) or None for anything else."""
    head = data[:64]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image", "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image", "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image", "image/webp"
    if head[:2] == b"BM" and len(data) > 26:
        return "image", "image/bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image", "image/tiff"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"avif"):
            return "image", "image/avif" if brand == b"avif" else "image/heic"
        if brand == b"qt  ":
            return "video", "video/quicktime"
        return "video", "video/mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "video", "video/webm" if b"webm" in data[:4096] else "video/x-matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video", "video/x-msvideo"
    return None


# The file extension each sniffed type is stored (and therefore served) under.
EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "image/bmp": ".bmp",
    "image/tiff": ".tiff",
    "image/avif": ".avif",
    "image/heic": ".heic",
    "video/mp4": ".mp4",
    "video/quicktime": ".mov",
    "video/webm": ".webm",
    "video/x-matroska": ".mkv",
    "video/x-msvideo": ".avi",
}
_SAFE_SUFFIXES = frozenset(EXTENSIONS.values()) | {".jpeg", ".jpe", ".tif", ".m4v", ".qt"}


def media_filename(filename: str, mime: str | None) -> str:
    """`filename` made safe to store and serve: media are served with the type their extension
    implies, so a name whose extension is not an image/video one ("x.html", "x.svg", none) gets
    the extension of `mime` (the sniffed or, before the bytes arrive, the claimed type; `.bin`,
    served as a download, when that is not a media type) appended. A PNG named `evil.html` would
    otherwise be served as text/html from this server's origin."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip() or "upload"
    dot = name.rfind(".")
    suffix = name[dot:].lower() if dot > 0 else ""
    if suffix in _SAFE_SUFFIXES:
        return name
    return name + EXTENSIONS.get((mime or "").split(";")[0].strip().lower(), ".bin")
