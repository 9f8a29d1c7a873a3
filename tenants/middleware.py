"""Limits the Django admin to STAFF_IP_ALLOWLIST."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden

from audit import context
from tenants.access import ip_in, networks


class StaffIpAllowlistMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.allowed = networks(settings.STAFF_IP_ALLOWLIST)

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if self.allowed and request.path.startswith("/admin/") and not ip_in(context.current().ip, self.allowed):
            return HttpResponseForbidden("The admin is not reachable from your address.", content_type="text/plain")
        return self.get_response(request)
