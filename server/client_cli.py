"""The client commands of `wan-vace`: `submit` (wait with a progress bar, download the output),
`status` and `cancel`, over plain HTTP (httpx) against any running server.

Where the server is: `--url`, else `$WANVACE_URL`, else http://127.0.0.1:8000. The key:
`--key`, else `$WANVACE_API_KEY`, else the key file a local `wan-vace serve` generated
(`$WAN_VACE_DATA_DIR/api_key`, default `./data/api_key`). The variables are not `WAN_VACE_*`
because those configure a server; a client may talk to a server elsewhere.

Submit's fields come from `--json FILE` (`-` for stdin) and from one flag per field of the
request table (server/kernel/request.py), flags winning. A media field's value that names a local
file is uploaded first (the two-step upload: a ticket, then a PUT) and replaced by its URL; URLs
and `data:` URIs are sent as they are. Validation stays the server's: a refused request prints
the envelope's message and exits 1.

Exit status: 0 done (`status`: the job was found), 1 refused, failed, cancelled or unreachable,
2 bad usage, 130 interrupted (the job keeps running: nothing accepted is lost).
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from server.kernel.request import FIELDS, MEDIA_BY_NAME, Field

MODEL_PATH = "/api/v3/wavespeed-ai/wan-2.1-14b-vace"
URL_ENV, KEY_ENV = "WANVACE_URL", "WANVACE_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
TERMINAL = ("completed", "failed", "cancelled")


class ClientError(Exception):
    """Ends a command with a message on stderr and exit status 1."""


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


# Flags ------------------------------------------------------------------------------------------


def _bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _list(text: str) -> Any:
    # JSON for boxes ([[x1,y1,x2,y2], ...]); a comma list is enough for names and frame numbers.
    t = text.strip()
    if t.startswith("["):
        try:
            return json.loads(t)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    items = [s.strip() for s in t.split(",") if s.strip()]
    return [int(s) if s.lstrip("-").isdigit() else s for s in items]


_TYPES = {"integer": int, "number": float, "boolean": _bool, "enum_list": _list, "int_list": _list,
          "box_list": _list}  # fmt: skip


def _add_field(p: argparse.ArgumentParser, f: Field) -> None:
    names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
    help_text = f.description or f.kind
    if f.name in MEDIA_BY_NAME:
        help_text += " A local file (uploaded) or a URL."
    if f.kind == "media_list":
        p.add_argument(*names, dest=f.name, nargs="+", action="extend", metavar="FILE_OR_URL", help=help_text)
        return
    p.add_argument(*names, dest=f.name, type=_TYPES.get(f.kind, str), help=help_text,
                   metavar="FILE_OR_URL" if f.kind == "media" else f.kind.upper())  # fmt: skip


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help=f"the server's base URL (${URL_ENV}, default {DEFAULT_URL})")
    p.add_argument("--key", help=f"an API key (${KEY_ENV}, else ./data/api_key of a local server)")


def add_commands(sub: Any) -> None:
    """Adds `submit`, `status` and `cancel` to the `wan-vace` subparsers."""
    s = sub.add_parser(
        "submit",
        help="submit a job, wait for it with a progress bar, download the output",
        description="Submit a job. Fields come from --json and the flags below (flags win); local "
        "files given for media fields are uploaded first.",
    )
    _connection(s)
    s.add_argument("--json", dest="json_file", metavar="FILE", help="a JSON object of fields ('-': stdin)")
    s.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="wait for the job and download its output (default) or print its id and return")  # fmt: skip
    s.add_argument("--output", "-o", type=Path, help="where the video goes (default ./<job id>.mp4)")
    s.add_argument("--timeout", type=float, help="give up waiting after this many seconds (the job goes on)")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress, only the output path")
    fields = s.add_argument_group("request fields (see GET /api/v3/models)")
    for f in FIELDS:
        _add_field(fields, f)
    st = sub.add_parser("status", help="print a job's status (--json: the whole prediction object)")
    _connection(st)
    st.add_argument("id")
    st.add_argument("--json", action="store_true", dest="as_json", help="print the prediction object as JSON")
    c = sub.add_parser("cancel", help="cancel a queued or running job")
    _connection(c)
    c.add_argument("id")


# HTTP -------------------------------------------------------------------------------------------


def _api_key(flag: str | None) -> str | None:
    if flag:
        return flag
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    key_file = Path(os.environ.get("WAN_VACE_DATA_DIR") or "data") / "api_key"
    try:
        return key_file.read_text().strip() or None
    except OSError:
        return None


def connect(args: argparse.Namespace) -> httpx.Client:
    base = (args.url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    key = _api_key(args.key)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base, headers=headers, timeout=60)


def _message(r: httpx.Response) -> str:
    """The envelope's message, else the body's start."""
    try:
        body = r.json()
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except ValueError:
        pass
    return r.text[:300] or r.reason_phrase


def call(c: httpx.Client, method: str, url: str, **kw: Any) -> Any:
    """One request; answers its `data`, or raises ClientError with the server's message."""
    try:
        r = c.request(method, url, **kw)
    except httpx.HTTPError as e:
        raise ClientError(f"cannot reach {c.base_url}: {e}") from None
    if r.status_code >= 400:
        raise ClientError(f"{_message(r)} (HTTP {r.status_code})")
    try:
        return r.json()["data"]
    except (ValueError, KeyError, TypeError):
        raise ClientError(f"{url}: the answer is not a WaveSpeed envelope: {r.text[:200]}") from None


def _is_remote(value: str) -> bool:
    return value.startswith(("http://", "https://", "data:"))


def upload(c: httpx.Client, path: Path) -> str:
    """The two-step upload of a local file; answers its download URL."""
    data = path.read_bytes()
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    ticket = call(c, "POST", "/api/v3/media/uploads", json={"filename": path.name, "size": len(data),
                                                            "content_type": ctype})  # fmt: skip
    put = ticket["upload"]
    # The ticket's URL authorises itself: no key on the PUT, as the SDKs send it.
    try:
        r = httpx.put(put["url"], content=data, headers=put.get("headers") or {}, timeout=300)
    except httpx.HTTPError as e:
        raise ClientError(f"uploading {path}: {e}") from None
    if r.status_code >= 400:
        raise ClientError(f"uploading {path}: {_message(r)} (HTTP {r.status_code})")
    return ticket["download_url"]


def _media(c: httpx.Client, name: str, value: Any) -> Any:
    if isinstance(value, list):
        return [_media(c, name, v) for v in value]
    if not isinstance(value, str) or not value or _is_remote(value):
        return value
    path = Path(value.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise ClientError(f"{name}: {value!r} is neither a file here nor an http(s) URL")
    return upload(c, path)


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.json_file:
        try:
            text = sys.stdin.read() if args.json_file == "-" else Path(args.json_file).read_text()
            body = json.loads(text)
        except (OSError, json.JSONDecodeError) as e:
            raise ClientError(f"--json {args.json_file}: {e}") from None
        if not isinstance(body, dict):
            raise ClientError(f"--json {args.json_file}: expected a JSON object of fields")
    for f in FIELDS:
        v = getattr(args, f.name, None)
        if v is not None:
            body[f.name] = v
    return body


# Waiting ----------------------------------------------------------------------------------------


class Progress:
    """Queue position, then the job's progress: a bar on a terminal, a line per change
    elsewhere (a CI log keeps lines)."""

    def __init__(self, job_id: str, quiet: bool):
        from tqdm import tqdm

        self.quiet = quiet
        self.bar = None if quiet or not sys.stderr.isatty() else tqdm(
            total=100, desc=job_id[:8], unit="%", bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}"
        )  # fmt: skip
        self.last = ""

    def show(self, data: dict[str, Any]) -> None:
        status = data["status"]
        if status == "created":
            pos = data.get("queue_position")
            text = "queued" + (f", position {pos}" if pos else "")
        else:
            text = status
        if self.bar is not None:
            self.bar.n = round(100 * float(data.get("progress") or 0))
            self.bar.set_postfix_str(text, refresh=True)
        elif not self.quiet and text != self.last:
            print(text, file=sys.stderr, flush=True)
        self.last = text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def wait(c: httpx.Client, job_id: str, *, timeout: float | None, quiet: bool) -> dict[str, Any]:
    progress = Progress(job_id, quiet)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            data = call(c, "GET", f"/api/v3/predictions/{job_id}/result")
            progress.show(data)
            if data["status"] in TERMINAL:
                return data
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"gave up waiting after {timeout:g} s; the job goes on: wan-vace status {job_id}")
            time.sleep(0.25)
    finally:
        progress.close()


def download(output: str, dest: Path) -> None:
    if not output.startswith(("http://", "https://")):  # enable_base64_output
        dest.write_bytes(base64.b64decode(output))
        return
    try:
        # Media URLs need no key, and may be on another host (a public_url or a CDN): send none.
        with httpx.stream("GET", output, timeout=300, follow_redirects=True) as r:
            if r.status_code >= 400:
                r.read()
                raise ClientError(f"downloading {output}: {_message(r)} (HTTP {r.status_code})")
            # A broken download must not leave a file that looks like the video.
            part = dest.with_name(dest.name + ".part")
            with open(part, "wb") as f:
                f.writelines(r.iter_bytes())
            part.replace(dest)
    except httpx.HTTPError as e:
        raise ClientError(f"downloading {output}: {e}") from None


# Commands ---------------------------------------------------------------------------------------


def submit(args: argparse.Namespace) -> int:
    with connect(args) as c:
        body = request_body(args)
        for name in MEDIA_BY_NAME:
            if name in body:
                body[name] = _media(c, name, body[name])
        data = call(c, "POST", MODEL_PATH, json=body)
        job_id = data["id"]
        if not args.wait:
            print(job_id)
            return EXIT_OK
        if not args.quiet:
            print(f"submitted {job_id}", file=sys.stderr, flush=True)
        try:
            data = wait(c, job_id, timeout=args.timeout, quiet=args.quiet)
        except KeyboardInterrupt:
            _err(f"stopped waiting; the job goes on: wan-vace status {job_id} (wan-vace cancel {job_id} to stop it)")
            return EXIT_INTERRUPTED
    if data["status"] != "completed":
        _err(f"job {job_id} {data['status']}" + (f" (code {data['code']})" if data.get("code") else "")
             + (f": {data['error']}" if data.get("error") else ""))  # fmt: skip
        return EXIT_FAILED
    dest = args.output or Path(f"{job_id}.mp4")
    download(data["outputs"][0], dest)
    print(dest)
    return EXIT_OK


def status(args: argparse.Namespace) -> int:
    with connect(args) as c:
        data = call(c, "GET", f"/api/v3/predictions/{args.id}/result")
    if args.as_json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    line = f"{data['id']}: {data['status']}"
    if data["status"] == "created" and data.get("queue_position"):
        line += f", queue position {data['queue_position']}"
    elif data["status"] == "processing":
        line += f", {round(100 * float(data.get('progress') or 0))}%"
    print(line)
    for url in data.get("outputs") or []:
        print(url)
    if data.get("error"):
        print(data["error"])
    return EXIT_OK


def cancel(args: argparse.Namespace) -> int:
    with connect(args) as c:
        data = call(c, "POST", f"/api/v3/predictions/{args.id}/cancel")
    print(f"{data['id']}: {data.get('cancel', data['status'])}")
    return EXIT_OK


COMMANDS = {"submit": submit, "status": status, "cancel": cancel}


def run(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.cmd](args)
    except ClientError as e:
        _err(str(e))
        return EXIT_FAILED
