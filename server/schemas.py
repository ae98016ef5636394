"""Validation of the submit body, with WaveSpeed's exact field names, ranges and defaults
(contract §6), tolerant of what real clients send:

- explicit `null` and `""` mean "absent" (ComfyUI nodes send both);
- unknown keys are ignored and reported back to the caller for logging;
- integers are accepted for number fields, integral floats (5.0) for integer fields;
- media fields take http(s) URLs or `data:` URIs;
- a seed above 2^31-1 (ComfyUI sends up to 9999999999) is reduced modulo 2^31 (decided in
  contract §6); -1 means random; other negative seeds are refused.

The field table itself (`FIELDS`) lives in the kernel (`server/kernel/request.py`); it is also
the request schema served by `GET /api/v3/models` and the OpenAPI document.
"""

from __future__ import annotations

import math
from typing import Any

from server.kernel.errors import bad_request
from server.kernel.request import (
    ALIASES,
    FIELDS,
    FIELDS_BY_NAME,
    MAX_IMAGES,
    SEED_MAX,
    Field,
)

_BY_NAME = FIELDS_BY_NAME


def _absent(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip() == "")


def _number(name: str, v: Any, integer: bool) -> float | int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_request(f"{name} must be a {'integer' if integer else 'number'}, got {v!r}")
    if isinstance(v, float) and not math.isfinite(v):
        raise bad_request(f"{name} must be a finite number, got {v!r}")
    if integer:
        if isinstance(v, float):
            if not v.is_integer():
                raise bad_request(f"{name} must be an integer, got {v!r}")
            v = int(v)
        return v
    return float(v)


def _media(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise bad_request(f"{name} must be a URL string, got {type(v).__name__}")
    s = v.strip()
    low = s[:11].lower()
    if low.startswith(("http://", "https://")) or low.startswith("data:"):
        return s
    raise bad_request(f"{name} must be an http(s) URL or a data: URI, got {s[:60]!r}")


def _check_range(f: Field, v: float | int) -> None:
    lo, hi = f.minimum, f.maximum
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if hi is None:
            raise bad_request(f"{f.name} must be at least {lo:g}, got {v}")
        raise bad_request(f"{f.name} must be between {lo:g} and {hi:g}, got {v}")


def _boolean(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise bad_request(f"{name} must be true or false, got {v!r}")


def _value(f: Field, v: Any) -> Any:
    if f.kind == "string":
        if not isinstance(v, str):
            raise bad_request(f"{f.name} must be a string, got {type(v).__name__}")
        return v
    if f.kind == "media":
        return _media(f.name, v)
    if f.kind == "media_list":
        if isinstance(v, str):  # [compat] a single URL where a list is expected
            v = [v]
        if not isinstance(v, list):
            raise bad_request(f"{f.name} must be a list of URLs")
        items = [_media(f"{f.name}[{i}]", x) for i, x in enumerate(v) if not _absent(x)]
        if len(items) > MAX_IMAGES:
            raise bad_request(f"{f.name} accepts at most {MAX_IMAGES} images, got {len(items)}")
        return items
    if f.kind == "boolean":
        return _boolean(f.name, v)
    if f.kind == "enum":
        s = v.strip().lower() if isinstance(v, str) else v
        if f.name == "size" and isinstance(s, str):
            s = s.replace("x", "*").replace(" ", "")  # [compat] "832x480"
        if s not in f.choices:
            raise bad_request(f"{f.name} must be one of {', '.join(f.choices)}, got {v!r}")
        return s
    n = _number(f.name, v, integer=f.kind == "integer")
    if f.name == "seed":
        if n > SEED_MAX:
            return n % 2**31  # decided in contract §6; the used seed is reported in data.seed
        if n < -1:
            raise bad_request(f"seed must be -1 (random) or between 0 and {SEED_MAX}, got {n}")
        return n
    _check_range(f, n)
    return n


def validate_submit(body: Any) -> tuple[dict[str, Any], list[str]]:
    """Returns (normalised input with every field present, ignored unknown keys)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    out: dict[str, Any] = {}
    ignored: list[str] = []
    for key, v in body.items():
        name = ALIASES.get(key, key)
        f = _BY_NAME.get(name)
        if f is None:
            ignored.append(key)
            continue
        if _absent(v):
            continue
        if name in out and key != name:
            continue  # the canonical name wins over its alias
        out[name] = _value(f, v)
    for f in FIELDS:
        if f.name not in out:
            if f.required:
                raise bad_request(f"{f.name} is required")
            out[f.name] = list(f.default) if isinstance(f.default, list) else f.default
    if out["webhook_url"] is not None:
        out["webhook_url"] = _media("webhook_url", out["webhook_url"])
        if out["webhook_url"].lower().startswith("data:"):
            raise bad_request("webhook_url must be an http(s) URL")
    return out, ignored


def request_schema() -> dict[str, Any]:
    """A JSON-schema-like description in WaveSpeed's `api_schema` shape (contract §3.6)."""
    props: dict[str, Any] = {}
    for f in FIELDS:
        t = {"media": "string", "media_list": "array", "enum": "string"}.get(f.kind, f.kind)
        p: dict[str, Any] = {"type": t}
        if f.description:
            p["description"] = f.description
        if f.default not in (None, []):
            p["default"] = f.default
        if f.choices:
            p["enum"] = list(f.choices)
        if f.minimum is not None:
            p["minimum"] = f.minimum
        if f.maximum is not None:
            p["maximum"] = f.maximum
        if f.kind == "media_list":
            p["items"] = {"type": "string"}
            p["maxItems"] = MAX_IMAGES
        props[f.name] = p
    return {
        "type": "object",
        "properties": props,
        "required": [f.name for f in FIELDS if f.required],
        "x-order-properties": [f.name for f in FIELDS],
    }


__all__ = ["FIELDS", "validate_submit", "request_schema"]
