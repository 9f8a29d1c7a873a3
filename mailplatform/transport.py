"""SSRF-safe HTTP to hosts a tenant names: webhook endpoints, OpenID providers.

The one module every outbound call to a tenant-supplied URL goes through. The host is
resolved once; every address must be globally routable (after unwrapping IPv4 embedded in
IPv6: IPv4-mapped, IPv4-compatible, 6to4, Teredo and NAT64 ``64:ff9b::/96``, which
``ipaddress`` reports as global); the connection goes to that pinned address while the
``Host`` header and TLS SNI/certificate check keep the URL's host name, so a second DNS
answer cannot swap in an internal address (DNS rebinding). Only ports 80/443 plus the
policy's extra ports; redirects are never followed (RFC 9110 section 15.4 leaves that to the
client); the whole exchange has one deadline and the body a size limit.

Each caller brings a :class:`Policy`: webhooks build theirs from the ``WEBHOOK_*`` settings
(webhooks/transport.py), everything else uses :meth:`Policy.outbound` (``OUTBOUND_*``).
``allow_private`` (development and tests) lifts the address and port rules.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class UrlRefused(ValueError):
    """The URL may not be called; the message says why."""


class TransportError(OSError):
    """The request did not produce a usable HTTP response (connection, TLS, timeout, size)."""


@dataclass(frozen=True)
class Policy:
    """What one kind of outbound call may reach."""

    allow_private: bool = False
    allow_http: bool = False
    extra_ports: frozenset[int] = frozenset()
    ca_file: str = ""

    @classmethod
    def outbound(cls) -> Policy:
        """The ``OUTBOUND_*`` settings (SSO discovery, tokens, keys, userinfo)."""
        return cls(
            allow_private=bool(settings.OUTBOUND_ALLOW_PRIVATE),
            allow_http=bool(settings.OUTBOUND_ALLOW_HTTP),
            extra_ports=frozenset(settings.OUTBOUND_EXTRA_PORTS),
            ca_file=settings.OUTBOUND_CA_FILE,
        )


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


def address_allowed(text: str, policy: Policy) -> bool:
    """Whether a call under ``policy`` may connect to this IP address."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return policy.allow_private or _is_public(address)


def url_parse(url: str, policy: Policy) -> tuple[str, str, int, str]:
    """Check the URL's shape (scheme, port, no credentials); return scheme, host, port, path."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise UrlRefused("The URL is not valid.") from None
    scheme = parts.scheme.lower()
    allowed_schemes = {"https", "http"} if policy.allow_http else {"https"}
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
    if not policy.allow_private and port not in {80, 443, *policy.extra_ports}:
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


def url_resolve(url: str, policy: Policy) -> Target:
    """Parse and resolve ``url`` once, refusing unless every address is allowed."""
    scheme, host, port, path = url_parse(url, policy)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise UrlRefused(f"The host {host} does not resolve.") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise UrlRefused(f"The host {host} does not resolve.")
    refused = [address for address in addresses if not address_allowed(address, policy)]
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


def _ssl_context(policy: Policy) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if policy.ca_file:
        context.load_verify_locations(cafile=policy.ca_file)
    return context


def request(
    target: Target,
    *,
    method: str,
    policy: Policy,
    timeout: float,
    body_limit: int,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    truncate: bool = False,
) -> Response:
    """One request to the pinned address, all of it within ``timeout`` seconds.

    Redirects are returned, never followed. A body longer than ``body_limit`` is cut there
    with ``truncate`` (a webhook receiver's answer is only kept for the record), and raises
    TransportError otherwise (a document we parse must be whole).
    """
    connection: http.client.HTTPConnection
    if target.scheme == "https":
        connection = _PinnedHTTPSConnection(target, timeout, _ssl_context(policy))
    else:
        connection = http.client.HTTPConnection(target.address, target.port, timeout=timeout)
    # Socket timeouts bound each read, not the exchange: a server trickling one byte at a
    # time would never trip them. The watchdog ends the connection at the deadline.
    expired = threading.Event()

    def _expire() -> None:
        expired.set()
        if connection.sock is not None:
            with contextlib.suppress(OSError):  # already closed
                connection.sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(timeout, _expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request(method, target.path, body=body, headers={**(headers or {}), "Host": target.host_header})
        raw = connection.getresponse()
        declared = raw.getheader("content-length")
        if not truncate and declared and declared.isdigit() and int(declared) > body_limit:
            raise TransportError(f"response larger than {body_limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while size <= body_limit:
            chunk = raw.read1(body_limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if expired.is_set():
            raise TimeoutError
        content = b"".join(chunks)
        if size > body_limit:
            if not truncate:
                raise TransportError(f"response larger than {body_limit} bytes")
            content = content[:body_limit]
        return Response(
            status=raw.status,
            headers={name.lower(): value for name, value in raw.getheaders()},
            body=content,
        )
    except TransportError:
        raise
    except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
        if expired.is_set() or isinstance(exc, TimeoutError | socket.timeout):
            raise TransportError(f"timed out after {timeout:g}s") from None
        raise TransportError(f"{type(exc).__name__}: {exc}"[:300]) from None
    finally:
        watchdog.cancel()
        connection.close()


def fetch(
    url: str,
    *,
    policy: Policy,
    timeout: float,
    body_limit: int,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """Resolve, check and call ``url`` in one step (UrlRefused or TransportError on failure)."""
    started = time.monotonic()
    target = url_resolve(url, policy)
    remaining = max(0.1, timeout - (time.monotonic() - started))
    return request(
        target, method=method, policy=policy, timeout=remaining, body_limit=body_limit, body=body, headers=headers
    )
