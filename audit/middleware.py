"""Binds the request's correlation id, client IP and user agent for the audit trail and logs."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from functools import lru_cache

from django.conf import settings
from django.http import HttpRequest, HttpResponse

from audit import context

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{8,64}$")


@lru_cache(maxsize=1)
def _trusted_proxies(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def _is_trusted(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in _trusted_proxies(tuple(settings.TRUSTED_PROXIES)))


def client_ip(request: HttpRequest) -> str | None:
    """The client's address: the socket's peer, unless that peer is a trusted proxy.

    Behind trusted proxies, X-Forwarded-For is read right to left and the first address
    that is not a trusted proxy is the client; anything further left was written by the
    client itself and could be forged.
    """
    remote = request.META.get("REMOTE_ADDR") or None
    if remote is None or not settings.TRUSTED_PROXIES or not _is_trusted(remote):
        return remote
    hops = [hop.strip() for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return remote  # a malformed hop: trust nothing beyond the proxy itself
        if not _is_trusted(hop):
            return hop
    return hops[0] if hops else remote


class RequestContextMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        offered = request.headers.get("X-Request-ID", "")
        correlation_id = offered if _REQUEST_ID.match(offered) else context.new_correlation_id()
        with context.bind(
            correlation_id=correlation_id,
            ip=client_ip(request),
            user_agent=request.headers.get("User-Agent", "")[:256],
        ):
            response = self.get_response(request)
        response["X-Request-ID"] = correlation_id
        return response
