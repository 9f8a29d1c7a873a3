"""Which client a per-IP limit counts: one IPv4 address, or one IPv6 network.

An IPv6 end site is normally given a /64 or more (RFC 6177, RFC 7421 section 5), so a
client picks a fresh address from its /64 as it pleases (RFC 8981 temporary addresses do
it on their own): counted by single address, an IPv6 client would never reach a limit.
"""

from __future__ import annotations

import ipaddress

from django.conf import settings


def rate_limit_subject(address: str | None) -> str:
    """The key a per-IP limit counts ``address`` under.

    IPv4 and IPv4-mapped IPv6 (``::ffff:a.b.c.d``, RFC 4291 section 2.5.5.2): the IPv4
    address. Other IPv6: its network of RATE_LIMIT_IPV6_PREFIX bits (default /64).
    Missing or unparsable: "-" (all such requests share one counter, never none).
    """
    if not address:
        return "-"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone index
    except ValueError:
        return "-"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        network = ipaddress.IPv6Network((ip, settings.RATE_LIMIT_IPV6_PREFIX), strict=False)
        return str(network)
    return str(ip)
