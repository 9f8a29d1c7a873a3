from __future__ import annotations

from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from mailboxes.selectors import mailbox_list
from tenants.access import Principal
from tenants.selectors import memberships_of
from webinbox.services import login_link_consume


@require_GET
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "webinbox/home.html")


@never_cache
@require_GET
def login_link(request: HttpRequest, token: str) -> HttpResponse:
    user = login_link_consume(token=token)
    if user is None:
        response = render(request, "webinbox/login_link_invalid.html", status=404)
    else:
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        response = redirect("webinbox:inbox")
    response["Referrer-Policy"] = "no-referrer"
    return response


@login_required
@require_GET
def inbox(request: HttpRequest) -> HttpResponse:
    tenants = []
    for membership in memberships_of(request.user):  # type: ignore[arg-type]
        principal = Principal.for_member(membership)
        tenants.append({"tenant": membership.tenant, "role": membership.role, "mailboxes": mailbox_list(principal)})
    return render(request, "webinbox/inbox.html", {"tenants": tenants})
