"""Who a mail client is: the mailbox address plus an API key, a temporary inbox's token, or
an app password; failed logins are rate-limited per client IP and per address, and audited."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from uuid import UUID

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

from audit import context as audit_context
from audit.models import AuditEntry
from audit.services import Actor, audit_entry_record
from mailaccess.models import AppPassword
from mailboxes.models import Mailbox
from mailboxes.selectors import mailbox_list
from mailplatform import ratelimit
from tenants import keys
from tenants.access import Permission, Principal, _allowlists, principal_ensure_usable
from tenants.services import KeyRejected, api_key_authenticate
from webinbox.selectors import temp_inbox_by_token, temp_inbox_principal

logger = logging.getLogger(__name__)

APP_PASSWORD_PREFIX = "mpa_"  # noqa: S105 - the shape of an app password, not one
_FAILURES = "mailaccess-login-failure"


@dataclass(frozen=True)
class Access:
    """A signed-in mail client: the principal, and the mailboxes it may open (by folder name)."""

    principal: Principal
    login: str
    mailboxes: dict[str, UUID]  # folder name -> mailbox id; "INBOX" is the login's own mailbox
    can_write: bool

    @property
    def tenant_id(self) -> UUID:
        return self.principal.tenant_id


class LoginRefused(Exception):
    """The credentials do not open the mailbox; ``code`` is for the log and the audit."""

    def __init__(self, code: str, message: str = "Invalid credentials") -> None:
        super().__init__(message)
        self.code = code


def app_password_create(
    *, principal: Principal, mailbox: Mailbox, name: str, can_write: bool = True
) -> tuple[AppPassword, str]:
    """Make an app password for one mailbox the principal may see; the secret is returned once."""
    if not principal.has_perm(Permission.MESSAGES_READ) or (
        can_write and not principal.has_perm(Permission.MESSAGES_WRITE)
    ):
        raise PermissionDenied("You may not create app passwords with these rights.")
    if not mailbox_list(principal).filter(pk=mailbox.pk).exists():
        raise Mailbox.DoesNotExist
    random_part = secrets.token_urlsafe(27)
    secret = f"{APP_PASSWORD_PREFIX}{random_part}"
    with transaction.atomic():
        app_password = AppPassword.objects.create(
            tenant_id=mailbox.tenant_id,
            mailbox=mailbox,
            name=name[:100] or "mail client",
            prefix=random_part[:8],
            secret_hash=keys.digest(secret),
            last_four=secret[-4:],
            can_write=can_write,
            created_by=principal.user,
        )
        audit_entry_record(
            tenant_id=mailbox.tenant_id,
            actor=principal.actor,
            action="app_password.create",
            resource_type="mailbox",
            resource_id=mailbox.pk,
            after={"name": app_password.name, "last_four": app_password.last_four, "can_write": can_write},
        )
    return app_password, secret


def app_password_revoke(*, principal: Principal, app_password: AppPassword) -> None:
    """Revoke an app password: the next login with it fails (open sessions end at their next command)."""
    if app_password.tenant_id != principal.tenant_id:
        raise AppPassword.DoesNotExist
    with transaction.atomic():
        if AppPassword.objects.filter(pk=app_password.pk, revoked_at__isnull=True).update(revoked_at=timezone.now()):
            audit_entry_record(
                tenant_id=app_password.tenant_id,
                actor=principal.actor,
                action="app_password.revoke",
                resource_type="mailbox",
                resource_id=app_password.mailbox_id,
                before={"name": app_password.name, "last_four": app_password.last_four},
            )


def _app_password_principal(app_password: AppPassword) -> Principal:
    mailbox = app_password.mailbox
    permissions = {Permission.MESSAGES_READ}
    if app_password.can_write:
        permissions.add(Permission.MESSAGES_WRITE)
    return Principal(
        tenant=mailbox.tenant,
        permissions=frozenset(permissions),
        actor=Actor.system(f"app password {app_password.name} (mpa_…{app_password.last_four})"),
        granted_domain_ids=frozenset(),
        granted_mailbox_ids=frozenset({mailbox.pk}),
        mailbox_domain_ids=frozenset({mailbox.domain_id}),
        ip_allowlists=_allowlists(mailbox.tenant.ip_allowlist),
    )


def _principal_for(address: str, password: str, ip: str | None) -> Principal:
    if password.startswith(keys.PREFIX):
        try:
            api_key = api_key_authenticate(secret=password, ip=ip)
        except KeyRejected as rejected:
            raise LoginRefused(rejected.code) from None
        return Principal.for_api_key(api_key)
    if password.startswith(APP_PASSWORD_PREFIX):
        prefix = password[len(APP_PASSWORD_PREFIX) : len(APP_PASSWORD_PREFIX) + 8]
        candidates = AppPassword.objects.select_related("mailbox", "mailbox__tenant").filter(
            prefix=prefix, mailbox__address=address
        )
        found = next((each for each in candidates if keys.matches(password, each.secret_hash)), None)
        if found is None:
            raise LoginRefused("invalid_password")
        if found.is_revoked:
            raise LoginRefused("app_password_revoked")
        AppPassword.objects.filter(pk=found.pk).update(last_used_at=timezone.now())
        return _app_password_principal(found)
    temp_inbox = temp_inbox_by_token(password) if password else None
    if temp_inbox is None or temp_inbox.mailbox.address != address:
        raise LoginRefused("invalid_password")
    return temp_inbox_principal(temp_inbox)


def login(*, username: str, password: str, ip: str | None, protocol: str) -> Access:
    """Sign a mail client in; LoginRefused (recorded and counted) otherwise.

    The user name is the mailbox address. A tenant-wide key also sees the tenant's other
    mailboxes as folders named by their address; a scoped key exactly its grants.
    """
    address = username.strip().lower()
    limit, window = settings.MAILACCESS_LOGIN_FAILURES, settings.MAILACCESS_LOGIN_WINDOW
    if (
        ratelimit.used(_FAILURES, f"ip:{ratelimit.rate_limit_subject(ip)}", window=window) >= limit
        or ratelimit.used(_FAILURES, f"address:{address}", window=window) >= limit
    ):
        raise LoginRefused("rate_limited", "Too many failed logins, try again later")
    try:
        principal = _principal_for(address, password, ip)
        try:
            principal_ensure_usable(principal, ip)
        except PermissionDenied as denied:
            raise LoginRefused(getattr(denied, "code", "forbidden")) from None
        if not principal.has_perm(Permission.MESSAGES_READ):
            raise LoginRefused("missing_permission")
        visible = list(mailbox_list(principal).order_by("address")[: settings.MAILACCESS_MAX_FOLDERS])
        own = next((mailbox for mailbox in visible if mailbox.address == address), None)
        if own is None:
            own = mailbox_list(principal).filter(address=address).first()
        if own is None:
            raise LoginRefused("mailbox_not_visible")
    except LoginRefused as refused:
        _failure_record(address, ip, refused.code, protocol)
        raise
    folders = {"INBOX": own.pk}
    for mailbox in visible:
        if mailbox.pk != own.pk:
            folders[mailbox.address] = mailbox.pk
    return Access(
        principal=principal,
        login=address,
        mailboxes=folders,
        can_write=principal.has_perm(Permission.MESSAGES_WRITE),
    )


def _failure_record(address: str, ip: str | None, code: str, protocol: str) -> None:
    window = settings.MAILACCESS_LOGIN_WINDOW
    ratelimit.hit(_FAILURES, f"ip:{ratelimit.rate_limit_subject(ip)}", limit=10**9, window=window)
    ratelimit.hit(_FAILURES, f"address:{address}", limit=10**9, window=window)
    logger.warning("%s login refused for %s from %s: %s", protocol, address, ip, code)
    from mailaccess import metrics

    metrics.AUTH_FAILURES.labels(protocol, code).inc()
    tenant_ids = set(Mailbox.objects.filter(address=address).values_list("tenant_id", flat=True)[:5])
    with audit_context.bind(ip=ip, user_agent=protocol):
        for tenant_id in tenant_ids:
            audit_entry_record(
                tenant_id=tenant_id,
                actor=Actor(type=AuditEntry.ActorType.USER, label=address),
                action="mailaccess.login_failed",
                resource_type="mailbox",
                resource_id=address,
                after={"protocol": protocol, "reason": code},
            )
