"""DNS lookups for domain verification and MX monitoring (dnspython).

The resolver's address, port and timeout are settings, so tests point it at their own
authoritative server on loopback and production at a trusted recursive resolver.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
from django.conf import settings


class LookupFailed(Exception):
    """The DNS did not answer (timeout, SERVFAIL): nothing can be concluded."""


@dataclass(frozen=True)
class DomainRecords:
    txt: tuple[str, ...]
    mx: tuple[str, ...]  # exchange host names, lowercase, without the trailing dot
    # RFC 5321 section 5.1: with no MX record, mail goes to the domain's A/AAAA address.
    implicit_mx: bool


def resolver_new(*, timeout: float | None = None) -> dns.resolver.Resolver:
    """A resolver on DNS_RESOLVERS (the system's when empty), without a cache of its own."""
    resolver = dns.resolver.Resolver(configure=not settings.DNS_RESOLVERS)
    if settings.DNS_RESOLVERS:
        resolver.nameservers = [host for host, _ in settings.DNS_RESOLVERS]
        resolver.port = settings.DNS_RESOLVERS[0][1]
    resolver.lifetime = timeout if timeout is not None else settings.DNS_TIMEOUT
    resolver.timeout = resolver.lifetime
    resolver.cache = None
    return resolver


def _resolver() -> dns.resolver.Resolver:
    return resolver_new()


def _answer(resolver: dns.resolver.Resolver, name: str, rdtype: str) -> list[object]:
    try:
        return list(resolver.resolve(name, rdtype, raise_on_no_answer=False) or [])
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as exc:
        raise LookupFailed(f"{rdtype} {name}: {type(exc).__name__}") from exc
    except dns.exception.DNSException as exc:
        raise LookupFailed(f"{rdtype} {name}: {exc}") from exc


def domain_records(name: str) -> DomainRecords:
    """The TXT and MX records of ``name``; LookupFailed when the DNS cannot tell."""
    resolver = _resolver()
    txt = tuple(
        b"".join(record.strings).decode("utf-8", "replace")  # type: ignore[attr-defined]
        for record in _answer(resolver, name, "TXT")
    )
    mx = tuple(
        sorted(
            str(record.exchange).rstrip(".").lower()  # type: ignore[attr-defined]
            for record in _answer(resolver, name, "MX")
        )
    )
    return DomainRecords(txt=txt, mx=mx, implicit_mx=not mx)


def mx_exchanges(name: str) -> list[tuple[int, str]]:
    """``name``'s MX records as (preference, host), best first (RFC 5321 section 5.1);
    empty when it has none. LookupFailed when the DNS cannot tell."""
    resolver = _resolver()
    return sorted(
        (int(record.preference), str(record.exchange).rstrip(".").lower())  # type: ignore[attr-defined]
        for record in _answer(resolver, name, "MX")
    )


def host_addresses(name: str) -> list[str]:
    """The IPv4 and IPv6 addresses of a host name (A, then AAAA)."""
    resolver = _resolver()
    return [str(record) for rdtype in ("A", "AAAA") for record in _answer(resolver, name, rdtype)]
