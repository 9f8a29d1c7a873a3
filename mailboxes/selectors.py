"""Reads of mailboxes, always through the principal's scope."""

from __future__ import annotations

from uuid import UUID

from django.db.models import QuerySet

from mailboxes.models import Mailbox
from tenants.access import Principal


def mailbox_list(principal: Principal, *, domain_id: UUID | None = None) -> QuerySet[Mailbox]:
    """Mailboxes the principal can see, optionally on one domain."""
    queryset = principal.scope(Mailbox.objects.select_related("domain"), domain_field="domain", mailbox_field="pk")
    if domain_id is not None:
        queryset = queryset.filter(domain_id=domain_id)
    return queryset


def mailbox_get(principal: Principal, mailbox_id: UUID) -> Mailbox:
    """The mailbox, or Mailbox.DoesNotExist when it is missing or outside the scope."""
    return mailbox_list(principal).get(pk=mailbox_id)
