"""Writes of IMAP pull connectors: create, change, delete, resync, reconnect, test.

The control plane (API, console) calls these with the caller's principal; the runner's own
writes (state changes, cursors, dedupe rows) live in :mod:`ingest.imap.leases`. Secrets are
encrypted on the way in (``tenants.crypto``) and never leave: not in answers, audit
entries, events or logs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from audit.services import audit_entry_record, event_record
from ingest.imap import target
from ingest.models import Connector, ConnectorFolder
from mailboxes.models import Mailbox
from mailplatform.transport import UrlRefused
from tenants import crypto
from tenants.access import Permission, Principal
from tenants.models import Membership

logger = logging.getLogger(__name__)

MAX_FOLDERS = 20
DEFAULT_PORTS = {Connector.TlsMode.IMPLICIT: 993, Connector.TlsMode.STARTTLS: 143, Connector.TlsMode.NONE: 143}
OAUTH_TYPES = {Connector.AuthType.XOAUTH2, Connector.AuthType.OAUTHBEARER}


def _require(principal: Principal, mailbox: Mailbox | None = None) -> None:
    if not principal.has_perm(Permission.CONNECTORS_MANAGE):
        raise PermissionDenied(f"This action needs the {Permission.CONNECTORS_MANAGE} permission.")


def summary(connector: Connector) -> dict[str, Any]:
    """What an audit entry or an event may say about a connector: no secret."""
    return {
        "name": connector.name,
        "mailbox_id": str(connector.mailbox_id),
        "host": connector.host,
        "port": connector.port,
        "tls_mode": connector.tls_mode,
        "auth_type": connector.auth_type,
        "username": connector.username,
        "folders": list(connector.folders),
        "active": connector.active,
    }


def folders_normalize(folders: list[str] | None) -> list[str]:
    names = list(dict.fromkeys(name.strip() for name in (folders or []) if name and name.strip()))
    if not names:
        names = ["INBOX"]
    if len(names) > MAX_FOLDERS:
        raise ValidationError({"folders": f"At most {MAX_FOLDERS} folders."}, code="invalid")
    for name in names:
        if len(name) > 500 or any(ch in name for ch in "\r\n\0"):
            raise ValidationError({"folders": f"{name[:50]!r} is not a folder name."}, code="invalid")
    return names


def _endpoint_check(connector: Connector) -> None:
    """The host resolves to allowed addresses, and plaintext only where insecure is allowed."""
    try:
        connector.host = target.host_normalize(connector.host)
        target.host_resolve(connector.host, connector.port)
    except UrlRefused as exc:
        raise ValidationError({"host": str(exc)}, code="host_refused") from None
    if connector.tls_mode == Connector.TlsMode.NONE and not settings.CONNECTOR_ALLOW_INSECURE:
        raise ValidationError(
            {"tls_mode": "Plaintext IMAP is not allowed; use implicit TLS or STARTTLS."}, code="tls_required"
        )


def _mailbox_check(principal: Principal, mailbox_id: UUID | str) -> Mailbox:
    from mailboxes import selectors as mailbox_selectors

    try:
        return mailbox_selectors.mailbox_get(principal, mailbox_id)  # type: ignore[arg-type]
    except (Mailbox.DoesNotExist, ValidationError, ValueError):
        raise ValidationError({"mailbox": "No such mailbox."}, code="invalid") from None


def _secrets_apply(connector: Connector, changes: dict[str, Any]) -> None:
    if "password" in changes:
        password = changes.pop("password") or ""
        connector.password_encrypted = crypto.encrypt(password) if password else ""
    if "oauth_client_secret" in changes:
        secret = changes.pop("oauth_client_secret") or ""
        connector.oauth_client_secret_encrypted = crypto.encrypt(secret) if secret else ""
    if "oauth_refresh_token" in changes:
        token = changes.pop("oauth_refresh_token") or ""
        connector.oauth_refresh_token_encrypted = crypto.encrypt(token) if token else ""
        connector.oauth_access_token_encrypted = ""
        connector.oauth_access_token_expires_at = None


def _auth_check(connector: Connector) -> None:
    if connector.auth_type == Connector.AuthType.PASSWORD and not connector.password_encrypted:
        raise ValidationError({"password": "A password is required for password authentication."}, code="required")
    if connector.auth_type in OAUTH_TYPES:
        from ingest.imap import oauth

        oauth.provider_apply(connector)
        if not connector.oauth_token_url or not connector.oauth_client_id:
            raise ValidationError(
                {"oauth_token_url": "OAuth2 needs a provider preset or a token URL and a client id."},
                code="required",
            )


_EDITABLE = {
    "name",
    "mailbox",
    "host",
    "port",
    "tls_mode",
    "auth_type",
    "username",
    "password",
    "folders",
    "active",
    "oauth_provider",
    "oauth_client_id",
    "oauth_client_secret",
    "oauth_authorize_url",
    "oauth_token_url",
    "oauth_scope",
    "oauth_refresh_token",
}


def connector_create(*, principal: Principal, mailbox: UUID | str, **fields: Any) -> Connector:
    """Create a connector pulling into ``mailbox`` (which the principal must see)."""
    _require(principal)
    unknown = set(fields) - _EDITABLE
    if unknown:
        raise ValidationError({name: "This field cannot be set." for name in unknown}, code="read_only")
    target_mailbox = _mailbox_check(principal, mailbox)
    tls_mode = fields.get("tls_mode") or Connector.TlsMode.IMPLICIT
    connector = Connector(
        tenant=principal.tenant,
        mailbox=target_mailbox,
        tls_mode=tls_mode,
        port=fields.get("port") or DEFAULT_PORTS.get(tls_mode, 993),
        state=Connector.State.CONNECTING,
    )
    changes = dict(fields)
    changes.pop("tls_mode", None)
    changes.pop("port", None)
    _secrets_apply(connector, changes)
    for name, value in changes.items():
        if name == "folders":
            value = folders_normalize(value)
        setattr(connector, name, value if value is not None else getattr(connector, name))
    connector.folders = folders_normalize(connector.folders)
    _endpoint_check(connector)
    _auth_check(connector)
    if not connector.active:
        connector.state = Connector.State.DISABLED
    connector.full_clean()
    with transaction.atomic():
        connector.save()
        audit_entry_record(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action="connector.create",
            resource_type="connector",
            resource_id=connector.pk,
            after=summary(connector),
        )
    return connector


def connector_update(*, principal: Principal, connector: Connector, **changes: Any) -> Connector:
    """Change a connector; the runner restarts its session with the new settings."""
    _require(principal)
    unknown = set(changes) - _EDITABLE
    if unknown:
        raise ValidationError({name: "This field cannot be changed." for name in unknown}, code="read_only")
    before = summary(connector)
    if "mailbox" in changes:
        connector.mailbox = _mailbox_check(principal, changes.pop("mailbox"))
    credentials_changed = bool({"password", "oauth_refresh_token", "username", "auth_type"} & set(changes))
    _secrets_apply(connector, changes)
    for name, value in changes.items():
        if name == "folders":
            value = folders_normalize(value)
        setattr(connector, name, value)
    connector.folders = folders_normalize(connector.folders)
    if {"host", "port", "tls_mode"} & set(changes):
        _endpoint_check(connector)
    _auth_check(connector)
    if not connector.active:
        connector.state = Connector.State.DISABLED
    elif connector.state == Connector.State.DISABLED or (
        credentials_changed and connector.state == Connector.State.AUTH_FAILED
    ):
        connector.state = Connector.State.CONNECTING
    connector.generation = F("generation") + 1  # type: ignore[assignment]
    connector.full_clean(exclude=["generation"])
    with transaction.atomic():
        connector.save()
        audit_entry_record(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action="connector.update",
            resource_type="connector",
            resource_id=connector.pk,
            before=before,
            after=summary(connector),
        )
    connector.refresh_from_db()
    return connector


def _connector_lock(connector: Connector) -> None:
    """Lock the connector row before any of its folder rows: the order of the runner's take
    (:func:`ingest.imap.leases.messages_take`), so a write here and a take never deadlock."""
    list(Connector.objects.select_for_update().filter(pk=connector.pk).values_list("pk"))


def connector_delete(*, principal: Principal, connector: Connector) -> None:
    """Delete a connector and its cursors; mail already taken in stays."""
    _require(principal)
    with transaction.atomic():
        _connector_lock(connector)  # the cascade deletes the folder rows before the connector's
        audit_entry_record(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action="connector.delete",
            resource_type="connector",
            resource_id=connector.pk,
            before=summary(connector),
        )
        connector.delete()


def connector_resync(*, principal: Principal, connector: Connector) -> Connector:
    """Forget the folder cursors: the runner takes the newest IMAP_INITIAL_WINDOW messages of
    each folder again; what was already taken in is recognised (Message-ID, sha256) and skipped."""
    _require(principal)
    with transaction.atomic():
        _connector_lock(connector)
        ConnectorFolder.objects.filter(connector=connector).delete()
        Connector.objects.filter(pk=connector.pk).update(
            resync_requested_at=timezone.now(), generation=F("generation") + 1, updated_at=timezone.now()
        )
        audit_entry_record(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action="connector.resync",
            resource_type="connector",
            resource_id=connector.pk,
        )
        event_record(
            tenant_id=connector.tenant_id,
            type="connector.resynced",
            data={"connector": str(connector.pk), "host": connector.host},
            mailbox_id=connector.mailbox_id,
        )
    connector.refresh_from_db()
    return connector


def connector_reconnect(*, principal: Principal, connector: Connector) -> Connector:
    """Try again after ``auth_failed`` (the credentials were fixed elsewhere) or a backoff."""
    _require(principal)
    with transaction.atomic():
        Connector.objects.filter(pk=connector.pk).update(
            state=Connector.State.CONNECTING if connector.active else Connector.State.DISABLED,
            generation=F("generation") + 1,
            updated_at=timezone.now(),
        )
        audit_entry_record(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action="connector.reconnect",
            resource_type="connector",
            resource_id=connector.pk,
        )
    connector.refresh_from_db()
    return connector


# --- Test: log in and list the folders ---------------------------------------------------
@dataclass
class TestResult:
    ok: bool
    stage: str  # "resolve", "connect", "tls", "login", "list", "done"
    folders: list[str] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)
    error_kind: str = ""
    error: str = ""


def connector_test(*, principal: Principal, connector: Connector) -> TestResult:
    """Log in with the stored settings and list the folders; says which step failed."""
    _require(principal)
    from ingest.imap.session import credentials_login, open_connection

    access_token: str | None = None
    if connector.auth_type in OAUTH_TYPES:
        from ingest.imap import oauth

        try:
            fresh = oauth.access_token_fresh(connector)
            if fresh is None:
                access_token, expires, rotated = oauth.access_token_refresh(connector)
                _access_token_store(connector, access_token, expires, rotated)
            else:
                access_token = fresh[0]
        except oauth.OAuthError as exc:
            failed = TestResult(ok=False, stage="login", error_kind=exc.kind, error=str(exc)[:300])
            return _test_audited(principal, connector, failed)

    async def run() -> TestResult:
        result = TestResult(ok=False, stage="resolve")
        from ingest.imap.client import ImapError

        client = None
        try:
            result.stage = "connect"
            client = await open_connection(connector)
            result.stage = "login"
            await credentials_login(client, connector, access_token)
            result.capabilities = sorted(client.capabilities)
            result.stage = "list"
            result.folders = await client.list_folders()
            result.stage = "done"
            result.ok = True
        except UrlRefused as exc:
            result.stage, result.error_kind, result.error = "resolve", "host_refused", str(exc)
        except ImapError as exc:
            result.error_kind, result.error = exc.kind, str(exc)[:300]
            if exc.kind == "tls":
                result.stage = "tls"
        except Exception as exc:  # an OAuth refresh or anything unexpected: said, not raised
            result.error_kind, result.error = getattr(exc, "kind", "error"), str(exc)[:300] or type(exc).__name__
        finally:
            if client is not None:
                await client.logout()
        return result

    return _test_audited(principal, connector, asyncio.run(run()))


def _test_audited(principal: Principal, connector: Connector, result: TestResult) -> TestResult:
    audit_entry_record(
        tenant_id=principal.tenant_id,
        actor=principal.actor,
        action="connector.test",
        resource_type="connector",
        resource_id=connector.pk,
        after={"ok": result.ok, "stage": result.stage, "error_kind": result.error_kind},
    )
    return result


def _access_token_store(connector: Connector, access_token: str, expires: Any, rotated: str | None) -> None:
    updates: dict[str, Any] = {
        "oauth_access_token_encrypted": crypto.encrypt(access_token),
        "oauth_access_token_expires_at": expires,
    }
    if rotated:
        updates["oauth_refresh_token_encrypted"] = crypto.encrypt(rotated)
    Connector.objects.filter(pk=connector.pk).update(**updates)


# --- Admin notice --------------------------------------------------------------------------
def admins_notify_auth_failed(tenant_id: UUID, connector_id: UUID, label: str, reason: str) -> None:
    """E-mail the tenant's owners and admins that a connector stopped (never the secret)."""
    recipients = sorted(
        Membership.objects.filter(
            tenant_id=tenant_id, role__in=[Membership.Role.OWNER, Membership.Role.ADMIN], user__is_active=True
        ).values_list("user__email", flat=True)
    )
    if not recipients:
        return
    send_mail(
        subject=f"Mail connector stopped: {label}",
        message=(
            f"The IMAP connector {connector_id} ({label}) can no longer sign in, so no mail is being "
            f"pulled from it.\n\nReason: {reason}\n\n"
            "Update its password or reconnect its OAuth account in the console "
            f"({settings.BASE_URL}/console/connectors/), or POST "
            f"{settings.BASE_URL}/api/v1/connectors/{connector_id}/reconnect/.\n"
        ),
        from_email=None,
        recipient_list=recipients,
        fail_silently=False,
    )
