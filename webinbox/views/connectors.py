"""The console's "Connectors" page: IMAP accounts pulled into a mailbox, with add, test,
resync, reconnect, pause/resume, delete and "connect with OAuth"; through ingest's selectors
and services (the same rules as the API: connectors:manage, secrets never shown)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages as flash
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods, require_POST

from ingest.imap import oauth, selectors, services
from ingest.imap.oauth import PRESETS
from ingest.models import Connector
from mailboxes import selectors as mailbox_selectors
from tenants.access import Permission, Principal
from webinbox.views.console import _errors, _page, _uuid, console_view


class ConnectorForm(forms.Form):
    mailbox = forms.UUIDField()
    host = forms.CharField(max_length=253)
    port = forms.IntegerField(min_value=1, max_value=65535, required=False)
    tls_mode = forms.ChoiceField(choices=Connector.TlsMode.choices, initial=Connector.TlsMode.IMPLICIT)
    auth_type = forms.ChoiceField(choices=Connector.AuthType.choices, initial=Connector.AuthType.PASSWORD)
    username = forms.CharField(max_length=320)
    password = forms.CharField(max_length=1000, required=False, widget=forms.PasswordInput)
    folders = forms.CharField(max_length=2000, required=False, help_text="comma-separated; empty: INBOX")
    name = forms.CharField(max_length=200, required=False)
    oauth_provider = forms.ChoiceField(choices=[("", "custom"), *((p, p) for p in PRESETS)], required=False)
    oauth_client_id = forms.CharField(max_length=500, required=False)
    oauth_client_secret = forms.CharField(max_length=1000, required=False, widget=forms.PasswordInput)


def _require(principal: Principal) -> None:
    if not principal.has_perm(Permission.CONNECTORS_MANAGE):
        raise PermissionDenied("Connectors need the connectors:manage permission.")


@console_view
@require_http_methods(["GET", "POST"])
def connectors(request: HttpRequest, principal: Principal) -> HttpResponse:
    _require(principal)
    form = ConnectorForm(request.POST or None)
    if request.method == "POST":
        if form.is_valid():
            data: dict[str, Any] = {key: value for key, value in form.cleaned_data.items() if value not in ("", None)}
            data["folders"] = [name.strip() for name in form.cleaned_data["folders"].split(",") if name.strip()]
            try:
                connector = services.connector_create(principal=principal, **data)
                flash.success(request, f"Connector for {connector.username} on {connector.host} added.")
                return redirect(request.path)
            except ValidationError as exc:
                _errors(request, exc)
        else:
            flash.error(request, "Check the form.")
    listing = selectors.connector_list(principal).order_by("-created_at")[:500]
    return _page(
        request,
        principal,
        "connectors.html",
        "connectors",
        form=form,
        connectors=listing,
        mailboxes=mailbox_selectors.mailbox_list(principal).order_by("address")[:500],
        tls_modes=Connector.TlsMode.choices,
        auth_types=Connector.AuthType.choices,
        presets=list(PRESETS),
    )


@console_view
@require_POST
def connector_action(request: HttpRequest, principal: Principal, connector_id: str) -> HttpResponse:
    _require(principal)
    connector = selectors.connector_get(principal, _uuid(connector_id))
    action = request.POST.get("action", "")
    label = f"{connector.username} on {connector.host}"
    try:
        if action == "test":
            result = services.connector_test(principal=principal, connector=connector)
            if result.ok:
                flash.success(request, f"{label}: signed in; folders: {', '.join(result.folders[:20])}.")
            else:
                flash.error(request, f"{label}: {result.stage} failed ({result.error_kind}): {result.error}")
        elif action == "resync":
            services.connector_resync(principal=principal, connector=connector)
            flash.success(request, f"{label}: the newest messages are looked at again.")
        elif action == "reconnect":
            services.connector_reconnect(principal=principal, connector=connector)
            flash.success(request, f"{label}: reconnecting.")
        elif action in {"pause", "resume"}:
            services.connector_update(principal=principal, connector=connector, active=action == "resume")
            flash.success(request, f"{label}: {'resumed' if action == 'resume' else 'paused'}.")
        elif action == "delete":
            services.connector_delete(principal=principal, connector=connector)
            flash.success(request, f"{label}: deleted (the mail taken in stays).")
        elif action == "oauth":
            return redirect(oauth.authorization_start(connector))
    except ValidationError as exc:
        _errors(request, exc)
    except oauth.OAuthError as exc:
        flash.error(request, f"{label}: {exc}.")
    return redirect("webinbox:console-connectors", tenant_slug=principal.tenant.slug)
