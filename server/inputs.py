"""Inputs given inline as `data:` URIs are moved into storage at submit time and replaced by our
own media URL. The store then keeps small rows (a 100 MB video is not re-read on every poll),
and the worker reads the bytes from storage like any uploaded file. Decoding base64 is cheap
(server/datauri.py, the decoder the worker's fetch uses too); no network fetch happens before
submit answers (contract §7).
"""

from __future__ import annotations

from typing import Any

from server.datauri import DataURIError, decode_data_uri
from server.kernel.errors import ApiError, bad_request
from server.kernel.media_types import media_filename, sniff
from server.kernel.request import MEDIA_BY_NAME, MEDIA_FIELDS
from server.storage import Storage


def _limit_for(field: str, limits: dict[str, int]) -> int:
    return limits[MEDIA_BY_NAME[field.split("[", 1)[0]].holds]


def store_inline_media(
    inp: dict[str, Any], job_id: str, storage: Storage, base_url: str, limits: dict[str, int]
) -> dict[str, Any]:
    def move(field: str, value: str) -> str:
        if not value.lower().startswith("data:"):
            return value
        limit = _limit_for(field, limits)
        # Cheap bound before decoding: base64 is 4/3 of the payload.
        if len(value) * 3 // 4 > limit + 1024:
            raise ApiError(413, f"{field}: inline media larger than the {limit // 2**20} MB limit")
        # No cap passed: the bound above is this route's, and the exact check follows.
        try:
            data, _mime = decode_data_uri(value)
        except DataURIError as e:
            raise bad_request(f"{field}: {e}") from None
        if not data:
            raise bad_request(f"{field}: the data: URI is empty")
        if len(data) > limit:
            raise ApiError(413, f"{field}: inline media larger than the {limit // 2**20} MB limit")
        # The extension comes from the bytes, never the claimed type: a `data:text/html` input
        # must not be served back as HTML from our origin. Undecodable bytes are kept as .bin
        # and fail the job with the decoder's clear message.
        found = sniff(data)
        name = media_filename(field.replace("[", "").replace("]", ""), found[1] if found else None)
        key = storage.put_bytes(storage.new_key(f"inputs/{job_id}", name), data)
        return storage.url(base_url, key)

    out = dict(inp)
    for m in MEDIA_FIELDS:
        if m.many:
            out[m.name] = [move(f"{m.name}[{i}]", v) for i, v in enumerate(out.get(m.name) or [])]
        elif out.get(m.name):
            out[m.name] = move(m.name, out[m.name])
    return out
