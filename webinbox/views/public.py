"""Public pages: the home page and its temporary inboxes, and passwordless sign-in."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages as flash
from django.contrib.auth import login, logout
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from mailboxes.selectors import message_get
from tenants.access import TenantSuspended, session_scope_clear, tenant_ensure_active
from webinbox import selectors, services
from webinbox.forms import LoginForm, TagsForm
from webinbox.models import TempInbox
from webinbox.views import common


@require_http_methods(["GET", "POST"])
def home(request: HttpRequest) -> HttpResponse:
    """The landing page; its one button creates a temporary inbox (POST)."""
    if request.method == "POST":
        try:
            _, token = services.temp_inbox_create(ip=services.client_ip())
        except services.RateLimited:
            response = render(request, "webinbox/home.html", {"rate_limited": True}, status=429)
            return response
        return redirect("webinbox:temp-inbox", token=token)
    return render(request, "webinbox/home.html", {"ttl_hours": settings.TEMP_INBOX_TTL // 3600})


# --- Sign-in ---------------------------------------------------------------------------
@never_cache
@require_http_methods(["GET", "POST"])
def login_page(request: HttpRequest) -> HttpResponse:
    """Ask for an address; always answer "check your inbox", the same bytes either way."""
    form = LoginForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        email = form.cleaned_data["email"]
        if selectors.sso_tenant_for_email(email) is not None:
            # Continue with the company's own provider (a domain-level fact, not who exists).
            # A page that navigates on, not a redirect: Chromium holds every redirect that
            # follows this form's POST to the page's form-action 'self' (CSP Level 3,
            # form-action), and the provider is another origin.
            start_url = f"{reverse('tenants:sso-start')}?{urlencode({'email': email})}"
            return render(request, "webinbox/login_sso.html", {"start_url": start_url})
        # The link will work only in this browser: it carries this cookie's secret (every
        # answer sets one, so the answer does not tell whether the address exists).
        binding = secrets.token_urlsafe(24)
        services.login_request(email=email, ip=services.client_ip(), binding=binding)
        response = render(request, "webinbox/login_sent.html", {"ttl_minutes": settings.LOGIN_LINK_TTL // 60})
        response.set_cookie(
            LOGIN_BINDING_COOKIE,
            binding,
            max_age=settings.LOGIN_LINK_TTL,
            path="/login/",
            secure=settings.SESSION_COOKIE_SECURE,
            httponly=True,
            samesite="Lax",
        )
    else:
        response = render(request, "webinbox/login.html", {"form": form}, status=400 if form.errors else 200)
    return response


_PENDING_LINK = "_mp_login_link"
LOGIN_BINDING_COOKIE = "mp_login_binding"


@never_cache
@require_http_methods(["GET", "POST"])
def login_link(request: HttpRequest, token: str) -> HttpResponse:
    """The landing page of a sign-in link (``Referrer-Policy: no-referrer``).

    GET moves the token out of the URL into the session and shows a "Sign in" button, so a
    mail scanner that fetches links cannot use the link up (and a no-referrer page, whose
    form posts would carry ``Origin: null``, never hosts the form). POST, from a script,
    signs in directly.
    """
    if request.method == "GET":
        request.session[_PENDING_LINK] = token[:200]
        response = redirect("webinbox:login-confirm")
        response["Referrer-Policy"] = "no-referrer"
        return response
    return _sign_in(request, token[:200])


@never_cache
@require_http_methods(["GET", "POST"])
def login_confirm(request: HttpRequest) -> HttpResponse:
    if request.method == "GET":
        return render(request, "webinbox/login_confirm.html", {"pending": _PENDING_LINK in request.session})
    return _sign_in(request, str(request.session.pop(_PENDING_LINK, "")))


def _sign_in(request: HttpRequest, token: str) -> HttpResponse:
    binding = request.COOKIES.get(LOGIN_BINDING_COOKIE, "")[:100]
    user = services.login_link_consume(token=token, binding=binding) if token else None
    if user is None:
        if token:
            services.login_failure_record(reason="invalid, used or expired link")
        response = render(request, "webinbox/login_link_invalid.html", status=404)
    else:
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        session_scope_clear(request.session)  # the link proves the person: all their tenants
        services.login_record(user=user, method="link")
        response = redirect("webinbox:inbox")
    response["Referrer-Policy"] = "no-referrer"
    return response


@require_POST
def logout_view(request: HttpRequest) -> HttpResponse:
    logout(request)
    return redirect("webinbox:home")


@login_required
@require_POST
def logout_everywhere(request: HttpRequest) -> HttpResponse:
    services.sign_out_everywhere(user=request.user)  # type: ignore[arg-type]
    logout(request)
    return redirect("webinbox:login")


# --- Temporary inboxes ------------------------------------------------------------------
def _not_found(request: HttpRequest) -> HttpResponse:
    """The one answer for an unknown, malformed, deleted or expired inbox link."""
    response = render(request, "webinbox/temp_not_found.html", status=404)
    response["Referrer-Policy"] = "no-referrer"
    response["Cache-Control"] = "no-store"
    return response


def _open(token: str) -> TempInbox | None:
    """The live inbox the token opens; TenantSuspended if its tenant is suspended (every door's rule)."""
    inbox = selectors.temp_inbox_by_token(token[:128])
    if inbox is not None:
        tenant_ensure_active(inbox.mailbox.tenant)
    return inbox


def _temp_door(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A temporary-inbox page: a suspended tenant answers 403, private like the page itself."""

    @wraps(view)
    def wrapper(request: HttpRequest, token: str, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            return view(request, token, *args, **kwargs)
        except TenantSuspended as refusal:
            return _private(render(request, "403.html", {"exception": str(refusal)}, status=403))

    return wrapper


def _private(response: HttpResponse) -> HttpResponse:
    # The token in the URL is the credential: never send it to another site as a Referer
    # (same-origin, not no-referrer: a no-referrer page's forms post "Origin: null", which
    # CSRF protection rightly refuses), and never cache it.
    response["Referrer-Policy"] = "same-origin"
    response["Cache-Control"] = "no-store"
    response["X-Robots-Tag"] = "noindex"
    return response


@_temp_door
@require_GET
def temp_inbox(request: HttpRequest, token: str) -> HttpResponse:
    inbox = _open(token)
    if inbox is None:
        return _not_found(request)
    principal = selectors.temp_inbox_principal(inbox)
    context: dict[str, Any] = {
        "temp": inbox,
        "mailbox": inbox.mailbox,
        "base": reverse("webinbox:temp-inbox", kwargs={"token": token}),
        "can_extend": inbox.extensions < settings.TEMP_INBOX_EXTENSIONS,
        "extension_hours": settings.TEMP_INBOX_EXTENSION // 3600,
        **common.list_context(principal, request, mailbox_id=inbox.mailbox_id),
    }
    context["poll_url"] = reverse("webinbox:temp-poll", kwargs={"token": token})
    context["message_base"] = context["base"] + "m/"
    return _private(common.render_list(request, "webinbox/temp_inbox.html", context))


@_temp_door
@require_GET
def temp_poll(request: HttpRequest, token: str) -> HttpResponse:
    inbox = _open(token)
    if inbox is None:
        return _not_found(request)
    principal = selectors.temp_inbox_principal(inbox)
    return _private(common.poll_response(principal, request, mailbox_id=inbox.mailbox_id))


@_temp_door
@require_POST
def temp_extend(request: HttpRequest, token: str) -> HttpResponse:
    inbox = _open(token)
    if inbox is None:
        return _not_found(request)
    try:
        services.temp_inbox_extend(temp_inbox=inbox)
        flash.success(request, "Extended.")
    except ValidationError as exc:
        flash.error(request, " ".join(exc.messages))
    return _private(redirect("webinbox:temp-inbox", token=token))


@_temp_door
@require_POST
def temp_delete(request: HttpRequest, token: str) -> HttpResponse:
    inbox = _open(token)
    if inbox is None:
        return _not_found(request)
    services.temp_inbox_delete(temp_inbox=inbox)
    return _private(render(request, "webinbox/temp_deleted.html"))


def _temp_message(token: str, message_id: str) -> tuple[TempInbox, Any] | None:
    inbox = _open(token)
    if inbox is None:
        return None
    try:
        from uuid import UUID

        message = message_get(selectors.temp_inbox_principal(inbox), UUID(message_id))
    except (ValueError, ObjectDoesNotExist):
        return None
    return inbox, message


@_temp_door
@require_http_methods(["GET", "POST"])
def temp_message(request: HttpRequest, token: str, message_id: str) -> HttpResponse:
    found = _temp_message(token, message_id)
    if found is None:
        return _not_found(request)
    inbox, message = found
    principal = selectors.temp_inbox_principal(inbox)
    base = reverse("webinbox:temp-inbox", kwargs={"token": token})
    if request.method == "POST":
        return _private(_message_action(request, principal, message, back=base, here=request.path))
    if not message.is_read:
        from mailboxes.services import message_update

        message_update(principal=principal, message=message, is_read=True)
    context = {
        "temp": inbox,
        "mailbox": inbox.mailbox,
        "back_url": base,
        "can_write": True,
        "tags_form": TagsForm(initial={"tags": ", ".join(message.tags)}),
        **common.message_context(message, request, body_url=request.path + "body/"),
    }
    return _private(render(request, "webinbox/message.html", context))


@_temp_door
@require_GET
def temp_message_body(request: HttpRequest, token: str, message_id: str) -> HttpResponse:
    found = _temp_message(token, message_id)
    if found is None:
        return _not_found(request)
    return _private(common.message_body(request, found[1]))


def _message_action(request: HttpRequest, principal: Any, message: Any, *, back: str, here: str) -> HttpResponse:
    """Mark read/unread, tag, delete: the POST side of a message page (inbox and temporary)."""
    from mailboxes.services import message_delete, message_update

    action = request.POST.get("action", "")
    if action == "delete":
        message_delete(principal=principal, message=message, reason="deleted in the web inbox")
        flash.success(request, "Message deleted.")
        return redirect(back)
    if action in {"read", "unread"}:
        message_update(principal=principal, message=message, is_read=action == "read")
    elif action == "tags":
        form = TagsForm(request.POST)
        if form.is_valid():
            message_update(principal=principal, message=message, tags=form.tag_list())
    return redirect(here)
