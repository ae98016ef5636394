"""Fetching a job's media inputs (URLs and `data:` URIs) in the worker process.

The URLs come from API callers, so every fetch is a potential server-side request forgery: a
caller could point `video` at a cloud metadata endpoint or an admin page on the private network
and read the answer back through the generated video. The guards, in order:

1. Only `http`/`https` (and `data:`, decoded locally) are accepted.
2. Every host, on the first request and on every redirect hop, is resolved and refused if
   ANY of its addresses is loopback, private, link-local, CGNAT, multicast, reserved, ...
   (`WAN_VACE_ALLOW_PRIVATE_URLS=true` turns this off for on-prem networks and tests).
3. The TCP connection itself is made by server/netguard.py's guarded transport to one of the
   addresses it just resolved and vetted, never by a second, independent DNS lookup. That closes
   the DNS-rebinding gap (a name that answers "public" to the check and "127.0.0.1" to the
   connect). The peer address of the open connection is checked once more as defence in depth.
4. Redirects are followed by hand, so each hop goes through 2 and 3; the hop count is capped.
5. The body is streamed with a byte cap (and `Content-Length` is checked up front), under
   per-read timeouts and an overall deadline, so a slow or endless answer cannot pin a worker.

Error text: every failure is a `MediaAccessError` whose message names the field. WaveSpeed SDKs
re-submit (paid) tasks whose error text contains "HTTP 5", "429", "timeout" or "connection"
(see server/errors.py), so deterministic failures never use those words, and URLs are echoed
only in a shortened form that is checked for them (a URL can contain "429" by chance). Genuinely
transient failures (remote 5xx/429, timeouts, a dropped transfer) raise
`MediaTemporarilyUnavailable`, which is retryable.

No FastAPI or torch here: this runs inside the worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import httpx

from server import netguard
from server.datauri import DataURIError, DataURITooLarge, decode_data_uri
from server.kernel.errors import MediaAccessError
from server.netguard import AddressRefused, GuardedTransport, Unresolvable, vetted_addresses

__all__ = [
    "FetchPolicy",
    "MediaTemporarilyUnavailable",
    "fetch_media",
]

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "wan-vace-server (media fetch)"
# Substrings that make WaveSpeed SDKs re-submit a failed task (server/errors.py).
_RETRY_MARKERS = ("http 5", "429", "timeout", "connection")
_PRIVATE_HINT = "which is refused; set WAN_VACE_ALLOW_PRIVATE_URLS=true to allow it"


class MediaTemporarilyUnavailable(MediaAccessError):
    """The media could not be fetched for a reason that may go away (remote 5xx/429, a timeout,
    a dropped transfer): running the job again may succeed."""

    retryable = True


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int  # cap enforced WHILE streaming (also on Content-Length up front)
    # The whole fetch of one input, redirects included (WAN_VACE_FETCH_TIMEOUT): connecting,
    # each read and the download together end within it, so a host that drips a byte a second
    # holds a worker for exactly this long, and the README's number is the one that applies.
    timeout_s: float = 120.0
    allow_private: bool = False  # WAN_VACE_ALLOW_PRIVATE_URLS
    max_redirects: int = 5

    @property
    def deadline_s(self) -> float:
        return self.timeout_s


# ---------------------------------------------------------------------------------------------
# Messages


def _human_bytes(n: int) -> str:
    """Binary units, as the limits are set (100 MB = 100 * 2**20), so the message shows the
    README's number."""
    if n >= 2**20:
        return f"{n / 2**20:.4g} MB"
    if n >= 2**10:
        return f"{n / 2**10:.4g} kB"
    return f"{n} bytes"


def _has_retry_marker(text: str) -> bool:
    low = text.lower()
    return any(m in low for m in _RETRY_MARKERS)


def _safe(text: str, fallback: str) -> str:
    """`text` (a host, an address) for an error message, or `fallback` if it contains a marker."""
    return fallback if _has_retry_marker(text) else text


def _url_for_message(url: str) -> str:
    """A short, safe rendering of a URL for error text: no query string or fragment (presigned
    URLs carry credentials there), no user info, at most ~100 characters, and never a retry
    marker (falls back to the bare origin, then to "the URL")."""
    if url[:5].lower() == "data:":
        return "the data: URI"
    try:
        parsed = httpx.URL(url)
        origin = f"{parsed.scheme}://{parsed.host}" + (f":{parsed.port}" if parsed.port else "")
        full = origin + parsed.path
    except Exception:
        return "the URL"
    if len(full) > 100:
        full = full[:97] + "..."
    for candidate in (full, origin):
        if not _has_retry_marker(candidate):
            return candidate
    return "the URL"


def _fail(field: str, what: str) -> MediaAccessError:
    return MediaAccessError(f"{field}: {what}")


def _too_large(field: str, policy: FetchPolicy) -> MediaAccessError:
    return _fail(field, f"larger than the {_human_bytes(policy.max_bytes)} limit")


# ---------------------------------------------------------------------------------------------
# data: URIs

def _decode_data_uri(url: str, field: str, policy: FetchPolicy) -> bytes:
    try:
        return decode_data_uri(url, policy.max_bytes)[0]
    except DataURITooLarge:
        raise _too_large(field, policy) from None
    except DataURIError as e:
        raise _fail(field, str(e)) from None


# ---------------------------------------------------------------------------------------------
# HTTP


def _check_hop(url: str, field: str, policy: FetchPolicy, *, hop: int, first_url: str) -> httpx.URL:
    """Validate one URL of the redirect chain before any request is sent to it: scheme, host,
    and (unless private URLs are allowed) every address the host resolves to."""
    try:
        parsed = httpx.URL(url)
    except Exception:
        raise _fail(field, f"not a valid URL: {_url_for_message(url)}") from None
    scheme = parsed.scheme.lower()
    if hop == 0 and scheme not in ("http", "https"):
        if not scheme:
            raise _fail(field, "not a URL (expected http://, https:// or a data: URI)")
        raise _fail(field, f"unsupported URL scheme '{scheme}'; use http(s) or a data: URI")
    if hop > 0 and scheme not in ("http", "https"):
        raise _fail(
            field,
            f"{_url_for_message(first_url)} redirects to an unsupported URL scheme '{scheme}'",
        )
    if not parsed.host:
        raise _fail(field, f"URL has no host: {_url_for_message(url)}")
    try:
        vetted_addresses(parsed.host, policy.allow_private)
    except Unresolvable as exc:
        raise _unresolvable_error(field, exc) from None
    except AddressRefused as exc:
        raise _forbidden_error(field, exc, hop=hop, first_url=first_url) from None
    return parsed


def _unresolvable_error(field: str, exc: Unresolvable) -> MediaAccessError:
    what = f"could not resolve the host name {_safe(repr(exc.host), 'of the URL')}"
    if exc.temporary:
        return MediaTemporarilyUnavailable(f"{field}: {what} (the DNS server asked to retry)")
    return _fail(field, what)


def _forbidden_error(
    field: str, exc: AddressRefused, *, hop: int, first_url: str
) -> MediaAccessError:
    if hop == 0:
        return _fail(
            field,
            f"URL resolves to a private or loopback address ({_safe(exc.ip, 'not shown')}), "
            f"{_PRIVATE_HINT}",
        )
    return _fail(
        field,
        f"{_url_for_message(first_url)} redirects to {_safe(exc.host, 'a host')}, which resolves "
        f"to a private or loopback address ({_safe(exc.ip, 'not shown')}), {_PRIVATE_HINT}",
    )


def _peer_ip(response: httpx.Response) -> str | None:
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    try:
        addr = stream.get_extra_info("server_addr")
    except Exception:
        return None
    if isinstance(addr, tuple) and addr:
        return str(addr[0])
    return None


def _status_error(field: str, url: str, status: int) -> MediaAccessError:
    where = f"could not download {_url_for_message(url)}"
    if status == 429:
        return MediaTemporarilyUnavailable(
            f"{field}: {where}: the server answered 429 (too many requests); try again later"
        )
    if status >= 500:
        return MediaTemporarilyUnavailable(
            f"{field}: {where}: the server answered {status} (temporarily unavailable)"
        )
    # 4xx: deterministic. The bare status number is safe: only 429 is a marker and it is above.
    return _fail(field, f"{where}: the server answered {status}")


def fetch_media(
    url: str,
    field: str,
    policy: FetchPolicy,
    *,
    local_resolver: Callable[[str], bytes | None] | None = None,
) -> bytes:
    """Return the bytes behind `url` (an http(s) URL or a `data:` URI) for the request field
    `field` (e.g. "images[1]"), or raise MediaAccessError naming that field.

    `local_resolver(url)` may recognise this server's own media URLs (uploads, earlier outputs)
    and return their bytes from storage: no HTTP, and no private-address refusal for ourselves.
    """
    url = url.strip()
    if url[:5].lower() == "data:":
        return _decode_data_uri(url, field, policy)

    if local_resolver is not None:
        local = local_resolver(url)
        if local is not None:
            if len(local) > policy.max_bytes:
                raise _too_large(field, policy)
            return local

    started = time.monotonic()
    timeout = httpx.Timeout(policy.timeout_s)
    headers = {"User-Agent": _USER_AGENT, "Accept": "*/*", "Accept-Encoding": "identity"}
    transport = GuardedTransport(policy.allow_private)
    # trust_env=False: environment proxies would route around the guarded transport (and make
    # the peer check meaningless); .netrc credentials must not leak to caller-chosen hosts.
    with httpx.Client(transport=transport, trust_env=False, follow_redirects=False,
                      timeout=timeout, headers=headers) as client:
        current = url
        for hop in range(policy.max_redirects + 1):
            parsed = _check_hop(current, field, policy, hop=hop, first_url=url)
            try:
                result = _get_once(client, parsed, field, url, policy, started, hop)
            except MediaAccessError:
                raise
            except AddressRefused as exc:  # the connect-time re-resolution disagreed (rebinding)
                raise _forbidden_error(field, exc, hop=hop, first_url=url) from None
            except httpx.TimeoutException:
                raise MediaTemporarilyUnavailable(
                    f"{field}: downloading {_url_for_message(url)} timed out after "
                    f"{policy.timeout_s:g} s without data"
                ) from None
            except httpx.ConnectError as exc:
                raise _connect_failure(field, parsed, exc) from None
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
                raise MediaTemporarilyUnavailable(
                    f"{field}: the server of {_url_for_message(url)} dropped the transfer "
                    "before it was complete"
                ) from None
            except httpx.HTTPError as exc:
                raise _fail(
                    field, f"could not download {_url_for_message(url)} ({type(exc).__name__})"
                ) from None
            if isinstance(result, bytes):
                return result
            current = result  # the next hop's absolute URL
        raise _fail(
            field,
            f"{_url_for_message(url)} redirects more than {policy.max_redirects} times",
        )


def _connect_failure(field: str, parsed: httpx.URL, exc: Exception) -> MediaAccessError:
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    where = _safe(f"{parsed.host}:{port}", "the host of the URL")
    text = str(exc).lower()
    if "certificate" in text or "ssl" in text or "tls" in text:
        return _fail(field, f"the TLS certificate of {where} could not be verified")
    if "refused" in text:
        return _fail(field, f"nothing is accepting requests at {where}")
    return _fail(field, f"could not reach {where}")


def _get_once(
    client: httpx.Client,
    target: httpx.URL,
    field: str,
    first_url: str,
    policy: FetchPolicy,
    started: float,
    hop: int,
) -> bytes | str:
    """One GET. Returns the body, or the absolute URL of the next hop for a redirect."""
    remaining = policy.deadline_s - (time.monotonic() - started)
    if remaining <= 0:
        raise _deadline_error(field, first_url, policy)
    per_read = min(policy.timeout_s, remaining)
    with client.stream("GET", target, timeout=httpx.Timeout(per_read)) as response:
        peer = _peer_ip(response)
        # Through the module, so a replacement installed there (tests) is the one consulted.
        if peer is not None and not policy.allow_private and netguard.is_forbidden_address(peer):
            raise _forbidden_error(
                field, AddressRefused(target.host, peer), hop=hop, first_url=first_url
            )
        status = response.status_code
        if status in _REDIRECT_STATUSES:
            location = response.headers.get("location")
            if not location:
                raise _fail(
                    field, f"{_url_for_message(first_url)} answered {status} without a Location"
                )
            try:
                return str(target.join(location))
            except Exception:
                raise _fail(
                    field, f"{_url_for_message(first_url)} redirects to an invalid URL"
                ) from None
        if status >= 400 or status < 200:
            raise _status_error(field, first_url, status)
        if 300 <= status < 400:  # 300, 304, 305...: nothing to follow
            raise _fail(field, f"could not download {_url_for_message(first_url)}: the server "
                               f"answered {status}")

        declared = response.headers.get("content-length")
        if declared is not None and declared.strip().isdigit():
            if int(declared) > policy.max_bytes:
                raise _too_large(field, policy)

        chunks: list[bytes] = []
        received = 0
        for chunk in response.iter_bytes():
            received += len(chunk)
            if received > policy.max_bytes:
                raise _too_large(field, policy)
            chunks.append(chunk)
            if time.monotonic() - started > policy.deadline_s:
                raise _deadline_error(field, first_url, policy)
        return b"".join(chunks)


def _deadline_error(field: str, url: str, policy: FetchPolicy) -> MediaAccessError:
    # Not retried: a host too slow for the whole limit once is as slow on the next attempt, and
    # a retry would hold a worker for the limit again.
    return MediaAccessError(
        f"{field}: downloading {_url_for_message(url)} took longer than the "
        f"{policy.deadline_s:g} s download limit"
    )
