"""Reads of the tenant hierarchy, always through the principal's scope."""

from __future__ import annotations

from uuid import UUID

from django.db.models import QuerySet

from tenants.access import Principal
from tenants.models import ApiKey, Domain, Membership, SsoDomain, SsoProvider, Tenant, User


def domain_list(principal: Principal, *, writable: bool = False) -> QuerySet[Domain]:
    """Domains the principal can see (a mailbox grant shows its domain, read-only).

    With ``writable``, only the domains it may change.
    """
    return principal.scope_domains(Domain.objects.all(), writable=writable)


def domain_get(principal: Principal, domain_id: UUID, *, writable: bool = False) -> Domain:
    """The domain, or Domain.DoesNotExist when it is missing or outside the scope."""
    return domain_list(principal, writable=writable).get(pk=domain_id)


def api_key_list(principal: Principal) -> QuerySet[ApiKey]:
    """The tenant's keys (key management is tenant-wide, see access.TENANT_WIDE_PERMISSIONS)."""
    return (
        principal.scope(ApiKey.objects.all())
        .prefetch_related("allowed_domains", "allowed_mailboxes")
        .select_related("created_by")
    )


def membership_list(principal: Principal) -> QuerySet[Membership]:
    return principal.scope(Membership.objects.select_related("user"))


def memberships_of(user: User) -> QuerySet[Membership]:
    """The tenants a signed-in person belongs to (active ones first)."""
    return Membership.objects.filter(user=user).select_related("tenant").order_by("tenant__status", "tenant__name")


def tenant_of(principal: Principal) -> Tenant:
    return principal.tenant


def sso_provider_for_email(email: str) -> SsoProvider | None:
    """The enabled provider that signs in people at ``email``'s domain, if one claims it."""
    domain = email.strip().lower().rpartition("@")[2]
    if not domain:
        return None
    claim = SsoDomain.objects.select_related("provider__tenant").filter(name=domain, provider__enabled=True).first()
    return claim.provider if claim is not None else None


def sso_provider_of(principal: Principal) -> SsoProvider | None:
    return SsoProvider.objects.filter(tenant=principal.tenant).prefetch_related("domains").first()
