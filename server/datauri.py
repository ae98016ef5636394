"""The one `data:` URI decoder (RFC 2397), for inline media at submit and in the worker's fetch.

Lenient in what real clients send: whitespace and line breaks inside base64, the URL-safe
alphabet, stripped `=` padding, and percent-encoded `+`, `/` and `=`. Errors are a plain
`DataURIError` (a ValueError) whose message says what is wrong; each caller adds the field name
and maps it to its own error (400 at submit, MediaAccessError in the worker).
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import unquote_to_bytes

_DATA_URI = re.compile(r"^data:(?P<meta>[^,]*),(?P<payload>.*)$", re.DOTALL | re.IGNORECASE)


class DataURIError(ValueError):
    pass


class DataURITooLarge(DataURIError):
    """The decoded bytes would exceed the caller's cap (`max_bytes`)."""


def decode_data_uri(uri: str, max_bytes: int | None = None) -> tuple[bytes, str]:
    """(bytes, declared media type) of a `data:` URI. With `max_bytes`, an oversized payload is
    refused before it is decoded, as far as its length tells, and exactly after."""
    m = _DATA_URI.match(uri)
    if m is None:
        raise DataURIError("malformed data: URI (expected data:<type>;base64,<data>)")
    meta = m.group("meta").lower().split(";")
    mime = meta[0].strip() or "application/octet-stream"
    payload = m.group("payload")
    if "base64" in (p.strip() for p in meta[1:]):
        # Base64 expands 3 bytes to 4: 10% slack for line breaks and percent-encoding.
        if max_bytes is not None and len(payload) * 3 // 4 > max_bytes * 1.1 + 3:
            raise DataURITooLarge("larger than the limit")
        if "%" in payload:
            payload = unquote_to_bytes(payload).decode("ascii", "replace")
        payload = "".join(payload.split())
        if "-" in payload or "_" in payload:
            payload = payload.replace("-", "+").replace("_", "/")
        payload += "=" * (-len(payload) % 4)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise DataURIError("the data: URI is not valid base64") from None
    else:
        if max_bytes is not None and len(payload) // 3 > max_bytes:  # 1 to 3 characters a byte
            raise DataURITooLarge("larger than the limit")
        data = unquote_to_bytes(payload)
    if max_bytes is not None and len(data) > max_bytes:
        raise DataURITooLarge("larger than the limit")
    return data, mime
