"""Binds the request's correlation id, client IP and user agent for the audit trail and logs."""

from __future__ import annotations

import re
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from audit import context

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{8,64}$")


def client_ip(request: HttpRequest) -> str | None:
    """The peer address of the socket. Proxy headers are not trusted here."""
    return request.META.get("REMOTE_ADDR") or None


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
