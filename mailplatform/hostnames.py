"""The name our mail servers give: SMTP greetings, EHLO replies, our authserv-id.

``SMTP_HOSTNAME`` defaults to ``BASE_URL``'s host, which on a development machine is an
address (``127.0.0.1``). RFC 5321 sections 4.1.1.1 and 4.1.3 want a domain name or an
address literal in greetings, and an authserv-id (RFC 8601 section 2.5) names the host that
verified, so a name is taken from ``MX_HOSTS`` when ``SMTP_HOSTNAME`` is an address.
"""

from __future__ import annotations

import functools
import ipaddress

from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(name: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


def mail_hostname() -> str | None:
    """SMTP_HOSTNAME when it is a name; else the first MX host that is one; else None."""
    return _mail_hostname(str(settings.SMTP_HOSTNAME), tuple(settings.MX_HOSTS))


@functools.lru_cache(maxsize=16)
def _mail_hostname(smtp_hostname: str, mx_hosts: tuple[object, ...]) -> str | None:
    # Kept per value: every parsed message asks for the authserv-id several times.
    configured = smtp_hostname.strip().rstrip(".")
    if configured and not configured.startswith("[") and _address(configured) is None:
        return configured
    for host in mx_hosts:
        if host and _address(str(host)) is None:
            return str(host).rstrip(".")
    return None


def greeting_hostname() -> str:
    """The name in a 220 greeting and an EHLO reply: a domain name, else an address literal
    (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``), never a bare address."""
    name = mail_hostname()
    if name is not None:
        return name
    configured = str(settings.SMTP_HOSTNAME).strip().rstrip(".")
    if configured.startswith("["):
        return configured
    ip = _address(configured)
    if ip is None:
        return configured
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


def authserv_id() -> str:
    """Our authserv-id in Authentication-Results: the mail host's name, lower case."""
    return (mail_hostname() or str(settings.SMTP_HOSTNAME).strip("[]")).lower()
