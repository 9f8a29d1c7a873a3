"""SSRF-safe HTTP to hosts a tenant names: webhook endpoints, OpenID providers.

The one module every outbound call to a tenant-supplied URL goes through. The host is
resolved once; every address must be globally routable (after unwrapping IPv4 embedded in
IPv6: IPv4-mapped, IPv4-compatible, 6to4, Teredo and NAT64 ``64:ff9b::/96``, which
``ipaddress`` reports as global); the connection goes to that pinned address while the
``Host`` header and TLS SNI/certificate check keep the URL's host name, so a second DNS
answer cannot swap in an internal address (DNS rebinding). Only ports 80/443 plus the
policy's extra ports; redirects are never followed (RFC 9110 section 15.4 leaves that to the
client); the whole exchange has one deadline and the body a size limit.

A caller that sends many requests to the same hosts (webhooks) may pass a
:class:`ConnectionPool`: a connection is kept open after a response read to its end (HTTP/1.1
persistence, RFC 9112 section 9.3) and reused only for a request whose freshly checked target
has the same scheme, host, port, policy and **pinned address**, so a pooled connection never
reaches an address the check of this request did not allow.

Each caller brings a :class:`Policy`: webhooks build theirs from the ``WEBHOOK_*`` settings
(webhooks/transport.py), everything else uses :meth:`Policy.outbound` (``OUTBOUND_*``).
``allow_private`` (development and tests) lifts the address and port rules.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import os
import select
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


def _connection_new(target: Target, policy: Policy, timeout: float) -> http.client.HTTPConnection:
    if target.scheme == "https":
        return _PinnedHTTPSConnection(target, timeout, _ssl_context(policy))
    return http.client.HTTPConnection(target.address, target.port, timeout=timeout)


_PoolKey = tuple[str, str, int, str, Policy]


def _pool_key(target: Target, policy: Policy) -> _PoolKey:
    """What a pooled connection must share with a request to be reused for it: the pinned
    address above all (the host name alone could now resolve elsewhere)."""
    return (target.scheme, target.host, target.port, target.address, policy)


class ConnectionPool:
    """Idle HTTP/1.1 connections kept for reuse, by :func:`_pool_key`; thread-safe.

    A connection goes back only after a response read to its end that did not ask to close,
    within its deadline; it is dropped after ``idle`` seconds unused, or when the server has
    closed it meanwhile (the socket reads as ready: EOF or bytes nobody asked for).
    """

    def __init__(self, *, idle: float = 4.0, per_key: int = 8, total: int = 256) -> None:
        self.idle, self.per_key, self.total = idle, per_key, total
        self._idle: dict[_PoolKey, list[tuple[float, http.client.HTTPConnection]]] = {}
        self._count = 0
        self._lock = threading.Lock()
        # A forked worker must not share its parent's sockets (nor a lock held at the fork).
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._idle, self._count, self._lock = {}, 0, threading.Lock()

    def take(self, key: _PoolKey) -> http.client.HTTPConnection | None:
        """An idle connection for ``key`` that still looks open, or None."""
        now = time.monotonic()
        while True:
            with self._lock:
                entries = self._idle.get(key)
                if not entries:
                    return None
                since, connection = entries.pop()
                self._count -= 1
            if now - since <= self.idle and connection.sock is not None and not _readable(connection.sock):
                return connection
            connection.close()

    def give(self, key: _PoolKey, connection: http.client.HTTPConnection) -> None:
        """Keep ``connection`` for the next request to ``key`` (closed when the pool is full)."""
        with self._lock:
            entries = self._idle.setdefault(key, [])
            if len(entries) < self.per_key and self._count < self.total:
                entries.append((time.monotonic(), connection))
                self._count += 1
                return
        connection.close()

    def clear(self) -> None:
        """Close every idle connection."""
        with self._lock:
            entries = [connection for idle in self._idle.values() for _, connection in idle]
            self._idle.clear()
            self._count = 0
        for connection in entries:
            connection.close()


def _readable(sock: socket.socket) -> bool:
    """Whether an idle socket has something to read: the peer closed it (or misbehaves)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


# The peer closed a kept-alive connection before answering (a race with its idle timeout):
# the request never reached the application, so it goes once more on a new connection.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


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
    pool: ConnectionPool | None = None,
) -> Response:
    """One request to the pinned address, all of it within ``timeout`` seconds.

    Redirects are returned, never followed. A body longer than ``body_limit`` is cut there
    with ``truncate`` (a webhook receiver's answer is only kept for the record), and raises
    TransportError otherwise (a document we parse must be whole). With ``pool``, a kept-alive
    connection to the same pinned address is reused and this one kept after a whole response.
    """
    started = time.monotonic()
    key = _pool_key(target, policy)
    reused = pool.take(key) if pool is not None else None
    if reused is not None:
        try:
            return _exchange(
                reused, target, method, timeout, body_limit, body, headers, truncate, pool, key, reuse=True
            )
        except _StaleConnection:
            timeout = max(0.1, timeout - (time.monotonic() - started))
    return _exchange(
        _connection_new(target, policy, timeout),
        target,
        method,
        timeout,
        body_limit,
        body,
        headers,
        truncate,
        pool,
        key,
        reuse=False,
    )


class _StaleConnection(Exception):
    """A reused connection turned out closed before any answer (retried on a new one)."""


def _exchange(
    connection: http.client.HTTPConnection,
    target: Target,
    method: str,
    timeout: float,
    body_limit: int,
    body: bytes | None,
    headers: dict[str, str] | None,
    truncate: bool,
    pool: ConnectionPool | None,
    key: _PoolKey,
    *,
    reuse: bool,
) -> Response:
    if reuse and connection.sock is not None:
        connection.timeout = timeout
        connection.sock.settimeout(timeout)
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
    keep = False
    try:
        try:
            connection.request(method, target.path, body=body, headers={**(headers or {}), "Host": target.host_header})
            raw = connection.getresponse()
        except _STALE:
            if reuse and not expired.is_set():
                raise _StaleConnection from None
            raise
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
        if pool is not None and size <= body_limit and not raw.isclosed() and raw.length == 0:
            raw.read()  # the declared length is read: this ends the response (read1 never does)
        # Kept only when the response was read to its end (nothing of it left on the wire)
        # and neither side asked to close (RFC 9112 section 9.6).
        keep = pool is not None and size <= body_limit and raw.isclosed() and not raw.will_close
        return Response(
            status=raw.status,
            headers={name.lower(): value for name, value in raw.getheaders()},
            body=content,
        )
    except (TransportError, _StaleConnection):
        raise
    except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
        if expired.is_set() or isinstance(exc, TimeoutError | socket.timeout):
            raise TransportError(f"timed out after {timeout:g}s") from None
        raise TransportError(f"{type(exc).__name__}: {exc}"[:300]) from None
    finally:
        watchdog.cancel()
        if keep and pool is not None and not expired.is_set():
            pool.give(key, connection)
        else:
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
