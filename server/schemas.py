"""Validation of the submit body, with WaveSpeed's exact field names, ranges and defaults
(contract §6), tolerant of what real clients send:

- explicit `null` and `""` mean "absent" (ComfyUI nodes send both);
- unknown keys are ignored and reported back to the caller for logging;
- integers are accepted for number fields, integral floats (5.0) for integer fields;
- media fields take http(s) URLs or `data:` URIs;
- a seed above 2^31-1 (ComfyUI sends up to 9999999999) is reduced modulo 2^31 (decided in
  contract §6); -1 means random; other negative seeds are refused.

Our extension fields (`Field.extension`) are held to the same standard: every bad value, and
every combination that cannot be honoured (`_check_extensions`: a box outside the frame of the
requested `size`, a field that needs `video` without one, exclusive fields together), is a 400
naming the field. What only the decoded media can tell (a clip too long to extend, a kept frame
past the clip's end) fails the job in the worker instead, with the same kind of message.

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
    MEDIA_BY_NAME,
    OUTPAINTING_TASKS,
    SEED_MAX,
    Field,
    num_frames_for,
    parse_size,
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


def _items(f: Field, v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise bad_request(f"{f.name} must be a list, got {type(v).__name__}")
    if len(v) < f.min_items:
        raise bad_request(
            f"{f.name} needs at least {f.min_items} item{'s' * (f.min_items > 1)}, got {len(v)}"
        )
    return v


def _box(name: str, v: Any) -> list[int]:
    if not isinstance(v, list) or len(v) != 4:
        raise bad_request(f"{name} must be a box [x1, y1, x2, y2] of 4 integers, got {v!r}")
    box = [_number(f"{name}[{i}]", x, integer=True) for i, x in enumerate(v)]
    if box[0] >= box[2] or box[1] >= box[3]:
        raise bad_request(f"{name} must have x1 < x2 and y1 < y2, got {box}")
    return box


def _list_value(f: Field, v: Any) -> list[Any]:
    if f.kind == "enum_list":
        if isinstance(v, str):  # [compat] one value where a list is expected
            v = [v]
        items = [x.strip().lower() if isinstance(x, str) else x for x in _items(f, v)]
        for x in items:
            if x not in f.choices:
                raise bad_request(f"{f.name} items must be among {', '.join(f.choices)}, got {x!r}")
        if len(set(items)) != len(items):
            raise bad_request(f"{f.name} lists a value twice: {items}")
        return items
    if f.kind == "int_list":
        items = [_number(f"{f.name}[{i}]", x, integer=True) for i, x in enumerate(_items(f, v))]
        for i, x in enumerate(items):
            _check_range(Field(f"{f.name}[{i}]", "integer", minimum=f.minimum), x)
        if len(set(items)) != len(items):
            raise bad_request(f"{f.name} lists a frame twice: {items}")
        return items
    # box_list: where one box is enough, a bare box is that box.
    if f.min_items <= 1 and isinstance(v, list) and len(v) == 4 and not isinstance(v[0], list):
        v = [v]
    return [_box(f"{f.name}[{i}]", b) for i, b in enumerate(_items(f, v))]


def _value(f: Field, v: Any) -> Any:
    if f.kind in ("enum_list", "int_list", "box_list"):
        return _list_value(f, v)
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
    given = {ALIASES.get(k, k) for k, v in body.items() if not _absent(v)}
    _check_extensions(out, given)
    return out, ignored


def _check_extensions(out: dict[str, Any], given: set[str]) -> None:
    """The combinations of extension fields that cannot be honoured, refused at submit."""
    video, task = out["video"] is not None, out["task"]
    masks = [n for n in ("mask_video", "mask_image", "mask_bbox") if out[n]]
    extend, keep = out["extend"], out["keep_frames"]

    def needs_video(name: str) -> None:
        if not video:
            raise bad_request(f"{name} needs a video: give video as well")

    def exclusive(name: str, others: list[str]) -> None:
        if others:
            raise bad_request(f"{name} cannot be combined with {', '.join(others)}")

    if extend is not None:
        needs_video("extend")
        exclusive("extend", masks + ["keep_frames"] * bool(keep))
        if extend == "between" and out["last_video"] is None:
            raise bad_request('extend "between" needs last_video, the clip kept at the end')
    if out["last_video"] is not None and extend != "between":
        raise bad_request('last_video is the clip kept at the end with extend "between"; set extend')
    if keep:
        needs_video("keep_frames")
        exclusive("keep_frames", masks)
        frames = num_frames_for(out["duration"])
        for i, x in enumerate(keep):
            if x >= frames:
                raise bad_request(
                    f"keep_frames[{i}] is {x}; a {out['duration']} s video has frames 0..{frames - 1}"
                )
    if out["mask_bbox"]:
        needs_video("mask_bbox")
        exclusive("mask_bbox", [n for n in masks if n != "mask_bbox"])
    if out["layout_bbox"]:
        exclusive("layout_bbox", ["video"] * video + masks)
    if task in OUTPAINTING_TASKS:
        if not (video or out["first_image"] or out["last_image"]):
            raise bad_request(f"task {task} needs video, first_image or last_image to expand")
        bound = [n for n in ("extend", "keep_frames", "layout_bbox") if out[n]]
        exclusive(f"task {task}", masks + bound)
        if task == "outpainting_inner":
            d, r = out["outpaint_direction"], out["outpaint_ratio"]
            for a, b in (("left", "right"), ("up", "down")):
                if a in d and b in d and 2 * r >= 1:
                    raise bad_request(
                        f"outpaint_ratio {r:g} regenerates the whole frame from {a} and {b} with "
                        "outpainting_inner: use less than 0.5"
                    )
    else:
        for name in ("outpaint_direction", "outpaint_ratio"):
            if name in given:
                raise bad_request(f"{name} applies to task outpainting or outpainting_inner only")
    width, height = parse_size(out["size"])
    for name in ("layout_bbox", "mask_bbox"):
        for i, (x1, y1, x2, y2) in enumerate(out[name]):
            if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
                raise bad_request(
                    f"{name}[{i}] {[x1, y1, x2, y2]} is outside the {width}x{height} frame of "
                    f"size {out['size']}: 0 <= x1 < x2 <= {width}, 0 <= y1 < y2 <= {height}"
                )


def request_schema() -> dict[str, Any]:
    """A JSON-schema-like description in WaveSpeed's `api_schema` shape (contract §3.6)."""
    props: dict[str, Any] = {}
    for f in FIELDS:
        t = {"media": "string", "enum": "string"}.get(f.kind, f.kind)
        if f.kind.endswith("_list"):
            t = "array"
        p: dict[str, Any] = {"type": t}
        if f.description:
            p["description"] = f.description
        if f.default not in (None, []):
            p["default"] = f.default
        bounds = {"minimum": f.minimum, "maximum": f.maximum}
        bounds = {k: v for k, v in bounds.items() if v is not None}
        if f.kind == "media_list":
            p["items"] = {"type": "string"}
            p["maxItems"] = MAX_IMAGES
        elif f.kind == "enum_list":
            p["items"] = {"type": "string", "enum": list(f.choices)}
            p["uniqueItems"] = True
        elif f.kind == "int_list":
            p["items"] = {"type": "integer", **bounds}
            p["uniqueItems"] = True
        elif f.kind == "box_list":
            # A box is [x1, y1, x2, y2] in pixels of `size`, x1 < x2 and y1 < y2.
            p["items"] = {
                "type": "array",
                "items": {"type": "integer", "minimum": 0},
                "minItems": 4,
                "maxItems": 4,
            }
        else:
            if f.choices:
                p["enum"] = list(f.choices)
            p.update(bounds)
        if f.min_items:
            p["minItems"] = f.min_items
        if f.extension:
            p["x-extension"] = True
        media = MEDIA_BY_NAME.get(f.name)
        if media is not None:
            # WaveSpeed's playground marks media fields this way; ours reads it to offer a file
            # picker, so the page learns media fields from the table, not from their names.
            p["x-ui-component"] = "uploader"
            p["x-accept"] = f"{media.holds}/*"
        props[f.name] = p
    return {
        "type": "object",
        "properties": props,
        "required": [f.name for f in FIELDS if f.required],
        "x-order-properties": [f.name for f in FIELDS],
    }


__all__ = ["FIELDS", "validate_submit", "request_schema"]
