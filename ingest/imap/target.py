"""Where a connector may connect: the IMAP host checked like a webhook URL.

The host is resolved once; every address must be globally routable (the rules of
``mailplatform.transport``), and the connection goes to the first of them while TLS keeps
the host name for SNI and the certificate check, so a second DNS answer cannot swap in an
internal address. ``CONNECTOR_ALLOW_INSECURE`` (development and tests) lifts the address
rule and allows plaintext.
"""

from __future__ import annotations

import asyncio
import re
import socket

from django.conf import settings

from mailplatform.transport import Policy, UrlRefused, address_allowed

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def policy() -> Policy:
    return Policy(allow_private=bool(settings.CONNECTOR_ALLOW_INSECURE))


def host_normalize(host: str) -> str:
    """The host as an ASCII name or an IP literal; UrlRefused when it is neither."""
    host = host.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return host
    except OSError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise UrlRefused("The host name is not valid.") from None
    labels = ascii_host.split(".")
    if not ascii_host or len(ascii_host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise UrlRefused("The host name is not valid.")
    return ascii_host


def _checked(host: str, infos: list[tuple[object, ...]]) -> str:
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))  # type: ignore[index]
    if not addresses:
        raise UrlRefused(f"The host {host} does not resolve.")
    rules = policy()
    refused = [address for address in addresses if not address_allowed(address, rules)]
    if refused:
        raise UrlRefused(f"The host {host} resolves to a non-public address ({refused[0]}).")
    return addresses[0]


def host_resolve(host: str, port: int) -> str:
    """Resolve ``host`` once and check every address; returns the one to connect to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise UrlRefused(f"The host {host} does not resolve.") from None
    return _checked(host, list(infos))


async def host_resolve_async(host: str, port: int) -> str:
    """:func:`host_resolve` on the event loop (the resolver runs in its thread pool)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), 30)
    except (OSError, UnicodeError, TimeoutError):
        raise UrlRefused(f"The host {host} does not resolve.") from None
    return _checked(host, list(infos))
