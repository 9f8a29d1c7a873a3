"""The tenant console: settings, domains, mailboxes, members, API keys, webhooks, event and audit logs.

Every page resolves the member's Principal first (another tenant answers 404, a suspended
tenant or an address outside the tenant's IP allowlist 403). Reads go through selectors; writes through services,
which check the permission (PermissionDenied answers 403) and write the audit entry.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from functools import wraps
from typing import Any
from uuid import UUID

from django.conf import settings
from django.contrib import messages as flash
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ObjectDoesNotExist, PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from audit import selectors as audit_selectors
from audit.exports import FORMATS as EXPORT_FORMATS
from audit.exports import audit_export_response
from mailboxes import selectors as mailbox_selectors
from mailboxes import services as mailbox_services
from mailboxes.bindings import selectors as binding_selectors
from mailplatform.streams import stream_for
from outbound import selectors as outbound_selectors
from outbound import services as outbound_services
from tenants import selectors as tenant_selectors
from tenants import services as tenant_services
from tenants.access import (
    IpNotAllowed,
    Permission,
    Principal,
    principal_ensure_usable,
    session_memberships,
    session_reaches,
)
from tenants.models import Membership
from webhooks import selectors as webhook_selectors
from webhooks import services as webhook_services
from webinbox import selectors, services
from webinbox.forms import (
    ApiKeyForm,
    DomainForm,
    InviteForm,
    MailboxForm,
    ReplayForm,
    RetentionForm,
    RoleForm,
    TenantSettingsForm,
    WebhookForm,
)

View = Callable[..., HttpResponseBase]


def _uuid(value: str) -> UUID:
    try:
        return UUID(str(value))
    except ValueError:
        raise Http404 from None


def _forbidden(request: HttpRequest, reason: str) -> HttpResponse:
    return render(request, "webinbox/console/forbidden.html", {"reason": reason}, status=403)


def _check_summary(result: Any) -> str:
    txt = "found" if result.txt_ok else "missing"
    mx = "found" if result.mx_ok else "missing"
    return f"TXT record {txt}, MX record {mx}: the domain is {result.state}."


def console_view(view: View) -> View:
    """Resolve the member's principal for ``tenant_slug`` and turn service refusals into pages."""

    @login_required
    @wraps(view)
    def wrapper(request: HttpRequest, tenant_slug: str, *args: Any, **kwargs: Any) -> HttpResponseBase:
        try:
            membership = selectors.console_membership(request.user, tenant_slug)  # type: ignore[arg-type]
        except Membership.DoesNotExist:
            raise Http404 from None
        if not session_reaches(request.session, membership.tenant_id):
            raise Http404  # a session from another tenant's SSO: this tenant needs its own sign-in
        principal = Principal.for_member(membership)
        try:
            principal_ensure_usable(principal, services.client_ip())  # TenantSuspended: a 403 page
        except IpNotAllowed as refusal:
            return _forbidden(request, str(refusal))
        request.console_principal = principal  # type: ignore[attr-defined]
        try:
            return view(request, principal, *args, **kwargs)
        except PermissionDenied as exc:
            return _forbidden(request, str(exc) or "Your role cannot do this.")
        except ObjectDoesNotExist:
            raise Http404 from None

    return wrapper


def _errors(request: HttpRequest, exc: ValidationError) -> None:
    for message in exc.messages:
        flash.error(request, message)


def _page(request: HttpRequest, principal: Principal, template: str, section: str, **context: Any) -> HttpResponse:
    context.update(
        {
            "principal": principal,
            "tenant": principal.tenant,
            "section": section,
            "can": {permission.name.lower(): principal.has_perm(permission) for permission in Permission},
        }
    )
    return render(request, f"webinbox/console/{template}", context)


@login_required
@require_GET
def console_home(request: HttpRequest) -> HttpResponse:
    memberships = list(session_memberships(request.session, tenant_selectors.memberships_of(request.user)))  # type: ignore[arg-type]
    if len(memberships) == 1:
        return redirect("webinbox:console-settings", tenant_slug=memberships[0].tenant.slug)
    return render(request, "webinbox/console/choose.html", {"memberships": memberships})


# --- Settings ---------------------------------------------------------------------------
@console_view
@require_http_methods(["GET", "POST"])
def settings_page(request: HttpRequest, principal: Principal) -> HttpResponse:
    tenant = tenant_selectors.tenant_of(principal)
    form = TenantSettingsForm(
        request.POST or None, initial={"name": tenant.name, "ip_allowlist": "\n".join(tenant.ip_allowlist)}
    )
    if request.method == "POST" and form.is_valid():
        try:
            tenant_services.tenant_update(
                principal=principal, name=form.cleaned_data["name"], ip_allowlist=form.cidrs()
            )
            flash.success(request, "Settings saved.")
            return redirect(request.path)
        except ValidationError as exc:
            _errors(request, exc)
    return _page(request, principal, "settings.html", "settings", form=form)


# --- Domains ----------------------------------------------------------------------------
@console_view
@require_http_methods(["GET", "POST"])
def domains(request: HttpRequest, principal: Principal) -> HttpResponse:
    form = DomainForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            domain = tenant_services.domain_create(principal=principal, **form.cleaned_data)
            flash.success(request, f"{domain.name} added. Create the DNS records below, then verify.")
            return redirect("webinbox:console-domain", tenant_slug=principal.tenant.slug, domain_id=domain.pk)
        except ValidationError as exc:
            _errors(request, exc)
    return _page(
        request, principal, "domains.html", "domains", form=form, domains=tenant_selectors.domain_list(principal)
    )


@console_view
@require_http_methods(["GET", "POST"])
def domain_detail(request: HttpRequest, principal: Principal, domain_id: str) -> HttpResponse:
    domain = tenant_selectors.domain_get(principal, _uuid(domain_id))
    if request.method == "POST":
        action = request.POST.get("action")
        try:
            if action == "verify":
                result = tenant_services.domain_verify(principal=principal, domain=domain)
                if result.error:
                    flash.error(request, f"DNS lookup failed: {result.error}")
                else:
                    flash.info(
                        request,
                        _check_summary(result),
                    )
            elif action == "dmarc_reject":
                enabled = request.POST.get("enabled") == "1"
                tenant_services.domain_update(principal=principal, domain=domain, dmarc_reject=enabled)
                flash.success(
                    request, "DMARC failures under p=reject are now " + ("refused." if enabled else "accepted.")
                )
            elif action == "any_local_part":
                enabled = request.POST.get("enabled") == "1"
                outbound_services.domain_sending_set(principal=principal, domain=domain, any_local_part=enabled)
                flash.success(
                    request,
                    f"Any address of {domain.name} may now send."
                    if enabled
                    else f"Only the mailboxes of {domain.name} may send now.",
                )
            elif action == "delete":
                tenant_services.domain_delete(principal=principal, domain=domain)
                flash.success(request, f"{domain.name} removed.")
                return redirect("webinbox:console-domains", tenant_slug=principal.tenant.slug)
        except ValidationError as exc:
            _errors(request, exc)
        return redirect(request.path)
    records = [("TXT", domain.name, domain.verification_record)] + [
        ("MX", domain.name, f"10 {host}") for host in settings.MX_HOSTS
    ]
    mailboxes = mailbox_selectors.mailbox_list(principal, domain_id=domain.pk)[:100]
    return _page(
        request,
        principal,
        "domain.html",
        "domains",
        domain=domain,
        records=records,
        mailboxes=mailboxes,
        any_local_part=outbound_selectors.domain_any_local_part(principal, domain),
        may_manage_domain=principal.may_manage_domain(domain.pk),
    )


# --- Mailboxes --------------------------------------------------------------------------
@console_view
@require_http_methods(["GET", "POST"])
def mailboxes(request: HttpRequest, principal: Principal) -> HttpResponse:
    domain_choices = tenant_selectors.domain_list(principal, writable=True)
    form = MailboxForm(request.POST or None)
    if request.method == "POST":
        if form.is_valid():
            try:
                domain = tenant_selectors.domain_get(principal, form.cleaned_data["domain"], writable=True)
                mailbox = mailbox_services.mailbox_create(
                    principal=principal,
                    domain=domain,
                    local_part=form.cleaned_data["local_part"] or None,
                    name=form.cleaned_data["name"],
                    retention_days=form.cleaned_data["retention_days"],
                )
                flash.success(request, f"{mailbox.address} created.")
                return redirect(request.path)
            except ValidationError as exc:
                _errors(request, exc)
        else:
            flash.error(request, "Check the form.")
    listing = mailbox_selectors.mailbox_list(principal).order_by("address")[:500]
    return _page(
        request, principal, "mailboxes.html", "mailboxes", form=form, mailboxes=listing, domains=domain_choices
    )


@console_view
@require_POST
def mailbox_action(request: HttpRequest, principal: Principal, mailbox_id: str) -> HttpResponse:
    mailbox = mailbox_selectors.mailbox_get(principal, _uuid(mailbox_id))
    if request.POST.get("action") == "delete":
        mailbox_services.mailbox_delete(principal=principal, mailbox=mailbox)
        flash.success(request, f"{mailbox.address} deleted with its mail.")
    else:
        form = RetentionForm(request.POST)
        if form.is_valid():
            try:
                mailbox_services.mailbox_update(
                    principal=principal, mailbox=mailbox, retention_days=form.cleaned_data["retention_days"]
                )
                flash.success(request, f"Retention of {mailbox.address} saved.")
            except ValidationError as exc:
                _errors(request, exc)
    return redirect("webinbox:console-mailboxes", tenant_slug=principal.tenant.slug)


# --- Members ----------------------------------------------------------------------------
@console_view
@require_http_methods(["GET", "POST"])
def members(request: HttpRequest, principal: Principal) -> HttpResponse:
    form = InviteForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            services.member_invite(principal=principal, **form.cleaned_data)
            flash.success(request, f"{form.cleaned_data['email']} invited; they sign in at /login/ with that address.")
            return redirect(request.path)
        except ValidationError as exc:
            _errors(request, exc)
    listing = tenant_selectors.membership_list(principal).order_by("user__email")
    return _page(
        request, principal, "members.html", "members", form=form, memberships=listing, roles=Membership.Role.choices
    )


@console_view
@require_POST
def member_action(request: HttpRequest, principal: Principal, membership_id: str) -> HttpResponse:
    membership = tenant_selectors.membership_list(principal).get(pk=_uuid(membership_id))
    try:
        if request.POST.get("action") == "remove":
            services.member_remove(principal=principal, membership=membership)
            flash.success(request, f"{membership.user.email} removed.")
        else:
            form = RoleForm(request.POST)
            if form.is_valid():
                services.member_invite(principal=principal, email=membership.user.email, role=form.cleaned_data["role"])
                flash.success(request, f"{membership.user.email} is now {form.cleaned_data['role']}.")
    except ValidationError as exc:
        _errors(request, exc)
    return redirect("webinbox:console-members", tenant_slug=principal.tenant.slug)


# --- API keys ---------------------------------------------------------------------------
def _key_form(principal: Principal, data: Any = None) -> ApiKeyForm:
    domains = [(str(d.pk), d.name) for d in tenant_selectors.domain_list(principal)]
    boxes = [(str(m.pk), m.address) for m in mailbox_selectors.mailbox_list(principal).order_by("address")[:500]]
    pools = [(str(p.pk), f"{p.name} ({p.domain.name})") for p in binding_selectors.pool_list(principal)[:500]]
    return ApiKeyForm(data, domains=domains, mailboxes=boxes, pools=pools, initial={"permissions": ["messages:read"]})


@console_view
@require_http_methods(["GET", "POST"])
def api_keys(request: HttpRequest, principal: Principal) -> HttpResponse:
    tenant_services.require(principal, Permission.KEYS_MANAGE)
    form = _key_form(principal, request.POST or None)
    minted = None
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            days = data.get("expires_in_days")
            key, secret = tenant_services.api_key_mint(
                principal=principal,
                name=data["name"],
                permissions=data["permissions"],
                domains=[tenant_selectors.domain_get(principal, _uuid(i)) for i in data["domains"]],
                mailboxes=[mailbox_selectors.mailbox_get(principal, _uuid(i)) for i in data["mailboxes"]],
                pools=[binding_selectors.pool_get(principal, _uuid(i)) for i in data["pools"]],
                expires_at=timezone.now() + timedelta(days=days) if days else None,
                ip_allowlist=[line.strip() for line in data["ip_allowlist"].splitlines() if line.strip()],
            )
            minted = {"key": key, "secret": secret}
            form = _key_form(principal)
        except ValidationError as exc:
            _errors(request, exc)
    listing = tenant_selectors.api_key_list(principal).order_by("-created_at")[:200]
    response = _page(
        request, principal, "keys.html", "keys", form=form, keys=listing, minted=minted, now=timezone.now()
    )
    response["Cache-Control"] = "no-store"  # the page may hold a secret shown once
    return response


@console_view
@require_POST
def api_key_revoke(request: HttpRequest, principal: Principal, key_id: str) -> HttpResponse:
    tenant_services.require(principal, Permission.KEYS_MANAGE)
    key = tenant_selectors.api_key_list(principal).get(pk=_uuid(key_id))
    tenant_services.api_key_revoke(principal=principal, api_key=key)
    flash.success(request, f"Key {key.name} revoked.")
    return redirect("webinbox:console-keys", tenant_slug=principal.tenant.slug)


# --- App passwords (IMAP and POP3 clients: mailaccess/) ---------------------------------
@console_view
@require_http_methods(["GET", "POST"])
def app_passwords(request: HttpRequest, principal: Principal) -> HttpResponse:
    from mailaccess import auth as mailaccess_auth
    from mailaccess.selectors import app_password_list

    tenant_services.require(principal, Permission.MESSAGES_READ)
    made = None
    if request.method == "POST":
        mailbox = mailbox_selectors.mailbox_get(principal, _uuid(request.POST.get("mailbox", "")))
        app_password, secret = mailaccess_auth.app_password_create(
            principal=principal,
            mailbox=mailbox,
            name=request.POST.get("name", "").strip()[:100],
            can_write=request.POST.get("can_write") == "on",
        )
        made = {"app_password": app_password, "secret": secret}
    response = _page(
        request,
        principal,
        "app_passwords.html",
        "app_passwords",
        made=made,
        app_passwords=app_password_list(principal)[:200],
        mailboxes=mailbox_selectors.mailbox_list(principal).order_by("address")[:500],
        imap=f"{settings.IMAP_HOST}:{settings.IMAP_PORT}",
        pop3=f"{settings.POP3_HOST}:{settings.POP3_PORT}",
    )
    response["Cache-Control"] = "no-store"  # the page may hold a secret shown once
    return response


@console_view
@require_POST
def app_password_revoke(request: HttpRequest, principal: Principal, app_password_id: str) -> HttpResponse:
    from mailaccess import auth as mailaccess_auth
    from mailaccess.selectors import app_password_list

    app_password = app_password_list(principal).get(pk=_uuid(app_password_id))
    mailaccess_auth.app_password_revoke(principal=principal, app_password=app_password)
    flash.success(request, f"App password {app_password.name} revoked.")
    return redirect("webinbox:console-app-passwords", tenant_slug=principal.tenant.slug)


# --- Webhooks ---------------------------------------------------------------------------
@console_view
@require_http_methods(["GET", "POST"])
def webhooks(request: HttpRequest, principal: Principal) -> HttpResponse:
    tenant_services.require(principal, Permission.WEBHOOKS_MANAGE)
    form = WebhookForm(request.POST or None)
    secret = None
    if request.method == "POST" and form.is_valid():
        try:
            _, secret = webhook_services.endpoint_create(
                principal=principal,
                url=form.cleaned_data["url"],
                description=form.cleaned_data["description"],
                event_types=form.type_list(),
            )
            form = WebhookForm()
        except ValidationError as exc:
            _errors(request, exc)
    response = _page(
        request, principal, "webhooks.html", "webhooks", form=form, secret=secret,
        endpoints=webhook_selectors.endpoint_list(principal)[:200],
    )  # fmt: skip
    response["Cache-Control"] = "no-store"
    return response


@console_view
@require_http_methods(["GET", "POST"])
def webhook_detail(request: HttpRequest, principal: Principal, endpoint_id: str) -> HttpResponse:
    tenant_services.require(principal, Permission.WEBHOOKS_MANAGE)
    endpoint = webhook_selectors.endpoint_get(principal, _uuid(endpoint_id))
    secret = None
    if request.method == "POST":
        action = request.POST.get("action")
        try:
            if action == "rotate":
                endpoint, secret = webhook_services.endpoint_secret_rotate(principal=principal, endpoint=endpoint)
            elif action in {"enable", "disable"}:
                webhook_services.endpoint_update(principal=principal, endpoint=endpoint, enabled=action == "enable")
                return redirect(request.path)
            elif action == "delete":
                webhook_services.endpoint_delete(principal=principal, endpoint=endpoint)
                return redirect("webinbox:console-webhooks", tenant_slug=principal.tenant.slug)
            elif action == "retry":
                delivery = webhook_selectors.delivery_get(principal, endpoint, _uuid(request.POST.get("delivery", "")))
                webhook_services.delivery_retry(principal=principal, delivery=delivery)
                flash.success(request, "Delivery queued again.")
                return redirect(request.path)
            elif action == "replay":
                replay = ReplayForm(request.POST)
                if replay.is_valid():
                    result = webhook_services.endpoint_replay(
                        principal=principal, endpoint=endpoint, after=replay.cleaned_data["after"]
                    )
                    flash.success(request, f"{result.enqueued} event(s) queued for replay.")
                return redirect(request.path)
        except ValidationError as exc:
            _errors(request, exc)
            return redirect(request.path)
    state = request.GET.get("state") or None
    deliveries = webhook_selectors.delivery_list(principal, endpoint, state=state).select_related("event")
    deliveries = deliveries.prefetch_related("attempt_log")[:100]
    response = _page(
        request, principal, "webhook.html", "webhooks", endpoint=endpoint, deliveries=deliveries, secret=secret,
        replay_form=ReplayForm(), state=state or "",
    )  # fmt: skip
    response["Cache-Control"] = "no-store"
    return response


# --- Event log and audit trail -----------------------------------------------------------------
@console_view
@require_GET
def events(request: HttpRequest, principal: Principal) -> HttpResponse:
    tenant_services.require(principal, Permission.EVENTS_READ)
    event_type = request.GET.get("type", "").strip()[:100]
    mailbox = request.GET.get("mailbox", "").strip()
    mailbox_id = None
    if mailbox:
        try:
            mailbox_id = UUID(mailbox)
        except ValueError:
            mailbox_id = None
    queryset = audit_selectors.event_list(principal, types=[event_type] if event_type else None, mailbox_id=mailbox_id)
    # Newest first for people; the cursor is the event's sequence number.
    before = request.GET.get("before", "")
    ordered = queryset.order_by("-seq")
    if before.isdigit():
        ordered = ordered.filter(seq__lt=int(before))
    rows = list(ordered[:51])
    older = rows[49].seq if len(rows) > 50 else None
    return _page(
        request, principal, "events.html", "events", events=rows[:50], older=older, type=event_type, mailbox=mailbox,
        mailboxes=mailbox_selectors.mailbox_list(principal).order_by("address")[:500],
    )  # fmt: skip


def _audit_entries(request: HttpRequest, principal: Principal) -> tuple[Any, str, str]:
    tenant_services.require(principal, Permission.AUDIT_READ)
    action = request.GET.get("action", "").replace("\x00", "").strip()[:100]
    actor = request.GET.get("actor", "").replace("\x00", "").strip()[:200]
    return audit_selectors.audit_entry_list(principal, action=action or None, actor=actor or None), action, actor


@console_view
@require_GET
def audit_log(request: HttpRequest, principal: Principal) -> HttpResponse:
    entries, action, actor = _audit_entries(request, principal)
    return _page(request, principal, "audit.html", "audit", entries=entries[:100], action=action, actor=actor)


@console_view
@require_GET
def audit_export(request: HttpRequest, principal: Principal) -> StreamingHttpResponse:
    """The filtered audit trail as a CSV or JSON file."""
    entries, _, _ = _audit_entries(request, principal)
    kind = request.GET.get("format", "csv")
    response = audit_export_response(entries, kind if kind in EXPORT_FORMATS else "csv")
    return stream_for(request, response, uses_database=True)
