"""Reads of the tenant hierarchy, always through the principal's scope."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
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
        .prefetch_related("allowed_domains", "allowed_mailboxes", "allowed_pools")
        .select_related("created_by")
    )


def membership_list(principal: Principal) -> QuerySet[Membership]:
    return principal.scope(Membership.objects.select_related("user"))


def memberships_of(user: User) -> QuerySet[Membership]:
    """The tenants a signed-in person belongs to (active ones first)."""
    return Membership.objects.filter(user=user).select_related("tenant").order_by("tenant__status", "tenant__name")


def tenant_of(principal: Principal) -> Tenant:
    return principal.tenant


def sso_domains_verified(tenant_id: Any, names: Iterable[str]) -> set[str]:
    """Which of ``names`` the tenant has proven, by its DNS TXT record, to be its own right now.

    Only these may be claimed by the tenant's SSO: verified once (out of pending) and the TXT
    record still seen at the latest check. A domain whose record disappears stops signing
    anyone in at its next check.
    """
    verified = Domain.objects.filter(tenant=tenant_id, name__in=list(names), txt_ok=True).exclude(
        state=Domain.State.PENDING
    )
    return set(verified.values_list("name", flat=True))


def sso_provider_for_email(email: str) -> SsoProvider | None:
    """The enabled provider that signs in people at ``email``'s domain, if one claims it and its
    tenant has verified the domain."""
    domain = email.strip().lower().rpartition("@")[2]
    if not domain:
        return None
    claim = SsoDomain.objects.select_related("provider__tenant").filter(name=domain, provider__enabled=True).first()
    if claim is None or domain not in sso_domains_verified(claim.provider.tenant_id, [domain]):
        return None
    return claim.provider


def sso_provider_of(principal: Principal) -> SsoProvider | None:
    return SsoProvider.objects.filter(tenant=principal.tenant).prefetch_related("domains").first()
