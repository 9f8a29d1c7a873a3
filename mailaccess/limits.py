"""Connection limits of the IMAP and POP3 servers: per client IP and per credential."""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings


def is_loopback(ip: str | None) -> bool:
    try:
        return ip is not None and ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@dataclass
class ConnectionLimits:
    """Counts of one server process; ``take_*`` answers None when the limit is reached."""

    per_ip: int = field(default_factory=lambda: settings.MAILACCESS_MAX_CONNECTIONS_PER_IP)
    per_key: int = field(default_factory=lambda: settings.MAILACCESS_MAX_CONNECTIONS_PER_KEY)
    by_ip: Counter[str] = field(default_factory=Counter)
    by_key: Counter[str] = field(default_factory=Counter)

    def take_ip(self, ip: str | None) -> str | None:
        key = ip or "?"
        if self.by_ip[key] >= self.per_ip:
            return None
        self.by_ip[key] += 1
        return key

    def release_ip(self, key: str) -> None:
        self.by_ip[key] -= 1
        if self.by_ip[key] <= 0:
            del self.by_ip[key]

    def take_key(self, principal_pk: Any) -> str | None:
        key = str(principal_pk)
        if self.by_key[key] >= self.per_key:
            return None
        self.by_key[key] += 1
        return key

    def release_key(self, key: str) -> None:
        self.by_key[key] -= 1
        if self.by_key[key] <= 0:
            del self.by_key[key]


def proxy_trusted(peer_ip: str | None) -> bool:
    """Whether a PROXY header from this socket peer may be believed (MAILACCESS_TRUSTED_PROXIES)."""
    try:
        address = ipaddress.ip_address((peer_ip or "").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    networks = [ipaddress.ip_network(cidr, strict=False) for cidr in settings.MAILACCESS_TRUSTED_PROXIES]
    return any(address.version == network.version and address in network for network in networks)


async def client_address(reader: Any, peer_ip: str | None) -> tuple[bool, str | None]:
    """(go on?, the client's address): with MAILACCESS_PROXY_PROTOCOL, the PROXY v1/v2 header
    of a trusted balancer names the client; any other peer is disconnected before the greeting
    (HAProxy's PROXY protocol spec, section 2), never served with a forged address."""
    if not settings.MAILACCESS_PROXY_PROTOCOL:
        return True, peer_ip
    if not proxy_trusted(peer_ip):
        return False, peer_ip
    import asyncio

    from aiosmtpd.proxy_protocol import get_proxy

    try:
        proxy = await asyncio.wait_for(get_proxy(reader), 5.0)
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        return False, peer_ip
    if not proxy or not proxy.valid:
        return False, peer_ip
    source = proxy.src_addr
    return True, str(source) if source else peer_ip
