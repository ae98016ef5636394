"""The outbound address guard: which IP addresses this server may connect to, and an httpx
transport that enforces it when the connection is made.

Caller-chosen URLs (media inputs, webhooks) are potential server-side request forgery: a caller
could point one at a cloud metadata endpoint or an admin page on the private network. So:

1. Every host is resolved here and refused if ANY of its addresses is loopback, private,
   link-local, CGNAT, multicast, reserved, ... (`WAN_VACE_ALLOW_PRIVATE_URLS=true` turns this
   off for on-prem networks and tests).
2. The TCP connection itself is made by `_GuardedBackend` to one of the addresses it just
   resolved and vetted, never by a second, independent DNS lookup. That closes the DNS-rebinding
   gap (a name that answers "public" to the check and "127.0.0.1" to the connect).

`is_forbidden_address` and `_resolve` are looked up as module globals at call time, so tests
(and the test-only sitecustomize of tests/test_bad_media.py) can replace them here.

No FastAPI or torch here: this runs inside the worker.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl

import httpcore
import httpx

__all__ = [
    "AddressRefused",
    "GuardedTransport",
    "Unresolvable",
    "guarded_client",
    "is_forbidden_address",
    "vetted_addresses",
]


# Ranges `ipaddress` does not already flag as non-global on every Python version we support.
_EXTRA_FORBIDDEN = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches the local host on Linux
        "100.64.0.0/10",  # carrier-grade NAT (often internal cloud networks)
        "192.0.0.0/24",  # IETF protocol assignments
        "198.18.0.0/15",  # benchmarking
        "240.0.0.0/4",  # reserved, incl. broadcast
        "64:ff9b:1::/48",  # local-use NAT64
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_forbidden_address(ip: str) -> bool:
    """True if `ip` must not be fetched from unless private URLs are allowed: anything that is
    not a plain public unicast address. Unparseable input is forbidden (fail closed)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    except ValueError:
        return True
    if isinstance(addr, ipaddress.IPv6Address):
        # IPv4-mapped (::ffff:a.b.c.d) and NAT64 (64:ff9b::a.b.c.d) addresses reach exactly the
        # embedded IPv4 host: judge that one alone.
        if addr.ipv4_mapped is not None:
            return is_forbidden_address(str(addr.ipv4_mapped))
        if addr in _NAT64:
            return is_forbidden_address(str(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)))
        # 6to4 and Teredo carry an IPv4 address too: refuse if that one is forbidden, then still
        # judge the IPv6 address itself below.
        embedded = addr.sixtofour or (addr.teredo[1] if addr.teredo is not None else None)
        if embedded is not None and is_forbidden_address(str(embedded)):
            return True
    return (
        not addr.is_global
        or addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
        or any(addr in net for net in _EXTRA_FORBIDDEN if net.version == addr.version)
    )


def _resolve(host: str) -> list[str]:
    """All addresses `host` resolves to (an IP literal resolves to itself). Module-level so tests
    can stand in for DNS."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for _family, _type, _proto, _canon, sockaddr in infos:
        seen.setdefault(str(sockaddr[0]), None)
    return list(seen)


class Unresolvable(Exception):
    def __init__(self, host: str, temporary: bool = False):
        super().__init__(host)
        self.host = host
        self.temporary = temporary  # the resolver said "try again" (EAI_AGAIN)


class AddressRefused(Exception):
    """Raised by a `guarded_client()` connection to a forbidden address (`ip`) of `host`."""

    def __init__(self, host: str, ip: str):
        super().__init__(host, ip)
        self.host = host
        self.ip = ip


def vetted_addresses(host: str, allow_private: bool) -> list[str]:
    """Resolve `host` and return its addresses, refusing the host if ANY address is forbidden
    (a name with one public and one private address must not be usable to reach the private
    one by chance of ordering)."""
    try:
        addresses = _resolve(host)
    except socket.gaierror as exc:
        raise Unresolvable(host, temporary=exc.errno == socket.EAI_AGAIN) from None
    except (UnicodeError, OSError):
        raise Unresolvable(host) from None
    if not addresses:
        raise Unresolvable(host)
    if not allow_private:
        for ip in addresses:
            if is_forbidden_address(ip):
                raise AddressRefused(host, ip)
    return addresses


class _GuardedBackend(httpcore.NetworkBackend):
    """httpcore network backend that connects only to addresses it resolved and vetted itself,
    so the address checked is the address connected to (no second DNS lookup to rebind)."""

    def __init__(self, allow_private: bool):
        self._allow_private = allow_private
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        try:
            addresses = vetted_addresses(host, self._allow_private)
        except Unresolvable:
            raise httpcore.ConnectError(f"could not resolve {host}") from None
        last_error: Exception | None = None
        for ip in addresses:
            try:
                return self._inner.connect_tcp(
                    ip, port, timeout=timeout, local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc  # try the host's next address, as a resolver-based client would
        assert last_error is not None
        raise last_error

    def connect_unix_socket(self, path, timeout=None, socket_options=None):  # pragma: no cover
        raise httpcore.ConnectError("unix sockets are not used for media fetches")

    def sleep(self, seconds: float) -> None:  # pragma: no cover - only used by pool retries
        self._inner.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's transport with its connection pool rebuilt on `_GuardedBackend`. httpx has no
    public knob for the network backend, so this replaces the (long-stable) `_pool` attribute
    and fails loudly if a future httpx changes it."""

    def __init__(self, allow_private: bool):
        ssl_context = _ssl_context()
        super().__init__(verify=ssl_context, trust_env=False, retries=0)
        if not isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool):
            raise RuntimeError("httpx.HTTPTransport internals changed; update server/netguard.py")
        self._pool.close()
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=1,
            network_backend=_GuardedBackend(allow_private),
        )


def guarded_client(*, allow_private: bool, timeout: float) -> httpx.Client:
    """An httpx client with the same connect-time address guard as `server.fetch.fetch_media`,
    for other outbound requests to caller-chosen URLs (webhooks). It never follows redirects and
    ignores proxy/netrc environment settings. A forbidden address raises `AddressRefused`; a name
    that does not resolve raises httpx.ConnectError."""
    return httpx.Client(transport=GuardedTransport(allow_private), trust_env=False,
                        follow_redirects=False, timeout=timeout)


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """Built once (loading the CA bundle takes ~0.1 s). trust_env=True only makes it honour
    SSL_CERT_FILE / SSL_CERT_DIR, for on-prem certificate authorities."""
    return httpx.create_ssl_context(trust_env=True)
