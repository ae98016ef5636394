"""`wan-vace settings`: every effective setting, its value and where it came from (a flag, the
environment, a `.env` file when the settings read one, or the default), secrets masked.

The source is found the way pydantic-settings resolves a value: a flag (an explicit init value)
wins over a `WAN_VACE_*` variable (matched case-insensitively, as the settings match it), which
wins over the dotenv file, which wins over the default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from server.settings import Settings

FLAG, ENVIRONMENT, DOTENV, DEFAULT = "flag", "environment", ".env", "default"
SECRET_FIELDS = ("api_keys",)
URL_FIELDS = ("database_url", "storage_url", "public_url")


def _mask_key(key: str) -> str:
    # Enough of the end to tell two keys apart, never enough to use one.
    return "****" + key[-4:] if len(key) >= 12 else "****"


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:****@{host}"))


def shown(name: str, value: Any) -> Any:
    """A setting's value as printed: keys masked, passwords cut out of URLs, paths as text."""
    if name in SECRET_FIELDS:
        return [_mask_key(str(k)) for k in value]
    if name in URL_FIELDS and isinstance(value, str):
        return _mask_url(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _dotenv_names(cls: type[Settings]) -> set[str]:
    """Lower-cased variable names the settings' dotenv file(s) define (none when not read)."""
    files = cls.model_config.get("env_file")
    if not files:
        return set()
    from dotenv import dotenv_values

    names: set[str] = set()
    for f in [files] if isinstance(files, str | os.PathLike) else files:
        if Path(f).is_file():
            names |= {k.lower() for k in dotenv_values(f)}
    return names


def report(
    settings: Settings, flags: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """One row per setting: name, variable, value (masked), source."""
    environ = os.environ if environ is None else environ
    cls = type(settings)
    prefix = str(cls.model_config.get("env_prefix", "")).lower()
    env_names = {k.lower() for k in environ}
    dotenv = _dotenv_names(cls)
    rows = []
    for name in cls.model_fields:
        var = (prefix + name).lower()
        if name in flags:
            source = FLAG
        elif var in env_names:
            source = ENVIRONMENT
        elif var in dotenv:
            source = DOTENV
        else:
            source = DEFAULT
        value = getattr(settings, name)
        rows.append({"name": name, "variable": var.upper(), "value": shown(name, value), "source": source})
    return rows


def _note(row: dict[str, Any], settings: Settings) -> str:
    if row["name"] == "api_keys" and not row["value"] and not settings.open_access:
        return f"  (none set: the key in {settings.data_dir / 'api_key'} is used, generated on first start)"
    if row["name"] == "weights_dir" and row["value"] is None:
        return f"  (so {settings.resolved_weights_dir})"
    return ""


def render(rows: list[dict[str, Any]], settings: Settings, *, as_json: bool = False) -> str:
    if as_json:
        return json.dumps(rows, indent=2)
    width = max(len(r["variable"]) for r in rows)
    lines = []
    for r in rows:
        value = "" if r["value"] is None else r["value"]
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        lines.append(f"{r['variable']:<{width}}  {r['source']:<11}  {value}{_note(r, settings)}")
    return "\n".join(lines)
