"""Writes to the tenant hierarchy. Each checks the principal, validates, saves and audits."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.text import slugify

from audit.services import Actor, audit_entry_record
from tenants import keys
from tenants.access import ALL_PERMISSIONS, TENANT_WIDE_PERMISSIONS, Permission, Principal
from tenants.models import ApiKey, Domain, Membership, Tenant, User

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def require(principal: Principal, permission: Permission) -> None:
    if not principal.has_perm(permission):
        raise PermissionDenied(f"This action needs the {permission} permission.")


def domain_name_normalize(name: str) -> str:
    """Lowercase A-label form of a domain name, or ValidationError saying what is wrong."""
    candidate = name.strip().rstrip(".").lower()
    if not candidate:
        raise ValidationError({"name": "Enter a domain name."}, code="invalid")
    try:
        candidate = candidate.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValidationError({"name": "This is not a valid domain name."}, code="invalid") from None
    labels = candidate.split(".")
    if len(candidate) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise ValidationError({"name": "This is not a valid domain name."}, code="invalid")
    if labels[-1].isdigit():
        raise ValidationError({"name": "An IP address is not a domain name."}, code="invalid")
    return candidate


def _summary(instance: Any, fields: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(instance, name) for name in fields}


# --- Users and tenants -----------------------------------------------------------------
def user_get_or_create(*, email: str, name: str = "") -> User:
    email = User.objects.normalize_email(email.strip()).lower()
    user = User.objects.filter(email__iexact=email).first()
    if user is None:
        user = User.objects.create_user(email=email, name=name)
    return user


def tenant_create(
    *, name: str, actor: Actor, plan: str = Tenant.Plan.DEVELOPER, slug: str | None = None, owner: User | None = None
) -> Tenant:
    """Create a tenant, optionally with its first owner."""
    base = slugify(slug or name)[:50] or "tenant"
    candidate, counter = base, 1
    while Tenant.objects.filter(slug=candidate).exists():
        counter += 1
        candidate = f"{base}-{counter}"
    tenant = Tenant(name=name, slug=candidate, plan=plan)
    tenant.full_clean()
    with transaction.atomic():
        tenant.save()
        if owner is not None:
            Membership.objects.create(user=owner, tenant=tenant, role=Membership.Role.OWNER)
        audit_entry_record(
            tenant_id=tenant.pk,
            actor=actor,
            action="tenant.create",
            resource_type="tenant",
            resource_id=tenant.pk,
            after=_summary(tenant, ["name", "slug", "plan"]),
        )
    return tenant


_TENANT_EDITABLE = ("name",)


def tenant_update(*, principal: Principal, **changes: Any) -> Tenant:
    require(principal, Permission.TENANT_MANAGE)
    tenant = principal.tenant
    before = _summary(tenant, _TENANT_EDITABLE)
    for name, value in changes.items():
        if name not in _TENANT_EDITABLE:
            raise ValidationError({name: "This field cannot be changed."}, code="read_only")
        setattr(tenant, name, value)
    tenant.full_clean()
    with transaction.atomic():
        tenant.save(update_fields=[*changes, "updated_at"])
        audit_entry_record(
            tenant_id=tenant.pk,
            actor=principal.actor,
            action="tenant.update",
            resource_type="tenant",
            resource_id=tenant.pk,
            before=before,
            after=_summary(tenant, _TENANT_EDITABLE),
        )
    return tenant


def tenant_set_status(*, tenant: Tenant, status: str, actor: Actor, reason: str = "") -> Tenant:
    """Suspend or reactivate a tenant (staff). A suspended tenant's mail and API are refused."""
    if status not in Tenant.Status.values:
        raise ValidationError({"status": "Unknown status."}, code="invalid")
    before = _summary(tenant, ["status", "status_reason"])
    tenant.status = status
    tenant.status_reason = reason if status == Tenant.Status.SUSPENDED else ""
    with transaction.atomic():
        tenant.save(update_fields=["status", "status_reason", "updated_at"])
        audit_entry_record(
            tenant_id=tenant.pk,
            actor=actor,
            action="tenant.suspend" if status == Tenant.Status.SUSPENDED else "tenant.activate",
            resource_type="tenant",
            resource_id=tenant.pk,
            before=before,
            after=_summary(tenant, ["status", "status_reason"]),
        )
    return tenant


def membership_set(*, tenant: Tenant, user: User, role: str, actor: Actor) -> Membership:
    """Add a member, or change an existing member's role."""
    if role not in Membership.Role.values:
        raise ValidationError({"role": "Unknown role."}, code="invalid")
    with transaction.atomic():
        membership, created = Membership.objects.get_or_create(tenant=tenant, user=user, defaults={"role": role})
        if not created and membership.role == role:
            return membership
        before = None if created else {"role": membership.role}
        if not created:
            membership.role = role
            membership.save(update_fields=["role"])
        audit_entry_record(
            tenant_id=tenant.pk,
            actor=actor,
            action="membership.create" if created else "membership.update",
            resource_type="membership",
            resource_id=membership.pk,
            before=before,
            after={"user": user.email, "role": role},
        )
    return membership


# --- Domains ----------------------------------------------------------------------------
_DOMAIN_FIELDS = ("name", "recipient_policy", "state")


def domain_create(*, principal: Principal, name: str, recipient_policy: str = Domain.RecipientPolicy.REJECT) -> Domain:
    """Add a domain to the principal's tenant (pending until verified)."""
    require(principal, Permission.DOMAINS_MANAGE)
    if not principal.is_tenant_wide:
        raise PermissionDenied("A key limited to some domains or mailboxes cannot add domains.")
    domain = Domain(tenant=principal.tenant, name=domain_name_normalize(name), recipient_policy=recipient_policy)
    domain.full_clean()
    try:
        with transaction.atomic():
            domain.save(force_insert=True)
            audit_entry_record(
                tenant_id=principal.tenant.pk,
                actor=principal.actor,
                action="domain.create",
                resource_type="domain",
                resource_id=domain.pk,
                after=_summary(domain, _DOMAIN_FIELDS),
            )
    except IntegrityError:
        raise ValidationError({"name": "This domain is already registered."}, code="unique") from None
    return domain


def domain_update(*, principal: Principal, domain: Domain, recipient_policy: str | None = None) -> Domain:
    require(principal, Permission.DOMAINS_MANAGE)
    before = _summary(domain, _DOMAIN_FIELDS)
    if recipient_policy is not None:
        domain.recipient_policy = recipient_policy
    domain.full_clean()
    with transaction.atomic():
        domain.save(update_fields=["recipient_policy", "updated_at"])
        audit_entry_record(
            tenant_id=domain.tenant_id,
            actor=principal.actor,
            action="domain.update",
            resource_type="domain",
            resource_id=domain.pk,
            before=before,
            after=_summary(domain, _DOMAIN_FIELDS),
        )
    return domain


def domain_delete(*, principal: Principal, domain: Domain) -> None:
    """Remove a domain. Refused while it still has mailboxes, so no mail is lost by accident."""
    require(principal, Permission.DOMAINS_MANAGE)
    if domain.mailboxes.exists():  # type: ignore[attr-defined]
        raise ValidationError(
            "Delete the domain's mailboxes first; deleting a domain never deletes mail.", code="domain_not_empty"
        )
    with transaction.atomic():
        audit_entry_record(
            tenant_id=domain.tenant_id,
            actor=principal.actor,
            action="domain.delete",
            resource_type="domain",
            resource_id=domain.pk,
            before=_summary(domain, _DOMAIN_FIELDS),
        )
        domain.delete()


# --- API keys ---------------------------------------------------------------------------
def api_key_mint(
    *,
    principal: Principal,
    name: str,
    permissions: Iterable[str],
    domains: Iterable[Domain] = (),
    mailboxes: Iterable[Any] = (),
    expires_at: datetime | None = None,
    created_by: User | None = None,
) -> tuple[ApiKey, str]:
    """Mint a key and return it with its secret, which is never available again.

    The new key can hold only permissions and resources the minting principal holds itself.
    """
    require(principal, Permission.KEYS_MANAGE)
    wanted = sorted(set(permissions))
    unknown = [perm for perm in wanted if perm not in ALL_PERMISSIONS]
    if unknown:
        raise ValidationError({"permissions": f"Unknown permission: {', '.join(unknown)}."}, code="invalid")
    if not wanted:
        raise ValidationError({"permissions": "Give the key at least one permission."}, code="required")
    if not principal.can_grant(wanted):
        raise PermissionDenied("A key cannot be given permissions its creator does not hold.")
    domains, mailboxes = list(domains), list(mailboxes)
    for resource in [*domains, *mailboxes]:
        if resource.tenant_id != principal.tenant.pk:
            raise ValidationError({"resources": "Unknown resource."}, code="invalid")
    if (domains or mailboxes) and TENANT_WIDE_PERMISSIONS & set(wanted):
        raise ValidationError(
            {"permissions": "keys:manage and tenant:manage need a key for the whole tenant."}, code="invalid"
        )
    if not principal.is_tenant_wide and not (domains or mailboxes):
        raise PermissionDenied("A scoped key can only mint keys within its own scope.")
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationError({"expires_at": "The expiry must be in the future."}, code="invalid")

    generated = keys.generate()
    api_key = ApiKey(
        tenant=principal.tenant,
        name=name,
        prefix=generated.prefix,
        secret_hash=generated.secret_hash,
        last_four=generated.last_four,
        permissions=wanted,
        expires_at=expires_at,
        created_by=created_by or principal.user,
    )
    api_key.full_clean()
    with transaction.atomic():
        api_key.save(force_insert=True)
        api_key.allowed_domains.set(domains)
        api_key.allowed_mailboxes.set(mailboxes)
        audit_entry_record(
            tenant_id=principal.tenant.pk,
            actor=principal.actor,
            action="api_key.create",
            resource_type="api_key",
            resource_id=api_key.pk,
            after={
                "name": name,
                "permissions": wanted,
                "domains": [str(domain.pk) for domain in domains],
                "mailboxes": [str(mailbox.pk) for mailbox in mailboxes],
                "expires_at": expires_at,
                "last_four": api_key.last_four,
            },
        )
    return api_key, generated.secret


def api_key_revoke(*, principal: Principal | None, api_key: ApiKey, actor: Actor | None = None) -> ApiKey:
    """Revoke a key at once. Revoking twice is harmless."""
    if principal is not None:
        require(principal, Permission.KEYS_MANAGE)
    if api_key.revoked_at is None:
        with transaction.atomic():
            api_key.revoked_at = timezone.now()
            api_key.save(update_fields=["revoked_at"])
            audit_entry_record(
                tenant_id=api_key.tenant_id,
                actor=actor or (principal.actor if principal else Actor.system()),
                action="api_key.revoke",
                resource_type="api_key",
                resource_id=api_key.pk,
                after={"name": api_key.name, "last_four": api_key.last_four},
            )
    return api_key


class KeyRejected(Exception):
    """The presented key does not authenticate; ``code`` says why (for the error body)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def api_key_authenticate(*, secret: str, ip: str | None) -> ApiKey:
    """The active key for ``secret``, recording its use; KeyRejected otherwise.

    last_used_at is written at most once per API_KEY_LAST_USED_RESOLUTION seconds, so a
    busy key does not turn every request into a write.
    """
    from django.conf import settings

    if not keys.is_well_formed(secret):
        raise KeyRejected("invalid_api_key", "The API key is not valid.")
    candidates = ApiKey.objects.select_related("tenant").filter(prefix=keys.lookup_prefix(secret))
    api_key = next((key for key in candidates if keys.matches(secret, key.secret_hash)), None)
    if api_key is None:
        raise KeyRejected("invalid_api_key", "The API key is not valid.")
    if api_key.is_revoked:
        raise KeyRejected("api_key_revoked", "The API key has been revoked.")
    if api_key.is_expired:
        raise KeyRejected("api_key_expired", "The API key has expired.")
    now = timezone.now()
    stale = api_key.last_used_at is None or (now - api_key.last_used_at).total_seconds() > (
        settings.API_KEY_LAST_USED_RESOLUTION
    )
    if stale or api_key.last_used_ip != ip:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now, last_used_ip=ip)
        api_key.last_used_at, api_key.last_used_ip = now, ip
    return api_key
