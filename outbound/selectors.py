"""Reads of outbound mail, always through the principal's scope."""

from __future__ import annotations

from uuid import UUID

from django.db.models import QuerySet

from outbound.models import DkimKey, DomainSending, OutboundMessage, Suppression
from tenants.access import Principal
from tenants.models import Domain


def domain_for_keys(principal: Principal, domain_id: UUID, *, writable: bool = False) -> Domain:
    """The domain whose DKIM keys are asked for; Domain.DoesNotExist outside the scope."""
    return principal.scope_domains(Domain.objects.all(), writable=writable).get(pk=domain_id)


def dkim_key_list(principal: Principal, domain: Domain) -> QuerySet[DkimKey]:
    return principal.scope(DkimKey.objects.select_related("domain"), domain_field="domain").filter(domain=domain)


def outbound_message_list(principal: Principal) -> QuerySet[OutboundMessage]:
    """Messages sent by the tenant, newest first; a scoped key sees its domains' and mailboxes'."""
    return (
        principal.scope(OutboundMessage.objects.all(), domain_field="domain", mailbox_field="mailbox")
        .defer("content")
        .prefetch_related("recipients")
    )


def suppression_list(principal: Principal) -> QuerySet[Suppression]:
    """The tenant's suppression list (tenant-wide: a key scoped to a domain or mailbox sees none)."""
    return principal.scope(Suppression.objects.all())


def domain_any_local_part(principal: Principal, domain: Domain) -> bool:
    """Whether any address of ``domain`` may send (its DomainSending policy), or only its
    mailboxes' (no policy row is the default: only mailboxes). ``domain`` is one the caller
    got through the principal's scope; whoever may see it may read its policy."""
    return DomainSending.objects.filter(tenant_id=principal.tenant_id, domain=domain, any_local_part=True).exists()
