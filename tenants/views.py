"""The browser side of per-tenant single sign-on: send to the provider, take the answer back."""

from __future__ import annotations

import logging
import time

from django.contrib.auth import login
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from tenants import selectors, services, sso
from tenants.access import session_scope_limit
from tenants.models import SsoProvider

logger = logging.getLogger(__name__)

_SESSION_KEY = "sso_flows"
_FLOW_TTL = 600  # seconds a sign-in may take at the provider
_MAX_FLOWS = 5


def _failure(request: HttpRequest, message: str, *, status: int = 403) -> HttpResponse:
    return render(request, "tenants/sso_error.html", {"message": message}, status=status)


def _safe_next(request: HttpRequest, target: str | None) -> str:
    if target and url_has_allowed_host_and_scheme(target, allowed_hosts=None, require_https=request.is_secure()):
        return target
    return "/inbox/"


@never_cache
@require_GET
def sso_start(request: HttpRequest) -> HttpResponse:
    """Redirect an address on a claimed domain to its tenant's provider."""
    email = request.GET.get("email", "").strip().lower()
    provider = selectors.sso_provider_for_email(email) if "@" in email else None
    if provider is None:
        return _failure(request, "No single sign-on is set up for this address.", status=404)
    try:
        auth = sso.authorization_request(provider, login_hint=email)
    except sso.SsoError as failure:
        logger.warning("sso start for tenant %s failed: %s", provider.tenant_id, failure)
        return _failure(request, "Your company's sign-in service did not answer. Try again in a moment.", status=502)
    flows = {
        state: flow
        for state, flow in request.session.get(_SESSION_KEY, {}).items()
        if time.time() - flow["started"] < _FLOW_TTL
    }
    flows[auth.state] = {
        "provider": str(provider.pk),
        "nonce": auth.nonce,
        "verifier": auth.code_verifier,
        "next": _safe_next(request, request.GET.get("next")),
        "started": time.time(),
    }
    request.session[_SESSION_KEY] = dict(list(flows.items())[-_MAX_FLOWS:])
    return HttpResponseRedirect(auth.url)


@never_cache
@require_GET
def sso_callback(request: HttpRequest) -> HttpResponse:
    """The provider's answer: check state, exchange the code, verify the ID token, sign in."""
    flows = request.session.get(_SESSION_KEY, {})
    flow = flows.pop(request.GET.get("state", ""), None)
    request.session[_SESSION_KEY] = flows
    if flow is None or time.time() - flow["started"] > _FLOW_TTL:
        return _failure(request, "This sign-in has expired or was not started here. Start again.", status=400)
    provider = SsoProvider.objects.select_related("tenant").filter(pk=flow["provider"], enabled=True).first()
    if provider is None:
        return _failure(request, "Single sign-on is no longer set up for this tenant.", status=400)
    if request.GET.get("error"):
        return _failure(request, "Your company's sign-in service refused the sign-in.")
    backend = None
    try:
        backend = sso.TenantOIDCBackend(provider)
        user, role = backend.authenticate_with_claims(request, nonce=flow["nonce"], code_verifier=flow["verifier"])
    except sso.SsoError as failure:
        logger.warning("sso sign-in for tenant %s refused (%s): %s", provider.tenant_id, failure.code, failure)
        services.sso_sign_in_refused(
            provider=provider,
            email=str(backend.claims.get("email", "")) if backend else "",
            user=backend.matched_user if backend else None,
            reason=failure.code,
        )
        return _failure(request, "The sign-in could not be completed. Start again, or ask your administrator.")
    services.sso_sign_in(provider=provider, user=user, role=role)
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    # Vouched for by this tenant's provider only: the session reaches this tenant alone.
    session_scope_limit(request.session, provider.tenant_id)
    return HttpResponseRedirect(flow["next"])
