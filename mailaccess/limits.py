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
