"""SSRF-safe HTTP delivery.

The host is resolved once; every address must be globally routable (after unwrapping IPv4
embedded in IPv6: IPv4-mapped, IPv4-compatible, 6to4, Teredo and NAT64 ``64:ff9b::/96``,
which ``ipaddress`` reports as global); the connection goes to that pinned address while
the ``Host`` header and TLS SNI/certificate check keep the URL's host name, so a second DNS
answer cannot swap in an internal address (DNS rebinding). Only ports 80/443 plus
``WEBHOOK_EXTRA_PORTS``; redirects are never followed (RFC 9110 section 15.4 leaves that
to the client). ``WEBHOOK_ALLOW_PRIVATE`` (development and tests) lifts the address and
port rules.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_DEFAULT_PORTS = {"http": 80, "https": 443}
RESPONSE_BODY_LIMIT = 1024


class UrlRefused(ValueError):
    """The URL may not be delivered to; the message says why (shown to the tenant)."""


class TransportError(OSError):
    """The request did not produce an HTTP response (connection, TLS, timeout)."""


@dataclass(frozen=True)
class Target:
    """A checked URL with the one address it will be sent to."""

    scheme: str
    host: str
    port: int
    path: str
    address: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses a packet to ``address`` may end up at."""
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def _is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address in _NAT64:
        # ::/8 is "reserved", but a DNS64 answer for a public IPv4 host is a public address.
        return all(_is_public(inner) for inner in _embedded_ipv4(address))
    if (
        not address.is_global
        or address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    ):
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local or address in _NAT64_LOCAL:
            return False
        return all(_is_public(inner) for inner in _embedded_ipv4(address))
    return True


def address_allowed(text: str) -> bool:
    """Whether a delivery may connect to this IP address under the current settings."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return bool(settings.WEBHOOK_ALLOW_PRIVATE) or _is_public(address)


def url_parse(url: str) -> tuple[str, str, int, str]:
    """Check the URL's shape (scheme, port, no credentials); return scheme, host, port, path."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise UrlRefused("The URL is not valid.") from None
    scheme = parts.scheme.lower()
    allowed_schemes = {"https", "http"} if settings.WEBHOOK_ALLOW_HTTP else {"https"}
    if scheme not in allowed_schemes:
        raise UrlRefused("The URL must use https." if scheme == "http" else "The URL must be http(s).")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("Credentials in the URL are not supported; use a token in the path or query.")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UrlRefused("The URL has no host.")
    try:
        host = host.encode("idna").decode("ascii") if not _is_ip_literal(host) else host
    except UnicodeError:
        raise UrlRefused("The URL's host name is not valid.") from None
    port = port or _DEFAULT_PORTS[scheme]
    if not settings.WEBHOOK_ALLOW_PRIVATE and port not in {80, 443, *settings.WEBHOOK_EXTRA_PORTS}:
        raise UrlRefused(f"Port {port} is not allowed; use 80 or 443.")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port, path


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def url_resolve(url: str) -> Target:
    """Parse and resolve ``url`` once, refusing unless every address is allowed."""
    scheme, host, port, path = url_parse(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise UrlRefused(f"The host {host} does not resolve.") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise UrlRefused(f"The host {host} does not resolve.")
    refused = [address for address in addresses if not address_allowed(address)]
    if refused:
        raise UrlRefused(f"The host {host} resolves to a non-public address ({refused[0]}).")
    return Target(scheme=scheme, host=host, port=port, path=path, address=addresses[0])


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to a fixed address; SNI and certificate check use the URL's host name."""

    def __init__(self, target: Target, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(target.address, target.port, timeout=timeout, context=context)
        self._server_name = target.host
        self._context = context

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._server_name)


def _ssl_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    if settings.WEBHOOK_CA_FILE:
        context.load_verify_locations(cafile=settings.WEBHOOK_CA_FILE)
    return context


def post(target: Target, body: bytes, headers: dict[str, str], *, timeout: float) -> Response:
    """POST ``body`` to the pinned address within ``timeout`` seconds; never follows redirects."""
    deadline = time.monotonic() + timeout
    connection: http.client.HTTPConnection
    if target.scheme == "https":
        connection = _PinnedHTTPSConnection(target, timeout, _ssl_context())
    else:
        connection = http.client.HTTPConnection(target.address, target.port, timeout=timeout)
    try:
        connection.request("POST", target.path, body=body, headers={**headers, "Host": target.host_header})
        raw = connection.getresponse()
        chunks: list[bytes] = []
        size = 0
        while size < RESPONSE_BODY_LIMIT:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if connection.sock is not None:
                connection.sock.settimeout(remaining)
            chunk = raw.read1(RESPONSE_BODY_LIMIT - size) if hasattr(raw, "read1") else b""
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return Response(
            status=raw.status,
            headers={name.lower(): value for name, value in raw.getheaders()},
            body=b"".join(chunks),
        )
    except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
        if isinstance(exc, TimeoutError | socket.timeout):
            raise TransportError(f"timed out after {timeout:g}s") from None
        raise TransportError(f"{type(exc).__name__}: {exc}"[:300]) from None
    finally:
        connection.close()
