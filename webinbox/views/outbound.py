"""The console's "Suppressions" page: addresses the tenant sends nothing to (hard bounces,
complaints, added by hand), with add and remove; through outbound's selectors and services."""

from __future__ import annotations

from django.contrib import messages as flash
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods

from outbound import selectors, services
from tenants.access import Permission, Principal
from webinbox.views.console import _errors, _page, _uuid, console_view

MAX_ROWS = 500


@console_view
@require_http_methods(["GET", "POST"])
def suppressions(request: HttpRequest, principal: Principal) -> HttpResponse:
    if not principal.has_perm(Permission.MESSAGES_READ):
        raise PermissionDenied("The suppression list needs the messages:read permission.")
    if request.method == "POST":
        try:
            if request.POST.get("action") == "remove":
                suppression = selectors.suppression_list(principal).get(pk=_uuid(request.POST.get("suppression", "")))
                services.suppression_remove(principal=principal, suppression=suppression)
                flash.success(request, f"{suppression.address} may be sent to again.")
            else:
                added = services.suppression_add(principal=principal, address=request.POST.get("address", ""))
                flash.success(request, f"{added.address} is suppressed.")
        except ValidationError as exc:
            _errors(request, exc)
        return redirect(request.path)
    rows = list(selectors.suppression_list(principal)[:MAX_ROWS])
    return _page(
        request,
        principal,
        "suppressions.html",
        "suppressions",
        suppressions=rows,
        can_change=principal.has_perm(Permission.MESSAGES_SEND),
    )
